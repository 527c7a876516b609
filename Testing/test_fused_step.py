"""The fused CPU kernel of the no-grad IMEX step (AnatomyDTLib/fused.py) against the torch path.

Every test runs the same problem twice without gradients: once through the fused kernel and once
with ``ANATOMYDT_FUSED=0`` (the torch inference path, itself tested against the differentiable
reference in test_inference_path.py and test_inference_fast_paths.py). In float64 the two must
agree to rounding. The problems switch on every feature the kernel implements (reaction with
fields, chemotherapy, radiotherapy with delayed death, a domain mask, per-face diffusion weights,
both Jacobi variants, dense and single-column cross-diffusion, batches) and run on grids deep
enough that the kernel splits the box into several slabs, whose seams are the delicate part.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from AnatomyDTLib import fused, simulate
from AnatomyDTLib.inference import InferenceStepper, support_box_within, support_floor

pytestmark = pytest.mark.skipif(not fused.fused_kernel_available(), reason="numba is not installed")

K = 5
TUMOUR, WM, GM, VENT = 1, 2, 3, 4
PLAN = {"radiotherapy": {"fraction_days": [1, 2, 3], "dose_per_fraction_gy": 2.0,
                         "delayed_death": {"delay_days": 1.0, "clearance_half_life_days": 2.0}},
        "chemotherapy": [{"agent": "tmz", "kill_rate_per_day": 0.1, "windows": [[0.5, 4.0]]}]}


def _dense_field(shape, seed=0, batch=None) -> torch.Tensor:
    """Every voxel a random mixture of all K classes (float64)."""
    torch.manual_seed(seed)
    size = (batch,) + tuple(shape) if batch else tuple(shape)
    x = torch.distributions.Dirichlet(torch.full((K,), 0.7, dtype=torch.float64)).sample(size)
    return x.movedim(-1, 1 if batch else 0).contiguous()


def _well_posed_chi(seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chi = (torch.rand(K, K, generator=g, dtype=torch.float64) - 0.5) * 0.04  # |χ| <= 0.02 < D_j + D_k
    return chi.fill_diagonal_(0)


def _mass_effect_chi(dtype=torch.float64) -> torch.Tensor:
    """χ of the brain's mass effect: the tumour pushes white matter, grey matter and the ventricles."""
    chi = torch.zeros(K, K, dtype=dtype)
    chi[WM, TUMOUR], chi[GM, TUMOUR], chi[VENT, TUMOUR] = -0.01, -0.01, -0.005
    return chi


def _tissue_diffusion(p0: torch.Tensor) -> torch.Tensor:
    """Per-voxel D (mm²/day): the tumour's, 0.2 in white matter and 0.02 elsewhere; 0 for the others."""
    diffusion = torch.zeros_like(p0)
    diffusion[TUMOUR] = 0.2 * p0[WM] + 0.02 * (1 - p0[WM])
    return diffusion


def _brain_like(shape=(40, 24, 22)) -> torch.Tensor:
    """Background shell, grey / white matter, a ventricle slab and a compact tumour (one-hot, float64)."""
    labels = torch.zeros(shape, dtype=torch.long)
    labels[2:-2, 2:-2, 2:-2] = GM
    labels[2:-2, 2:-2, shape[2] // 2:-2] = WM
    labels[5:9, 6:18, 4:9] = VENT
    labels[14:24, 9:15, 8:15] = TUMOUR
    return torch.nn.functional.one_hot(labels, K).permute(3, 0, 1, 2).double()


def _run(p0, monkeypatch, fused_on: bool, threads: int | None = None, **kwargs):
    monkeypatch.setenv(fused.ENV_SWITCH, "1" if fused_on else "0")
    if threads is not None:
        monkeypatch.setenv("ANATOMYDT_KERNEL_THREADS", str(threads))
    with torch.no_grad():
        return simulate(p0, return_trajectory=True, **kwargs)


def _record_steppers(monkeypatch) -> list:
    """A list that every InferenceStepper built from now on (one per no-grad solve) is appended to."""
    built = []
    original = InferenceStepper.__init__

    def recording(self, problem, state):
        original(self, problem, state)
        built.append(self)

    monkeypatch.setattr(InferenceStepper, "__init__", recording)
    return built


def _current_copy(stepper, p: torch.Tensor) -> torch.Tensor:
    """A copy of the state as it is now: ``p`` with the stepper's packed copy, if it keeps one, in its region."""
    state = p.clone()
    if stepper.packed is not None:
        state[(slice(None), slice(None)) + stepper.packed.region] = stepper.packed.data
    return state


def _assert_agree(a, b, tol):
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol


@pytest.mark.parametrize("threads", [1, 3])
def test_dense_step_matches_the_torch_path_with_one_and_several_slabs(monkeypatch, threads):
    """All classes diffuse, every pair cross-diffuses, logistic growth: the dense worst case."""
    p0 = _dense_field((40, 14, 16))
    kwargs = dict(spacing=(1.0, 1.2, 0.9), days=[2.0, 4.0], dt=1.0, diffusion=[0.05, 0.2, 0.1, 0.1, 0.05],
                  growth_rate=0.05, cross_diffusion=_well_posed_chi(), jacobi_iters=2, tumor_class=TUMOUR)
    reference = _run(p0, monkeypatch, False, **kwargs)
    built = _record_steppers(monkeypatch)
    fast = _run(p0, monkeypatch, True, threads=threads, **kwargs)
    _assert_agree(fast, reference, 1e-12)
    assert float((fast[-1] - p0).abs().max()) > 1e-3  # the problem really evolved
    assert built[-1].packings == 0  # the box is the whole grid: a packed copy would only double the memory


@pytest.mark.parametrize("variant, sweeps", [("conservative", 2), ("classic", 3), ("conservative", 1)])
def test_brain_like_step_with_every_treatment_matches_the_torch_path(monkeypatch, variant, sweeps):
    """Domain mask, tissue-dependent tumour D (per-face weights), mass effect (one χ column), a
    growth-rate field, chemotherapy, radiotherapy with delayed death (the dying channel and its
    clearance), split over three slabs."""
    p0 = _brain_like()
    mask = torch.zeros(p0.shape[1:], dtype=torch.bool)
    mask[1:-1, 1:-1, 1:-1] = True
    diffusion = _tissue_diffusion(p0)
    growth = 0.05 + 0.05 * p0[WM:WM + 1]
    chi = _mass_effect_chi()
    kwargs = dict(spacing=(1.0, 1.0, 1.5), days=[2.5, 6.0], dt=1.0, diffusion=diffusion, growth_rate=growth,
                  cross_diffusion=chi, tumor_class=TUMOUR, mask=mask, plan=PLAN, jacobi_iters=sweeps,
                  jacobi_variant=variant)
    reference = _run(p0, monkeypatch, False, **kwargs)
    fast = _run(p0, monkeypatch, True, threads=3, **kwargs)
    _assert_agree(fast, reference, 1e-12)
    outside = ~mask
    assert torch.equal(fast[-1][:, outside], p0[:, outside])  # nothing changes outside the domain


@pytest.mark.parametrize("margin", [0, 2])
@pytest.mark.parametrize("variant", ["conservative", "classic"])
def test_diffusion_coefficients_packed_around_a_growing_box_match_the_torch_path(monkeypatch, margin, variant):
    """The kernel reads the fields that do not change during a solve (per-face weights, the classic
    variant's per-voxel Jacobi scales, growth rate, capacity, domain) from copies restricted to a
    region around the box, renewed when the box outgrows it. With a small margin the region is
    renewed while the tumour spreads, and is smaller than the grid: every offset between the grid's
    and the region's indices is exercised (random fields: no two voxels alike)."""
    p0 = torch.roll(_brain_like((40, 40, 40)), shifts=(0, 10, 10), dims=(1, 2, 3))  # tumour mid-grid
    diffusion = torch.zeros_like(p0)
    torch.manual_seed(3)
    diffusion[TUMOUR] = 0.02 + 0.18 * torch.rand(p0.shape[1:], dtype=torch.float64)
    growth = 0.05 + 0.1 * torch.rand((1,) + p0.shape[1:], dtype=torch.float64)
    capacity = 0.8 + 0.2 * torch.rand((1,) + p0.shape[1:], dtype=torch.float64)
    mask = torch.rand(p0.shape[1:]) > 0.1
    chi = _mass_effect_chi()
    kwargs = dict(spacing=(1.0, 1.0, 1.5), days=[2.0, 4.0], dt=1.0, diffusion=diffusion, growth_rate=growth,
                  carrying_capacity=capacity, cross_diffusion=chi, tumor_class=TUMOUR, plan=PLAN, mask=mask,
                  jacobi_iters=2, jacobi_variant=variant)
    built = _record_steppers(monkeypatch)
    monkeypatch.setattr(fused.FusedStep, "PACK_MARGIN", margin)
    reference = _run(p0, monkeypatch, False, **kwargs)
    fast = _run(p0, monkeypatch, True, threads=2, **kwargs)
    _assert_agree(fast, reference, 1e-12)
    packing = built[-1].fused
    assert packing.regions_built >= 2
    assert all(r.start > 0 for r in packing._region)  # the region's origin is off the grid's on every axis


@pytest.mark.parametrize("threads, torch_steps", [(1, False), (2, False), (2, True)])
def test_the_packed_state_gives_the_grid_sized_kernels_result_bit_for_bit(monkeypatch, threads, torch_steps):
    """Between steps the kernel keeps the state packed on a region around the box; radiotherapy,
    the delayed-death bookkeeping and the support search work on that copy, while output days,
    surgery and the end of the solve write it back. With a small margin the region is renewed as
    the tumour spreads, the clearable cells are carried from region to region, and every event
    falls between steps: the result must equal, bit for bit, the kernel stepping the grid-sized
    state, and agree with the torch path. ``torch_steps``: a χ strong enough for the outflow
    limiter to act on steps longer than 0.34 days, so the torch path takes most steps and the
    kernel only the quarter-day steps after day 1 and day 5 (the packed copy is written back
    before the torch-path step that follows). That needs D_tumour + χ at the edge of well-posedness (0: no
    stable sub-step exists, so the solver warns and takes the steps as given; with a margin its
    sub-steps stay below the limiter's bound) and no delayed death (its dying channel, D = 0,
    would bound the sub-steps too)."""
    p0 = torch.roll(_brain_like((40, 40, 40)), shifts=(0, 10, 10), dims=(1, 2, 3))
    diffusion = torch.zeros_like(p0)
    torch.manual_seed(11)
    diffusion[TUMOUR] = 0.02 + 0.18 * torch.rand(p0.shape[1:], dtype=torch.float64)
    chi = _mass_effect_chi()
    plan = {"surgery": [{"day": 3.0, "extent": 0.5}],
            "radiotherapy": {"fraction_days": [1, 2, 4, 5, 7], "dose_per_fraction_gy": 2.0,
                             "delayed_death": {"delay_days": 1.5, "clearance_half_life_days": 2.0}},
            "chemotherapy": [{"agent": "tmz", "kill_rate_per_day": 0.1, "windows": [[0.5, 6.0]]}]}
    days, dt = [1.5, 4.0, 5.5, 8.0], 0.5
    if torch_steps:  # limiter-free below 0.5 / (0.3 · 2 · Σ 1/h²) = 0.34 days
        diffusion[TUMOUR] = 0.3
        chi.zero_()
        chi[WM, TUMOUR] = -0.3
        del plan["radiotherapy"]["delayed_death"]
        plan["chemotherapy"][0]["windows"] = [[0.5, 1.25]]  # a cut at 1.25 with no output day: kernel, then torch
        days, dt = [4.0, 5.25, 8.0], 1.0
    kwargs = dict(spacing=(1.0, 1.0, 1.5), days=days, dt=dt, diffusion=diffusion, growth_rate=0.1,
                  cross_diffusion=chi, tumor_class=TUMOUR, plan=plan, jacobi_iters=2,
                  mask=torch.rand(p0.shape[1:]) > 0.05, return_dying=True)
    built = _record_steppers(monkeypatch)
    monkeypatch.setattr(fused.FusedStep, "PACK_MARGIN", 2)
    kernel_steps = []
    original_fused_step = InferenceStepper._fused_step_

    def counting(self, *args):
        kernel_steps.append(self.packed is not None)
        return original_fused_step(self, *args)

    monkeypatch.setattr(InferenceStepper, "_fused_step_", counting)
    packed, packed_dying = _run(p0, monkeypatch, True, threads=threads, **kwargs)
    assert built[-1].packings >= (1 if torch_steps else 4) and built[-1].fused.regions_built >= 2
    if torch_steps:  # the kernel took the two quarter-day steps, each after the torch path had the state
        assert len(kernel_steps) == 2 and not any(kernel_steps)
    monkeypatch.setattr(fused.FusedStep, "PACK_STATE", False)
    grid_sized, grid_dying = _run(p0, monkeypatch, True, threads=threads, **kwargs)
    assert built[-1].packings == 0
    assert torch.equal(packed, grid_sized)
    if not torch_steps:
        assert torch.equal(packed_dying.dying, grid_dying.dying)
        assert len(packed_dying.pending) == len(grid_dying.pending) > 0
        for (day_a, mass_a), (day_b, mass_b) in zip(packed_dying.pending, grid_dying.pending):
            assert day_a == day_b and torch.equal(mass_a, mass_b)
    reference, _ = _run(p0, monkeypatch, False, **kwargs)
    _assert_agree(packed, reference, 1e-12)
    assert float(packed[-1, TUMOUR].sum()) > 1.0 and float((packed[-1] - packed[0]).abs().max()) > 1e-2


def test_a_packed_batch_in_float32_gives_the_grid_sized_kernels_result_bit_for_bit(monkeypatch):
    """The product's dtype and a batch of two cases whose tumours lie apart: the packed region
    covers both boxes, each batch item is stepped on its part of the copy."""
    first = torch.roll(_brain_like((40, 40, 40)), shifts=(0, 10, 10), dims=(1, 2, 3))
    second = torch.roll(_brain_like((40, 40, 40)), shifts=(-8, 14, 4), dims=(1, 2, 3))
    p0 = torch.stack([first, second]).float()
    chi = _mass_effect_chi(torch.float32)
    kwargs = dict(spacing=(1.0, 1.0, 1.0), days=[2.0, 5.0], dt=1.0, diffusion=[0, 0.15, 0, 0, 0], growth_rate=0.08,
                  cross_diffusion=chi, tumor_class=TUMOUR, plan=PLAN, jacobi_iters=2)
    built = _record_steppers(monkeypatch)
    monkeypatch.setattr(fused.FusedStep, "PACK_MARGIN", 2)
    packed = _run(p0, monkeypatch, True, threads=2, **kwargs)
    assert built[-1].packings >= 2
    monkeypatch.setattr(fused.FusedStep, "PACK_STATE", False)
    grid_sized = _run(p0, monkeypatch, True, threads=2, **kwargs)
    assert packed.dtype == torch.float32 and torch.equal(packed, grid_sized)
    assert not torch.equal(packed[:, 0], packed[:, 1])
    reference = _run(p0, monkeypatch, False, **kwargs)  # the torch path, in float32 too
    assert float((packed - reference).abs().max()) < 1e-5


@pytest.mark.parametrize("strip_rows, threads", [(1, 1), (2, 3), (5, 2)])
def test_planes_cut_into_strips_of_rows_match_the_torch_path(monkeypatch, strip_rows, threads):
    """Large planes are advanced in strips of rows (``fused_kernels.STRIP_CELLS``), each computed
    with m + 1 rows of halo, its lower halo read from a copy taken before the strip below wrote.
    Forced here on small grids, with strips thinner than the halo, one and several slabs: every
    feature of the brain-like problem (domain, per-face D, one χ column, growth field, delayed
    death) and the dense one (every class diffuses and cross-diffuses)."""
    monkeypatch.setattr(fused.FusedStep, "STRIP_ROWS", strip_rows)
    p0 = _brain_like((36, 24, 22))
    mask = torch.zeros(p0.shape[1:], dtype=torch.bool)
    mask[1:-1, 1:-1, 1:-1] = True
    diffusion = _tissue_diffusion(p0)
    chi = _mass_effect_chi()
    kwargs = dict(spacing=(1.0, 1.0, 1.5), days=[2.5, 6.0], dt=1.0, diffusion=diffusion,
                  growth_rate=0.05 + 0.05 * p0[WM:WM + 1], cross_diffusion=chi, tumor_class=TUMOUR, mask=mask,
                  plan=PLAN, jacobi_iters=2)
    reference = _run(p0, monkeypatch, False, **kwargs)
    _assert_agree(_run(p0, monkeypatch, True, threads=threads, **kwargs), reference, 1e-12)
    dense = _dense_field((30, 17, 12))
    dense_kwargs = dict(spacing=(1.0, 1.2, 0.9), days=[2.0, 3.0], dt=1.0, diffusion=[0.05, 0.2, 0.1, 0.1, 0.05],
                        growth_rate=0.05, cross_diffusion=_well_posed_chi(), jacobi_iters=3, tumor_class=TUMOUR)
    fast = _run(dense, monkeypatch, True, threads=threads, **dense_kwargs)
    _assert_agree(fast, _run(dense, monkeypatch, False, **dense_kwargs), 1e-12)
    assert float((fast[-1] - dense).abs().max()) > 1e-3


def _ball_tumour(shape=(40, 40, 40), centre=(19, 21, 18), radius=7.5) -> torch.Tensor:
    """The brain-like field with its block tumour replaced by a ball: its support's rows differ from
    plane to plane, as a real tumour's do (float64, one-hot)."""
    p0 = _brain_like(shape)
    labels = p0.argmax(0)
    labels[labels == TUMOUR] = GM
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij")
    ball = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2
    labels[ball] = TUMOUR
    return torch.nn.functional.one_hot(labels, K).permute(3, 0, 1, 2).double()


def test_plane_rows_are_the_supports_rows_within_reach_faces(monkeypatch):
    """``FusedStep.plane_rows`` against an independent construction: dilate the support's (z, y)
    footprint by the step's reach (a convolution with a diamond, |dz| + |dy| <= reach; here m, no
    cross-diffusion), take each plane's first and last row, clip to the box (the rows computed);
    and the support's own rows on each plane (where the reaction acts). Blobs at the grid's ends and a gap of empty planes exercise the window's padding and
    empty ranges; a packed state's origin shifts every index."""
    built = _record_steppers(monkeypatch)
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    with torch.no_grad():
        simulate(_brain_like(), spacing=(1.0, 1.0, 1.0), days=1.0, dt=1.0, diffusion=[0, 0.1, 0, 0, 0],
                 tumor_class=TUMOUR, jacobi_iters=2)
    step = built[-1].fused
    reach = 2  # m: no cross-diffusion moves the diffused tumour before the sweeps
    assert step.reach == reach
    support = torch.zeros(40, 30, 12, dtype=torch.bool)
    support[0:2, 3:5, 2] = True
    support[9:11, 20:23, 5] = True
    support[12, 8, 1] = True
    support[25:28, 12:29, 7] = True
    support[39, 27:30, 0] = True
    footprint = support.any(dim=2)
    rows = np.zeros((40, 2), dtype=np.int64)
    for z in range(40):
        found = torch.nonzero(footprint[z])[:, 0]
        if found.numel():
            rows[z] = int(found.min()), int(found.max()) + 1
    offsets = torch.arange(-reach, reach + 1)
    diamond = (offsets[:, None].abs() + offsets[None, :].abs() <= reach).double()
    grown = torch.nn.functional.conv2d(footprint[None, None].double(), diamond[None, None], padding=reach)[0, 0] > 0
    for box, origin in [((slice(0, 40), slice(0, 30)), (0, 0)), ((slice(5, 33), slice(6, 26)), (3, 4))]:
        computed = step.plane_rows(rows, box + (slice(0, 12),), origin, 40 - origin[0])
        for z in range(box[0].start, box[0].stop):
            for columns, footprint_of_z in ((slice(0, 2), grown[z, box[1]]), (slice(2, 4), footprint[z, box[1]])):
                expected = torch.nonzero(footprint_of_z)[:, 0]  # the rows computed; the support's own
                first, stop = computed[z - origin[0], columns] + origin[1]
                if expected.numel() == 0:
                    assert first == stop
                else:
                    assert (first, stop) == (box[1].start + int(expected.min()),
                                             box[1].start + int(expected.max()) + 1)
        assert any(stop == first for first, stop, _, _ in computed[box[0].start - origin[0]:box[0].stop - origin[0]])
    monkeypatch.setattr(fused.FusedStep, "ROW_RANGES", False)
    everything = step.plane_rows(rows, (slice(5, 33), slice(6, 26), slice(0, 12)), (3, 4), 37)
    assert (everything[2:30] == (2, 22, 2, 22)).all()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pushed_diffuses", [False, True])
def test_computing_only_the_rows_that_can_change_gives_the_full_rows_result_bit_for_bit(monkeypatch, threads,
                                                                                      pushed_diffuses):
    """The kernel computes on each plane only the rows within ``FusedStep.reach`` faces of the
    watched classes' support (``FusedStep.plane_rows``; the rows come from the kernel's own extents
    after a kernel step, and from the support pass after an event): the result must equal, bit for
    bit, the kernel computing every row of the box. A ball-shaped tumour whose rows change from
    plane to plane; surgery, radiotherapy with delayed death, chemotherapy, output days; the region
    renewed as the tumour spreads (margin 2). The tumour pushes three tissues that do not diffuse
    (reach m = 2, the brain's case), or also a small blob of ventricle next to it that does (reach
    m + 1: the sweeps spread what cross-diffusion moved one face out)."""
    p0 = _ball_tumour()
    diffusion = torch.zeros_like(p0)
    torch.manual_seed(13)
    diffusion[TUMOUR] = 0.05 + 0.25 * torch.rand(p0.shape[1:], dtype=torch.float64)
    if pushed_diffuses:
        p0[:, 18:21, 27:30, 16:20] = 0.0  # just past the ball's last rows (y 14-28) on its middle planes
        p0[VENT, 18:21, 27:30, 16:20] = 1.0
        p0[TUMOUR, 18:21, 27, 16:20] = 1.0  # the tumour meets it: the mass effect pushes it outward
        p0[VENT, 18:21, 27, 16:20] = 0.0
        diffusion[VENT] = 0.1
    plan = {"surgery": [{"day": 3.0, "extent": 0.5}],
            "radiotherapy": {"fraction_days": [1, 2, 4, 5], "dose_per_fraction_gy": 2.0,
                             "delayed_death": {"delay_days": 1.5, "clearance_half_life_days": 2.0}},
            "chemotherapy": [{"agent": "tmz", "kill_rate_per_day": 0.1, "windows": [[0.5, 6.0]]}]}
    kwargs = dict(spacing=(1.0, 1.0, 1.5), days=[1.5, 4.0, 7.0], dt=0.5, diffusion=diffusion, growth_rate=0.1,
                  cross_diffusion=_mass_effect_chi(), tumor_class=TUMOUR, plan=plan, jacobi_iters=2,
                  mask=torch.rand(p0.shape[1:]) > 0.05, return_dying=True)
    monkeypatch.setattr(fused.FusedStep, "PACK_MARGIN", 2)
    shares = []
    original = fused.FusedStep.plane_rows
    reaches = set()

    def recording(self, support_rows, box, origin, n_planes):
        reaches.add(self.reach)
        rows = original(self, support_rows, box, origin, n_planes)
        planes = slice(box[0].start - origin[0], box[0].stop - origin[0])
        computed = int((rows[planes, 1] - rows[planes, 0]).sum())
        shares.append(computed / ((box[0].stop - box[0].start) * (box[1].stop - box[1].start)))
        return rows

    monkeypatch.setattr(fused.FusedStep, "plane_rows", recording)
    restricted, restricted_dying = _run(p0, monkeypatch, True, threads=threads, **kwargs)
    # fewer rows than the box's after kernel steps (rows from its extents; steps 1, 3) and after the
    # radiotherapy fractions of days 1, 2, 4 and the surgery of day 3 (rows from the support pass)
    assert len(shares) == 14 and all(shares[i] < 0.95 for i in (1, 2, 3, 4, 6, 8)) and min(shares) < 0.8
    assert reaches == {3 if pushed_diffuses else 2}
    monkeypatch.setattr(fused.FusedStep, "ROW_RANGES", False)
    every_row, every_row_dying = _run(p0, monkeypatch, True, threads=threads, **kwargs)
    assert torch.equal(restricted, every_row)
    assert torch.equal(restricted_dying.dying, every_row_dying.dying)
    reference, _ = _run(p0, monkeypatch, False, **kwargs)
    _assert_agree(restricted, reference, 1e-12)
    assert float((restricted[-1] - restricted[0]).abs().max()) > 1e-2


def test_clearable_cells_move_with_the_packed_state(monkeypatch):
    """The dying cells whose delay has passed are written by the integrator before a step, in the
    coordinates of the state the step works on. Packing carries them into the packed region; a
    write-back (before a torch-path step) carries them to the grid-sized buffer, which is zero
    everywhere else."""
    p0 = torch.roll(_brain_like((40, 40, 40)), shifts=(0, 10, 10), dims=(1, 2, 3))
    built = _record_steppers(monkeypatch)
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    with torch.no_grad():
        simulate(p0, spacing=(1.0, 1.0, 1.0), days=1.0, dt=1.0, diffusion=[0, 0.1, 0, 0, 0], tumor_class=TUMOUR,
                 plan=PLAN)
    stepper = built[-1]
    p = stepper.unpacked(torch.cat([p0, torch.zeros_like(p0[:1])])[None].clone())
    box = (slice(14, 24), slice(19, 25), slice(18, 25))  # the tumour's
    stepper.dying_box = box
    values = torch.rand((1, 1, 10, 6, 7), dtype=torch.float64)
    stepper.clearable_on_(box).copy_(values)  # on the grid-sized buffer
    state, region = stepper._kernel_state(p, box)
    assert region is not None and stepper.packed is not None and state.shape[2:] != p.shape[2:]
    assert torch.equal(stepper.on(stepper.clearable_buffer(), box), values)
    assert int(stepper.clearable_buffer().count_nonzero()) == values.numel()  # nothing else
    assert float(stepper._grid_clearable.abs().sum()) == 0.0  # emptied: it must not clear the cells twice
    stepper.unpacked(p)
    assert torch.equal(stepper.clearable_buffer()[(slice(None), slice(None)) + box], values)
    assert int(stepper.clearable_buffer().count_nonzero()) == values.numel()


@pytest.mark.parametrize("shape", [(1, 6, 7), (5, 1, 9), (6, 5, 1), (2, 2, 2), (9, 3, 2)])
@pytest.mark.parametrize("variant", ["conservative", "classic"])
def test_grids_one_or_two_voxels_thick_match_the_torch_path(monkeypatch, shape, variant):
    """Thin boxes: an axis of one cell (no faces along it, y-faces or x-faces absent from the flat
    plane) or of two, with a domain, a growth field, one χ column, tissue-dependent D and a plan."""
    torch.manual_seed(sum(shape))
    labels = torch.randint(0, K, shape)
    labels[labels == TUMOUR] = WM
    labels[: max(1, shape[0] // 2), : max(1, shape[1] // 2), : max(1, shape[2] // 2)] = TUMOUR
    p0 = torch.nn.functional.one_hot(labels, K).permute(3, 0, 1, 2).double()
    mask = torch.rand(shape) > 0.2
    diffusion = _tissue_diffusion(p0)
    chi = _mass_effect_chi()
    kwargs = dict(spacing=(1.0, 1.2, 0.9), days=[1.5, 4.0], dt=1.0, diffusion=diffusion,
                  growth_rate=0.05 + 0.05 * p0[WM:WM + 1], cross_diffusion=chi, tumor_class=TUMOUR, mask=mask,
                  plan=PLAN, jacobi_iters=2, jacobi_variant=variant)
    reference = _run(p0, monkeypatch, False, **kwargs)
    fast = _run(p0, monkeypatch, True, **kwargs)
    _assert_agree(fast, reference, 1e-12)


def test_batches_with_their_own_growth_fields_match_the_torch_path(monkeypatch):
    p0 = _dense_field((30, 12, 14), batch=2)
    growth = torch.tensor([0.02, 0.2], dtype=torch.float64).reshape(2, 1, 1, 1, 1).expand(2, 1, 30, 12, 14)
    kwargs = dict(spacing=(1.0, 1.0, 1.0), days=[3.0], dt=1.0, diffusion=[0.0, 0.2, 0.1, 0.0, 0.05],
                  growth_rate=growth, cross_diffusion=_well_posed_chi(1), tumor_class=TUMOUR)
    reference = _run(p0, monkeypatch, False, **kwargs)
    fast = _run(p0, monkeypatch, True, threads=2, **kwargs)
    _assert_agree(fast, reference, 1e-12)
    assert not torch.allclose(fast[:, 0], fast[:, 1])


def test_float32_fused_step_tracks_the_float64_torch_path(monkeypatch):
    p0 = _dense_field((40, 14, 16))
    kwargs = dict(spacing=(1.0, 1.0, 1.0), days=[3.0], dt=1.0, diffusion=[0.05, 0.2, 0.1, 0.1, 0.05],
                  growth_rate=0.05, cross_diffusion=_well_posed_chi(), tumor_class=TUMOUR)
    reference = _run(p0, monkeypatch, False, **kwargs)
    fast = _run(p0.float(), monkeypatch, True, threads=2, **kwargs)
    assert fast.dtype == torch.float32
    assert float((fast.double() - reference).abs().max()) < 2e-6
    assert float((fast.sum(1) - 1).abs().max()) < 1e-6 and float(fast.min()) >= 0


def test_the_kernel_steps_aside_where_it_does_not_apply(monkeypatch):
    """A learned reaction hook, a step long enough for the outflow limiter to act, or the switch
    ANATOMYDT_FUSED=0 leave the step to the torch path."""
    p0 = _brain_like((12, 10, 10))[None]
    chi = torch.zeros(K, K, dtype=torch.float64)
    chi[WM, TUMOUR] = -0.08  # well-posed with the tumour's D = 0.1; the limiter can act above Δt ≈ 1 day
    stepper_kwargs = dict(spacing=(1.0, 1.0, 1.0), days=1.0, dt=1.0, diffusion=[0, 0.1, 0, 0, 0],
                          cross_diffusion=chi, tumor_class=TUMOUR)
    built = _record_steppers(monkeypatch)
    with torch.no_grad():
        simulate(p0, **stepper_kwargs)
    stepper = built[-1]
    assert stepper.fused.usable
    assert not stepper.fused.applies(2 * stepper.limiter_free_dt)
    assert stepper.fused.applies(0.5 * stepper.limiter_free_dt)
    with torch.no_grad():
        simulate(p0, reaction_hook=lambda p, t: torch.zeros_like(p), **stepper_kwargs)
    assert not built[-1].fused.usable
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    assert not fused.fused_kernel_available()
    with torch.no_grad():
        simulate(p0, **stepper_kwargs)
    assert not built[-1].fused.usable


def test_floored_supports_match_the_torch_search(monkeypatch):
    """One pass of the kernel zeroes sub-floor values and finds the same boxes as the torch code."""
    rng = np.random.default_rng(0)
    field = np.zeros((2, K, 16, 18, 20))
    field[0, 1, 3:9, 4:11, 5:7] = rng.random((6, 7, 2)) + 0.1
    field[1, 1, 10:12, 2:3, 15:19] = 1e-3
    field[0, 1, 12, 15, 1] = 1e-33  # below the float64 floor (4.9e-32): removed, not part of the box
    field[1, 2, 0:16, 0:18, 0:20] = 1.0
    p = torch.from_numpy(field)
    window = (slice(0, 16), slice(0, 18), slice(0, 20))
    floor = support_floor(torch.float64)
    boxes = fused.floored_supports_(p.clone(), [1, 2, 3], window, floor)
    expected = {1: (slice(3, 12), slice(2, 11), slice(5, 19)), 2: window, 3: None}
    assert boxes == expected
    q = p.clone()
    fused.floored_supports_(q, [1], window, floor)
    assert float(q[0, 1, 12, 15, 1]) == 0.0 and torch.equal(q[:, 2], p[:, 2])
    # floor 0: the boxes of every non-zero voxel (the tiny one included), the field unchanged
    r = p.clone()
    boxes = fused.floored_supports_(r, [1, 2, 3], window, 0.0)
    assert torch.equal(r, p)
    for c in (1, 2, 3):
        assert boxes[c] == support_box_within(p.narrow(1, c, 1), window, 0, (16, 18, 20))
    assert boxes[1] == (slice(3, 13), slice(2, 16), slice(1, 19))


def test_many_classes_and_no_diffusion_take_the_kernels_other_branches(monkeypatch):
    """Nine classes (more than the sorting network's 8 lanes: the generic projection) and a problem
    where no class diffuses (no Jacobi sweep: the output lags the input by one plane)."""
    torch.manual_seed(3)
    k = 9
    p0 = torch.distributions.Dirichlet(torch.full((k,), 0.5, dtype=torch.float64)).sample((36, 10, 12))
    p0 = p0.permute(3, 0, 1, 2).contiguous()
    chi = (torch.rand(k, k, dtype=torch.float64) - 0.5) * 0.02
    chi.fill_diagonal_(0)
    many = dict(spacing=(1.0, 1.0, 1.0), days=[2.0], dt=1.0, diffusion=[0.05] * k, growth_rate=0.05,
                cross_diffusion=chi, tumor_class=1)
    _assert_agree(_run(p0, monkeypatch, True, threads=2, **many), _run(p0, monkeypatch, False, **many), 1e-12)
    still = dict(many, diffusion=[0.0] * k)
    fast = _run(p0, monkeypatch, True, threads=2, **still)
    _assert_agree(fast, _run(p0, monkeypatch, False, **still), 1e-12)
    assert float((fast[-1] - p0).abs().max()) > 1e-4


def test_a_solve_that_cannot_use_the_kernel_does_not_import_numba():
    """The learned model's forecasts (a reaction hook) never take the fused path, so they must not
    pay numba's import; checked in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from AnatomyDTLib import simulate\n"
            "p0 = torch.zeros(5, 8, 8, 8); p0[0] = 1; p0[0, 3:5, 3:5, 3:5] = 0; p0[1, 3:5, 3:5, 3:5] = 1\n"
            "with torch.no_grad():\n"
            "    simulate(p0, spacing=(1, 1, 1), days=2.0, dt=1.0, diffusion=[0, 0.1, 0, 0, 0],\n"
            "             reaction_hook=lambda p, t: torch.zeros_like(p))\n"
            "print('numba' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="numba's pool has one thread here: nothing to change")
def test_a_forecast_through_the_kernel_keeps_the_users_torch_thread_count():
    """A process that set torch to one thread keeps one thread during and after a forecast that
    runs the kernel. numba's OpenMP pool, started by the first parallel call, used to set the count
    torch reads to the core count for the rest of the process. Checked in a fresh interpreter (the
    pool starts once per process), with the thread count read at every step."""
    import json
    import subprocess
    import sys

    code = ("import json, torch\n"
            "torch.set_num_threads(1)\n"
            "from AnatomyDTLib import fused\n"
            "from AnatomyDTLib.io import LabelVolume\n"
            "from AnatomyDTLib.phantom import ellipsoid_brain\n"
            "from AnatomyDTLib.predict import PDEOnlyModel\n"
            "from AnatomyDTLib.solver import simulate\n"
            "from AnatomyDTLib.state import AnatomyState\n"
            "model = PDEOnlyModel()\n"
            "labels, _, geometry = ellipsoid_brain()\n"
            "p0 = AnatomyState.from_labelmap(LabelVolume(labels, geometry, model.schema, 'phantom')).field.float()\n"
            "seen = []\n"
            "with torch.no_grad():\n"
            "    simulate(p0, spacing=geometry.spacing_array_order, days=[2.0, 4.0], schema=model.schema,\n"
            "             progress=lambda day, horizon: seen.append(torch.get_num_threads()),\n"
            "             **model.parameters.simulate_kwargs(p0, model.schema))\n"
            "ran = len(fused._kernels()._fused_step.signatures) > 0\n"
            "print(json.dumps({'steps': seen, 'after': torch.get_num_threads(), 'kernel_ran': ran}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kernel_ran"]
    assert len(result["steps"]) >= 4 and set(result["steps"]) == {1}, result
    assert result["after"] == 1


@pytest.mark.parametrize("variant", ["conservative", "classic"])
def test_supports_found_by_the_kernel_equal_the_support_search_and_yield_to_later_changes(monkeypatch, variant):
    """The kernel floors the watched classes as it writes them and reports their boxes, which the
    next step uses instead of its support search. Those boxes must be exactly what the search finds
    on the same state; and once anything else has changed the state (here mass added far from the
    tumour, as an event would through torch), the search must run again and find it. A faint
    patch of tumour just above the support floor, beside the lesion, falls below it under
    chemotherapy in the first step: the kernel must floor it as the search would."""
    p0 = torch.roll(_brain_like((40, 40, 40)), shifts=(0, 10, 10), dims=(1, 2, 3))[None]
    floor = support_floor(p0.dtype)
    p0[0, TUMOUR, 14:18, 27:29, 18:20] = 2.0 * floor  # 4 voxels beyond the lesion's rows
    p0[0, GM, 14:18, 27:29, 18:20] -= 2.0 * floor
    diffusion = torch.zeros_like(p0[0])
    torch.manual_seed(5)
    diffusion[TUMOUR] = 0.02 + 0.18 * torch.rand(p0.shape[2:], dtype=torch.float64)
    chi = _mass_effect_chi()
    built = _record_steppers(monkeypatch)
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    monkeypatch.setattr(fused.FusedStep, "PACK_MARGIN", 2)  # a region that leaves grid corners out
    with torch.no_grad():
        simulate(p0, spacing=(1.0, 1.0, 1.5), days=1.0, dt=1.0, diffusion=diffusion, growth_rate=0.1,
                 cross_diffusion=chi, tumor_class=TUMOUR, jacobi_iters=2, jacobi_variant=variant)
    stepper = built[-1]
    p = p0.clone()
    with torch.no_grad():
        for day in range(4):
            stepper.step(p, float(day), 1.0, 1.0, None)  # chemotherapy: kill rate 1/day
            assert stepper.packed is not None  # the kernel stepped the packed copy; p is stale inside its region
            state = _current_copy(stepper, p)
            if day == 0:
                assert float(state[0, TUMOUR, 14:18, 27:29, 18:20].abs().max()) == 0.0  # the faint patch was floored
            rows = np.zeros((1, 40, 2), dtype=np.int64)
            searched = fused.floored_supports_(state, stepper.watched, stepper.search_window(), stepper.floor, rows)
            assert stepper._floored_supports_(p, stepper.search_window()) == searched
            assert np.array_equal(stepper._support_rows, rows)  # the kernel's rows per plane, too
        stepper.step(p, 4.0, 1.0, 0.0, None)
        corner = tuple(slice(r.start, r.start + 1) for r in stepper.packed.region)  # in the region, beyond the lesion
        inside = stepper.current(p, corner)  # a change through the packed copy, as radiotherapy makes
        inside[0, TUMOUR] += 0.25
        inside[0, GM] -= 0.25
        found = stepper._floored_supports_(p, stepper.full_box)
        assert all(found[TUMOUR][a].start == corner[a].start for a in range(3))
        stepper.step(p, 5.0, 1.0, 0.0, None)
        corners = [tuple(slice(i, i + 1) for i in (z, y, x)) for z in (0, 39) for y in (0, 39) for x in (0, 39)]
        far = next(c for c in corners if not stepper.packed.holds(c))
        outside = stepper.current(p, far)  # outside the region: the packed copy is written back
        assert stepper.packed is None
        outside[0, TUMOUR] += 0.25  # an in-place torch change after the kernel, outside every box
        outside[0, GM] -= 0.25
        expected = fused.floored_supports_(p.clone(), stepper.watched, stepper.full_box, stepper.floor)
        found = stepper._floored_supports_(p, stepper.full_box)
    assert found == expected
    assert all(found[TUMOUR][a].start <= far[a].start and far[a].stop <= found[TUMOUR][a].stop for a in range(3))
