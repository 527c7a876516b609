"""Tests of cohort manifests (load_cohort) and the public-dataset importers, on tiny folders laid out
exactly like UCSF-ALPTDG, BraTS 2021/2023/2024 and LUMIERE (12 x 14 x 10 voxels). Real files only."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from AnatomyDTLib.brain.cohort import MANIFEST_COLUMNS, load_cohort, write_manifest
from AnatomyDTLib.brain.importers import DEFAULT_LABELS, find_scans, import_cohort, parse_labels
from AnatomyDTLib.cli import main as cli_main
from AnatomyDTLib.errors import InputError, OutputExistsError, PlanError
from AnatomyDTLib.io import read_labelmap
from AnatomyDTLib.schema import BRAIN_SCHEMA

SHAPE = (10, 14, 12)  # array order z, y, x -> 12 x 14 x 10 voxels
TUMOUR = BRAIN_SCHEMA.tumour_index


def _write(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), True)


def _seg(values, dtype=np.uint8):
    """A segmentation with one 2x2x2 block per label value, placed along x."""
    seg = np.zeros(SHAPE, dtype)
    for n, v in enumerate(values):
        seg[4:6, 5:7, 1 + 2 * n:3 + 2 * n] = v
    return seg


def _image(seed):
    return np.random.default_rng(seed).uniform(0, 100, SHAPE).astype(np.float32)


def _count(path, cls):
    return int((read_labelmap(path).labels == cls).sum())


# --------------------------------------------------------------------------------------------- UCSF


def _ucsf(src):
    for pid in ("UCSF-ALPTDG-001", "UCSF-ALPTDG-002"):
        for t in (1, 2):
            stem = src / pid / f"{pid}_time{t}"
            for mod in ("t1", "t1ce", "t2", "flair"):
                _write(stem.parent / f"{stem.name}_{mod}.nii.gz", _image(t))
            seg = _seg([1, 2, 3, 4], np.float32) + np.float32(2e-5)  # float-stored mask, near-integers
            seg[seg < 0.5] = 0.0
            _write(stem.parent / f"{stem.name}_seg.nii.gz", seg)


def test_ucsf_import_rounds_float_masks_and_merges_tumour(tmp_path):
    src = tmp_path / "ucsf"
    _ucsf(src)
    days = tmp_path / "days.csv"
    days.write_text("case,interval_days\nUCSF-ALPTDG-001,120\n")
    out = import_cohort("ucsf-alptdg", src, tmp_path / "out", days_csv=days)
    patients = load_cohort(out)
    assert [p.case for p in patients] == ["UCSF-ALPTDG-001", "UCSF-ALPTDG-002"]
    assert patients[0].days == [0.0, 120.0]
    assert patients[1].days[0] == 0.0 and math.isnan(patients[1].days[1])
    tp = patients[0].timepoints[1]
    assert tp.anatomy == "missing" and tp.plan is None and tp.source == "ucsf-alptdg"
    assert _count(tp.segmentation, TUMOUR) == 3 * 8  # necrosis, oedema, enhancing
    assert _count(tp.segmentation, BRAIN_SCHEMA.background_index) == int(np.prod(SHAPE)) - 24  # cavity -> background
    assert tp.image.resolve() == (src / "UCSF-ALPTDG-001" / "UCSF-ALPTDG-001_time2_flair.nii.gz").resolve()
    assert tp.extra["t1ce"].endswith("UCSF-ALPTDG-001_time2_t1ce.nii.gz")
    # the cavity can be sent to another class; never to tumour
    out2 = import_cohort("ucsf-alptdg", src, tmp_path / "out2", cavity_class="grey_matter", copy_images=True)
    tp2 = load_cohort(out2)[0].timepoints[0]
    assert _count(tp2.segmentation, BRAIN_SCHEMA.index("grey_matter")) == 8
    assert tp2.image.parent.parent == out2  # copied into the cohort
    with pytest.raises(InputError, match="cavity"):
        import_cohort("ucsf-alptdg", src, tmp_path / "out3", cavity_class="tumour")
    with pytest.raises(OutputExistsError):
        import_cohort("ucsf-alptdg", src, out)


# -------------------------------------------------------------------------------------------- BraTS


def test_brats2021_labels_and_unknown_values(tmp_path):
    src = tmp_path / "brats21"
    for cid, values in (("BraTS2021_00000", [1, 2, 4]), ("BraTS2021_00002", [2])):
        for mod in ("t1", "t1ce", "t2", "flair"):
            _write(src / cid / f"{cid}_{mod}.nii.gz", _image(0))
        _write(src / cid / f"{cid}_seg.nii.gz", _seg(values))
    _write(src / "BraTS2021_00005" / "BraTS2021_00005_flair.nii.gz", _image(1))  # validation case: no seg
    out = import_cohort("brats2021", src, tmp_path / "out")
    patients = load_cohort(out)
    assert [len(p.timepoints) for p in patients] == [1, 1]
    assert _count(patients[0].timepoints[0].segmentation, TUMOUR) == 24
    assert json.loads((out / "cohort.json").read_text())["skipped"][0]["scan"] == "BraTS2021_00005"
    bad = tmp_path / "bad"
    for mod in ("flair",):
        _write(bad / "BraTS2021_00009" / f"BraTS2021_00009_{mod}.nii.gz", _image(0))
    _write(bad / "BraTS2021_00009" / "BraTS2021_00009_seg.nii.gz", _seg([1, 3]))  # 3 is not a 2021 label
    with pytest.raises(InputError, match="--labels"):
        import_cohort("brats2021", bad, tmp_path / "out_bad")
    # with the meaning of 3 stated, it imports
    import_cohort("brats2021", bad, tmp_path / "out_ok", labels="1=NCR,3=enhancing")


def _brats_gli(src, cases):
    for name, values in cases:
        for mod in ("t1n", "t1c", "t2w", "t2f"):
            _write(src / name / f"{name}-{mod}.nii.gz", _image(0))
        _write(src / name / f"{name}-seg.nii.gz", _seg(values))


def test_brats2023_groups_time_points_by_patient(tmp_path):
    src = tmp_path / "brats23"
    _brats_gli(src, [("BraTS-GLI-00002-000", [1, 2, 3]), ("BraTS-GLI-00002-001", [2]),
                     ("BraTS-GLI-00003-000", [3])])
    out = import_cohort("brats2023", src, tmp_path / "out")
    patients = {p.case: p for p in load_cohort(out)}
    assert set(patients) == {"BraTS-GLI-00002", "BraTS-GLI-00003"}
    p = patients["BraTS-GLI-00002"]
    assert [t.extra["source_id"] for t in p.timepoints] == ["BraTS-GLI-00002-000", "BraTS-GLI-00002-001"]
    assert p.days[0] == 0.0 and math.isnan(p.days[1])
    assert _count(p.timepoints[0].segmentation, TUMOUR) == 24
    assert p.timepoints[0].extra["t2"].endswith("-t2w.nii.gz")


def test_brats2024_resection_cavity_goes_to_the_cavity_class(tmp_path):
    src = tmp_path / "brats24"
    _brats_gli(src, [("BraTS-GLI-00010-100", [1, 2, 3, 4])])
    seg = load_cohort(import_cohort("brats2024", src, tmp_path / "out"))[0].timepoints[0].segmentation
    assert _count(seg, TUMOUR) == 24
    with pytest.raises(InputError, match="--labels"):
        import_cohort("brats2023", src, tmp_path / "out23")  # 2023 has no label 4
    seg = load_cohort(import_cohort("brats2024", src, tmp_path / "out_lv", cavity_class="lateral_ventricles"))[0]
    assert _count(seg.timepoints[0].segmentation, BRAIN_SCHEMA.index("lateral_ventricles")) == 8


def test_segmentation_on_another_grid_is_refused(tmp_path):
    src = tmp_path / "brats24"
    name = "BraTS-GLI-00011-000"
    _write(src / name / f"{name}-t2f.nii.gz", _image(0), spacing=(2.0, 1.0, 1.0))
    _write(src / name / f"{name}-seg.nii.gz", _seg([1]))
    with pytest.raises(InputError, match="different voxel grids"):
        import_cohort("brats2024", src, tmp_path / "out")


# ------------------------------------------------------------------------------------------ LUMIERE


def test_lumiere_needs_confirmed_labels_and_uses_weeks(tmp_path):
    src = tmp_path / "LUMIERE"
    sessions = {"week-000-1": [1, 2, 3], "week-000-2": [3], "week-044": [1, 3], "week-056": None}
    for session, values in sessions.items():
        folder = src / "Imaging" / "Patient-001" / session
        for mod in ("CT1", "T1", "T2", "FLAIR"):
            _write(folder / f"{mod}.nii.gz", _image(1))
        if values is not None:
            _write(folder / "DeepBraTumIA-segmentation" / "native" / "segmentation" / "ct1_seg_mask.nii.gz",
                   _seg(values))
    _write(src / "Imaging" / "Patient-001" / "week-044" / "HD-GLIO-AUTO-segmentation" / "native" /
           "segmentation_CT1_origspace.nii.gz", _seg([1, 2]))
    with pytest.raises(InputError, match="--labels"):
        import_cohort("lumiere", src, tmp_path / "out")
    assert cli_main(["import-cohort", "lumiere", "--src", str(src), "--out", str(tmp_path / "cli")]) == 2
    out = import_cohort("lumiere", src, tmp_path / "out", labels="1=necrosis,2=enhancing,3=oedema")
    (patient,) = load_cohort(out)
    assert patient.days == [0.0, 1.0, 308.0]  # 7 x week; the repeated week 0 scan one day later
    assert _count(patient.timepoints[0].segmentation, TUMOUR) == 24
    skipped = json.loads((out / "cohort.json").read_text())["skipped"]
    assert [s["scan"] for s in skipped] == ["Patient-001/week-056"]
    assert cli_main(["import-cohort", "lumiere", "--src", str(src), "--out", str(tmp_path / "hd"),
                     "--labels", "1=non_enhancing,2=enhancing", "--lumiere-segmentation", "hd-glio-auto"]) == 0
    (hd,) = load_cohort(tmp_path / "hd")
    assert len(hd.timepoints) == 1 and hd.days == [0.0]


def test_label_parsing_and_layout_errors(tmp_path):
    assert parse_labels("1=NCR, 2=ED, 4=ET") == {1: "necrosis", 2: "oedema", 4: "enhancing"}
    assert parse_labels({"3": "tumour"}) == {3: "non_enhancing"}
    assert DEFAULT_LABELS["lumiere"] is None
    with pytest.raises(InputError, match="sub-region"):
        parse_labels("1=brain")
    with pytest.raises(InputError, match="value=sub-region"):
        parse_labels("1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="BraTS2021_00000_flair"):
        find_scans("brats2021", tmp_path / "empty")
    with pytest.raises(InputError, match="not a folder"):
        find_scans("brats2021", tmp_path / "nope")


# -------------------------------------------------------------------------------------- load_cohort


def _manifest_dir(tmp_path, rows, columns=None):
    root = tmp_path / "c"
    root.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for key in ("image", "segmentation"):
            if row.get(key) and not (root / row[key]).exists():
                _write(root / row[key], _seg([1]))
    (root / "plan.json").write_text('{"version": 1}')
    (root / "plan2.json").write_text('{"version": 1}')
    if columns is None:
        write_manifest(root / "manifest.csv", rows)
    else:
        with open(root / "manifest.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return root


def _row(case, tp, day, plan="plan.json", **kw):
    return {"case": case, "timepoint": tp, "day": day, "image": f"{case}/i{tp}.nii.gz",
            "segmentation": f"{case}/s{tp}.nii.gz", "plan": plan, **kw}


def test_load_cohort_validates(tmp_path):
    root = _manifest_dir(tmp_path, [_row("a", 1, 30.0), _row("a", 0, 0.0), _row("b", 0, "")])
    a, b = load_cohort(root)
    assert a.days == [0.0, 30.0] and a.plan == root / "plan.json" and math.isnan(b.days[0])
    assert a.load_plan().is_empty()
    cases = [
        ([_row("a", 0, 0.0), _row("a", 1, 0.0)], "strictly increase"),
        ([_row("a", 0, 10.0), _row("a", 1, 5.0)], "strictly increase"),
        ([_row("a", 0, 0.0), _row("a", 0, 5.0)], "no duplicates"),
        ([_row("a", 0, 0.0), _row("a", 2, 5.0)], "no duplicates or gaps"),
        ([_row("a", 0, 0.0), _row("a", 1, 5.0, plan="plan2.json")], "different plans"),
        ([_row("a", 0, "soon")], "not a number"),
        ([_row("a", "first", 0.0)], "not an integer"),
        ([_row("a", 0, 0.0, anatomy="partial")], "anatomy"),
    ]
    for n, (rows, message) in enumerate(cases):
        root = _manifest_dir(tmp_path / f"case{n}", rows)
        with pytest.raises(InputError, match=message):
            load_cohort(root)
    root = _manifest_dir(tmp_path / "cols", [_row("a", 0, 0.0)], columns=["case", "timepoint", "image"])
    with pytest.raises(InputError, match=r"lacks column\(s\) \['day', 'segmentation', 'plan'\]"):
        load_cohort(root)
    root = _manifest_dir(tmp_path / "files", [_row("a", 0, 0.0)])
    (root / "a" / "s0.nii.gz").unlink()
    with pytest.raises(InputError, match="do not exist: a/s0.nii.gz"):
        load_cohort(root)
    root = _manifest_dir(tmp_path / "plan", [_row("a", 0, 0.0)])
    (root / "plan.json").write_text('{"radiotherapy": {"start_day": -1}}')
    with pytest.raises(PlanError):
        load_cohort(root)
    load_cohort(root, check_plans=False)
    with pytest.raises(InputError, match="no manifest.csv"):
        load_cohort(tmp_path)
    assert MANIFEST_COLUMNS == ("case", "timepoint", "day", "image", "segmentation", "plan")
