"""Tests of the visibility coding (AnatomyDTLib.models.visibility) and the well-posed repulsion.

The coding's promises, each checked against an independent computation (scipy distance
transforms, closed-form exponential profiles), on tiny real tensors:

* a labelled baseline survives encode → decode exactly (on anisotropic grids too);
* the encoded density is on the simplex, ≥ τ inside the label, < τ outside, with the tail only in
  infiltrated tissue inside the body;
* the tail follows τ·exp(-d/λ) with d the distance to the half-voxel boundary;
* a uniform kill by a factor f moves the visible margin inwards by λ·ln(1/f): the reason the
  coding exists (small kills shrink a treated tumour on the scan);
* gradients reach τ and λ through a whole model rollout.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from AnatomyDTLib.errors import ParameterError
from AnatomyDTLib.models import AnatomyDTModel, Conditioning, Config
from AnatomyDTLib.models.visibility import TAIL_CUTOFF, VisibilityCoding
from AnatomyDTLib.state import labels_to_field

K, TUMOUR, BACKGROUND = 5, 1, 0


def brain_like_labels(shape=(20, 22, 18), radius=4.0, seed=0):
    """Background outside an ellipsoid; white (2) / grey (3) halves, a ventricle box (4), a tumour ball (1)."""
    grid = np.indices(shape).astype(float)
    mid = (np.array(shape) - 1) / 2.0
    body = sum(((g - m) / (0.45 * n)) ** 2 for g, m, n in zip(grid, mid, shape)) < 1.0
    labels = np.zeros(shape, np.int64)
    labels[body] = 2
    labels[body & (grid[0] > mid[0] + 3)] = 3
    labels[body & (abs(grid[1] - mid[1]) < 2) & (abs(grid[2] - mid[2] + 4) < 2)] = 4
    centre = mid + np.array([-1.0, 2.0, 2.0])
    labels[body & (np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) <= radius)] = 1
    return labels


def coding(**kw) -> VisibilityCoding:
    args = dict(infiltrated_classes=[2, 3], excluded=(BACKGROUND,), threshold=0.15, length_mm=3.0)
    args.update(kw)
    return VisibilityCoding(K, TUMOUR, **args)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 6.0), (4.0, 4.0, 4.0)])
def test_decode_of_encode_gives_back_the_labels(spacing):
    labels = brain_like_labels()
    p0 = labels_to_field(labels, K)[None]
    vis = coding()
    with torch.no_grad():
        density = vis.encode(p0, spacing)
        back = vis.decode(density)
    assert torch.equal(back.argmax(1)[0], torch.as_tensor(labels))
    assert torch.allclose(density.sum(1), torch.ones(1, *labels.shape), atol=1e-6)
    assert torch.allclose(back.sum(1), torch.ones(1, *labels.shape), atol=1e-5)
    assert float(density.min()) >= 0.0


def test_a_given_core_density_replaces_the_coded_profile_and_keeps_the_labels():
    """Calibration restarts with a fitted density inside the lesion: where it is finite it is used
    (kept in [1.05 τ, 1]), where NaN the coded profile stays; the labels never change."""
    labels = brain_like_labels()
    p0 = labels_to_field(labels, K)[None]
    vis = coding()
    inside = torch.as_tensor(labels == TUMOUR)
    given = torch.full((1,) + labels.shape, float("nan"))
    half = inside.clone()
    half[: labels.shape[0] // 2] = False  # the fitted density covers only part of the lesion
    given[0][half] = 0.01  # below τ: lifted to 1.05 τ
    given[0][half & (torch.arange(labels.shape[2]) % 2 == 0)] = 0.6
    with torch.no_grad():
        coded = vis.encode(p0, (1.0, 1.0, 1.0))
        density = vis.encode(p0, (1.0, 1.0, 1.0), core_density=given)
        back = vis.decode(density)
    tumour = density[0, TUMOUR]
    expected = torch.clamp(given[0], min=1.05 * 0.15, max=1.0)
    assert torch.allclose(tumour[half], expected[half], atol=1e-6)
    assert torch.equal(tumour[inside & ~half], coded[0, TUMOUR][inside & ~half])
    assert torch.equal(density[0][:, ~inside], coded[0][:, ~inside])  # outside the lesion: as coded
    assert torch.equal(back.argmax(1)[0], torch.as_tensor(labels))
    assert torch.allclose(density.sum(1), torch.ones(1, *labels.shape), atol=1e-6)


def test_a_core_order_rearranges_the_coded_densities_and_keeps_mass_and_labels():
    """``core_order`` keeps the coded densities inside the lesion (same values, same sum) but puts
    the densest where the key is highest; a constant or NaN key gives the coded field back."""
    labels = brain_like_labels()
    p0 = labels_to_field(labels, K)[None]
    vis = coding(length_mm=1.0)
    inside = torch.as_tensor(labels == TUMOUR)
    zz = torch.arange(labels.shape[0], dtype=torch.float32).reshape(-1, 1, 1).expand(labels.shape)
    key = zz.clone()[None]   # "older" towards high z: the densest values must go there
    with torch.no_grad():
        coded = vis.encode(p0, (1.0, 1.0, 1.0))
        ordered = vis.encode(p0, (1.0, 1.0, 1.0), core_order=key)
        constant = vis.encode(p0, (1.0, 1.0, 1.0), core_order=torch.ones_like(key))
        unknown = vis.encode(p0, (1.0, 1.0, 1.0), core_order=torch.full_like(key, float("nan")))
        back = vis.decode(ordered)
    a, b = coded[0, TUMOUR][inside], ordered[0, TUMOUR][inside]
    assert not torch.equal(a, b)                                   # something moved
    assert torch.equal(torch.sort(a).values, torch.sort(b).values)  # ... the same values
    # ordered by the key: every density of a z plane of the lesion is at most every one of the next
    z_inside = zz[inside]
    planes = sorted(set(z_inside.tolist()))
    lowest = [float(b[z_inside == z].min()) for z in planes]
    highest = [float(b[z_inside == z].max()) for z in planes]
    assert all(hi <= lo for hi, lo in zip(highest, lowest[1:])), (lowest, highest)
    assert torch.equal(ordered[0][:, ~inside], coded[0][:, ~inside])  # outside the lesion: as coded
    assert torch.equal(back.argmax(1)[0], torch.as_tensor(labels))
    assert torch.allclose(ordered.sum(1), torch.ones(1, *labels.shape), atol=1e-6)
    assert torch.equal(constant, coded) and torch.equal(unknown, coded)
    with pytest.raises(ValueError, match="not both"):
        vis.encode(p0, (1.0, 1.0, 1.0), core_density=key, core_order=key)


def test_density_is_above_threshold_inside_and_the_tail_stays_in_tissue_in_the_body():
    labels = brain_like_labels()
    body = labels != BACKGROUND
    p0 = labels_to_field(labels, K)[None]
    vis = coding(length_mm=1.0)
    tau = float(vis.threshold().detach())
    with torch.no_grad():
        density = vis.encode(p0, (1.0, 1.0, 1.0), torch.as_tensor(body, dtype=torch.float32)[None]).numpy()[0]
    tumour = labels == TUMOUR
    assert density[TUMOUR][tumour].min() > tau
    assert density[TUMOUR][~tumour].max() < tau
    tail = (density[TUMOUR] > 0) & ~tumour
    assert tail.any()
    assert set(np.unique(labels[tail])) <= {2, 3}, "the tail entered the ventricles or the background"
    # The core is 1 deep inside; the tissue under the tumour is the nearest white/grey voxel.
    assert density[TUMOUR][tumour].max() == pytest.approx(1.0)
    _, index = ndi.distance_transform_edt(~np.isin(labels, [2, 3]), return_indices=True)
    nearest = labels[tuple(index)]
    rim = tumour & (density[TUMOUR] < 1.0)
    hidden = density[[2, 3]].argmax(0) + 2
    assert np.array_equal(hidden[rim], nearest[rim])


def test_tail_follows_the_exponential_profile_of_the_distance_to_the_margin():
    shape = (40, 6, 6)
    labels = np.full(shape, 2, np.int64)
    labels[:10] = TUMOUR                      # a half-space tumour: margin between voxels 9 and 10
    spacing = (0.5, 1.0, 1.0)
    vis = coding(length_mm=2.5, threshold=0.2)
    with torch.no_grad():
        density = vis.encode(labels_to_field(labels, K)[None], spacing).numpy()[0, TUMOUR, :, 3, 3]
    for i in range(10, 40):
        d = (i - 9) * 0.5 - 0.25              # mm from the half-voxel boundary
        expected = 0.2 * math.exp(-d / 2.5)
        expected = 0.0 if expected < TAIL_CUTOFF else expected
        assert density[i] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    for i in range(10):
        d = (10 - i) * 0.5 - 0.25
        assert density[i] == pytest.approx(min(1.0, 0.2 * math.exp(d / 2.5)), rel=1e-4)


def test_a_small_uniform_kill_moves_the_visible_margin_by_lambda_log_of_the_kill():
    """Killing a fraction 1 - f of the cells shrinks the visible tumour by λ·ln(1/f) mm."""
    shape = (60, 4, 4)
    labels = np.full(shape, 2, np.int64)
    labels[:30] = TUMOUR
    lam = 3.0
    vis = coding(length_mm=lam, threshold=0.1)
    with torch.no_grad():
        density = vis.encode(labels_to_field(labels, K)[None], (1.0, 1.0, 1.0))
        for survival in (0.5, 0.2):
            killed = density.clone()
            killed[:, TUMOUR] *= survival
            killed[:, 2] += density[:, TUMOUR] * (1 - survival)
            visible = int((vis.decode(killed).argmax(1)[0, :, 2, 2] == TUMOUR).sum())
            expected = 30 - lam * math.log(1 / survival)
            assert abs(visible - expected) <= 1.0, (survival, visible, expected)
    # An argmax labelling (no coding) would keep all 30 voxels for both kills: 1·0.5 = 0.5 ties, 0.2 < 0.8 flips all.


def test_gradients_reach_threshold_and_length_through_a_rollout():
    labels = brain_like_labels(shape=(14, 14, 12), radius=3.0)
    cfg = Config.from_dict({"model": {"alpha_channels": 4, "cnn_channels": 4, "cnn_dilations": [1], "film_hidden": 8,
                                      "dt_days": 5.0, "visibility_threshold": 0.15, "infiltrated_classes": [2, 3],
                                      "alpha_init_per_day": 0.05, "well_posed_cross_diffusion": True}})
    model = AnatomyDTModel(cfg.model, K, 3, tumour_index=TUMOUR, sink_index=BACKGROUND)
    p0 = labels_to_field(labels, K)[None]
    body = torch.as_tensor(labels != BACKGROUND, dtype=torch.float32)[None]
    traj, aux = model(p0, spacing=(2.0, 2.0, 2.0), days=[30.0], conditioning=Conditioning.from_static([{}]), mask=body)
    assert torch.equal(aux["p0_visible"].argmax(1), p0.argmax(1))
    assert torch.allclose(traj.sum(2), torch.ones_like(traj.sum(2)), atol=1e-4)
    grown = traj[0, 0, TUMOUR].sum()
    assert float((traj[0, 0].argmax(0) == TUMOUR).sum()) > float((p0[0].argmax(0) == TUMOUR).sum()), "no growth"
    grown.backward()
    for p in (model.visibility.raw_threshold, model.visibility.raw_length):
        assert p.grad is not None and torch.isfinite(p.grad) and float(p.grad.abs()) > 0


def test_well_posed_repulsion_never_exceeds_the_pair_diffusion():
    cfg = Config.from_dict({"model": {"well_posed_cross_diffusion": True, "repulsion_init_mm2_per_day": 0.02,
                                      "diffusion_init_mm2_per_day": [0.001, 0.1, 0.001, 0.001, 0.001]}})
    model = AnatomyDTModel(cfg.model, K, 2)
    r, d = model.repulsion().detach(), model.diffusion().detach()
    bound = d[:, None] + d[None, :]
    assert torch.all(r <= bound * (1 + 1e-6))
    assert float(r[0, 1]) == pytest.approx(0.02, rel=1e-3)   # inside the bound: the requested value
    assert float(r[2, 3]) == pytest.approx(0.99 * float(bound[2, 3]), rel=1e-3)  # outside: just under it
    with torch.no_grad():
        model.raw_repulsion.uniform_(-30, 30)
        model.raw_diffusion.uniform_(-20, 5)
    r, d = model.repulsion().detach(), model.diffusion().detach()
    assert torch.all(r <= (d[:, None] + d[None, :]) * (1 + 1e-6)) and torch.all(r >= 0)


@pytest.mark.parametrize("key,value", [("visibility_threshold", 1.5), ("visibility_threshold", 0.0),
                                       ("infiltration_length_mm", 0.0), ("infiltrated_classes", [])])
def test_visibility_configuration_errors_name_the_key(key, value):
    with pytest.raises(ParameterError, match=key):
        Config.from_dict({"model": {"visibility_threshold": 0.1, key: value}})


def test_infiltrated_class_outside_the_data_is_refused():
    cfg = Config.from_dict({"model": {"visibility_threshold": 0.1, "infiltrated_classes": [2, 7]}})
    with pytest.raises(ParameterError, match="infiltrated_classes"):
        cfg.check_classes(5)


def test_forecast_with_visibility_on_a_finer_grid_changes_nothing_at_day_0_and_grows_later():
    """The learned forecast resamples to its 4 mm grid; day 0 must give the 2 mm labels back exactly."""
    from AnatomyDTLib.models import LearnedForecastModel
    from AnatomyDTLib.schema import BRAIN_SCHEMA

    torch.manual_seed(0)
    cfg = Config.from_dict({"model": {"alpha_channels": 4, "cnn_channels": 4, "cnn_dilations": [1], "film_hidden": 8,
                                      "dt_days": 5.0, "alpha_init_per_day": 0.05, "visibility_threshold": 0.1,
                                      "infiltrated_classes": [2, 3], "well_posed_cross_diffusion": True}})
    net = AnatomyDTModel(cfg.model, K, 3, tumour_index=TUMOUR, sink_index=BACKGROUND)
    model = LearnedForecastModel(net, BRAIN_SCHEMA.names, info={"spacing": [4.0, 4.0, 4.0], "body_mask": True})
    coarse = brain_like_labels(shape=(12, 12, 10), radius=2.5)
    fine = np.repeat(np.repeat(np.repeat(coarse, 2, 0), 2, 1), 2, 2)          # the same anatomy at 2 mm
    out = model.forecast(labels_to_field(fine, K), spacing=(2.0, 2.0, 2.0), days=[0.0, 60.0])
    assert torch.equal(out[0].argmax(0), torch.as_tensor(fine))
    grown = out[1].argmax(0).numpy()
    assert (grown == TUMOUR).sum() > (fine == TUMOUR).sum()
    assert np.array_equal(grown[fine == BACKGROUND], fine[fine == BACKGROUND])
