"""Treatment terms in the solver: radiotherapy (LQ, dose maps, delayed death), surgery, chemotherapy.

With diffusion and growth switched off, each treatment has an exact closed-form answer, so the
tolerances are rounding-level unless stated.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from AnatomyDTLib import simulate
from AnatomyDTLib.errors import InputError
from AnatomyDTLib.plan import stupp_plan
from AnatomyDTLib.schema import BRAIN_SCHEMA

ALPHA, AB = 0.05, 10.0
BETA = ALPHA / AB


def _brain_like_field(shape=(12, 14, 10), seed=0):
    """A 5-class field with a soft tumour blob (class 1) inside white matter (class 2)."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in shape], indexing="ij")
    tumour = 0.9 * torch.exp(-(z ** 2 + y ** 2 + x ** 2) / (2 * 2.5 ** 2))
    rest = torch.rand((4,) + shape, generator=g, dtype=torch.float64) + 0.05
    rest[1] += 2.0  # mostly white matter around it
    rest = rest / rest.sum(0, keepdim=True) * (1 - tumour)
    return torch.cat([rest[:1], tumour[None], rest[1:]])


def _static(p0, plan, days, **kw):
    """Run with no diffusion and no growth: only the treatment acts."""
    return simulate(p0, spacing=(1.0, 1.0, 2.0), days=days, dt=1.0, diffusion=0.0, growth_rate=0.0, plan=plan, **kw)


def test_radiotherapy_follows_linear_quadratic_survival_fraction_by_fraction():
    p0 = _brain_like_field()
    fraction_days = [1, 2, 3, 4, 5, 8, 9, 10]
    plan = {"radiotherapy": {"fraction_days": fraction_days, "dose_per_fraction_gy": 2.0,
                             "alpha_per_gy": ALPHA, "alpha_beta_gy": AB}}
    days = [0.0] + [d + 0.5 for d in fraction_days]
    traj = _static(p0, plan, days, return_trajectory=True)
    start = float(p0[1].sum())
    survival = math.exp(-(ALPHA * 2.0 + BETA * 2.0 ** 2))
    for n, state in enumerate(traj):
        assert float(state[1].sum()) == pytest.approx(start * survival ** n, rel=1e-12)
    # Killed tumour goes to the schema's removed-tumour class (background); the simplex holds.
    removed = start * (1 - survival ** len(fraction_days))
    assert float(traj[-1][0].sum() - p0[0].sum()) == pytest.approx(removed, rel=1e-10)
    assert float((traj[-1].sum(0) - 1).abs().max()) < 1e-12


def _smoothstep_reference(x, lo, hi):
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@pytest.mark.parametrize("grad", [True, False])
def test_hypoxic_tumour_gets_the_dose_divided_by_its_oxygen_enhancement_ratio(grad):
    """With radiotherapy.hypoxia, each voxel's fraction acts with dose / OER(tumour share), the
    OER rising smoothly from 1 below dense_from to its maximum above dense_to (numpy reference,
    voxel by voxel, on the differentiable and on the in-place no-grad path)."""
    p0 = _brain_like_field()  # tumour share 0 .. 0.9 across the blob
    hypoxia = {"oxygen_enhancement_ratio": 2.5, "dense_from": 0.3, "dense_to": 0.8}
    plan = {"radiotherapy": {"fraction_days": [1.0], "dose_per_fraction_gy": 2.0, "alpha_per_gy": ALPHA,
                             "alpha_beta_gy": AB, "hypoxia": hypoxia}}
    with torch.set_grad_enabled(grad):
        after = _static(p0.requires_grad_(grad) if grad else p0, plan, [1.5])
    share = p0[1].detach().numpy()
    oer = 1.0 + 1.5 * _smoothstep_reference(share, 0.3, 0.8)
    dose = 2.0 / oer
    expected = share * np.exp(-(ALPHA * dose + BETA * dose ** 2))
    assert np.abs(after[1].detach().numpy() - expected).max() < 1e-12
    assert oer.min() == 1.0 and oer.max() == 2.5  # both ends of the ramp are on the grid
    oxygenated = _static(p0.detach(), {"radiotherapy": {k: v for k, v in plan["radiotherapy"].items()
                                                        if k != "hypoxia"}}, [1.5])
    dense = share > 0.8
    assert (after[1].detach().numpy()[dense] > oxygenated[1].numpy()[dense] + 1e-6).all()  # the core survives more


def test_hypoxia_slows_the_response_of_a_dense_lesion_with_delayed_death():
    """The dying channel counts towards the tumour share: later fractions see the same dense lesion."""
    p0 = _brain_like_field()
    rt = {"fraction_days": [1.0, 2.0, 3.0], "dose_per_fraction_gy": 2.0, "alpha_per_gy": ALPHA, "alpha_beta_gy": AB,
          "delayed_death": {"delay_days": 10.0, "clearance_half_life_days": 5.0}}
    hypoxic = {**rt, "hypoxia": {"oxygen_enhancement_ratio": 3.0, "dense_from": 0.3, "dense_to": 0.8}}
    with torch.no_grad():
        lesion = [_static(p0, {"radiotherapy": r}, [30.0])[1].sum() for r in (rt, hypoxic)]
    assert float(lesion[1]) > float(lesion[0]) * 1.05


def test_radiotherapy_with_a_dose_map_kills_per_voxel():
    p0 = _brain_like_field()
    dose_total = np.zeros(p0.shape[1:])
    dose_total[:, :, :5] = 60.0  # half the volume gets 60 Gy in 30 fractions, the rest nothing
    plan = {"radiotherapy": {"start_day": 0, "fractions": 30, "total_dose_gy": 60.0, "dose_map": dose_total,
                             "alpha_per_gy": ALPHA, "alpha_beta_gy": AB}}
    out = _static(p0, plan, 60.0)
    s30 = math.exp(-30 * (ALPHA * 2.0 + BETA * 4.0))
    assert torch.allclose(out[1][:, :, :5], p0[1][:, :, :5] * s30, rtol=1e-10, atol=1e-15)
    # Unirradiated voxels are untouched up to the projection's rounding (1e-14).
    assert torch.allclose(out[1][:, :, 5:], p0[1][:, :, 5:], rtol=0, atol=1e-14)


def test_radiotherapy_reads_a_dose_map_file_on_the_grid(tmp_path):
    p0 = _brain_like_field()
    dose = np.full(p0.shape[1:], 20.0, dtype=np.float32)
    path = tmp_path / "dose.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(dose), str(path))
    before = path.read_bytes()
    plan = {"radiotherapy": {"fraction_days": [0, 1], "dose_per_fraction_gy": 10.0, "dose_map": str(path),
                             "alpha_per_gy": ALPHA, "alpha_beta_gy": AB}}
    out = _static(p0, plan, 3.0)
    s = math.exp(-2 * (ALPHA * 10.0 + BETA * 100.0))
    assert float(out[1].sum()) == pytest.approx(float(p0[1].sum()) * s, rel=1e-6)
    assert path.read_bytes() == before  # the user's file is untouched


def test_delayed_death_keeps_killed_cells_visible_then_clears_them():
    p0 = _brain_like_field()
    delay, half_life = 7.0, 10.0
    plan = {"radiotherapy": {"fraction_days": [0.0], "dose_per_fraction_gy": 10.0, "alpha_per_gy": ALPHA,
                             "alpha_beta_gy": AB, "delayed_death": {"delay_days": delay, "clearance_half_life_days": half_life}}}
    days = [0.5, 6.5, 7.0, 17.0, 27.0]
    traj = _static(p0, plan, days, return_trajectory=True)
    start = float(p0[1].sum())
    s = math.exp(-(ALPHA * 10.0 + BETA * 100.0))
    lam = math.log(2) / half_life
    for day, state in zip(days, traj):
        cleared = 0.0 if day <= delay else (1 - s) * start * (1 - math.exp(-lam * (day - delay)))
        assert float(state[1].sum()) == pytest.approx(start - cleared, rel=1e-9), day
        assert state.shape[0] == 5  # the dying compartment is merged back into the tumour for output
        assert float((state.sum(0) - 1).abs().max()) < 1e-12


def test_surgery_with_a_mask_removes_exactly_the_resection_region():
    p0 = _brain_like_field()
    mask = np.zeros(p0.shape[1:], dtype=bool)
    mask[3:9, 4:10, 3:7] = True
    plan = {"surgery": [{"day": 2.0, "resection_mask": mask}]}
    before, after = _static(p0, plan, [2.0, 2.5], return_trajectory=True)
    # The state reported at day 2 is before the surgery of day 2 (equal up to rounding, 1e-14).
    assert torch.allclose(before, p0, rtol=0, atol=1e-14)
    inside = torch.as_tensor(mask)
    assert float(after[1][inside].abs().max()) < 1e-15
    assert torch.allclose(after[1][~inside], p0[1][~inside], rtol=0, atol=1e-14)
    assert torch.allclose(after[0][inside], p0[0][inside] + p0[1][inside])  # went to background
    for k in (2, 3, 4):
        assert torch.allclose(after[k], p0[k], rtol=0, atol=1e-14)


def test_surgery_with_a_mask_file_and_a_named_target_class(tmp_path):
    p0 = _brain_like_field()
    mask = np.zeros(p0.shape[1:], dtype=np.uint8)
    mask[5:7, 5:9, 4:6] = 1
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "cavity.nii.gz"))
    (tmp_path / "plan.json").write_text('{"surgery": [{"day": 0, "resection_mask": "cavity.nii.gz", "removed_to": "white matter"}]}')
    out = _static(p0, str(tmp_path / "plan.json"), 1.0)
    inside = torch.as_tensor(mask.astype(bool))
    assert float(out[1][inside].max()) < 1e-15
    assert torch.allclose(out[2][inside], p0[2][inside] + p0[1][inside])


def test_surgery_by_extent_removes_that_fraction_from_the_core_outward():
    # A flat-topped tumour (probability 0.95 within 5 mm, soft 1 mm edge), like a real segmentation.
    shape = (16, 16, 12)
    r = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in shape], indexing="ij"))
    physical_radius = torch.sqrt(r[0] ** 2 + r[1] ** 2 + (2.0 * r[2]) ** 2)
    tumour = 0.95 * torch.sigmoid((5.0 - physical_radius) / 1.0)
    p0 = torch.stack([0.5 * (1 - tumour), tumour, 0.5 * (1 - tumour), torch.zeros(shape, dtype=torch.float64),
                      torch.zeros(shape, dtype=torch.float64)])
    plan = {"surgery": [{"day": 0.0, "extent": 0.3}]}
    out = _static(p0, plan, 1.0)
    start = float(p0[1].sum())
    assert float(out[1].sum()) == pytest.approx(0.7 * start, rel=1e-9)
    removed = (p0[1] - out[1]) > 1e-12
    centre = tuple(n // 2 for n in p0.shape[1:])
    assert bool(removed[centre])  # the core goes first
    kept_tumour = (p0[1] >= 0.5) & ~removed  # core voxels the surgeon left
    assert bool(kept_tumour.any())
    # "From the core outward": removed voxels are at least as deep inside the tumour (distance in mm
    # to the nearest voxel outside it) as every core voxel that was kept ...
    depth = torch.as_tensor(ndimage.distance_transform_edt((p0[1] >= 0.5).numpy(), sampling=(1.0, 1.0, 2.0)))
    assert float(depth[removed].min()) >= float(depth[kept_tumour].max()) - 1e-9
    # ... and, for this round tumour, closer to its centre to within one voxel (1 mm).
    assert float(physical_radius[removed].max()) <= float(physical_radius[kept_tumour].min()) + 1.0


def test_chemotherapy_acts_only_inside_its_windows():
    p0 = _brain_like_field()
    k = 0.1
    plan = {"chemotherapy": [{"agent": "temozolomide", "kill_rate_per_day": k, "windows": [[2.0, 4.5], [7.25, 8.0]]}]}
    days = [1.0, 2.0, 3.0, 4.5, 6.0, 7.25, 8.0, 10.0]
    traj = _static(p0, plan, days, return_trajectory=True)
    start = float(p0[1].sum())

    def exposure(t):
        return max(0.0, min(t, 4.5) - 2.0) + max(0.0, min(t, 8.0) - 7.25)

    for day, state in zip(days, traj):
        assert float(state[1].sum()) == pytest.approx(start * math.exp(-k * exposure(day)), rel=1e-12), day


def test_stupp_protocol_combines_radiotherapy_and_temozolomide_exactly():
    p0 = _brain_like_field()
    plan = stupp_plan(rt_start_day=7.0, include_adjuvant=False, tmz_kill_rate_per_day=0.02)
    horizon = 70.0
    out = _static(p0, plan, horizon)
    rt = plan.radiotherapy
    n = sum(d < horizon for d in rt.fraction_days)
    chemo = sum(max(0.0, min(b, horizon) - a) for c in plan.chemotherapy for a, b in c.windows)
    expected = float(p0[1].sum()) * math.exp(-n * (rt.alpha_per_gy * 2 + rt.beta_per_gy2 * 4)) * math.exp(-0.02 * chemo)
    assert n == 30
    assert float(out[1].sum()) == pytest.approx(expected, rel=1e-10)


def test_fractions_after_the_horizon_are_not_simulated():
    p0 = _brain_like_field()
    plan = {"radiotherapy": {"fraction_days": [1, 2, 20, 21], "dose_per_fraction_gy": 2.0}}
    out = _static(p0, plan, 10.0)
    s = math.exp(-(ALPHA * 2 + BETA * 4))
    assert float(out[1].sum()) == pytest.approx(float(p0[1].sum()) * s ** 2, rel=1e-12)


def test_untreated_tumour_grows_and_treated_tumour_shrinks_with_full_physics():
    p0 = _brain_like_field(shape=(16, 16, 12)).to(torch.float32)
    kwargs = dict(spacing=(1.0, 1.0, 2.0), days=60.0, dt=1.0, diffusion=[0.0, 0.05, 0.0, 0.0, 0.0], growth_rate=0.03,
                  schema=BRAIN_SCHEMA)
    untreated = simulate(p0, **kwargs)
    treated = simulate(p0, plan=stupp_plan(rt_start_day=0.0, include_adjuvant=False), **kwargs)
    start = float(p0[1].sum())
    assert float(untreated[1].sum()) > 1.3 * start
    assert float(treated[1].sum()) < 0.8 * start


def test_a_resection_mask_on_another_grid_is_refused_with_advice():
    p0 = _brain_like_field()
    plan = {"surgery": [{"day": 0.0, "resection_mask": np.ones((3, 3, 3), dtype=bool)}]}
    with pytest.raises(InputError, match="resample"):
        _static(p0, plan, 1.0)


# --------------------------------------------------------------------------------------------
# carrying the dying compartment from one solve into the next (restart from a later scan)
# --------------------------------------------------------------------------------------------

def _delayed_plan(fraction_days, delay=7.0, half_life=10.0):
    return {"radiotherapy": {"fraction_days": list(fraction_days), "dose_per_fraction_gy": 4.0, "alpha_per_gy": 0.1,
                             "alpha_beta_gy": AB,
                             "delayed_death": {"delay_days": delay, "clearance_half_life_days": half_life}}}


@pytest.mark.parametrize("grad", [True, False], ids=["differentiable-path", "inference-path"])
def test_a_carried_dying_compartment_continues_a_solve_exactly(grad):
    """0→20 days in one solve equals 0→8, then 8→20 restarted from the visible day-8 field with the
    dying compartment carried over (fractions on days 0–9, delay 7 d: cohorts pending across the cut)."""
    p0 = _brain_like_field()
    kwargs = dict(spacing=(1.0, 1.0, 2.0), dt=1.0, diffusion=[0.0, 0.08, 0.0, 0.0, 0.0], growth_rate=0.04,
                  schema=BRAIN_SCHEMA)
    fractions = [0, 1, 2, 3, 4, 7, 8, 9]
    with torch.set_grad_enabled(grad):
        whole = simulate(p0, days=[8.0, 20.0], plan=_delayed_plan(fractions), return_trajectory=True, **kwargs)
        first, carried = simulate(p0, days=8.0, plan=_delayed_plan(fractions), return_dying=True, **kwargs)
        later_plan = _delayed_plan([d - 8 for d in fractions if d >= 8])
        second = simulate(first, days=12.0, plan=later_plan, dying=carried, **kwargs)
        forgetting = simulate(first, days=12.0, plan=later_plan, **kwargs)
    assert torch.allclose(first, whole[0], atol=1e-12)
    # the state at day 8 is before day 8's fraction: kills of days 2, 3, 4, 7 are still in their delay
    assert sorted(round(d, 9) for d, _ in carried.pending) == [1.0, 2.0, 3.0, 6.0]
    assert carried.clearance_rate_per_day == pytest.approx(math.log(2) / 10.0)
    assert 0 < float(carried.dying.sum()) < float(first[1].sum())
    assert torch.allclose(second, whole[1], atol=1e-10), float((second - whole[1]).abs().max())
    # Restarting without the compartment counts the killed cells as living tumour: far more tumour.
    assert float(forgetting[1].sum()) > 1.2 * float(second[1].sum())


def test_a_carried_dying_compartment_clears_after_its_delay_without_a_plan():
    p0 = _brain_like_field()
    dying = 0.5 * p0[1:2]
    half_life, delay = 10.0, 2.5  # between two 1-day steps: the solver must cut its step there
    from AnatomyDTLib.solver import DyingCompartment

    carried = DyingCompartment(dying, [(delay, 0.5 * dying)], math.log(2) / half_life)
    days = [2.0, 13.0]
    traj = _static(p0, None, days, return_trajectory=True, dying=carried)
    lam = math.log(2) / half_life
    viable, d = float((p0[1] - dying[0]).sum()), float(dying.sum())
    for day, state in zip(days, traj):
        clearing = 0.5 * d * math.exp(-lam * day)  # the half whose delay had passed
        pending = 0.5 * d * (1.0 if day <= delay else math.exp(-lam * (day - delay)))
        assert float(state[1].sum()) == pytest.approx(viable + clearing + pending, rel=1e-9), day


def test_a_carried_dying_compartment_is_checked_with_advice():
    from AnatomyDTLib.errors import ParameterError
    from AnatomyDTLib.solver import DyingCompartment

    p0 = _brain_like_field()
    rate = math.log(2) / 10.0
    with pytest.raises(InputError, match="exceeds p0's tumour"):
        _static(p0, None, 2.0, dying=DyingCompartment(p0[1:2] + 0.1, [], rate))
    with pytest.raises(InputError, match="grid"):
        _static(p0, None, 2.0, dying=DyingCompartment(p0[1:2, :3], [], rate))
    with pytest.raises(InputError, match="delay must be > 0"):
        _static(p0, None, 2.0, dying=DyingCompartment(0.5 * p0[1:2], [(0.0, 0.1 * p0[1:2])], rate))
    no_delay = {"radiotherapy": {"fraction_days": [1.0], "dose_per_fraction_gy": 2.0}}
    with pytest.raises(ParameterError, match="delayed_death"):
        _static(p0, no_delay, 2.0, dying=DyingCompartment(0.5 * p0[1:2], [], rate))
    with pytest.raises(ParameterError, match="same half-life"):
        _static(p0, _delayed_plan([1.0], half_life=20.0), 2.0, dying=DyingCompartment(0.5 * p0[1:2], [], rate))
