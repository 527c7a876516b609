"""Verification of the IMEX solver against analytic solutions and invariants (issue: core solver).

Every tolerance below is stated next to its assertion with the reason for its size.
All tests run in float64 unless said otherwise, so that rounding never hides a discretisation error.
"""

from __future__ import annotations

import math

import pytest
import torch

from AnatomyDTLib import simulate
from AnatomyDTLib.errors import InputError, ParameterError
from AnatomyDTLib.operators import recommended_jacobi_iters
from analytic import grid_coordinates, heat_kernel_gaussian, two_class_field

D = 0.5          # mm²/day
SIGMA0 = 2.0     # mm
AMPLITUDE = 0.5  # keeps both classes strictly inside (0, 1): the projection never clips
HORIZON = 2.0    # days
HALF_WIDTH = 12.0  # mm: 6 σ0, so the no-flux walls see < 1e-7 of the Gaussian


def _heat_run(h, dt, jacobi_iters, ndim=2, spacing=None):
    spacing = spacing or (h,) * ndim
    shape = tuple(int(round(2 * HALF_WIDTH / s)) for s in spacing)
    u0 = heat_kernel_gaussian(shape, spacing, SIGMA0, AMPLITUDE, D, 0.0)
    out = simulate(two_class_field(u0), spacing=spacing, days=HORIZON, dt=dt, diffusion=D, jacobi_iters=jacobi_iters)
    exact = heat_kernel_gaussian(shape, spacing, SIGMA0, AMPLITUDE, D, HORIZON)
    return out[1], exact


@pytest.mark.parametrize("ndim", [2, 3])
def test_heat_kernel_matches_analytic_gaussian(ndim):
    # Converged implicit solve (Jacobi contraction^m < 1e-3), h = 0.5 mm, Δt = 0.025 day.
    h, dt = 0.5, 0.025
    m = recommended_jacobi_iters(dt, D, (h,) * ndim, tolerance=1e-3)
    numeric, exact = _heat_run(h, dt, m, ndim)
    peak = float(exact.max())
    # Tolerance 1 % of the peak — O(h²) space + O(Δt) time error (measured 0.5 % in 2D, 0.6 % in 3D).
    error = float((numeric - exact).abs().max())
    assert error < 0.01 * peak, f"max error {error:.3g} vs peak {peak:.3g}"



def test_heat_kernel_error_is_second_order_in_space():
    # Δt small and sweeps converged so the time error is far below the space error.
    errors = []
    for h in (1.0, 0.5, 0.25):
        numeric, exact = _heat_run(h, 0.002, recommended_jacobi_iters(0.002, D, (h, h), tolerance=1e-4))
        errors.append(float((numeric - exact).abs().max()))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    # Second order: each halving of h divides the error by ≈ 4 (measured 3.6–3.7).
    assert all(3.3 < r < 4.6 for r in ratios), (errors, ratios)


def test_heat_kernel_error_is_first_order_in_time():
    # Compare against a fine-Δt run on the same grid to isolate the time error (implicit Euler).
    h = 0.5
    reference, _ = _heat_run(h, 0.0025, 60)
    errors = []
    for dt in (0.1, 0.05, 0.025):
        numeric, _ = _heat_run(h, dt, recommended_jacobi_iters(dt, D, (h, h), tolerance=1e-5, maximum=200))
        errors.append(float((numeric - reference).abs().max()))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    # First order: halving Δt halves the error (ratio ≈ 2; the fine reference itself adds a little).
    assert all(1.7 < r < 2.4 for r in ratios), (errors, ratios)


def test_anisotropic_spacing_diffuses_like_isotropic_grid_in_physical_space():
    # Same Gaussian on 1×1×3 mm and on 1×1×1 mm voxels; the anisotropic grid's cells are every
    # third isotropic cell along the first axis, so both are compared at the same physical points.
    sigma0, dt, t = 4.0, 0.25, 10.0
    iso_shape, aniso_shape = (45, 40, 40), (15, 40, 40)
    results = {}
    for name, shape, spacing in (("iso", iso_shape, (1.0, 1.0, 1.0)), ("aniso", aniso_shape, (3.0, 1.0, 1.0))):
        u0 = heat_kernel_gaussian(shape, spacing, sigma0, AMPLITUDE, D, 0.0)
        m = recommended_jacobi_iters(dt, D, spacing, tolerance=1e-3)
        results[name] = simulate(two_class_field(u0), spacing=spacing, days=t, dt=dt, diffusion=D, jacobi_iters=m)[1]
        results[name + "_exact"] = heat_kernel_gaussian(shape, spacing, sigma0, AMPLITUDE, D, t)
    iso_at_aniso_points = results["iso"][1::3]
    peak = float(results["iso_exact"].max())
    # Both grids agree to 2 % of the peak, and the anisotropic run is within 4 % of the exact
    # solution: its 3 mm axis has O(h²) error ≈ h²/(12σ²) ≈ 3 % for σ ≈ 5.1 mm (measured 2.8 %).
    assert float((results["aniso"] - iso_at_aniso_points).abs().max()) < 0.02 * peak
    assert float((results["aniso"] - results["aniso_exact"]).abs().max()) < 0.04 * peak
    # Spread is physical: the same second moment along the 3 mm axis and along a 1 mm axis.
    z, y, _ = grid_coordinates(aniso_shape, (3.0, 1.0, 1.0))
    mass = results["aniso"].sum()
    var_z = float((results["aniso"] * z ** 2).sum() / mass)
    var_y = float((results["aniso"] * y ** 2).sum() / mass)
    assert var_z == pytest.approx(var_y, rel=0.03)


def _front_position(profile, x):
    i = int((profile >= 0.5).nonzero().max())
    x0, x1, y0, y1 = float(x[i]), float(x[i + 1]), float(profile[i]), float(profile[i + 1])
    return x0 + (y0 - 0.5) / (y0 - y1) * (x1 - x0)


def test_fisher_kpp_front_travels_at_two_sqrt_d_alpha():
    torch.manual_seed(0)
    diffusion, alpha, h, dt = 1.0, 1.0, 0.2, 0.02
    n = 1000  # 200 mm strip, two cells wide
    x = (torch.arange(n, dtype=torch.float64) + 0.5) * h
    tumour = 1.0 / (1.0 + torch.exp((x - 10.0) / 1.0))
    p0 = two_class_field(tumour.expand(2, n).clone())
    m = recommended_jacobi_iters(dt, diffusion, (1.0, h), tolerance=1e-3)
    times = [40.0, 80.0]
    traj = simulate(p0, spacing=(1.0, h), days=times, dt=dt, diffusion=diffusion, growth_rate=alpha, jacobi_iters=m,
                    return_trajectory=True)
    positions = [_front_position(traj[i, 1, 0], x) for i in range(2)]
    speed = (positions[1] - positions[0]) / (times[1] - times[0])
    expected = 2.0 * math.sqrt(diffusion * alpha)
    # Within 3 % after the transient (measured −0.6 %: Bramson's log correction is −1.3 % over
    # days 40–80, partly offset by the discretisation).
    assert abs(speed - expected) / expected < 0.03, speed


def _smooth_positive_state(shape, k, seed, floor=0.1):
    """A smooth state with every class >= floor everywhere (so the projection clips nothing)."""
    g = torch.Generator().manual_seed(seed)
    coords = grid_coordinates(shape, (1.0,) * len(shape))
    channels = []
    for _ in range(k):
        centre = [float(torch.rand(1, generator=g)) * 6 - 3 for _ in shape]
        r2 = sum((c - z) ** 2 for c, z in zip(coords, centre))
        channels.append(1.0 + 2.0 * torch.exp(-r2 / (2 * 2.5 ** 2)))
    p = torch.stack(channels)
    p = p / p.sum(0, keepdim=True)
    p = floor + (1 - k * floor) * p
    return p.to(torch.float64)


@pytest.mark.parametrize("variant", ["conservative", "classic"])
@pytest.mark.parametrize("grad", [True, False])
def test_a_grid_one_voxel_thick_evolves_like_the_grid_without_that_axis(variant, grad):
    """A single slice (one voxel along z) has no faces along z: its forecast must be the 2-D
    forecast of the same slice, whatever the spacing along z. The classic Jacobi variant used to
    fail there (its diagonal summed the faces of an empty axis)."""
    p2 = _smooth_positive_state((12, 14), 3, seed=5)
    chi = torch.tensor([[0.0, 0.03, -0.02], [-0.04, 0.0, 0.01], [0.02, -0.03, 0.0]], dtype=torch.float64)
    kwargs = dict(days=[1.0, 2.0], dt=0.5, diffusion=[0.2, 0.5, 0.05], cross_diffusion=chi, growth_rate=0.1,
                  tumor_class=1, jacobi_iters=2, jacobi_variant=variant, return_trajectory=True)
    with torch.set_grad_enabled(grad):
        flat = simulate(p2, spacing=(1.0, 0.8), **kwargs)
        thick = simulate(p2.unsqueeze(1).contiguous(), spacing=(3.0, 1.0, 0.8), **kwargs)
    # the same operations on the same values: equal to rounding (1e-12 in float64)
    assert float((thick[:, :, 0] - flat).abs().max()) < 1e-12
    assert float((flat[-1] - p2).abs().max()) > 1e-3  # it did evolve


@pytest.mark.parametrize("ndim", [2, 3])
def test_diffusion_and_cross_diffusion_conserve_each_class_mass(ndim):
    shape = (24, 26) if ndim == 2 else (14, 15, 16)
    k = 3
    p0 = _smooth_positive_state(shape, k, seed=ndim)
    chi = torch.tensor([[0.0, 0.3, -0.2], [-0.4, 0.0, 0.1], [0.2, -0.3, 0.0]], dtype=torch.float64)
    days = [0.5 * i for i in range(1, 11)]
    traj = simulate(p0, spacing=(1.0, 0.8, 1.3)[:ndim], days=days, dt=0.5, diffusion=[0.2, 0.5, 0.05],
                    cross_diffusion=chi, jacobi_iters=3, return_trajectory=True)
    assert float(traj.min()) > 0.0  # the projection clipped nothing: all classes stayed positive
    mass0 = p0.flatten(1).sum(1)
    for state in traj:
        drift = (state.flatten(1).sum(1) - mass0).abs() / mass0
        # 1e-5 relative (measured ≈ 1e-15: flux form + conservative Jacobi + unclipped projection).
        assert float(drift.max()) < 1e-5


def test_conservative_jacobi_conserves_with_mask_and_tissue_dependent_diffusion():
    shape = (30, 30)
    k = 3
    p0 = _smooth_positive_state(shape, k, seed=7)
    yy, xx = grid_coordinates(shape, (1.0, 1.0))
    mask = (yy ** 2 + xx ** 2) < 12.5 ** 2
    d_field = torch.stack([0.05 + 0.4 * (xx > 0).double(), torch.full(shape, 0.3, dtype=torch.float64),
                           0.1 + 0.2 * (yy > 0).double()])
    kwargs = dict(spacing=(1.0, 1.0), days=20.0, dt=1.0, diffusion=d_field, mask=mask, jacobi_iters=2)
    out = simulate(p0, **kwargs)
    inside = mask.to(torch.float64)
    drift = ((out * inside).flatten(1).sum(1) - (p0 * inside).flatten(1).sum(1)).abs() / (p0 * inside).flatten(1).sum(1)
    assert float(out.min()) > 0
    assert float(drift.max()) < 1e-5  # measured ≈ 1e-15
    # Outside the mask nothing changes.
    assert torch.equal(out[:, ~mask], p0[:, ~mask])
    # Classic (local-diagonal) Jacobi does drift here; this is why it is not the default.
    classic = simulate(p0, jacobi_variant="classic", **kwargs)
    classic_drift = ((classic * inside).flatten(1).sum(1) - (p0 * inside).flatten(1).sum(1)).abs() / (p0 * inside).flatten(1).sum(1)
    assert float(classic_drift.max()) > 1e-4


def _sharp_three_class_field():
    labels = torch.zeros(32, 32, dtype=torch.long)
    labels[8:24, 8:24] = 1
    labels[12:20, 12:20] = 2
    return torch.nn.functional.one_hot(labels, 3).permute(2, 0, 1).to(torch.float64)


def test_clipping_projection_with_equal_diffusion_still_conserves():
    # Sharp one-hot labels: the projection is active at every interface, but with equal D the
    # channel sum stays 1, so the projection has nothing to redistribute.
    p0 = _sharp_three_class_field()
    out = simulate(p0, spacing=(1.0, 1.0), days=10.0, dt=0.5, diffusion=0.3, jacobi_iters=3)
    drift = (out.flatten(1).sum(1) - p0.flatten(1).sum(1)) / p0.flatten(1).sum(1)
    assert float(drift.abs().max()) < 1e-12


def test_clipping_projection_drift_with_unequal_diffusion_is_as_documented():
    # README "Conservation": with unequal D_k the channel sum leaves 1 near interfaces and the
    # Euclidean projection shifts every class by the same amount, clipping at 0. Mass then moves
    # from the fast class to the slow ones. Measured here: class 1 (D = 0.3) −7.6 %, class 2
    # (D = 0.05, 64 voxels) +27 % after 10 days; the total over classes is still exact.
    p0 = _sharp_three_class_field()
    out = simulate(p0, spacing=(1.0, 1.0), days=10.0, dt=0.5, diffusion=[0.0, 0.3, 0.05], jacobi_iters=3)
    mass0, mass = p0.flatten(1).sum(1), out.flatten(1).sum(1)
    drift = (mass - mass0) / mass0
    assert -0.09 < float(drift[1]) < -0.06
    assert 0.24 < float(drift[2]) < 0.30
    assert float((mass.sum() - mass0.sum()).abs()) < 1e-9
    assert float(out.sum(0).sub(1).abs().max()) < 1e-12


def test_simplex_invariance_with_ten_times_the_explicit_step():
    g = torch.Generator().manual_seed(11)
    k, shape, h = 5, (20, 22, 18), (1.0, 1.0, 2.0)
    p0 = torch.distributions.Dirichlet(torch.full((k,), 0.3)).sample(shape).permute(3, 0, 1, 2).to(torch.float64)
    diffusion = torch.tensor([0.3, 1.0, 0.5, 0.2, 0.8], dtype=torch.float64)
    chi = (torch.rand(k, k, generator=g, dtype=torch.float64) - 0.5) * 2.0
    chi.fill_diagonal_(0.0)
    explicit_limit = 1.0 / (2 * float(diffusion.max()) * sum(1 / x ** 2 for x in h))
    dt = 10 * explicit_limit
    steps = 12
    days = [dt * (i + 1) for i in range(steps)]
    traj = simulate(p0, spacing=h, days=days, dt=dt, diffusion=diffusion, growth_rate=0.8, cross_diffusion=chi,
                    return_trajectory=True)
    assert torch.isfinite(traj).all()
    for state in traj:  # after every step
        assert float(state.min()) >= -1e-12
        assert float((state.sum(0) - 1).abs().max()) <= 1e-6


def test_simplex_invariance_in_float32_batched_2d():
    torch.manual_seed(5)
    p0 = torch.distributions.Dirichlet(torch.full((4,), 0.5)).sample((3, 40, 40)).permute(0, 3, 1, 2)
    traj = simulate(p0, spacing=(0.5, 0.5), days=[1.0, 2.0, 3.0], dt=1.0, diffusion=[1.0, 2.0, 0.5, 0.1],
                    growth_rate=0.5, cross_diffusion=torch.full((4, 4), 0.5).fill_diagonal_(0), return_trajectory=True)
    assert traj.shape == (3, 3, 4, 40, 40)
    assert float(traj.min()) >= 0.0
    assert float((traj.sum(2) - 1).abs().max()) <= 1e-6


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------

def _gradcheck_state(seed=0, shape=(5, 6), k=3):
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand((k,) + shape, generator=g, dtype=torch.float64) + 0.2
    return raw / raw.sum(0, keepdim=True)


def _run(p0, diffusion, alpha, chi, **extra):
    return simulate(p0, spacing=(1.0, 1.3), days=1.5, dt=0.5, diffusion=diffusion, growth_rate=alpha,
                    cross_diffusion=chi, jacobi_iters=2, **extra)


def test_gradcheck_diffusion_growth_and_cross_diffusion():
    p0 = _gradcheck_state()
    d = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    off = torch.tensor([0.2, -0.3, 0.1, 0.25, -0.15, 0.3], dtype=torch.float64, requires_grad=True)

    def fn(d, alpha, off):
        chi = torch.zeros(3, 3, dtype=torch.float64)
        chi = chi.index_put((torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 2, 0, 2, 0, 1])), off)
        return _run(p0, d, alpha, chi)

    assert torch.autograd.gradcheck(fn, (d, alpha, off), eps=1e-6, atol=1e-5)


def test_gradcheck_initial_state():
    p0 = _gradcheck_state(seed=1).requires_grad_(True)
    d = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
    chi = torch.tensor([[0, 0.2, 0], [-0.1, 0, 0.2], [0.1, 0, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: _run(p, d, 0.3, chi), (p0,), eps=1e-6, atol=1e-5)


def test_gradcheck_spatial_growth_field_and_checkpointing_gives_same_gradient():
    p0 = _gradcheck_state(seed=2)
    alpha = (torch.rand(5, 6, dtype=torch.float64) * 0.5 + 0.1).requires_grad_(True)
    d = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: _run(p0, d, a, None), (alpha,), eps=1e-6, atol=1e-5)
    plain = torch.autograd.grad(_run(p0, d, alpha, None)[1].sum(), alpha)[0]
    checkpointed = torch.autograd.grad(_run(p0, d, alpha, None, checkpoint=True)[1].sum(), alpha)[0]
    assert torch.allclose(plain, checkpointed, atol=1e-12)


def test_reaction_hook_enters_the_rollout_and_gets_gradients():
    p0 = _gradcheck_state(seed=3)
    weight = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def hook(p, t):  # moves class 2 into the tumour class 1 at a learnable rate
        rate = weight * p[:, 2:3]
        return torch.cat([torch.zeros_like(rate), rate, -rate], dim=1)

    out = simulate(p0, spacing=(1.0, 1.0), days=2.0, dt=0.5, diffusion=0.0, reaction_hook=hook)
    base = simulate(p0, spacing=(1.0, 1.0), days=2.0, dt=0.5, diffusion=0.0)
    assert float(out[1].detach().sum()) > float(base[1].detach().sum()) + 0.1
    (grad,) = torch.autograd.grad(out[1].sum(), weight)
    assert float(grad) > 0


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

def _ok_field():
    return two_class_field(torch.full((6, 6), 0.3, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, error, phrase",
    [
        (dict(dt=0.0), ParameterError, "dt must be a positive"),
        (dict(dt=-1.0), ParameterError, "dt must be a positive"),
        (dict(diffusion=[-0.1, 0.2]), ParameterError, "diffusion must be >= 0"),
        (dict(diffusion=[0.1, 0.2, 0.3]), ParameterError, "one value per class"),
        (dict(diffusion=float("nan")), ParameterError, "NaN"),
        (dict(growth_rate=-0.5), ParameterError, "growth_rate must be >= 0"),
        (dict(carrying_capacity=0.0), ParameterError, "carrying_capacity must be > 0"),
        (dict(carrying_capacity=1.5), ParameterError, "carrying_capacity must be <= 1"),
        (dict(cross_diffusion=[[0.1, 0.0], [0.0, 0.0]]), ParameterError, "zero diagonal"),
        (dict(mask=torch.ones(5, 6, dtype=torch.bool)), InputError, "same grid"),
        (dict(mask=torch.zeros(6, 6, dtype=torch.bool)), InputError, "mask is empty"),
        (dict(spacing=(1.0, 0.0)), ParameterError, "spacing must be positive"),
        (dict(spacing=(1.0, 1.0, 1.0, 1.0)), ParameterError, "2 or 3 spatial axes"),
        (dict(days=-3), ParameterError, "days must be finite and >= 0"),
        (dict(days=[5, 2]), ParameterError, "increasing order"),
        (dict(omega=1.5), ParameterError, "omega must be in (0, 1]"),
        (dict(jacobi_iters=0), ParameterError, "jacobi_iters"),
        (dict(tumor_class=4), ParameterError, "tumor_class"),
    ],
)
def test_bad_parameters_are_reported_specifically(kwargs, error, phrase):
    args = dict(spacing=(1.0, 1.0), days=1.0, dt=0.5, diffusion=0.1)
    args.update(kwargs)
    with pytest.raises(error) as info:
        simulate(_ok_field(), **args)
    assert phrase in str(info.value)


def test_nan_in_field_is_reported():
    p0 = _ok_field()
    p0[0, 2, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        simulate(p0, spacing=(1.0, 1.0), days=1.0, dt=0.5, diffusion=0.1)


def test_field_off_the_simplex_is_reported():
    p0 = _ok_field() * 1.2
    with pytest.raises(InputError, match="not on the probability simplex"):
        simulate(p0, spacing=(1.0, 1.0), days=1.0, dt=0.5, diffusion=0.1)


def test_integer_labels_instead_of_field_are_reported():
    with pytest.raises(InputError, match="labels_to_field"):
        simulate(torch.zeros(2, 6, 6, dtype=torch.long), spacing=(1.0, 1.0), days=1.0, dt=0.5, diffusion=0.1)


def test_spacing_that_does_not_match_the_field_is_reported():
    with pytest.raises(InputError, match="spatial axes"):
        simulate(_ok_field(), spacing=(1.0, 1.0, 1.0, 1.0)[:3], days=1.0, dt=0.5, diffusion=0.1)


def test_all_finite_finds_every_kind_of_bad_value_and_survives_overflow():
    # all_finite decides from one sum where it can; it must agree with the element-wise test
    from AnatomyDTLib.solver import all_finite

    field = torch.rand(4, 7, 9, dtype=torch.float32)
    assert all_finite(field) and all_finite(field.double()) and all_finite(torch.empty(0))
    assert all_finite(torch.arange(10))  # integers are always finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = field.clone()
        broken[3, 6, 8] = bad
        assert not all_finite(broken), bad
    both = field.clone()
    both[0, 0, 0], both[1, 1, 1] = float("inf"), float("-inf")  # their sum is NaN: still refused
    assert not all_finite(both)
    huge = torch.full((8,), 3e38, dtype=torch.float32)  # finite values whose sum overflows to inf
    assert all_finite(huge) and bool(torch.isinf(huge.sum()))


def test_nonfinite_or_non_binary_masks_are_refused():
    for bad in (float("nan"), float("inf"), 0.5):
        mask = torch.ones(6, 6)
        mask[2, 2] = bad
        with pytest.raises(InputError, match="mask must be binary"):
            simulate(_ok_field(), spacing=(1.0, 1.0), days=1.0, dt=0.5, diffusion=0.1, mask=mask)


def test_diffusion_field_with_an_infinite_voxel_is_refused():
    d = torch.full((2, 6, 6), 0.1)
    d[1, 4, 4] = float("inf")
    with pytest.raises(ParameterError, match="diffusion contains NaN or infinite"):
        simulate(_ok_field(), spacing=(1.0, 1.0), days=1.0, dt=0.5, diffusion=d)
