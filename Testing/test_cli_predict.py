"""The ``anatomydt predict`` command on real files: outputs, plans from flags, and every bad-input path."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from AnatomyDTLib import __version__
from AnatomyDTLib.cli import main
from AnatomyDTLib.io import Geometry, read_labelmap, write_image, write_labelmap
from AnatomyDTLib.phantom import ellipsoid_brain
from AnatomyDTLib.schema import BRAIN_SCHEMA

os.environ["ANATOMYDT_NO_PROGRESS"] = "1"

TUMOUR = BRAIN_SCHEMA.tumour_index
TUMOUR_RGB = tuple(int(round(255 * c)) for c in BRAIN_SCHEMA.colors[TUMOUR])
BASELINE_YELLOW = (255, 220, 0)
CLASSES = [n for n in BRAIN_SCHEMA.names if n != "background"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def case(tmp_path):
    """A small phantom as .seg.nrrd + FLAIR on one grid with origin, a rotated direction and anisotropic voxels."""
    labels, flair, _ = ellipsoid_brain(shape=(20, 24, 22), spacing_mm=(4.0, 3.0, 3.0), tumour_centre_mm=(0, -6, 9),
                                       tumour_radius_mm=7.0)
    geometry = Geometry(spacing=(3.0, 3.0, 4.0), origin=(-30.0, 12.5, 40.0),
                        direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    seg = tmp_path / "inputs" / "baseline.seg.nrrd"
    image = tmp_path / "inputs" / "flair.nii.gz"
    write_labelmap(seg, labels, geometry, BRAIN_SCHEMA)
    write_image(image, flair, geometry)
    return {"seg": seg, "image": image, "labels": labels, "geometry": geometry, "out": tmp_path / "out"}


def run_predict(*options) -> int:
    return main(["predict", *[str(o) for o in options]])


def read_png(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def has_colour(rgb: np.ndarray, colour) -> bool:
    return bool(np.all(rgb[..., :3] == np.asarray(colour, dtype=rgb.dtype), axis=-1).any())


def read_volumes(path) -> dict[float, dict[str, float]]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return {float(r.split(",")[0]): dict(zip(header[1:], map(float, r.split(",")[1:]))) for r in lines[1:]}


def test_predict_writes_every_output_on_the_input_grid(case, capsys):
    seg, out, geometry, labels = case["seg"], case["out"], case["geometry"], case["labels"]
    before = {p: p.read_bytes() for p in (seg, case["image"])}
    assert run_predict("--seg", seg, "--image", case["image"], "--days", 60, 30, "--model", "pde-only",
                       "--seed", 7, "--out", out) == 0
    assert {p: p.read_bytes() for p in before} == before  # inputs untouched
    printed = capsys.readouterr().out
    assert "tumour (mL)" in printed and "day 60" in printed and "baseline" in printed

    for day in (30, 60):
        segmentation = slicerio.read_segmentation(str(out / f"prediction_day{day}.seg.nrrd"))
        assert {s["name"] for s in segmentation["segments"]} == set(CLASSES)
        colours = {s["name"]: s["color"] for s in segmentation["segments"]}
        np.testing.assert_allclose(colours["tumour"], BRAIN_SCHEMA.colors[TUMOUR])
        codes = {s["name"]: s["terminology"]["type"] for s in segmentation["segments"]}
        assert codes["tumour"] == ["SCT", "108369006", "Neoplasm"]  # SNOMED CT, read back by slicerio
        assert codes["white_matter"] == ["SCT", "68523003", "Cerebral White Matter"]
        assert codes["lateral_ventricles"][1] == "66720007"
        for segment in segmentation["segments"]:
            assert segment["tags"]["DICOM.SegmentAlgorithmType"] == "AUTOMATIC"
            assert segment["tags"]["DICOM.SegmentAlgorithmName"] == f"AnatomyDT pde-only {__version__}"
        np.testing.assert_allclose(segmentation["ijkToLPS"], geometry.ijk_to_lps(), atol=1e-9)
        from_seg = read_labelmap(out / f"prediction_day{day}.seg.nrrd").labels
        labelmap = sitk.ReadImage(str(out / f"prediction_day{day}_labels.nii.gz"))
        assert Geometry.from_sitk(labelmap).matches(geometry)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap), from_seg)
        probability_image = sitk.ReadImage(str(out / f"tumour_probability_day{day}.nii.gz"))
        assert Geometry.from_sitk(probability_image).matches(geometry)
        probability = sitk.GetArrayFromImage(probability_image)
        assert probability.dtype == np.float32 and probability.shape == labels.shape
        assert probability.min() >= 0.0 and probability.max() <= 1.0 + 1e-6
        assert probability[from_seg == TUMOUR].min() >= 1.0 / BRAIN_SCHEMA.num_classes  # argmax => p >= 1/K
        assert probability[from_seg != TUMOUR].max() <= 0.5 + 1e-6

    volumes = read_volumes(out / "volumes.csv")
    assert sorted(volumes) == [0.0, 30.0, 60.0]
    voxel_ml = np.prod(geometry.spacing) / 1000
    assert volumes[0.0]["tumour_ml"] == pytest.approx((labels == TUMOUR).sum() * voxel_ml, abs=1e-3)
    day60 = read_labelmap(out / "prediction_day60_labels.nii.gz").labels
    assert volumes[60.0]["tumour_ml"] == pytest.approx((day60 == TUMOUR).sum() * voxel_ml, abs=1e-3)
    assert volumes[60.0]["tumour_ml"] > volumes[0.0]["tumour_ml"]  # untreated tumour grows

    montage, chart = read_png(out / "overlay_montage.png"), read_png(out / "volumes.png")
    assert montage.ndim == 3 and montage.shape[0] > 100 and montage.shape[1] > 300
    assert has_colour(montage, TUMOUR_RGB) and has_colour(montage, BASELINE_YELLOW)
    assert has_colour(chart, TUMOUR_RGB)

    run = json.loads((out / "run.json").read_text())
    assert run["days"] == [30.0, 60.0] and run["seed"] == 7
    assert run["model"] == {"requested": "pde-only", "name": "pde-only", "version": __version__}
    assert run["inputs"]["segmentation"]["sha256"] == hashlib.sha256(seg.read_bytes()).hexdigest()
    assert run["inputs"]["image"]["path"] == str(case["image"].resolve())
    assert run["plan"] == {"version": 1} and run["software"]["anatomydt"] == __version__
    assert run["wall_time_s"] > 0 and run["device"]["used"] == "cpu"
    assert set(run["outputs"]) == {p.name for p in out.iterdir()}


def test_existing_outputs_are_refused_without_force(case, capsys):
    seg, out = case["seg"], case["out"]
    assert run_predict("--seg", seg, "--days", 5, "--model", "pde-only", "--out", out) == 0
    csv_before = (out / "volumes.csv").read_bytes()
    capsys.readouterr()
    # Another day into the same folder would mix two runs (volumes.csv, run.json): refused too.
    assert run_predict("--seg", seg, "--days", 9, "--model", "pde-only", "--out", out) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "volumes.csv").read_bytes() == csv_before and not (out / "prediction_day9.seg.nrrd").exists()
    assert run_predict("--seg", seg, "--days", 9, "--model", "pde-only", "--out", out, "--force") == 0
    assert (out / "prediction_day9.seg.nrrd").exists() and (out / "volumes.csv").read_bytes() != csv_before
    # Inputs are never outputs, even with --force; --out must be a folder.
    assert run_predict("--seg", out / "prediction_day9_labels.nii.gz", "--days", 9, "--model", "pde-only",
                       "--out", out, "--force") == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert run_predict("--seg", seg, "--days", 9, "--model", "pde-only", "--out", out / "volumes.csv") == 2
    assert "is a file" in capsys.readouterr().err


def test_plan_flags_build_the_same_plan_as_the_json_file(case, tmp_path):
    seg = case["seg"]
    flags = ["--rt-start", 5, "--rt-dose", 60, "--rt-fractions", 30, "--chemo-start", 5, "--chemo-cycles", 1,
             "--chemo-days-on", 40, "--chemo-cycle-days", 40]
    assert run_predict("--seg", seg, "--days", 60, "--model", "pde-only", "--out", tmp_path / "flags", *flags) == 0
    plan = {"version": 1,
            "radiotherapy": {"start_day": 5, "fractions": 30, "total_dose_gy": 60},
            "chemotherapy": [{"agent": "temozolomide", "kill_rate_per_day": 0.02, "start_day": 5, "cycles": 1,
                              "days_on": 40, "cycle_length_days": 40}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert run_predict("--seg", seg, "--days", 60, "--model", "pde-only", "--out", tmp_path / "json",
                       "--plan", tmp_path / "plan.json") == 0
    assert run_predict("--seg", seg, "--days", 60, "--model", "pde-only", "--out", tmp_path / "none") == 0
    by_flags = read_labelmap(tmp_path / "flags" / "prediction_day60_labels.nii.gz").labels
    by_json = read_labelmap(tmp_path / "json" / "prediction_day60_labels.nii.gz").labels
    np.testing.assert_array_equal(by_flags, by_json)
    treated = read_volumes(tmp_path / "flags" / "volumes.csv")[60.0]["tumour_ml"]
    untreated = read_volumes(tmp_path / "none" / "volumes.csv")[60.0]["tumour_ml"]
    assert treated < untreated
    run = json.loads((tmp_path / "flags" / "run.json").read_text())
    assert run["plan"]["radiotherapy"]["fractions"] == 30 and run["plan"]["chemotherapy"][0]["windows"] == [[5.0, 45.0]]


def test_surgery_flags_with_a_resection_mask_on_another_grid(case, tmp_path):
    labels, geometry = case["labels"], case["geometry"]
    mask = geometry.apply_to_sitk(sitk.GetImageFromArray((labels == TUMOUR).astype(np.uint8)))
    finer = sitk.Resample(mask, [n * 2 for n in mask.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                          mask.GetOrigin(), [s / 2 for s in mask.GetSpacing()], mask.GetDirection())
    sitk.WriteImage(finer, str(tmp_path / "cavity.nii.gz"))
    assert run_predict("--seg", case["seg"], "--days", 2, "--model", "pde-only", "--surgery-day", 1,
                       "--resection", tmp_path / "cavity.nii.gz", "--out", tmp_path / "post") == 0
    assert read_volumes(tmp_path / "post" / "volumes.csv")[2.0]["tumour_ml"] == 0.0  # all of it resected
    run = json.loads((tmp_path / "post" / "run.json").read_text())
    assert run["plan"]["surgery"] == [{"day": 1.0, "resection_mask": str(tmp_path / "cavity.nii.gz")}]


@pytest.mark.parametrize(
    "options, phrases",
    [
        (["--plan", "PLAN", "--rt-start", 5], ["not both", "--rt-start"]),
        (["--rt-start", 5, "--rt-fractions", 30], ["total_dose_gy", "--rt-dose"]),
        (["--rt-start", 5, "--rt-fractions", 30, "--rt-dose", -2], ["must be > 0 Gy", "--rt-dose"]),
        (["--extent", 0.5], ["surgery[0].day", "--surgery-day"]),
        (["--surgery-day", 3, "--extent", 0.5, "--resection", "cavity.nii.gz"], ["exactly one", "--extent"]),
        (["--chemo-cycles", 2], ["start_day", "--chemo-start"]),
        (["--rt-start", 5, "--rt-fractions", 30, "--rt-dose", 60, "--rt-dose-map", "missing_dose.nrrd"],
         ["dose map file not found", "--rt-dose-map"]),
    ],
)
def test_plan_flag_errors_name_the_flag(case, tmp_path, capsys, monkeypatch, options, phrases):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "PLAN").write_text("{}")
    (tmp_path / "cavity.nii.gz").write_bytes(b"")
    assert run_predict("--seg", case["seg"], "--days", 10, "--model", "pde-only", "--out", "o", *options) == 2
    err = capsys.readouterr().err
    assert all(p in err for p in phrases), err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# Bad inputs: exit code 2 and a message saying what is wrong (never a traceback)
# ------------------------------------------------------------------------------------------------


def test_missing_files(case, tmp_path, capsys):
    assert run_predict("--seg", tmp_path / "nope.seg.nrrd", "--days", 5, "--model", "pde-only", "--out", case["out"]) == 2
    assert "not found" in capsys.readouterr().err
    assert run_predict("--seg", case["seg"], "--image", tmp_path / "nope.nii.gz", "--days", 5, "--model", "pde-only",
                       "--out", case["out"]) == 2
    assert "not found" in capsys.readouterr().err
    assert run_predict("--seg", case["seg"], "--days", 5, "--model", tmp_path / "absent.pt", "--out", case["out"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not case["out"].exists()


def test_segmentation_without_tumour(case, tmp_path, capsys):
    labels = case["labels"].copy()
    labels[labels == TUMOUR] = BRAIN_SCHEMA.index("white_matter")
    write_labelmap(tmp_path / "healthy.seg.nrrd", labels, case["geometry"], BRAIN_SCHEMA)
    assert run_predict("--seg", tmp_path / "healthy.seg.nrrd", "--days", 5, "--model", "pde-only",
                       "--out", case["out"]) == 2
    assert "no tumour" in capsys.readouterr().err
    assert not case["out"].exists()


def test_image_on_another_grid_asks_to_resample(case, tmp_path, capsys):
    g = case["geometry"]
    shifted = Geometry(spacing=g.spacing, origin=(g.origin[0] + 5.0, *g.origin[1:]), direction=g.direction)
    write_image(tmp_path / "moved_flair.nii.gz", np.ones(case["labels"].shape, np.float32), shifted)
    assert run_predict("--seg", case["seg"], "--image", tmp_path / "moved_flair.nii.gz", "--days", 5,
                       "--model", "pde-only", "--out", case["out"]) == 2
    err = capsys.readouterr().err
    assert "different voxel grids" in err and "Resample" in err
    write_image(tmp_path / "small_flair.nii.gz", np.ones((10, 24, 22), np.float32), g)  # same header, fewer slices
    assert run_predict("--seg", case["seg"], "--image", tmp_path / "small_flair.nii.gz", "--days", 5,
                       "--model", "pde-only", "--out", case["out"]) == 2
    assert "different voxel grids" in capsys.readouterr().err
    assert not case["out"].exists()


@pytest.fixture()
def slice_2d(case, tmp_path):
    """The phantom's slice through the tumour as a 2D labelmap (0.8 mm pixels)."""
    labels = case["labels"]
    z = int(np.argwhere(labels == TUMOUR)[:, 0].mean())
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels[z]))
    image.SetSpacing((0.8, 0.8))
    image.SetOrigin((10.0, -4.0))
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, labels[z]


def test_2d_input_works_with_the_pde_only_model(slice_2d, tmp_path, capsys):
    path, labels = slice_2d
    out = tmp_path / "out2d"
    assert run_predict("--seg", path, "--days", 20, 40, "--model", "pde-only", "--out", out) == 0
    result = sitk.ReadImage(str(out / "prediction_day40_labels.nii.gz"))
    assert result.GetDimension() == 2 and Geometry.from_sitk(result).matches(Geometry((0.8, 0.8), (10.0, -4.0)))
    assert read_labelmap(out / "prediction_day40.seg.nrrd").labels.shape == labels.shape  # read back as 2D
    volumes = read_volumes(out / "volumes.csv")
    assert volumes[40.0]["tumour_ml"] > volumes[0.0]["tumour_ml"] > 0
    assert read_png(out / "overlay_montage.png").shape[1] > 0


def test_the_default_model_is_3d_and_refuses_a_2d_slice_clearly(slice_2d, tmp_path, capsys):
    path, _ = slice_2d
    assert run_predict("--seg", path, "--days", 20, "--out", tmp_path / "o") == 2  # --model default
    err = capsys.readouterr().err
    assert "3D" in err and "2D" in err and "--model pde-only" in err
    assert not (tmp_path / "o").exists()


def test_the_default_model_answers_an_anisotropic_volume_on_its_grid(tmp_path):
    """The bundled model works on 4 mm voxels; a 0.8 x 0.8 x 6 mm input is resampled inside and answered as given."""
    labels, _, _ = ellipsoid_brain(shape=(10, 64, 60), spacing_mm=(6.0, 0.8, 0.8), tumour_centre_mm=(0, -3, 5),
                                   tumour_radius_mm=7.0)
    geometry = Geometry(spacing=(0.8, 0.8, 6.0), origin=(-24.0, -25.6, -30.0))
    write_labelmap(tmp_path / "thick.nii.gz", labels, geometry, BRAIN_SCHEMA)
    out = tmp_path / "out"
    assert run_predict("--seg", tmp_path / "thick.nii.gz", "--days", 60, "--out", out) == 0
    result = sitk.ReadImage(str(out / "prediction_day60_labels.nii.gz"))
    assert Geometry.from_sitk(result).matches(geometry)
    predicted = sitk.GetArrayFromImage(result)
    assert predicted.shape == labels.shape
    assert (predicted == TUMOUR).any()
    assert (predicted[labels == 0] == 0).all()  # nothing enters the outside of the head
    seg = slicerio.read_segmentation(str(out / "prediction_day60.seg.nrrd"))
    assert {s["tags"]["DICOM.SegmentAlgorithmName"] for s in seg["segments"]} == {f"AnatomyDT anatomy-dt-learned {__version__}"}


def test_anisotropic_thick_slices_work(tmp_path):
    """0.8 x 0.8 mm in plane, 6 mm slices: the clinical 2D FLAIR acquisition, kept as is."""
    labels, flair, _ = ellipsoid_brain(shape=(10, 64, 60), spacing_mm=(6.0, 0.8, 0.8), tumour_centre_mm=(0, -3, 5),
                                       tumour_radius_mm=7.0)
    geometry = Geometry(spacing=(0.8, 0.8, 6.0), origin=(-24.0, -25.6, -30.0))
    write_labelmap(tmp_path / "thick.nii.gz", labels, geometry, BRAIN_SCHEMA)
    write_image(tmp_path / "thick_flair.nii.gz", flair, geometry)
    out = tmp_path / "out"
    assert run_predict("--seg", tmp_path / "thick.nii.gz", "--image", tmp_path / "thick_flair.nii.gz",
                       "--days", 45, "--model", "pde-only", "--out", out) == 0
    seg = slicerio.read_segmentation(str(out / "prediction_day45.seg.nrrd"))
    np.testing.assert_allclose(seg["ijkToLPS"], geometry.ijk_to_lps(), atol=1e-9)
    volumes = read_volumes(out / "volumes.csv")
    assert volumes[45.0]["tumour_ml"] > volumes[0.0]["tumour_ml"] > 0
    montage = read_png(out / "overlay_montage.png")
    # Shown in physical proportions: the coronal panel is as tall as 60 mm, not as 10 voxels.
    assert montage.shape[0] > 200 and has_colour(montage, TUMOUR_RGB)


def test_corrupt_weights_file_gives_a_clear_error(case, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not a checkpoint, just bytes" * 10)
    assert run_predict("--seg", case["seg"], "--days", 5, "--model", weights, "--out", case["out"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and "weights.pt" in err and "Traceback" not in err
    assert not case["out"].exists()


def test_weights_files_give_clear_errors_without_the_learned_models_package(tmp_path, monkeypatch):
    """An installation without AnatomyDTLib.models (None in sys.modules makes its import fail, as if absent)."""
    from AnatomyDTLib.errors import InputError
    from AnatomyDTLib.predict import load_model

    monkeypatch.setitem(sys.modules, "AnatomyDTLib.models", None)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_model(str(corrupt))
    readable = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(3)}, readable)
    with pytest.raises(InputError, match="learned models are not available"):
        load_model(str(readable))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu_is_refused(case, capsys):
    assert run_predict("--seg", case["seg"], "--days", 5, "--model", "pde-only", "--device", "cuda",
                       "--out", case["out"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not case["out"].exists()


def test_a_3d_learned_model_refuses_a_2d_slice(slice_2d, case, tmp_path, capsys):
    models = pytest.importorskip("AnatomyDTLib.models")
    small = {"alpha_channels": 4, "cnn_channels": 4, "cnn_dilations": [1, 2], "film_hidden": 8, "dt_days": 2.0}
    model = models.AnatomyDTModel(models.Config.from_dict({"model": small}).model, BRAIN_SCHEMA.num_classes, 3)
    weights = models.save_checkpoint(model, tmp_path / "learned3d.pt", list(BRAIN_SCHEMA.names))
    path, _ = slice_2d
    assert run_predict("--seg", path, "--days", 10, "--model", weights, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "3D" in err and "2D" in err and "--model pde-only" in err
    assert not (tmp_path / "o").exists()
    # The same weights predict on the 3D case, through the same outputs.
    assert run_predict("--seg", case["seg"], "--days", 4, "--model", weights, "--out", case["out"]) == 0
    run = json.loads((case["out"] / "run.json").read_text())
    assert run["model"]["requested"] == str(weights) and run["model"]["name"] != "pde-only"


def test_segments_are_mapped_by_terminology_and_by_explicit_classes(case, tmp_path, capsys):
    """A Slicer segmentation whose segment names say nothing ("Segment_1"...) but whose terminology does."""
    labels, geometry = case["labels"], case["geometry"]
    meanings = {"tumour": ("SCT", "108369006", "Neoplasm"), "white_matter": ("SCT", "68523003", "White matter"),
                "grey_matter": ("SCT", "421320006", "Grey matter"),
                "lateral_ventricles": ("SCT", "66720007", "Lateral ventricle")}
    voxels = np.ascontiguousarray(labels.transpose(2, 1, 0))  # slicerio is (i, j, k)
    segments = [{"id": f"Segment_{k}", "name": f"Segment_{k}", "labelValue": k, "layer": 0, "color": [0.5, 0.5, 0.5],
                 "terminology": {"contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
                                 "category": ["SCT", "123037004", "Anatomical Structure"],
                                 "type": list(meanings[BRAIN_SCHEMA.names[k]])}}
                for k in range(1, BRAIN_SCHEMA.num_classes)]
    slicerio.write_segmentation(str(tmp_path / "named.seg.nrrd"),
                                {"voxels": voxels, "ijkToLPS": geometry.ijk_to_lps(), "segments": segments,
                                 "encoding": "gzip"})
    assert run_predict("--seg", tmp_path / "named.seg.nrrd", "--days", 3, "--model", "pde-only",
                       "--out", tmp_path / "by_terminology") == 0
    mapped = read_volumes(tmp_path / "by_terminology" / "volumes.csv")[0.0]
    reference = {c: (labels == BRAIN_SCHEMA.index(c)).sum() * np.prod(geometry.spacing) / 1000 for c in CLASSES}
    assert mapped == pytest.approx({f"{c}_ml": v for c, v in reference.items()}, abs=1e-3)
    # Without terminology the names match nothing: the message names the segment and suggests --classes ...
    for s in segments:
        del s["terminology"]
    slicerio.write_segmentation(str(tmp_path / "anonymous.seg.nrrd"),
                                {"voxels": voxels, "ijkToLPS": geometry.ijk_to_lps(), "segments": segments,
                                 "encoding": "gzip"})
    assert run_predict("--seg", tmp_path / "anonymous.seg.nrrd", "--days", 3, "--model", "pde-only",
                       "--out", tmp_path / "anonymous") == 2
    err = capsys.readouterr().err
    assert "Segment_1" in err and "--classes" in err
    # ... which fixes it.
    classes = ",".join(f"Segment_{k}={BRAIN_SCHEMA.names[k]}" for k in range(1, BRAIN_SCHEMA.num_classes))
    assert run_predict("--seg", tmp_path / "anonymous.seg.nrrd", "--classes", classes, "--days", 3,
                       "--model", "pde-only", "--out", tmp_path / "anonymous") == 0
    assert read_volumes(tmp_path / "anonymous" / "volumes.csv")[0.0] == mapped


def test_tumour_sub_region_segments_become_the_tumour_class(case, tmp_path):
    """BraTS-style segments: oedema and necrosis are drawn separately; the model has one tumour class."""
    labels, geometry = case["labels"], case["geometry"]
    values = labels.copy()
    tumour = labels == TUMOUR
    values[tumour & (np.indices(labels.shape)[2] % 2 == 0)] = 5  # half of the tumour voxels: necrosis
    names = {1: "Edema", 2: "White matter", 3: "Cortex", 4: "Ventricles", 5: "Necrosis"}
    segments = [{"id": f"S{v}", "name": n, "labelValue": v, "layer": 0, "color": [0.5, 0.5, 0.5]}
                for v, n in names.items()]
    slicerio.write_segmentation(str(tmp_path / "brats.seg.nrrd"),
                                {"voxels": np.ascontiguousarray(values.transpose(2, 1, 0)),
                                 "ijkToLPS": geometry.ijk_to_lps(), "segments": segments, "encoding": "gzip"})
    assert run_predict("--seg", tmp_path / "brats.seg.nrrd", "--days", 3, "--model", "pde-only",
                       "--out", tmp_path / "o") == 0
    baseline = read_volumes(tmp_path / "o" / "volumes.csv")[0.0]
    assert baseline["tumour_ml"] == pytest.approx(tumour.sum() * np.prod(geometry.spacing) / 1000, abs=1e-3)


def test_days_must_follow_the_baseline(case, capsys):
    assert run_predict("--seg", case["seg"], "--days", 0, 30, "--model", "pde-only", "--out", case["out"]) == 2
    assert "> 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: a non-number
        run_predict("--seg", case["seg"], "--days", "soon", "--out", case["out"])
    assert exit_info.value.code == 2
    assert not case["out"].exists()
