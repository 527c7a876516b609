"""Tests of atlas-based anatomy completion: recover a known affine transform of the atlas (with a
tumour) and check per-class Dice against the truth, that the tumour is kept, and the errors.

Thresholds (measured values in docs/brain_data.md): affine at 3 mm WM >= 0.90, GM >= 0.90,
ventricles >= 0.88; with the demons stage at 4 mm WM/GM >= 0.92, ventricles >= 0.88.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from AnatomyDTLib.brain.atlas import load_atlas_arrays
from AnatomyDTLib.brain.completion import complete_anatomy
from AnatomyDTLib.errors import InputError
from AnatomyDTLib.io import Geometry
from AnatomyDTLib.schema import BRAIN_SCHEMA

TUMOUR, WM, GM, LV = 1, 2, 3, 4


def _known_transform(atlas):
    """Patient point -> atlas point: rotations (6, -4, 8) degrees, scales (1.06, 0.95, 1.03), shift (7, -5, 4) mm."""
    rotation = np.asarray(sitk.Euler3DTransform((0, 0, 0), *np.deg2rad([6, -4, 8])).GetMatrix()).reshape(3, 3)
    matrix = rotation @ np.diag([1.06, 0.95, 1.03])
    t = sitk.AffineTransform(3)
    t.SetMatrix(matrix.ravel().tolist())
    t.SetTranslation((7.0, -5.0, 4.0))
    centre_ijk = np.argwhere(atlas.brain_mask).mean(0)[::-1]
    t.SetCenter((atlas.geometry.ijk_to_lps()[:3] @ np.r_[centre_ijk, 1.0]).tolist())
    return t, matrix


def _phantom(spacing_mm):
    """The atlas FLAIR/labels seen through the known transform on a coarser grid, plus a 15 mm tumour."""
    atlas = load_atlas_arrays(2)
    transform, matrix = _known_transform(atlas)
    geometry = Geometry((spacing_mm,) * 3, atlas.geometry.origin, atlas.geometry.direction)
    size = [int(np.ceil(n * 2.0 / spacing_mm)) for n in reversed(atlas.labels.shape)]
    reference = geometry.apply_to_sitk(sitk.Image(size, sitk.sitkUInt8))

    def warp(array, mode):
        image = atlas.geometry.apply_to_sitk(sitk.GetImageFromArray(np.ascontiguousarray(array)))
        return sitk.GetArrayFromImage(sitk.Resample(image, reference, transform, mode, 0.0))

    flair = warp(atlas.flair.astype(np.float32), sitk.sitkLinear).astype(np.float32)
    truth = warp(atlas.labels, sitk.sitkNearestNeighbor).astype(np.uint8)
    wm = np.argwhere(truth == WM)
    centre = wm[len(wm) // 3]
    grid = np.indices(truth.shape)
    tumour = (((grid - centre.reshape(3, 1, 1, 1)) * spacing_mm) ** 2).sum(0) <= 15.0 ** 2
    tumour &= truth > 0
    truth[tumour] = TUMOUR
    flair[tumour] = 1.1
    scanner = 800.0 * flair + 15.0 * (flair > 0)  # arbitrary scanner units
    return truth, scanner.astype(np.float32), geometry, matrix


def _dice(a, b):
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_affine_completion_recovers_known_transform_and_keeps_tumour():
    truth, flair, geometry, matrix = _phantom(3.0)
    tumour_only = np.where(truth == TUMOUR, TUMOUR, 0).astype(np.uint8)
    fractions = []
    labels, report = complete_anatomy(tumour_only, flair, geometry, progress=fractions.append)
    dice = {k: _dice(labels == k, truth == k) for k in (WM, GM, LV)}
    assert dice[WM] >= 0.90 and dice[GM] >= 0.90 and dice[LV] >= 0.88, dice
    np.testing.assert_array_equal(labels == TUMOUR, truth == TUMOUR)  # the patient's tumour, exactly
    assert np.abs(np.asarray(report["affine_matrix"]) - matrix).max() < 0.03
    assert report["metric"] < -1.0 and report["seconds"] < 20 and not report["deformable"]
    assert isinstance(report["transform"], sitk.Transform)
    assert fractions and fractions[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in fractions)
    cavity = np.zeros_like(tumour_only, bool)
    cavity[tuple(np.argwhere(truth == WM)[100])] = True
    with_cavity, _ = complete_anatomy(tumour_only, flair, geometry, cavity_mask=cavity)
    assert with_cavity[cavity].tolist() == [BRAIN_SCHEMA.background_index]


def test_demons_stage_refines_the_affine_result():
    truth, flair, geometry, _ = _phantom(4.0)
    tumour_only = np.where(truth == TUMOUR, TUMOUR, 0).astype(np.uint8)
    affine_labels, _ = complete_anatomy(tumour_only, flair, geometry)
    labels, report = complete_anatomy(tumour_only, flair, geometry, deformable=True)
    dice = {k: _dice(labels == k, truth == k) for k in (WM, GM, LV)}
    before = {k: _dice(affine_labels == k, truth == k) for k in (WM, GM, LV)}
    assert dice[WM] >= 0.92 and dice[GM] >= 0.92 and dice[LV] >= 0.88, dice
    assert dice[WM] >= before[WM] - 0.005 and dice[GM] >= before[GM] - 0.005
    assert report["deformable"] and "demons" in report["stop_condition"]
    assert (labels == TUMOUR).sum() == (truth == TUMOUR).sum()


def test_completion_input_errors():
    geometry = Geometry((2.0, 2.0, 2.0))
    with pytest.raises(InputError, match="same grid"):
        complete_anatomy(np.zeros((4, 5, 6), np.uint8), np.ones((4, 5, 7), np.float32), geometry)
    with pytest.raises(InputError, match="constant"):
        complete_anatomy(np.zeros((4, 5, 6), np.uint8), np.ones((4, 5, 6), np.float32), geometry)
    with pytest.raises(InputError, match="3D"):
        complete_anatomy(np.zeros((5, 6), np.uint8), np.ones((5, 6), np.float32), Geometry((2.0, 2.0)))
