"""Tests of the phantom cohort (`anatomydt make-dataset brain`): files, manifest, determinism and the
simulated biology (growth, treatment response, mass effect, resection cavities). Real simulations
and real files; no mocks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AnatomyDTLib.brain.atlas import load_atlas_arrays
from AnatomyDTLib.brain.cohort import load_cohort, make_brain_cohort
from AnatomyDTLib.brain.phantom import BIOLOGY_RANGES, case_rng, sample_biology, simulate_patient
from AnatomyDTLib.cli import main as cli_main
from AnatomyDTLib.errors import OutputExistsError, ParameterError
from AnatomyDTLib.io import read_image, read_labelmap
from AnatomyDTLib.plan import load_plan
from AnatomyDTLib.schema import BRAIN_SCHEMA

TUMOUR = BRAIN_SCHEMA.tumour_index
LV = BRAIN_SCHEMA.index("lateral_ventricles")
PATTERNS = ["none", "stupp", "surgery_stupp", "rt_only"]


def _dice(a, b):
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    make_brain_cohort(out, 4, seed=7, patterns=PATTERNS)
    return out


def test_cohort_files_match_the_manifest(cohort):
    out = cohort
    patients = load_cohort(out)
    assert [p.case for p in patients] == [f"case_{i:04d}" for i in range(4)]
    atlas = load_atlas_arrays(2)
    description = json.loads((out / "cohort.json").read_text())
    assert description["n"] == 4 and description["seed"] == 7
    for patient in patients:
        assert 3 <= len(patient.timepoints) <= 5
        days = patient.days
        assert days[0] == 0.0 and all(b - a >= 14 for a, b in zip(days, days[1:])) and days[-1] <= 180
        plan = patient.load_plan()
        assert patient.plan.name == "plan.json"
        for tp in patient.timepoints:
            seg = read_labelmap(tp.segmentation)
            flair, g = read_image(tp.image)
            seg.geometry.check_matches(g, "phantom scan", shape=seg.shape, other_shape=flair.shape)
            seg.geometry.check_matches(atlas.geometry, "phantom vs atlas", shape=seg.shape,
                                       other_shape=atlas.labels.shape)
            assert tp.anatomy == "complete" and tp.source == "phantom"
            tumour_ml = (seg.labels == TUMOUR).sum() * seg.geometry.voxel_volume_ml
            assert tumour_ml == pytest.approx(tp.tumour_ml, abs=0.01)
            present = set(np.unique(seg.labels).tolist())
            assert {0, 2, 3, 4} <= present
            if tp.index == 0:
                assert TUMOUR in present and 3.0 <= tumour_ml <= 70.0
                # the lesion is the brightest tissue on the FLAIR-like image
                assert np.median(flair[seg.labels == TUMOUR]) > 1.3 * np.median(flair[seg.labels == 2])
        truth = json.loads((patient.plan.parent / "truth.json").read_text())
        assert truth["pattern"] == PATTERNS[int(patient.case[-1])]
        for name, (lo, hi) in BIOLOGY_RANGES.items():
            assert lo <= truth["biology"][name] <= hi
        if truth["pattern"] in ("stupp", "surgery_stupp", "rt_only"):
            rt = plan.radiotherapy
            assert rt.n_fractions == 30 and rt.total_dose_gy == pytest.approx(60.0)
            assert (patient.plan.parent / "dose_map.nii.gz").is_file()
        if truth["pattern"] in ("stupp", "surgery_stupp"):
            assert len(plan.chemotherapy) == 1 and len(plan.chemotherapy[0].windows) == 7


def test_surgery_leaves_a_dark_cavity(cohort):
    out = cohort
    patient = next(p for p in load_cohort(out) if p.case == "case_0002")  # surgery + Stupp
    plan = patient.load_plan()
    surgery_day = plan.surgeries[0].day
    mask, _ = read_image(patient.plan.parent / "resection_mask.nii.gz")
    mask = mask > 0.5
    assert mask.sum() * 0.008 > 1.0  # > 1 mL removed
    before = read_labelmap(patient.timepoints[0].segmentation).labels
    assert (before[mask] == TUMOUR).mean() > 0.8  # surgery removed tumour
    post = [tp for tp in patient.timepoints if tp.day > surgery_day]
    assert post
    first = post[0]
    labels = read_labelmap(first.segmentation).labels
    flair, _ = read_image(first.image)
    assert (labels[mask] == BRAIN_SCHEMA.background_index).mean() > 0.5
    assert flair[mask].mean() < 0.35  # fluid-filled: dark on FLAIR
    truth = json.loads((patient.plan.parent / "truth.json").read_text())
    assert all(s["cavity_ml"] > 1.0 for s in truth["scans"] if s["day"] > surgery_day)


def test_growth_treatment_response_and_mass_effect():
    atlas_vent = load_atlas_arrays(2).labels == LV
    ratios = {"none": [], "stupp": []}
    vent_dice = []
    for i in range(3):
        for pattern in ratios:
            patient = simulate_patient(case_rng(11, i), pattern=pattern)
            scans = patient.scans
            ratios[pattern].append(scans[-1].tumour_ml / scans[0].tumour_ml)
            if pattern == "none":
                vent_dice.append([_dice(s.labels == LV, atlas_vent) for s in (scans[0], scans[-1])])
                assert scans[-1].max_displacement_mm > scans[0].max_displacement_mm > 0.5
    # untreated tumours grow in every case; under Stupp they shrink on average
    assert min(ratios["none"]) > 1.2
    assert np.mean(ratios["stupp"]) < 0.8
    assert np.mean(ratios["stupp"]) < 0.5 * np.mean(ratios["none"])
    # a growing tumour pushes the ventricles further from their atlas position
    vent_dice = np.array(vent_dice)
    assert (vent_dice < 1.0).all()
    assert vent_dice[:, 1].mean() < vent_dice[:, 0].mean()


def test_biology_overrides_keep_the_patient_and_change_only_the_overridden_response():
    """Overriding the radiosensitivity keeps the site, schedule, baseline and pre-treatment scans,
    and changes what follows radiotherapy; overriding with the patient's own value changes nothing."""
    truth = simulate_patient(case_rng(11, 0), pattern="stupp")
    same = simulate_patient(case_rng(11, 0), pattern="stupp",
                            biology_overrides={"alpha_per_gy": truth.biology.alpha_per_gy})
    for a, b in zip(truth.scans, same.scans):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.flair, b.flair)
    sensitive = simulate_patient(case_rng(11, 0), pattern="stupp", biology_overrides={"alpha_per_gy": 0.07,
                                                                                       "hypoxic_oer": 1.0})
    resistant = simulate_patient(case_rng(11, 0), pattern="stupp", biology_overrides={"alpha_per_gy": 0.03})
    assert sensitive.biology.alpha_per_gy == 0.07 and sensitive.biology.hypoxic_oer == 1.0
    assert sensitive.biology.proliferation_per_day == truth.biology.proliferation_per_day
    assert sensitive.site_index == truth.site_index and sensitive.plan == truth.plan
    rt_start = truth.plan["radiotherapy"]["start_day"]
    assert truth.scans[0].day < rt_start < truth.scans[-1].day
    np.testing.assert_array_equal(sensitive.scans[0].labels, resistant.scans[0].labels)
    assert sensitive.scans[-1].tumour_ml < resistant.scans[-1].tumour_ml
    with pytest.raises(ParameterError, match="Unknown biology"):
        simulate_patient(case_rng(11, 0), biology_overrides={"alpha": 0.05})
    with pytest.raises(ParameterError, match="finite"):
        simulate_patient(case_rng(11, 0), biology_overrides={"alpha_per_gy": float("nan")})


def test_determinism_and_case_independence_of_n(cohort, tmp_path):
    cli_out = tmp_path / "cli"
    assert cli_main(["make-dataset", "brain", "--n", "2", "--seed", "3", "--out", str(cli_out)]) == 0
    single = tmp_path / "single"
    single.mkdir()
    (single / "junk.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        make_brain_cohort(single, 1, seed=3)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    make_brain_cohort(single, 1, seed=3, force=True)
    assert not (single / "junk.txt").exists()
    a, b = load_cohort(cli_out)[0], load_cohort(single)[0]
    assert a.days == b.days
    for ta, tb in zip(a.timepoints, b.timepoints):
        np.testing.assert_array_equal(read_labelmap(ta.segmentation).labels, read_labelmap(tb.segmentation).labels)
        np.testing.assert_array_equal(read_image(ta.image)[0], read_image(tb.image)[0])
    assert (a.plan.read_text() == b.plan.read_text())
    other = load_cohort(cli_out)[1]
    assert read_labelmap(other.timepoints[0].segmentation).labels.tobytes() != \
        read_labelmap(a.timepoints[0].segmentation).labels.tobytes()
    assert cli_main(["make-dataset", "brain", "--n", "1", "--seed", "3", "--out", str(cli_out)]) == 2


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ParameterError, match="positive integer"):
        make_brain_cohort(tmp_path / "x", 0)
    with pytest.raises(ParameterError, match="pattern"):
        make_brain_cohort(tmp_path / "x", 1, patterns=["chemo_forever"])
    with pytest.raises(ParameterError, match="pattern"):
        simulate_patient(case_rng(0, 0), pattern="bogus")
    b1, b2 = sample_biology(case_rng(5, 1)), sample_biology(case_rng(5, 1))
    assert b1 == b2 and 0.02 <= b1.front_speed_mm_per_day <= 0.15
    assert load_plan(None).is_empty()
