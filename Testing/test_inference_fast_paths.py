"""The shortcuts of the no-grad inference path (AnatomyDTLib/inference.py) against the reference path.

Each test runs the same problem through the differentiable reference path (gradients on) and the
in-place inference path (``torch.no_grad``) and bounds the difference. The problems are chosen so
that each shortcut is actually taken: the single-column cross-diffusion (brain mass effect), the
limiter-free step, in-place radiotherapy on the tumour box, the support floor, the gathered
projection; and the cases that must fall back to the general code (mixed signs, active limiter).
Also: the argmax of ``field_to_labels`` and the label cache of ``Prediction``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from AnatomyDTLib import simulate
from AnatomyDTLib.inference import InferenceStepper, support_floor
from AnatomyDTLib.parameters import PDEParameters
from AnatomyDTLib.schema import BRAIN_SCHEMA
from AnatomyDTLib.state import field_to_labels

K = 5
TUMOUR, WM, GM, VENT = 1, 2, 3, 4
RT_PLAN = {"radiotherapy": {"fraction_days": [2, 3, 4], "dose_per_fraction_gy": 2.0},
           "chemotherapy": [{"agent": "tmz", "kill_rate_per_day": 0.1, "windows": [[1.0, 5.0]]}]}


def _brain_like(shape=(20, 24, 22), dtype=torch.float64) -> torch.Tensor:
    """Background shell, WM / GM halves, a ventricle slab and a compact tumour: one-hot (K, *S)."""
    labels = torch.zeros(shape, dtype=torch.long)
    labels[2:-2, 2:-2, 2:-2] = GM
    labels[2:-2, 2:-2, shape[2] // 2:-2] = WM
    labels[4:7, 6:18, 4:9] = VENT
    labels[8:13, 9:14, 9:15] = TUMOUR
    return torch.nn.functional.one_hot(labels, K).permute(3, 0, 1, 2).to(dtype)


def _tissue_diffusion(p0: torch.Tensor) -> torch.Tensor:
    """Tumour D 0.2 mm²/day in white matter, 0.02 elsewhere; the tissues do not diffuse."""
    d = torch.zeros_like(p0)
    d[TUMOUR] = 0.2 * p0[WM] + 0.02 * (1 - p0[WM])
    return d


def _chi(values: dict) -> torch.Tensor:
    chi = torch.zeros(K, K, dtype=torch.float64)
    for (k, j), v in values.items():
        chi[k, j] = v
    return chi


def _both_paths(p0, **kwargs):
    reference = simulate(p0, return_trajectory=True, **kwargs)
    with torch.no_grad():
        fast = simulate(p0, return_trajectory=True, **kwargs)
    return reference, fast


def _assert_on_simplex(field):
    assert float(field.min()) >= 0.0
    assert float((field.sum(1) - 1).abs().max()) < 1e-12


@pytest.mark.parametrize("chi_values, plan, masked", [
    ({(WM, TUMOUR): -0.01, (GM, TUMOUR): -0.01, (VENT, TUMOUR): -0.005}, RT_PLAN, False),  # brain mass effect
    ({(WM, TUMOUR): -0.01, (GM, TUMOUR): -0.02, (VENT, TUMOUR): -0.01}, None, True),
    ({(WM, TUMOUR): 0.01, (GM, TUMOUR): 0.02}, RT_PLAN, False),  # attraction: the other donor
    ({(WM, TUMOUR): 0.01, (GM, TUMOUR): -0.02}, None, False),  # mixed signs: general form
    ({(WM, TUMOUR): -0.01, (GM, VENT): 0.01}, None, False),  # two columns: general form
])
def test_cross_diffusion_shortcuts_match_the_reference(chi_values, plan, masked):
    p0 = _brain_like()
    mask = None
    if masked:
        mask = torch.zeros(p0.shape[1:], dtype=torch.bool)
        mask[1:-1, 1:-1, 1:-1] = True
    kwargs = dict(spacing=(1.0, 1.0, 1.5), days=[3.0, 8.0], dt=1.0, diffusion=_tissue_diffusion(p0), growth_rate=0.1,
                  cross_diffusion=_chi(chi_values), plan=plan, mask=mask)
    reference, fast = _both_paths(p0, **kwargs)
    # Measured ≤ 1e-13: the same products in another order, plus the support floor (4.9e-32 in float64).
    assert float((reference - fast).abs().max()) < 1e-10
    _assert_on_simplex(fast)
    if mask is not None:
        assert torch.equal(fast[:, :, ~mask], p0[:, ~mask].unsqueeze(0).expand(2, -1, -1))


def test_the_limiter_free_step_is_taken_only_below_its_bound_and_the_limited_step_matches(monkeypatch):
    p0 = _brain_like((14, 16, 14))
    calls = {"limited": 0}
    original = InferenceStepper._limit_outflow_

    def counting(self, *args):
        calls["limited"] += 1
        return original(self, *args)

    monkeypatch.setattr(InferenceStepper, "_limit_outflow_", counting)
    # Strong, still well-posed attraction (D_T + D_WM + χ >= 0): Δt·Σ|χ|·2·Σ1/h² = 0.5·1.5·6 > 1/2,
    # so the steps compute the outflow limiter.
    chi = _chi({(WM, TUMOUR): 1.5, (GM, TUMOUR): 1.0})
    kwargs = dict(spacing=(1.0, 1.0, 1.0), days=[2.0], dt=0.5, diffusion=[0, 2.5, 0, 0, 0], growth_rate=0.0,
                  cross_diffusion=chi)
    reference, fast = _both_paths(p0, **kwargs)
    assert calls["limited"] > 0
    assert float((reference - fast).abs().max()) < 1e-10
    _assert_on_simplex(fast)
    # and the brain's mass effect (χ = -0.01, Δt = 1 day, 1 mm) never needs it
    calls["limited"] = 0
    with torch.no_grad():
        simulate(p0, spacing=(1.0, 1.0, 1.0), days=[3.0], dt=1.0, diffusion=[0, 0.2, 0, 0, 0],
                 cross_diffusion=_chi({(WM, TUMOUR): -0.01, (GM, TUMOUR): -0.01}))
    assert calls["limited"] == 0


def test_radiotherapy_in_place_with_a_dose_map_matches_the_reference():
    p0 = _brain_like()
    dose = np.zeros(p0.shape[1:])
    dose[:, :, :12] = 60.0  # Gy over the plan; half the tumour is outside the field
    plan = {"radiotherapy": {"fraction_days": [1, 2, 3, 4, 5], "dose_per_fraction_gy": 2.0, "dose_map": dose}}
    kwargs = dict(spacing=(1.0, 1.0, 1.0), days=[6.0], dt=1.0, diffusion=_tissue_diffusion(p0), growth_rate=0.05,
                  cross_diffusion=_chi({(WM, TUMOUR): -0.01}), plan=plan)
    reference, fast = _both_paths(p0, **kwargs)
    assert float((reference - fast).abs().max()) < 1e-10
    untreated = simulate(p0, **{**kwargs, "plan": None})
    assert float(fast[-1, TUMOUR].sum()) < float(untreated[TUMOUR].sum()) - 1.0  # the fractions did act


def test_support_floor_keeps_the_active_box_bounded_and_changes_values_by_less_than_the_floor_bound():
    # A 1-D tumour slab diffusing for 40 days in a long grid: without a floor every Jacobi sweep
    # would give one more voxel a non-zero (ever smaller) value, 2 voxels a step.
    labels = torch.full((4, 4, 160), WM, dtype=torch.long)
    labels[:, :, 76:84] = TUMOUR
    p0 = torch.nn.functional.one_hot(labels, K).permute(3, 0, 1, 2).double()
    alpha, days = 0.05, 40.0
    kwargs = dict(spacing=(1.0, 1.0, 1.0), days=[days], dt=1.0, diffusion=[0, 0.2, 0, 0, 0], growth_rate=alpha)
    reference, fast = _both_paths(p0, **kwargs)
    floor = support_floor(torch.float64)
    assert float((reference - fast).abs().max()) < 1e-12  # summation-order rounding (measured 4e-14)
    far = fast[0, TUMOUR, 0, 0] == 0
    assert bool(far[:5].all()) and bool(far[-5:].all())  # the ends are exactly zero in the fast path
    assert float(reference[0, TUMOUR, 0, 0, :5].max()) < floor * math.exp(alpha * days)
    # float32: the floor is ε² = 1.4e-14; the box stays well inside the 160-voxel grid
    with torch.no_grad():
        fast32 = simulate(p0.float(), **kwargs)
    nonzero = torch.nonzero(fast32[TUMOUR, 0, 0]).flatten()
    assert 0 < int(nonzero[0]) and int(nonzero[-1]) < 159
    assert int(nonzero[-1] - nonzero[0]) < 90  # measured 63; 111 with only denormals flushed
    assert float((reference[0].float() - fast32).abs().max()) < 1e-6


def test_float32_inference_with_brain_defaults_tracks_the_float64_reference():
    p0 = _brain_like()
    kwargs = PDEParameters.brain_defaults().simulate_kwargs(p0, BRAIN_SCHEMA)
    reference = simulate(p0, spacing=(1.0, 1.0, 1.0), days=20.0, plan=RT_PLAN, **kwargs)
    kwargs32 = PDEParameters.brain_defaults().simulate_kwargs(p0.float(), BRAIN_SCHEMA)
    with torch.no_grad():
        fast = simulate(p0.float(), spacing=(1.0, 1.0, 1.0), days=20.0, plan=RT_PLAN, **kwargs32)
    assert float((reference.float() - fast).abs().max()) < 2e-5  # float32 rounding over 20 steps


def test_field_to_labels_equals_torch_argmax_including_ties():
    g = torch.Generator().manual_seed(3)
    field = torch.rand(K, 9, 10, 11, generator=g)
    field[2, :3] = field[4, :3] = 2.0  # ties between classes 2 and 4 -> 2
    field[:, 5, 5, 5] = 0.2  # all equal -> 0
    labels = field_to_labels(field)
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.argmax(field, dim=0))
    assert int(labels[5, 5, 5]) == 0 and bool((labels[:3] == 2).all())
    batched = torch.rand(2, K, 6, 7, generator=g)
    assert torch.equal(field_to_labels(batched, batched=True), torch.argmax(batched, dim=1))
    assert torch.equal(field_to_labels(field.double()), torch.argmax(field, dim=0))


def test_prediction_labels_are_computed_once_and_returned_as_copies():
    from AnatomyDTLib.io import Geometry
    from AnatomyDTLib.predict import Prediction
    from AnatomyDTLib.state import AnatomyState

    p0 = _brain_like((6, 8, 9), torch.float32)
    fields = torch.stack([p0, p0.roll(1, dims=3)])
    geometry = Geometry((1.0, 1.0, 2.0))
    prediction = Prediction([10.0, 20.0], fields, geometry, BRAIN_SCHEMA, "test", "0", AnatomyState(p0, geometry))
    first = prediction.labels(1)
    first[:] = 0
    again = prediction.labels(1)
    assert np.array_equal(again, field_to_labels(fields[1]).numpy())
    rows = prediction.volumes_ml()
    assert rows[2][1] == AnatomyState(fields[1], geometry).class_volumes_ml()
