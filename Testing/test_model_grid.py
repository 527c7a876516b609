"""A learned model runs on its own voxel size and answers on the input grid (models/model_grid.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AnatomyDTLib.models import AnatomyDTModel, Config, LearnedForecastModel
from AnatomyDTLib.models.model_grid import (changes_to_input_grid, model_grid_shape, needs_resampling, resize_field,
                                            resize_plan)
from AnatomyDTLib.plan import load_plan
from AnatomyDTLib.schema import BRAIN_SCHEMA
from AnatomyDTLib.state import labels_to_field

SMALL = {"alpha_channels": 4, "cnn_channels": 4, "cnn_dilations": [1, 2], "film_hidden": 8, "dt_days": 5.0,
         "alpha_init_per_day": 0.05, "diffusion_init_mm2_per_day": [0.001, 0.2, 0.001, 0.001, 0.001]}


def brain_labels(shape):
    """A box 'brain': white matter left, grey matter right, ventricle strip, a tumour ball, outside = 0."""
    z, y, x = np.indices(shape)
    labels = np.full(shape, 2, dtype=np.uint8)
    labels[..., shape[2] // 2:] = 3
    labels[:, :, :2] = 0
    labels[:, 3:5, shape[2] // 2 - 1] = 4
    c = np.array(shape) / 2.0
    r = np.sqrt(((z - c[0]) * 2.0) ** 2 + ((y - c[1]) * 2.0) ** 2 + ((x - c[2]) * 2.0) ** 2)  # on a 2 mm grid
    labels[r < 7.0] = 1
    return labels


def test_area_downsampling_keeps_the_simplex_and_the_volumes():
    labels = brain_labels((12, 14, 16))
    p = labels_to_field(labels, 5)
    coarse = resize_field(p, (6, 7, 8))
    assert torch.allclose(coarse.sum(0), torch.ones(6, 7, 8), atol=1e-6)
    assert torch.allclose(coarse.sum((1, 2, 3)) * 8, p.sum((1, 2, 3)), rtol=1e-5)  # class volumes exact
    mixed = resize_field(p, (18, 7, 8))  # one axis finer, two coarser (an anisotropic input)
    assert mixed.shape == (5, 18, 7, 8) and float(mixed.min()) >= 0
    assert torch.allclose(mixed.sum(0), torch.ones(18, 7, 8), atol=1e-5)


def test_model_grid_shape_keeps_the_extent():
    assert model_grid_shape((155, 240, 240), (1.0, 1.0, 1.0), (4.0, 4.0, 4.0)) == (39, 60, 60)
    assert model_grid_shape((30, 256, 256), (6.0, 0.8, 0.8), (4.0, 4.0, 4.0)) == (45, 51, 51)
    assert not needs_resampling((2.0, 2.01, 2.0), (2.0, 2.0, 2.0))
    assert needs_resampling((1.0, 1.0, 1.0), (2.0, 2.0, 2.0))
    assert not needs_resampling((1.0, 1.0, 1.0), None)


def test_no_change_on_the_model_grid_returns_the_input_untouched():
    """Fine detail the model grid cannot hold (a 1-voxel ribbon) survives where nothing changes."""
    labels = brain_labels((12, 14, 16))
    labels[:, :, 10] = 4  # one-voxel-thin structure, lost by any 2x down-and-up resampling
    p0 = labels_to_field(labels, 5)
    coarse = resize_field(p0, (6, 7, 8))
    out = changes_to_input_grid(p0, coarse, torch.stack([coarse, coarse]))
    assert out.shape == (2,) + tuple(p0.shape)
    assert torch.allclose(out[1], p0, atol=1e-6)
    assert not torch.allclose(resize_field(coarse, p0.shape[1:]), p0, atol=0.1)  # what a plain resampling loses


def test_plan_arrays_follow_the_anatomy():
    dose = np.zeros((12, 14, 16))
    dose[2:10, 2:12, 2:14] = 60.0
    mask = np.zeros((12, 14, 16), dtype=bool)
    mask[4:8, 4:8, 4:8] = True
    plan = load_plan({"version": 1, "surgery": [{"day": 1, "resection_mask": mask}],
                      "radiotherapy": {"start_day": 20, "total_dose_gy": 60, "fractions": 30, "dose_map": dose}},
                     schema=BRAIN_SCHEMA)
    small = resize_plan(plan, (6, 7, 8))
    assert small.radiotherapy.dose_map.shape == (6, 7, 8) and float(small.radiotherapy.dose_map.max()) == pytest.approx(60.0)
    assert small.surgeries[0].resection_mask.shape == (6, 7, 8)
    assert small.surgeries[0].resection_mask.sum() * 8 == mask.sum()


def test_a_model_trained_at_2mm_answers_a_1mm_input_on_the_1mm_grid():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = AnatomyDTModel(Config.from_dict({"model": SMALL}).model, 5, 3)
    model = LearnedForecastModel(net, BRAIN_SCHEMA.names, info={"spacing": [2.0, 2.0, 2.0], "body_mask": True})
    coarse_labels = brain_labels((10, 12, 12))
    fine_labels = np.repeat(np.repeat(np.repeat(coarse_labels, 2, 0), 2, 1), 2, 2)  # the same anatomy at 1 mm
    coarse = model.forecast(labels_to_field(coarse_labels, 5), spacing=(2.0, 2.0, 2.0), days=[40.0])
    fine = model.forecast(labels_to_field(fine_labels, 5), spacing=(1.0, 1.0, 1.0), days=[40.0])
    assert fine.shape == (1, 5, 20, 24, 24)
    assert torch.allclose(fine.sum(1), torch.ones(1, 20, 24, 24), atol=1e-5) and float(fine.min()) >= 0
    tumour_coarse = float(coarse[0, 1].sum()) * 8.0  # mm³
    tumour_fine = float(fine[0, 1].sum()) * 1.0
    assert tumour_coarse > float((coarse_labels == 1).sum()) * 8.0 * 1.2  # it grew
    assert tumour_fine == pytest.approx(tumour_coarse, rel=0.05)  # the same prediction, on the finer grid
    outside = fine_labels == 0
    assert torch.equal(fine[0].argmax(0)[torch.as_tensor(outside)], torch.zeros(int(outside.sum()), dtype=torch.int64))


def _projection_by_bisection(v: np.ndarray) -> np.ndarray:
    """Reference projection onto the simplex, row by row (classes last): bisection for the θ with
    sum(max(v - θ, 0)) = 1, independent of the sorting algorithm of AnatomyDTLib.simplex."""
    lo = v.min(axis=1) - 1.0
    hi = v.max(axis=1)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        too_much = np.maximum(v - mid[:, None], 0.0).sum(axis=1) > 1.0
        lo, hi = np.where(too_much, mid, lo), np.where(too_much, hi, mid)
    return np.maximum(v - (0.5 * (lo + hi))[:, None], 0.0)


@pytest.mark.parametrize("dim", [0, 1])
def test_projecting_only_the_voxels_off_the_simplex(dim):
    """project_off_simplex_ projects the voxels with a negative value or a sum off 1 (as the
    bisection reference does) and leaves every other voxel bit for bit as it was."""
    from AnatomyDTLib.simplex import project_off_simplex_

    rng = np.random.default_rng(4)
    field = rng.dirichlet(np.full(5, 0.6), size=(7, 6, 9))  # (*S, K), on the simplex
    off = rng.random((7, 6, 9)) < 0.2
    field[off] += rng.normal(0.0, 0.3, size=(int(off.sum()), 5))  # pushed off: negatives, wrong sums
    v = torch.from_numpy(np.moveaxis(field, -1, 0).copy())  # (K, *S)
    if dim == 1:
        v = v[None]
    before = v.clone()
    out = project_off_simplex_(v, dim=dim)
    assert out is v
    classes_last = v.movedim(dim, -1).reshape(-1, 5).numpy()
    reference = _projection_by_bisection(before.movedim(dim, -1).reshape(-1, 5).numpy())
    flat_off = off.reshape(-1)
    assert np.abs(classes_last[flat_off] - reference[flat_off]).max() < 1e-12
    assert np.array_equal(classes_last[~flat_off], before.movedim(dim, -1).reshape(-1, 5).numpy()[~flat_off])
    assert classes_last.min() >= 0 and np.abs(classes_last.sum(1) - 1).max() < 1e-12


def test_projecting_off_simplex_voxels_of_a_strided_field():
    """The same projection on a field whose class axis is not the slowest (a permuted view)."""
    from AnatomyDTLib.simplex import project_off_simplex_

    rng = np.random.default_rng(5)
    field = rng.dirichlet(np.full(4, 0.6), size=(5, 6, 7))  # (*S, K)
    field[1:3] -= 0.05  # negatives and wrong sums on two planes
    v = torch.from_numpy(field.copy())  # classes last: dim = 3, not contiguous once moved first
    reference = _projection_by_bisection(field.reshape(-1, 4)).reshape(field.shape)
    project_off_simplex_(v, dim=3)
    assert np.abs(v.numpy()[1:3] - reference[1:3]).max() < 1e-12
    assert np.array_equal(v.numpy()[[0, 3, 4]], field[[0, 3, 4]])
