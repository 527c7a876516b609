"""The ``anatomydt simulate`` and ``anatomydt demo`` commands on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from AnatomyDTLib.cli import main
from AnatomyDTLib.io import Geometry, read_labelmap, write_labelmap
from AnatomyDTLib.phantom import ellipsoid_brain
from AnatomyDTLib.schema import BRAIN_SCHEMA

os.environ["ANATOMYDT_NO_PROGRESS"] = "1"


@pytest.fixture()
def baseline(tmp_path):
    """A small phantom written as .seg.nrrd with a non-trivial geometry (origin, direction, anisotropic voxels)."""
    labels, flair, _ = ellipsoid_brain(shape=(20, 24, 22), spacing_mm=(4.0, 3.0, 3.0), tumour_centre_mm=(0, -6, 9),
                                       tumour_radius_mm=7.0)
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry(spacing=(3.0, 3.0, 4.0), origin=(-30.0, 12.5, 40.0), direction=direction)
    path = tmp_path / "baseline.seg.nrrd"
    write_labelmap(path, labels, geometry, BRAIN_SCHEMA)
    return path, labels, geometry


def test_simulate_writes_a_seg_nrrd_with_the_input_geometry(baseline, tmp_path, capsys):
    path, labels, geometry = baseline
    before = path.read_bytes()
    out = tmp_path / "day60.seg.nrrd"
    assert main(["simulate", "--seg", str(path), "--days", "60", "--out", str(out)]) == 0
    assert path.read_bytes() == before  # the input is never modified
    seg = slicerio.read_segmentation(str(out))
    names = {s["name"] for s in seg["segments"]}
    assert {"tumour", "white_matter", "grey_matter", "lateral_ventricles"} <= names
    tags = seg["segments"][0].get("tags", {})
    assert tags.get("DICOM.SegmentAlgorithmType") == "AUTOMATIC"
    np.testing.assert_allclose(seg["ijkToLPS"], geometry.ijk_to_lps(), atol=1e-9)
    result = read_labelmap(out)
    assert result.labels.shape == labels.shape
    assert (result.labels == BRAIN_SCHEMA.tumour_index).sum() > (labels == BRAIN_SCHEMA.tumour_index).sum()
    printed = capsys.readouterr().out
    assert "day 60" in printed and "tumour (mL)" in printed


def test_simulate_trajectory_to_nifti_keeps_geometry(baseline, tmp_path):
    path, labels, geometry = baseline
    template = str(tmp_path / "pred_day{day}.nii.gz")
    assert main(["simulate", "--seg", str(path), "--days", "30", "90", "--out", template]) == 0
    for day in (30, 90):
        image = sitk.ReadImage(str(tmp_path / f"pred_day{day}.nii.gz"))
        assert Geometry.from_sitk(image).matches(geometry)
        assert sitk.GetArrayFromImage(image).shape == labels.shape


def test_simulate_with_plan_and_resection_mask_on_another_grid(baseline, tmp_path):
    path, labels, geometry = baseline
    # The surgeon's cavity mask drawn on a finer grid: resampled by physical position.
    tumour = (labels == BRAIN_SCHEMA.tumour_index).astype(np.uint8)
    mask_img = sitk.GetImageFromArray(tumour)
    mask_img = geometry.apply_to_sitk(mask_img)
    fine = sitk.Resample(mask_img, [n * 2 for n in mask_img.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                         mask_img.GetOrigin(), [s / 2 for s in mask_img.GetSpacing()], mask_img.GetDirection())
    sitk.WriteImage(fine, str(tmp_path / "cavity.nii.gz"))
    plan = {"surgery": [{"day": 1, "resection_mask": "cavity.nii.gz"}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "post.nii.gz"
    assert main(["simulate", "--seg", str(path), "--days", "2", "--plan", str(tmp_path / "plan.json"),
                 "--out", str(out)]) == 0
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert (result == BRAIN_SCHEMA.tumour_index).sum() == 0  # everything resected


def test_simulate_refuses_to_overwrite_without_force(baseline, tmp_path, capsys):
    path, _, _ = baseline
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"precious")
    assert main(["simulate", "--seg", str(path), "--days", "5", "--out", str(out)]) == 2
    assert out.read_bytes() == b"precious"
    assert "--force" in capsys.readouterr().err
    assert main(["simulate", "--seg", str(path), "--days", "5", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != b"precious"


def test_simulate_refuses_to_write_over_its_input(baseline, capsys):
    path, _, _ = baseline
    assert main(["simulate", "--seg", str(path), "--days", "5", "--out", str(path), "--force"]) == 2
    assert "is one of the inputs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, phrase",
    [
        (["--days", "10", "--plan", "missing_plan.json"], "not found"),
        (["--days", "10", "--params", "missing_params.json"], "not found"),
        (["--days", "10", "20"], "{day}"),
        (["--days", "10", "--classes", "tumour"], "key=class"),
    ],
)
def test_simulate_bad_arguments_give_specific_errors(baseline, tmp_path, capsys, options, phrase, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, _, _ = baseline
    assert main(["simulate", "--seg", str(path), "--out", "x.nii.gz", *options]) == 2
    assert phrase in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_simulate_missing_segmentation_and_invalid_plan(tmp_path, baseline, capsys):
    assert main(["simulate", "--seg", str(tmp_path / "nope.seg.nrrd"), "--days", "5", "--out", str(tmp_path / "o.nii.gz")]) == 2
    assert "not found" in capsys.readouterr().err
    path, _, _ = baseline
    (tmp_path / "plan.json").write_text('{"radiotherapy": {"start_day": 5, "fractions": 30, "dose_per_fraction_gy": -2}}')
    assert main(["simulate", "--seg", str(path), "--days", "5", "--plan", str(tmp_path / "plan.json"),
                 "--out", str(tmp_path / "o.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "dose_per_fraction_gy" in err and "> 0" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_simulate_parameter_file_errors_name_the_key(tmp_path, baseline, capsys):
    path, _, _ = baseline
    (tmp_path / "p.json").write_text('{"growth_rate_per_day": 0.1, "difusion": {"tumour": 0.1}}')
    assert main(["simulate", "--seg", str(path), "--days", "5", "--params", str(tmp_path / "p.json"),
                 "--out", str(tmp_path / "o.nii.gz")]) == 2
    assert "difusion" in capsys.readouterr().err


def test_labels_outside_the_schema_are_reported_with_the_class_map_hint(tmp_path, capsys):
    labels = np.zeros((6, 7, 8), dtype=np.uint8)
    labels[2:4, 2:4, 2:4] = 7
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "odd.nii.gz"))
    assert main(["simulate", "--seg", str(tmp_path / "odd.nii.gz"), "--days", "5", "--out", str(tmp_path / "o.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "7" in err and "--classes" in err
    # ... and the class map fixes it.
    assert main(["simulate", "--seg", str(tmp_path / "odd.nii.gz"), "--days", "5", "--classes", "7=tumour",
                 "--out", str(tmp_path / "o.nii.gz")]) == 0


def test_demo_runs_and_treatment_changes_the_outcome(tmp_path):
    """The README's main job with the bundled default model: untreated grows, Stupp shrinks by day 90."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    rows = [line.split(",") for line in (out / "volumes.csv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    tumour = header.index("tumour_ml")
    volumes = {(r[0], float(r[1])): float(r[tumour]) for r in body}
    assert volumes[("no_treatment", 90.0)] > volumes[("no_treatment", 0.0)]
    assert volumes[("stupp", 90.0)] < volumes[("stupp", 0.0)]
    seg = slicerio.read_segmentation(str(out / "stupp" / "prediction_day30.seg.nrrd"))
    assert seg["voxels"].ndim == 3  # one labelmap layer: classes are exclusive
    assert (out / "no_treatment" / "tumour_probability_day90.nii.gz").exists()
    # Each plan's folder holds the files of 'anatomydt predict' (same writer).
    for plan in ("no_treatment", "stupp"):
        for name in ("volumes.csv", "overlay_montage.png", "volumes.png", "run.json", "prediction_day90_labels.nii.gz"):
            assert (out / plan / name).is_file(), (plan, name)
        assert json.loads((out / plan / "run.json").read_text())["model"]["name"] == "anatomy-dt-learned"
    # A second run refuses to overwrite the folder's files.
    assert main(["demo", "--out", str(out)]) == 2


def test_installed_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "AnatomyDTLib", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "simulate" in result.stdout and "demo" in result.stdout
