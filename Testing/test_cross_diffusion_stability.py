"""Cross-diffusion: well-posedness on the simplex and the stability limit of its explicit step.

docs/solver.md, "Cross-diffusion: well-posedness and the explicit step limit", explains the two
mechanisms that made float32 and float64 runs drift apart; benchmarks/cross_diffusion_stability.py
reproduces the measurements quoted here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from AnatomyDTLib import simulate

K = 5


def _compact_tumour_field():
    """Same field as Testing/test_inference_path.py: WM half-space, tumour block, ventricle slab."""
    labels = torch.zeros(30, 32, 28, dtype=torch.long)
    labels[:, :, 14:] = 2
    labels[10:20, 12:20, 10:18] = 1
    labels[2:6] = 4
    return torch.nn.functional.one_hot(labels, K).permute(3, 0, 1, 2).double()


def _mass_effect(white_matter, ventricles):
    chi = torch.zeros(K, K, dtype=torch.float64)
    chi[2, 1], chi[4, 1] = white_matter, ventricles
    return chi


def _slab(n, h):
    """1-D tumour slab in white matter on a 2 × n grid (classes background, tumour, white matter)."""
    x = (torch.arange(n) + 0.5) * h
    labels = torch.full((n,), 2, dtype=torch.long)
    labels[(x > 0.4 * n * h) & (x < 0.6 * n * h)] = 1
    return torch.nn.functional.one_hot(labels, 3).T.double().reshape(3, 1, n).expand(3, 2, n).clone()


def test_float32_tracks_float64_over_90_days_with_well_posed_mass_effect():
    # The reported problem with a well-posed mass effect (|χ| = 0.1 < D_tumour = 0.2). Before the fix
    # the explicit cross-diffusion ran at Δt = 1 day, 3× its stability limit (0.35 day for 1 mm voxels
    # with m = 2 sweeps): float32 and float64 differed by 6e-3 at day 60 and 3e-2 at day 90. The solver
    # now takes 3 sub-steps per day; measured 7e-7 / 1.2e-6 / 1.3e-6 at days 30 / 60 / 90, the same
    # size as without cross-diffusion (2.4e-7..3.6e-7). Tolerance 2e-5: 15× the measurement, 1000×
    # below the old drift.
    p0 = _compact_tumour_field()
    kwargs = dict(spacing=(1.0, 1.0, 1.0), days=[30.0, 60.0, 90.0], dt=1.0, diffusion=[0, 0.2, 0, 0, 0],
                  growth_rate=0.05, cross_diffusion=_mass_effect(-0.1, -0.1), return_trajectory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # well-posed: no warning
        with torch.no_grad():
            double = simulate(p0, **kwargs)
            single = simulate(p0.float(), **kwargs)
    gap = (double.float() - single).abs().flatten(1).amax(dim=1)
    assert float(gap.max()) < 2e-5, gap
    assert float(single.min()) >= 0.0 and float((single.sum(1) - 1).abs().max()) < 1e-5


def test_perturbation_of_a_well_posed_problem_does_not_grow():
    # 1-D tumour slab, h = 0.25 mm, Δt = 0.25 day requested: 4× beyond the step limit of the explicit
    # cross-diffusion (0.065 day). Before the fix a 1e-10 perturbation grew at 0.25/day and passed
    # 1e-6 on day 18 (3e-2 by day 60, benchmarks section "growth"). With the automatic sub-steps it
    # decays (measured: stays at its initial 1e-10 level); tolerance 1e-8 over 60 days.
    h, n = 0.25, 160
    p0 = _slab(n, h)
    e = 1e-10 * torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p1 = p0.clone()
    p1[1] += e
    p1[2] -= e
    p1 = p1.clamp(min=0.0)
    p1 = p1 / p1.sum(0)
    chi = torch.zeros(3, 3, dtype=torch.float64)
    chi[2, 1] = -0.1
    kwargs = dict(spacing=(1.0, h), days=[20.0, 40.0, 60.0], dt=0.25, diffusion=[0, 0.2, 0], cross_diffusion=chi,
                  return_trajectory=True)
    with torch.no_grad():
        a = simulate(p0, **kwargs)
        b = simulate(p1, **kwargs)
    growth = (a - b).abs().flatten(1).amax(dim=1)
    assert float(growth.max()) < 1e-8, growth


def test_stability_limit_follows_the_two_class_analysis():
    from AnatomyDTLib.operators import cross_diffusion_stability

    d = torch.tensor([0.0, 0.2, 0.0, 0.0, 0.0], dtype=torch.float64).reshape(1, K, 1, 1, 1)
    shape, h = (30, 32, 28), (1.0, 1.0, 1.0)
    # |χ| = 0.1: well-posed; the two-class amplification factor needs Δt <= 0.345 day → 3 sub-steps of 1 day.
    report = cross_diffusion_stability(d, _mass_effect(-0.1, -0.1), h, shape, 1.0)
    assert (report.ill_posed, report.unresolved, report.substeps) == ([], [], 3)
    # Halving h quarters the limit (parabolic, Δt = O(h²)).
    fine = cross_diffusion_stability(d, _mass_effect(-0.1, -0.1), (0.5, 0.5, 0.5), (60, 64, 56), 1.0)
    assert 11 <= fine.substeps <= 13
    # The reported case: χ_WM,T = −0.3 < −D_T is ill-posed (margin −0.1), χ_V,T = −0.2 has no margin.
    report = cross_diffusion_stability(d, _mass_effect(-0.3, -0.2), h, shape, 1.0)
    assert [(k, j) for k, j, _ in report.ill_posed] == [(2, 1)]
    assert report.ill_posed[0][2] == pytest.approx(-0.1)
    assert [(k, j) for k, j, _ in report.unresolved] == [(4, 1)]
    # Attraction has an explicit limit too (about 3/(χ σ_max) for an immobile class).
    attraction = cross_diffusion_stability(d, _mass_effect(0.3, 0.0), h, shape, 1.0)
    assert attraction.ill_posed == [] and attraction.substeps == 2


def test_ill_posed_cross_diffusion_is_reported_but_computed_as_asked():
    from AnatomyDTLib.solver import CrossDiffusionWarning

    p0 = _compact_tumour_field()
    kwargs = dict(spacing=(1.0, 1.0, 1.0), days=2.0, dt=1.0, diffusion=[0, 0.2, 0, 0, 0],
                  cross_diffusion=_mass_effect(-0.3, -0.1))
    with pytest.warns(CrossDiffusionWarning, match=r"ill-posed.*white_matter.*tumour"):
        out = simulate(p0, **kwargs)
    assert float(out.min()) >= 0.0 and float((out.sum(0) - 1).abs().max()) < 1e-12


def test_delayed_death_channel_does_not_make_the_mass_effect_ill_posed():
    # The immobile dying channel pushed tissue like tumour does; with immobile tissue (D = 0) that pair
    # has margin χ < 0 (ill-posed). Its push is now clipped to what the tissue's own D can balance.
    from AnatomyDTLib.solver import _extended_chi

    chi = _mass_effect(-0.1, 0.05)
    d = torch.tensor([0.0, 0.2, 0.03, 0.0, 0.0, 0.0], dtype=torch.float64).reshape(1, K + 1, 1, 1, 1)
    ext = _extended_chi(chi, 1, d)
    assert torch.equal(ext[:K, :K], chi)
    assert float(ext[2, K]) == pytest.approx(-0.03)  # clipped to −D_white_matter
    assert float(ext[4, K]) == pytest.approx(0.05)  # attraction is copied
    assert float(ext[1, K]) == 0.0 and bool((ext[K] == 0).all())
    plan = {"radiotherapy": {"fraction_days": [1, 2], "dose_per_fraction_gy": 2.0,
                             "delayed_death": {"delay_days": 1, "clearance_half_life_days": 3}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = simulate(_compact_tumour_field(), spacing=(1.0, 1.0, 1.0), days=4.0, dt=1.0, diffusion=[0, 0.2, 0, 0, 0],
                       growth_rate=0.05, cross_diffusion=_mass_effect(-0.1, -0.1), plan=plan)
    assert float(out.min()) >= 0.0


def test_brain_defaults_are_well_posed_and_stable_at_one_day():
    from AnatomyDTLib.operators import cross_diffusion_stability
    from AnatomyDTLib.parameters import PDEParameters
    from AnatomyDTLib.phantom import ellipsoid_brain
    from AnatomyDTLib.schema import BRAIN_SCHEMA
    from AnatomyDTLib.state import labels_to_field

    params = PDEParameters.brain_defaults()
    assert all(margin > 0 for _, _, margin in params.cross_diffusion_margins(BRAIN_SCHEMA))
    labels, _, _ = ellipsoid_brain(shape=(20, 28, 24), spacing_mm=(2.0, 2.0, 2.0), tumour_centre_mm=(0, -8, 9),
                                   tumour_radius_mm=7.0)
    p0 = labels_to_field(labels, K).double()
    kwargs = params.simulate_kwargs(p0, BRAIN_SCHEMA)
    d = kwargs["diffusion"].unsqueeze(0)
    for spacing in ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0)):
        report = cross_diffusion_stability(d, torch.as_tensor(kwargs["cross_diffusion"]), spacing, p0.shape[1:], 1.0)
        assert (report.ill_posed, report.unresolved, report.substeps) == ([], [], 1)


def test_a_parameter_file_with_ill_posed_cross_diffusion_is_refused():
    from AnatomyDTLib.errors import ParameterError
    from AnatomyDTLib.parameters import PDEParameters

    old_defaults = {"tumour_diffusion_by_tissue_mm2_per_day": {"background": 0.02, "white_matter": 0.2,
                                                               "grey_matter": 0.02, "lateral_ventricles": 0.0},
                    "cross_diffusion_mm2_per_day": {"lateral_ventricles": {"tumour": -0.1},
                                                    "grey_matter": {"tumour": -0.05}}}
    with pytest.raises(ParameterError, match=r"ill-posed.*lateral_ventricles <- tumour.*grey_matter <- tumour"):
        PDEParameters.from_dict(old_defaults)
    old_defaults["tumour_diffusion_by_tissue_mm2_per_day"]["lateral_ventricles"] = 0.1
    old_defaults["cross_diffusion_mm2_per_day"] = {"grey_matter": {"tumour": -0.01}}
    assert PDEParameters.from_dict(old_defaults).cross_diffusion_margins()[0][2] == pytest.approx(0.01)


def test_library_cross_diffusion_gives_finite_gradients_over_a_long_rollout():
    """The outflow limiter must not divide by denormal demands (NaN gradients in the backward pass)."""
    import numpy as np
    import torch

    from AnatomyDTLib.solver import simulate
    from AnatomyDTLib.state import labels_to_field

    labels = np.full((24, 24), 2)
    labels[:, 12:] = 3
    labels[9:15, 9:15] = 1
    p0 = labels_to_field(labels, 4, dtype=torch.float64)
    chi = torch.zeros(4, 4, dtype=torch.float64)
    chi[2, 1] = chi[3, 1] = -0.05
    chi.requires_grad_(True)
    out = simulate(p0, spacing=(1.0, 1.0), days=[60.0], dt=2.0, diffusion=[0.01, 0.1, 0.05, 0.05], growth_rate=0.05,
                   carrying_capacity=1.0, tumor_class=1, cross_diffusion=chi, jacobi_iters=4)
    (out[1] * torch.linspace(-1, 1, 24) ** 2).sum().backward()
    assert torch.isfinite(chi.grad).all() and float(chi.grad.abs().sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distinct_values_and_their_index_agree_with_torch_unique(dtype):
    # the stability analysis reduces coefficient fields to distinct values through NumPy (fast on
    # CPU); torch.unique is the independent reference, including -0.0 == 0.0 and strided input
    from AnatomyDTLib.operators import distinct_value_index, distinct_values

    torch.manual_seed(3)
    values = torch.randint(0, 40, (3000,)).to(dtype) * 0.137
    values[::7] = -0.0
    values[1::7] = 0.0
    strided = values.reshape(60, 50).t().reshape(-1)[::2]
    for v in (values, strided, values[:1]):
        reference, inverse = torch.unique(v, return_inverse=True)
        distinct = distinct_values(v)
        assert distinct.dtype == v.dtype and torch.equal(distinct, reference)
        index = distinct_value_index(v)
        assert index.dtype == torch.int64 and torch.equal(index, inverse)
        assert torch.equal(distinct[index], v)


def test_stability_report_of_a_tissue_dependent_field_equals_that_of_its_distinct_values():
    # the report for a per-voxel D (a few tissue values repeated over the grid) must be the one of
    # the same D given as a grid holding each distinct value once
    from AnatomyDTLib.operators import cross_diffusion_stability

    torch.manual_seed(1)
    shape = (12, 14, 10)
    tissue = torch.randint(0, 3, shape)
    tumour_d = torch.tensor([0.02, 0.2, 0.05], dtype=torch.float64)[tissue]
    d = torch.zeros(1, K, *shape, dtype=torch.float64)
    d[0, 1] = tumour_d
    # χ = -0.04 mm²/day: ill-posed where D = 0.02 (left out of the limit), 2 sub-steps where D = 0.2
    # and 3 where D = 0.05 (measured per value); so every distinct value must be found
    chi = _mass_effect(-0.04, -0.01)
    full = cross_diffusion_stability(d, chi, (1.0, 1.0, 1.0), shape, 1.0)
    assert full.substeps == 3 and [r[:2] for r in full.ill_posed] == [(2, 1)]
    few = torch.zeros(1, K, 3, 1, 1, dtype=torch.float64)
    few[0, 1, :, 0, 0] = torch.tensor([0.02, 0.2, 0.05], dtype=torch.float64)
    # same σ_max (same grid and spacing) and the same per-class Jacobi scale: give the operator
    from AnatomyDTLib.operators import DiffusionOperator
    operator = DiffusionOperator(d, (1.0, 1.0, 1.0), None, shape)
    reduced = cross_diffusion_stability(few, chi, (1.0, 1.0, 1.0), shape, 1.0, operator=operator)
    assert (full.substeps, full.ill_posed, full.unresolved) == (reduced.substeps, reduced.ill_posed, reduced.unresolved)
