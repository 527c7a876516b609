"""The differentiable IMEX solver of the cross-diffusion reaction–diffusion PDE (Eq. 2, §2.4).

    ∂t p_k = ∇·( D_k(x) ∇p_k − Σ_{j≠k} χ_kj(x) p_k ∇p_j ) + r_k(p) + s_k(x, t)

One step from t to t+Δt (days):

1. explicit part at p^n: reaction (logistic tumour growth, chemotherapy kill, clearance of
   dying cells), the reaction hook of a learned model, and cross-diffusion (upwind, outflow
   limited — see :class:`~AnatomyDTLib.operators.CrossDiffusionOperator`) give the right-hand side;
2. implicit diffusion (I − Δt ∇·D_k∇) p^{n+1} = rhs by m unrolled Jacobi sweeps with relaxation ω;
3. exact Euclidean projection onto the simplex.

Instantaneous events (surgery, radiotherapy fractions, the end of a delayed-death delay) and the
edges of chemotherapy windows land exactly on their days: the solver splits its steps there.
With cross-diffusion, steps are also divided to stay below the explicit term's stability limit
(:func:`~AnatomyDTLib.operators.cross_diffusion_stability`); coefficients that make Eq. 2
ill-posed on the simplex (D_j + D_k + χ_kj < 0 for a pair of classes) raise a
:class:`CrossDiffusionWarning`.
Convention: an event on day d acts at the start of day d, after that day's scan; the state
reported "at day d" is the state before day d's events.

Everything is plain PyTorch, so gradients reach p0, D, α, κ, χ and any learned reaction hook.
``checkpoint=True`` recomputes each step in the backward pass to bound training memory.

The public entry point is :func:`simulate`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from . import treatments as tx
from .errors import InputError, ParameterError
from .boxes import intersection, relative, union
from .inference import _crop  # a field's view on a box
from .operators import CrossDiffusionOperator, DiffusionOperator, cross_diffusion_stability, jacobi_solve
from .plan import TreatmentPlan, load_plan
from .schema import ClassSchema, schema_for
from .simplex import project_to_simplex

ReactionHook = Callable[[torch.Tensor, float], torch.Tensor]
"""A learned extra reaction: ``hook(p, t_days) -> dp/dt`` with p (B, K, *S) and the result in 1/day.

It should sum to zero over classes (move probability between classes, not create it); whatever
it does not conserve is removed by the simplex projection.
"""

SIMPLEX_TOLERANCE = 1e-3
"""How far p0 may be from the simplex (per voxel) before we refuse it rather than project it."""

_EVENT_TIME_TOLERANCE = 1e-9  # days
_COHORT_FLOOR = 1e-15  # probability: dying mass below this is not tracked per cohort (see _rescale_cohorts)

MAX_CROSS_DIFFUSION_SUBSTEPS = 64
"""The most sub-steps a step is divided into to keep the explicit cross-diffusion stable."""


class CrossDiffusionWarning(UserWarning):
    """Cross-diffusion coefficients that make Eq. 2 ill-posed on the simplex, or that no affordable
    step keeps stable: the solution then depends on rounding and on the grid (docs/solver.md,
    "Cross-diffusion: well-posedness and the explicit step limit")."""


# --------------------------------------------------------------------------------------------
# Input normalisation: every tensor argument becomes a broadcastable (B|1, C|1, *S) tensor.
# --------------------------------------------------------------------------------------------

@dataclass
class Grid:
    """Shape and spacing of the batched field the solver integrates."""

    batch: int
    num_classes: int
    spatial_shape: tuple[int, ...]
    spacing: tuple[float, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def ndim(self) -> int:
        return len(self.spatial_shape)


def _as_batched_field(p0: torch.Tensor, spacing: Sequence[float]) -> tuple[torch.Tensor, bool]:
    """Return p0 as (B, K, *S) and whether it came batched."""
    if not isinstance(p0, torch.Tensor):
        p0 = torch.as_tensor(np.asarray(p0))
    if not torch.is_floating_point(p0):
        raise InputError(f"p0 must be a floating-point probability field, got dtype {p0.dtype}; "
                         "convert labels with AnatomyDTLib.state.labels_to_field first.")
    d = len(spacing)
    if p0.dim() == d + 1:
        return p0.unsqueeze(0), False
    if p0.dim() == d + 2:
        return p0, True
    raise InputError(f"p0 has shape {tuple(p0.shape)} but spacing has {d} axes; expected (K, *S) or (B, K, *S) "
                     f"with {d} spatial axes.")


def _check_spacing(spacing: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(h) for h in spacing)
    except TypeError as exc:
        raise ParameterError(f"spacing must be a sequence of mm per spatial axis, got {spacing!r}.") from exc
    if len(values) not in (2, 3):
        raise ParameterError(f"spacing must give 2 or 3 spatial axes (mm each), got {len(values)}: {values}.")
    if not all(math.isfinite(h) and h > 0 for h in values):
        raise ParameterError(f"spacing must be positive and finite in every axis (mm), got {values}.")
    return values


def all_finite(t: torch.Tensor) -> bool:
    """True if every value of ``t`` is finite, in one reduction instead of a full boolean copy.

    A sum is finite only if every term is (NaN and ±inf propagate through additions), so a finite
    sum proves the tensor finite; only a non-finite sum (a bad value, or an overflow of large
    finite values) needs the element-wise test. On a 1 mm, 5-class field this is one read of the
    field instead of writing and reading a boolean copy of it.
    """
    if t.numel() == 0:
        return True
    if not t.dtype.is_floating_point:
        return True
    if bool(torch.isfinite(t.detach().sum())):
        return True
    return bool(torch.isfinite(t.detach()).all())


def _check_field(p: torch.Tensor) -> None:
    if not all_finite(p):
        bad = int((~torch.isfinite(p)).sum())
        raise InputError(f"p0 contains {bad} NaN or infinite values; the initial anatomy must be a finite probability field.")
    low = float(p.min())
    sums = p.sum(dim=1)
    worst = float((sums - 1).abs().max())
    if low < -SIMPLEX_TOLERANCE or worst > SIMPLEX_TOLERANCE:
        raise InputError(
            f"p0 is not on the probability simplex (min value {low:.3g}, largest |sum-1| = {worst:.3g}); every voxel's "
            f"class probabilities must be >= 0 and sum to 1 within {SIMPLEX_TOLERANCE}. Build p0 with "
            "AnatomyDTLib.state.labels_to_field.")


def _coefficient_field(value, name: str, unit: str, grid: Grid, *, per_class: bool, minimum: float = 0.0,
                       strictly_positive: bool = False, maximum: float | None = None) -> torch.Tensor:
    """Validate a scalar / per-class / spatial coefficient and shape it (B|1, C|1, *S|1...)."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value, dtype=np.float64))
    t = t.to(dtype=grid.dtype, device=grid.device)
    if not all_finite(t):
        raise ParameterError(f"{name} contains NaN or infinite values; give finite values in {unit}.")
    low = float(t.detach().min()) if t.numel() else 0.0
    if strictly_positive and low <= minimum:
        raise ParameterError(f"{name} must be > {minimum:g} {unit} everywhere, got a minimum of {low:g}.")
    if not strictly_positive and low < minimum:
        raise ParameterError(f"{name} must be >= {minimum:g} {unit} everywhere, got a minimum of {low:g}.")
    if maximum is not None and float(t.detach().max()) > maximum:
        raise ParameterError(f"{name} must be <= {maximum:g} {unit}, got a maximum of {float(t.detach().max()):g}.")
    nd, k, s = grid.ndim, grid.num_classes, grid.spatial_shape
    ones = (1,) * nd
    if t.dim() == 0:
        return t.reshape((1, 1) + ones)
    if per_class and t.dim() == 1:
        if t.shape[0] != k:
            raise ParameterError(f"{name} has {t.shape[0]} values but the field has {k} classes; give one value per class ({unit}).")
        return t.reshape((1, k) + ones)
    if tuple(t.shape[-nd:]) != s:
        raise ParameterError(f"{name} has shape {tuple(t.shape)}, which does not match the field's spatial shape {s}.")
    lead = tuple(t.shape[:-nd])
    if per_class:
        if lead == (k,):
            return t.unsqueeze(0)
        if lead == (grid.batch, k):
            return t
        raise ParameterError(f"{name} field must be (K, *S) or (B, K, *S) = ({k}, ...) / ({grid.batch}, {k}, ...), got {tuple(t.shape)}.")
    if lead == ():
        return t.reshape((1, 1) + s)
    if lead in ((grid.batch,), (1,)):
        return t.reshape((lead[0], 1) + s)
    if lead in ((grid.batch, 1), (1, 1)):
        return t
    raise ParameterError(f"{name} field must be (*S), (B, *S) or (B, 1, *S), got {tuple(t.shape)}.")


def _mask_field(mask, grid: Grid) -> torch.Tensor | None:
    """The domain mask as a float (B|1, 1, *S) tensor of 0/1, or None."""
    if mask is None:
        return None
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    nd = grid.ndim
    if m.dim() < nd or tuple(m.shape[-nd:]) != grid.spatial_shape or m.dim() > nd + 2:
        raise InputError(f"mask has shape {tuple(m.shape)} but the field's spatial shape is {grid.spatial_shape}; "
                         "the brain mask must be on the same grid as p0.")
    m = m.reshape((-1, 1) + grid.spatial_shape)
    if m.shape[0] not in (1, grid.batch):
        raise InputError(f"mask has batch size {m.shape[0]} but p0 has {grid.batch}.")
    # NaN and ±inf equal neither 0 nor 1, so the binary test also refuses non-finite values
    if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
        raise InputError("mask must be binary (0/1 or bool).")
    if not bool(m.any()):
        raise InputError("mask is empty: no voxel is inside the domain.")
    return m.to(dtype=grid.dtype, device=grid.device)


def _cross_diffusion_tensor(chi, grid: Grid) -> torch.Tensor | None:
    if chi is None:
        return None
    t = chi if isinstance(chi, torch.Tensor) else torch.as_tensor(np.asarray(chi, dtype=np.float64))
    t = t.to(dtype=grid.dtype, device=grid.device)
    k = grid.num_classes
    if not torch.isfinite(t).all():
        raise ParameterError("cross_diffusion contains NaN or infinite values; give finite χ in mm²/day.")
    if t.dim() < 2 or tuple(t.shape[:2]) != (k, k) and not (t.dim() >= 3 and tuple(t.shape[1:3]) == (k, k)):
        raise ParameterError(f"cross_diffusion must be a (K, K) = ({k}, {k}) matrix or a (K, K, *S) field, got shape {tuple(t.shape)}.")
    if t.dim() == 2:
        diag = torch.diagonal(t)
    else:
        if tuple(t.shape[-grid.ndim:]) != grid.spatial_shape:
            raise ParameterError(f"cross_diffusion field has spatial shape {tuple(t.shape[-grid.ndim:])}, expected {grid.spatial_shape}.")
        if t.dim() == 2 + grid.ndim:
            t = t.unsqueeze(0)
        diag = torch.diagonal(t, dim1=1, dim2=2)
    if bool((diag != 0).any()):
        raise ParameterError("cross_diffusion must have a zero diagonal: χ_kk is not part of Eq. 2 (self-diffusion is D_k).")
    return t


def _output_days(days) -> list[float]:
    values = [float(days)] if np.ndim(days) == 0 else [float(d) for d in days]
    if not values:
        raise ParameterError("days is empty; give the horizon in days or a list of output days.")
    if not all(math.isfinite(d) and d >= 0 for d in values):
        raise ParameterError(f"days must be finite and >= 0 (days from the baseline scan), got {values}.")
    if values != sorted(values):
        raise ParameterError(f"output days must be in increasing order, got {values}.")
    return values


# --------------------------------------------------------------------------------------------
# The model on the grid
# --------------------------------------------------------------------------------------------

@dataclass
class _Cohort:
    """Tumour probability lethally hit by one fraction, waiting out the delay before clearance.

    On the no-grad path a cohort is kept on the box of the tumour it was cut from (``box``): its
    mass is zero outside that box for good (later steps only rescale it), so a fraction costs a
    tumour-sized tensor, not a grid-sized one (36 MB at 240×240×155 in float32)."""

    expiry_day: float
    mass: torch.Tensor  # (B, 1, *S), or (B, 1, *box's shape) when ``box`` is set
    box: tuple[slice, ...] | None = None  # where ``mass`` lies in the grid; None: it is grid-sized

    def part_in(self, box) -> tuple[torch.Tensor, tuple[slice, ...]] | None:
        """(view of the mass, where that view lies relative to ``box``) for the part of the cohort
        inside ``box``; None when the cohort has no voxel there."""
        if self.box is None:
            return _crop(self.mass, box), tuple(slice(0, b.stop - b.start) for b in box)
        common = intersection(self.box, box)
        if common is None:
            return None
        return (_crop(self.mass, relative(common, self.box)), relative(common, box))

    def on_grid(self, spatial_shape) -> torch.Tensor:
        """The mass as a grid-sized (B, 1, *S) tensor (a new one)."""
        if self.box is None:
            return self.mass.clone()
        full = self.mass.new_zeros(tuple(self.mass.shape[:2]) + tuple(spatial_shape))
        _crop(full, self.box).copy_(self.mass)
        return full


@dataclass
class DyingCompartment:
    """Delayed death's hidden state: lethally irradiated tumour cells that are still visible.

    A scan shows them as tumour, yet they will clear instead of growing. ``simulate(...,
    return_dying=True)`` returns this state at its last output day, and ``simulate(..., dying=...)``
    starts from it, so that a forecast restarted from a later scan (calibration) does not count
    cells killed before that scan as living tumour.

    Attributes:
        dying: (B|1, 1, *S) probability of dying cells, a part of the visible tumour channel.
        pending: cohorts still in their delay, as (days until their clearance starts, mass
            (B|1, 1, *S)), days counted from the state's day; each mass is a part of ``dying``.
        clearance_rate_per_day: rate (1/day) at which dying cells clear once their delay has
            passed (ln 2 / half-life in days).
    """

    dying: torch.Tensor
    pending: list[tuple[float, torch.Tensor]]
    clearance_rate_per_day: float

    @property
    def clearing(self) -> torch.Tensor:
        """The part of ``dying`` whose delay has passed: it clears now (probability, (B|1, 1, *S))."""
        pending = sum((mass for _, mass in self.pending), torch.zeros_like(self.dying))
        return torch.clamp(self.dying - pending, min=0.0)


@dataclass
class _Problem:
    """Everything one solve needs, validated and shaped for the grid."""

    grid: Grid
    num_channels: int  # K, or K+1 with the dying channel
    tumour: int
    sink: int
    dying: int | None
    diffusion: DiffusionOperator
    cross: CrossDiffusionOperator | None
    growth_rate: torch.Tensor
    carrying_capacity: torch.Tensor
    domain: torch.Tensor | None
    plan: TreatmentPlan
    schema: ClassSchema
    reaction_hook: ReactionHook | None
    jacobi_iters: int
    omega: float
    jacobi_variant: str
    surgery_removals: list = field(default_factory=list)  # per surgery: (B|1, 1, *S) tensor or None (extent)
    dose_per_fraction: torch.Tensor | float = 0.0
    diffusion_coefficients: torch.Tensor | None = None  # (B|1, num_channels, *S|1...) D in mm²/day
    max_step: float | None = None  # days; the stability limit of the explicit cross-diffusion, if below dt
    clearance_rate_per_day: float = 0.0  # of dying cells after their delay (plan's delayed death or carried state)


def _extended_diffusion(d: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Append a zero-diffusivity dying channel: lethally hit cells do not migrate."""
    if d.shape[1] == num_channels:
        return d
    if d.shape[1] == 1:
        d = d.expand(d.shape[0], num_channels - 1, *d.shape[2:])
    zero = torch.zeros_like(d[:, :1])
    return torch.cat([d, zero], dim=1)


def _extended_chi(chi: torch.Tensor, tumour: int, diffusion: torch.Tensor) -> torch.Tensor:
    """χ with a dying channel that does not move but pushes/pulls the others like tumour does,
    as far as that keeps the problem well-posed.

    The dying channel has D = 0, so a mixture of it and class k is well-posed only if
    χ_k,dying >= −D_k (docs/solver.md, "Cross-diffusion: well-posedness"): its column is the
    tumour's column clipped to that bound, with D_k the smallest D of class k in the grid. Dying
    cells therefore push an immobile tissue not at all and a diffusing one at most as hard as
    the tissue's own diffusion can balance; attraction (χ > 0) is copied unchanged.
    """
    k = chi.shape[0] if chi.dim() == 2 else chi.shape[1]
    d_min = diffusion[:, :k].transpose(0, 1).reshape(k, -1).amin(dim=1).to(chi.dtype)  # (k,)
    if chi.dim() == 2:
        ext = torch.zeros((k + 1, k + 1), dtype=chi.dtype, device=chi.device)
        ext[:k, :k] = chi
        ext[:k, k] = torch.maximum(chi[:, tumour], -d_min)
        ext[tumour, k] = 0.0
        return ext
    b = chi.shape[0]
    ext = torch.zeros((b, k + 1, k + 1) + tuple(chi.shape[3:]), dtype=chi.dtype, device=chi.device)
    ext[:, :k, :k] = chi
    ext[:, :k, k] = torch.maximum(chi[:, :, tumour], -d_min.reshape((1, k) + (1,) * (chi.dim() - 3)))
    ext[:, tumour, k] = 0.0
    return ext


def _grid_array(value, grid: Grid, what: str) -> torch.Tensor:
    """A plan array (resection mask, dose map) given as an array or a file path, as a (B|1, 1, *S) tensor."""
    if isinstance(value, str):
        import SimpleITK as sitk

        try:
            arr = sitk.GetArrayFromImage(sitk.ReadImage(value))
        except RuntimeError as exc:
            raise InputError(f"Cannot read the {what} {value!r}: {exc}") from exc
    else:
        arr = np.asarray(value)
    if tuple(arr.shape) != grid.spatial_shape:
        raise InputError(f"The {what} has shape {tuple(arr.shape)} but the anatomy grid is {grid.spatial_shape}; "
                         "resample it to the segmentation's grid (the anatomydt CLI does this from the files' geometry).")
    if not np.isfinite(arr).all():
        raise InputError(f"The {what} contains NaN or infinite values.")
    return torch.as_tensor(arr.astype(np.float64), dtype=grid.dtype, device=grid.device).reshape((1, 1) + grid.spatial_shape)


def _clearance_rate(plan: TreatmentPlan, carried: DyingCompartment | None) -> float | torch.Tensor | None:
    """Clearance rate (1/day) of the dying channel, or None when the solve has no dying channel.

    The channel exists when the plan models delayed death or a dying compartment is carried in;
    with both, their clearance rates must agree (one rate per channel). A plan's rate may be a
    0-d tensor (calibration fits it); it is returned as is, so the solve is differentiable in it."""
    rt = plan.radiotherapy
    planned = rt.delayed_death.clearance_rate_per_day if rt is not None and rt.delayed_death is not None else None
    if carried is None:
        return planned
    if rt is not None and planned is None:
        raise ParameterError("A dying compartment was carried in, but the plan's radiotherapy does not model delayed "
                             "death: its kills would have no delay. Add radiotherapy.delayed_death to the plan.")
    rate = float(carried.clearance_rate_per_day)
    if not (math.isfinite(rate) and rate > 0):
        raise ParameterError(f"The carried dying compartment's clearance rate must be > 0 per day, got {rate!r}.")
    if planned is not None and abs(float(planned) - rate) > 1e-9 * max(float(planned), rate):
        raise ParameterError(f"The carried dying compartment clears at {rate:g}/day but the plan's delayed death at "
                             f"{planned:g}/day; give both the same half-life.")
    return rate


def _build_problem(grid: Grid, *, diffusion, growth_rate, carrying_capacity, cross_diffusion, tumour: int, sink: int,
                   plan: TreatmentPlan, mask, schema, reaction_hook, jacobi_iters, omega, jacobi_variant,
                   carried: DyingCompartment | None = None) -> _Problem:
    rt = plan.radiotherapy
    clearance_rate = _clearance_rate(plan, carried)
    delayed = clearance_rate is not None
    num_channels = grid.num_classes + (1 if delayed else 0)
    dying = grid.num_classes if delayed else None
    domain = _mask_field(mask, grid)
    d = _coefficient_field(diffusion, "diffusion", "mm²/day", grid, per_class=True)
    if d.shape[1] == 1 and d.dim() > 2:
        d = d.expand(d.shape[0], grid.num_classes, *d.shape[2:])
    d = _extended_diffusion(d, num_channels)
    operator = DiffusionOperator(d, grid.spacing, domain, grid.spatial_shape)
    chi = _cross_diffusion_tensor(cross_diffusion, grid)
    cross = None
    if chi is not None and bool((chi != 0).any()):
        if delayed:
            chi = _extended_chi(chi, tumour, d)
        cross = CrossDiffusionOperator(chi, grid.spacing, domain)
    alpha = _coefficient_field(growth_rate, "growth_rate", "1/day", grid, per_class=False)
    kappa = _coefficient_field(carrying_capacity, "carrying_capacity", "(probability)", grid, per_class=False,
                               strictly_positive=True, maximum=1.0)
    problem = _Problem(grid, num_channels, tumour, sink, dying, operator, cross, alpha, kappa, domain, plan, schema,
                       reaction_hook, jacobi_iters, omega, jacobi_variant, diffusion_coefficients=d,
                       clearance_rate_per_day=0.0 if clearance_rate is None else clearance_rate)
    for surgery in plan.surgeries:
        if surgery.resection_mask is not None:
            removal = _grid_array(surgery.resection_mask, grid, "resection mask")
            if not bool(((removal == 0) | (removal == 1)).all()):
                raise InputError("The resection mask must be binary (0/1).")
            problem.surgery_removals.append(removal)
        else:
            problem.surgery_removals.append(None)
    if rt is not None:
        if rt.dose_map is not None:
            total = _grid_array(rt.dose_map, grid, "radiotherapy dose map")
            if float(total.min()) < 0:
                raise InputError("The radiotherapy dose map has negative doses; doses are in Gy and must be >= 0.")
            problem.dose_per_fraction = total / len(rt.fraction_days)
        else:
            problem.dose_per_fraction = float(rt.dose_per_fraction_gy)
    return problem


def _channel_name(problem: _Problem, c: int) -> str:
    if c == problem.dying:
        return "dying tumour (delayed death)"
    return problem.schema.names[c]


def _limit_cross_diffusion_step(problem: _Problem, dt: float) -> None:
    """Warn about ill-posed cross-diffusion and set the step limit of the explicit term.

    See :func:`AnatomyDTLib.operators.cross_diffusion_stability`: a mixture of classes j and k is
    well-posed only if D_j + D_k + χ_kj >= 0, and the explicit step is stable only below a
    parabolic limit Δt = O(h²/|χ|). Steps longer than that limit are divided (at most
    ``MAX_CROSS_DIFFUSION_SUBSTEPS`` times); coefficients for which no step helps are reported
    with a :class:`CrossDiffusionWarning` and computed as given.
    """
    if problem.cross is None:
        return
    report = cross_diffusion_stability(problem.diffusion_coefficients, problem.cross.chi, problem.grid.spacing,
                                       problem.grid.spatial_shape, dt, operator=problem.diffusion,
                                       jacobi_iters=problem.jacobi_iters, omega=problem.omega,
                                       variant=problem.jacobi_variant, mask=problem.domain,
                                       max_substeps=MAX_CROSS_DIFFUSION_SUBSTEPS)
    name = lambda c: _channel_name(problem, c)  # noqa: E731
    if report.ill_posed:
        worst = min(report.ill_posed, key=lambda r: r[2])
        pairs = ", ".join(f"χ[{name(k)}][{name(j)}]" for k, j, _ in report.ill_posed)
        k, j = worst[0], worst[1]
        warnings.warn(CrossDiffusionWarning(
            f"Cross-diffusion makes Eq. 2 ill-posed on the simplex for {pairs}: the margin D_j + D_k + χ_kj is "
            f"{worst[2]:.3g} mm²/day for row {name(k)!r}, column {name(j)!r} (it must be >= 0 wherever the two "
            "classes can mix). A mixture of the two classes then diffuses backwards, so interfaces depend on "
            "rounding and on the grid (float32 and float64 runs drift apart). Reduce |χ_kj| below D_j + D_k "
            "there (docs/solver.md, 'Cross-diffusion: well-posedness and the explicit step limit')."), stacklevel=3)
    if report.unresolved:
        pairs = ", ".join(f"χ[{name(k)}][{name(j)}] (margin {m:.3g} mm²/day)" for k, j, m in report.unresolved)
        warnings.warn(CrossDiffusionWarning(
            f"Cross-diffusion {pairs} is at the edge of well-posedness (D_j + D_k + χ_kj ≈ 0): the explicit step "
            f"is unstable even at Δt/{MAX_CROSS_DIFFUSION_SUBSTEPS} = {dt / MAX_CROSS_DIFFUSION_SUBSTEPS:.3g} day, "
            "so rounding differences grow at interfaces. Keep a margin, e.g. |χ_kj| <= (D_j + D_k)/2."),
            stacklevel=3)
    problem.max_step = report.max_stable_dt


# --------------------------------------------------------------------------------------------
# Stepping
# --------------------------------------------------------------------------------------------

def _removed_class(problem: _Problem, name: str | None) -> int:
    return problem.sink if name is None else problem.schema.index(name)


def _explicit_reaction(problem: _Problem, p: torch.Tensor, t: float, dt: float, chemo_rate: float,
                       clearable: torch.Tensor | None) -> torch.Tensor:
    """Local reaction and continuous treatment over [t, t+dt): growth, chemotherapy, clearance, hook."""
    q = tx.logistic_growth(p, problem.growth_rate, problem.carrying_capacity, dt, problem.tumour, problem.sink,
                           problem.dying, problem.domain)
    if chemo_rate > 0:
        q = tx.exponential_kill(q, chemo_rate, dt, problem.tumour, problem.sink, problem.domain)
    if clearable is not None:
        q, _ = tx.clear_dying(q, clearable, problem.clearance_rate_per_day, dt, problem.dying, problem.sink)
    if problem.reaction_hook is not None:
        visible = _visible(problem, p)
        extra = problem.reaction_hook(visible, t)
        if problem.dying is not None:
            extra = torch.cat([extra, torch.zeros_like(extra[:, :1])], dim=1)
        if problem.domain is not None:
            extra = extra * problem.domain
        q = q + dt * extra
    return q


def _transport_and_project(problem: _Problem, p_explicit: torch.Tensor, p_old: torch.Tensor, dt: float) -> torch.Tensor:
    """Add explicit cross-diffusion (from p^n), solve the implicit diffusion, project onto the simplex."""
    rhs = p_explicit
    if problem.cross is not None:
        rhs = rhs + dt * problem.cross.tendency(p_old, dt)
    u = jacobi_solve(problem.diffusion, rhs, dt, problem.jacobi_iters, problem.omega, problem.jacobi_variant)
    projected = project_to_simplex(u, dim=1)
    if problem.domain is not None:  # outside the domain nothing changes, not even by rounding
        projected = torch.where(problem.domain > 0, projected, p_old)
    return projected


def _visible(problem: _Problem, p: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """The K imaged classes: the dying channel merged back into the tumour (``p`` itself when there
    is none). ``into``: written there instead of a new tensor (always a copy)."""
    k = problem.grid.num_classes
    if problem.dying is None:
        return p if into is None else into.copy_(p)
    visible = p[:, :k].clone() if into is None else into.copy_(p[:, :k])  # one copy; adding the dying share
    visible[:, problem.tumour:problem.tumour + 1] += p[:, k:k + 1]  # to the tumour alone = adding dying × one-hot
    return visible


class _Integrator:
    """Time loop: splits steps at events, applies them, records the requested days."""

    def __init__(self, problem: _Problem, dt: float, use_checkpoint: bool, progress, cohorts=()):
        self.problem = problem
        self.dt = dt
        self.use_checkpoint = use_checkpoint
        self.progress = progress
        self.cohorts: list[_Cohort] = list(cohorts)  # carried-in cohorts first, then one per fraction
        self.final_state: torch.Tensor | None = None  # every channel (dying included) at the horizon
        self.stepper = None  # the buffer-reusing no-grad path, set up in run() when gradients are off
        # No-grad path: the box that holds every non-zero value of the dying channel and of the
        # cohorts this step (the stepper's search window); None = the whole grid (with gradients).
        self.cohort_box = None

    # -- events ---------------------------------------------------------------------------
    def _apply_events(self, p: torch.Tensor, day: float) -> torch.Tensor:
        pr = self.problem
        plan = pr.plan
        for surgery, removal in zip(plan.surgeries, pr.surgery_removals):
            if abs(surgery.day - day) <= _EVENT_TIME_TOLERANCE:
                p = self._surgery(p, surgery, removal)
        rt = plan.radiotherapy
        if rt is not None:
            for _ in range(sum(abs(f - day) <= _EVENT_TIME_TOLERANCE for f in rt.fraction_days)):
                p = self._radiation(p, day)  # a day listed twice in the plan gets two fractions
        return p

    def _surgery(self, p: torch.Tensor, surgery, removal) -> torch.Tensor:
        pr = self.problem
        p = self._current(p)  # surgery reads and rewrites the whole grid
        target = _removed_class(pr, surgery.removed_to)
        if removal is None:
            tumour = tx.tumour_total(p, pr.tumour, pr.dying).detach().cpu().numpy()
            domain = None if pr.domain is None else pr.domain.detach().cpu().numpy()
            per_item = []
            for b in range(p.shape[0]):
                dom = None if domain is None else domain[min(b, domain.shape[0] - 1), 0]
                per_item.append(tx.removal_from_extent(tumour[b, 0], surgery.extent, pr.grid.spacing, dom))
            removal = torch.as_tensor(np.stack(per_item)[:, None], dtype=p.dtype, device=p.device)
        elif pr.domain is not None:
            removal = removal * pr.domain
        before = None if pr.dying is None else p[:, pr.dying:pr.dying + 1]
        p = tx.resect(p, removal, pr.tumour, target, pr.dying)
        if before is not None:
            self._rescale_cohorts(before, p[:, pr.dying:pr.dying + 1])
        return p

    def _radiation(self, p: torch.Tensor, day: float) -> torch.Tensor:
        pr = self.problem
        rt = pr.plan.radiotherapy
        target = pr.dying if pr.dying is not None else pr.sink
        box = None
        if self.stepper is not None:  # in place, on the tumour's box only (same arithmetic, see inference.py)
            killed = self.stepper.radiation_fraction_(p, pr.dose_per_fraction, rt.alpha_per_gy, rt.beta_per_gy2, target,
                                                      hypoxia=rt.hypoxia)
            if killed is not None:
                box, killed = killed
        else:
            p, killed = tx.radiation_fraction(p, pr.dose_per_fraction, rt.alpha_per_gy, rt.beta_per_gy2, pr.tumour,
                                              target, pr.domain, hypoxia=rt.hypoxia, dying=pr.dying)
        if pr.dying is not None:
            delay = rt.delayed_death.delay_days
            self.cohorts.append(_Cohort(day + delay, killed, box))
        return p

    def _rescale_cohorts(self, before: torch.Tensor, after: torch.Tensor, box=None) -> None:
        """Keep pending cohorts a consistent part of the dying channel after it was rescaled.

        ``box`` (no-grad path): the dying channel changed only inside it, so only there are the
        cohorts rescaled, in place (the integrator owns their masses); ``before`` and ``after``
        are then the dying channel on ``box``."""
        if not self.cohorts:
            return
        # Below _COHORT_FLOOR the cohorts are negligible and the ratio is set to 0: dividing by a
        # tiny (denormal) value would make the backward pass's 1/before² overflow to NaN.
        live = before > _COHORT_FLOOR
        ratio = torch.where(live, after / torch.where(live, before, torch.ones_like(before)), torch.zeros_like(before))
        for cohort in self.cohorts:
            if box is None:
                cohort.mass = cohort.mass * (ratio if cohort.box is None else _crop(ratio, cohort.box))
                continue
            part = cohort.part_in(box)
            if part is not None:
                mass, where = part
                mass.mul_(_crop(ratio, where))

    def _clearable(self, p: torch.Tensor, day: float) -> torch.Tensor | None:
        """The part of the dying channel whose delay has passed by ``day``."""
        pr = self.problem
        if pr.dying is None:
            return None
        self.cohorts = [c for c in self.cohorts if c.expiry_day > day + _EVENT_TIME_TOLERANCE]
        if self.cohort_box is not None:
            return self._clearable_in_box(p, self.cohort_box)
        dying = p[:, pr.dying:pr.dying + 1]
        pending = self._pending_in(tuple(slice(0, n) for n in dying.shape[2:]), dying)
        return torch.clamp(dying - pending, min=0.0)

    def _pending_in(self, box, like: torch.Tensor) -> torch.Tensor:
        """The sum of the pending cohorts' masses on ``box``, a new tensor shaped like ``like``
        (added in cohort order; a cohort kept on its own box adds to its part of ``box`` only:
        elsewhere it is zero)."""
        pending = torch.zeros_like(like)
        for cohort in self.cohorts:
            if cohort.box is None:
                pending = pending + _crop(cohort.mass, box)
                continue
            part = cohort.part_in(box)
            if part is not None:
                mass, where = part
                _crop(pending, where).add_(mass)
        return pending

    def _clearable_in_box(self, p: torch.Tensor, box) -> torch.Tensor:
        """:meth:`_clearable` computed inside ``box`` only (the dying channel is zero elsewhere, so
        is the result), in the stepper's buffer (kept across steps, in the coordinates of the state
        the step works on); same operations in the same order."""
        stepper, d = self.stepper, self.problem.dying
        box = stepper.clip(box)  # while the state is packed, the dying channel is zero outside its region
        region = stepper.clearable_on_(box)
        pending = self._pending_in(box, region)
        torch.clamp(stepper.current(p, box)[:, d:d + 1] - pending, min=0.0, out=region)
        return stepper.clearable_buffer()

    # -- stepping -------------------------------------------------------------------------
    def _step(self, p: torch.Tensor, t: float, dt: float) -> torch.Tensor:
        pr = self.problem
        chemo = pr.plan.chemo_kill_rate(t, t + dt) if pr.plan.chemotherapy else 0.0
        if self.stepper is not None and pr.dying is not None:
            self.cohort_box = self.stepper.dying_box = self.stepper.search_window()
        clearable = self._clearable(p, t)
        if self.stepper is not None:
            p = self.stepper.step(p, t, dt, chemo, clearable)
            if pr.dying is not None:  # the dying channel changed inside the search window and the step's box
                stepper = self.stepper
                box = stepper.clip(union(self.cohort_box, stepper.window))
                self._rescale_cohorts(stepper.on(stepper.dying_before_projection, box),
                                      stepper.current(p, box)[:, pr.dying:pr.dying + 1], box)
            return p
        explicit = _explicit_reaction(pr, p, t, dt, chemo, clearable)
        # Transport leaves the immobile dying channel unchanged; only the projection rescales it.
        dying_before = None if pr.dying is None else explicit[:, pr.dying:pr.dying + 1]
        if self.use_checkpoint and torch.is_grad_enabled():
            # The operator caches its diagonals on first use; build them outside the checkpointed
            # region so the recomputation in the backward pass saves exactly the same tensors.
            pr.diffusion.diagonal  # noqa: B018 (property with a cache)
            pr.diffusion.max_diagonal()
            p_new = torch_checkpoint(_transport_and_project, pr, explicit, p, dt, use_reentrant=False)
        else:
            p_new = _transport_and_project(pr, explicit, p, dt)
        if dying_before is not None:
            self._rescale_cohorts(dying_before, p_new[:, pr.dying:pr.dying + 1])
        return p_new

    def run(self, p: torch.Tensor, output_days: list[float], *, private: bool = False,
            out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The fields at ``output_days``. ``private``: ``p`` is the solver's own tensor (built from
        p0, not the caller's), which the no-grad path may then change in place without a copy.
        ``out`` (no-grad only; (T, B, K, *S)): the fields are written into ``out[i]``, which the
        returned list then holds, so a trajectory needs no stacking copy."""
        if torch.is_grad_enabled():
            return self._run(p, output_days)
        from .inference import InferenceStepper

        if not (private and p.is_contiguous()):
            p = p.clone(memory_format=torch.contiguous_format)  # a private copy: the steps work in place
        self.stepper = InferenceStepper(self.problem, p)
        flushing = torch.set_flush_denormal(True)  # see inference.py: exact boxes, no slow denormals
        # torch keeps its thread count while the fused kernel runs: lowering it to one thread for the
        # torch ops between kernel calls left the brain step's time unchanged and made the output
        # days' copies slower (docs/performance.md, "torch's threads while the kernel runs")
        try:
            return self._run(p, output_days, out)
        finally:
            if flushing:
                torch.set_flush_denormal(False)

    def _run(self, p: torch.Tensor, output_days: list[float], out: torch.Tensor | None = None) -> list[torch.Tensor]:
        horizon = output_days[-1]
        plan = self.problem.plan
        cuts = {0.0, horizon, *[d for d in output_days if d < horizon], *plan.breakpoints(horizon),
                *[c.expiry_day for c in self.cohorts]}  # a carried cohort starts clearing on its day
        cuts = sorted(c for c in cuts if 0.0 <= c <= horizon)
        snapshots: dict[int, torch.Tensor] = {}
        pending_outputs = list(enumerate(output_days))
        for i, t0 in enumerate(cuts):
            final = t0 >= horizon - _EVENT_TIME_TOLERANCE  # nothing changes p after this
            while pending_outputs and abs(pending_outputs[0][1] - t0) <= _EVENT_TIME_TOLERANCE:
                index = pending_outputs.pop(0)[0]
                snapshots[index] = self._snapshot(p, final, None if out is None else out[index])
            if final:
                break
            p = self._apply_events(p, t0)
            t1 = cuts[i + 1]
            largest = self.dt if self.problem.max_step is None else min(self.dt, self.problem.max_step)
            n_steps = max(1, math.ceil((t1 - t0) / largest - 1e-9))
            h = (t1 - t0) / n_steps
            for s in range(n_steps):
                p = self._step(p, t0 + s * h, h)
                if self.progress is not None:
                    self.progress(t0 + (s + 1) * h, horizon)  # may raise Cancelled to stop the run
        for index, _ in pending_outputs:  # output days equal to the horizon
            snapshots[index] = self._snapshot(p, True, None if out is None else out[index])
        self.final_state = self._current(p)
        return [snapshots[i] for i in range(len(output_days))]

    def _current(self, p: torch.Tensor) -> torch.Tensor:
        """``p`` with every value current: on the no-grad path the stepper may keep part of the
        state in a packed copy between steps (see inference.py), which this writes back."""
        return p if self.stepper is None else self.stepper.unpacked(p)

    def _snapshot(self, p: torch.Tensor, final: bool, into: torch.Tensor | None = None) -> torch.Tensor:
        """The imaged classes at an output day, as a tensor later steps do not change.

        The no-grad steps work on ``p`` in place, so an earlier day's field is copied; the
        horizon's is ``p`` itself (no step follows), and a merged dying channel is a new tensor
        already. On a 1 mm brain grid each copy avoided saves ~0.1-0.2 s. ``into``: write the field
        there (a slot of the trajectory) and return it."""
        p = self._current(p)
        if into is not None:
            return _visible(self.problem, p, into)
        visible = _visible(self.problem, p)
        if visible is not p or final:
            return visible
        return p.clone()

    def dying_compartment(self, horizon: float) -> DyingCompartment | None:
        """The dying channel and its cohorts still in their delay at ``horizon``, on a day axis
        that starts there (see :class:`DyingCompartment`); None without a dying channel."""
        pr = self.problem
        if pr.dying is None or self.final_state is None:
            return None
        pending = [(c.expiry_day - horizon, c.on_grid(self.final_state.shape[2:])) for c in self.cohorts
                   if c.expiry_day > horizon + _EVENT_TIME_TOLERANCE]
        return DyingCompartment(self.final_state[:, pr.dying:pr.dying + 1].clone(), pending,
                                float(pr.clearance_rate_per_day))


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def simulate(p0, *, spacing, days, dt, diffusion, growth_rate=0.0, carrying_capacity=1.0, cross_diffusion=None,
             tumor_class: int = 1, plan=None, mask=None, jacobi_iters: int = 2, omega: float = 1.0,
             return_trajectory: bool = False, schema: ClassSchema | None = None, removed_class: int | None = None,
             reaction_hook: ReactionHook | None = None, jacobi_variant: str = "conservative",
             checkpoint: bool = False, progress: Callable[[float, float], None] | None = None,
             dying: DyingCompartment | None = None, return_dying: bool = False):
    """Evolve an anatomy probability field by Eq. 2 with the IMEX scheme.

    Args:
        p0: (K, *S) or (B, K, *S) float tensor on the simplex, 2 or 3 spatial axes.
        spacing: mm per spatial axis, in the tensor's axis order (e.g. (z, y, x)).
        days: the horizon in days, or an increasing list of output days (days from baseline).
        dt: the largest time step in days; steps are shortened to land exactly on events and, with
            cross-diffusion, to its stability limit (a parabolic limit Δt = O(h²/|χ|), see
            :func:`AnatomyDTLib.operators.cross_diffusion_stability`).
        diffusion: D_k in mm²/day: one scalar for all classes, K values, or a (K, *S) / (B, K, *S)
            field (e.g. tumour diffusion faster in white matter, see
            :func:`AnatomyDTLib.parameters.tissue_weighted_diffusion`).
        growth_rate: α of the tumour class in 1/day, scalar or (*S) / (B, *S) field.
        carrying_capacity: κ in (0, 1], scalar or field.
        cross_diffusion: χ in mm²/day, a (K, K) matrix or (K, K, *S) field with zero diagonal;
            sign convention of :class:`~AnatomyDTLib.operators.CrossDiffusionOperator`. Eq. 2 on the
            simplex is well-posed only if D_j + D_k + χ_kj >= 0 for every pair of classes that can
            mix (a stronger repulsion makes the mixture diffuse backwards); otherwise a
            :class:`CrossDiffusionWarning` is issued and the (grid- and rounding-dependent)
            solution is computed as asked.
        tumor_class: channel of the tumour.
        plan: treatment plan (dict, JSON path or :class:`~AnatomyDTLib.plan.TreatmentPlan`); arrays
            in it (resection masks, dose maps) must be on p0's grid.
        mask: optional (*S) / (B, *S) binary domain (brain) mask; nothing crosses its border and
            nothing changes outside it.
        jacobi_iters: m, the number of unrolled Jacobi sweeps per step (>= 1).
        omega: relaxation ω in (0, 1].
        return_trajectory: return every output day (stacked first) instead of only the last.
        schema: class names and roles; default: the brain schema for K = 5, generic otherwise.
        removed_class: channel that receives tumour removed by treatment (default: the schema's).
        reaction_hook: learned extra reaction dp/dt (see :data:`ReactionHook`).
        jacobi_variant: "conservative" (mass-conserving, default) or "classic" (local diagonal).
        checkpoint: recompute each step's transport in the backward pass (bounded memory).
        progress: optional callback ``progress(day_reached, horizon)`` after every step; it may raise
            :class:`~AnatomyDTLib.errors.Cancelled` to stop the run.
        dying: a :class:`DyingCompartment` carried in from an earlier solve: the part of p0's
            tumour that is lethally hit and will clear (its ``dying`` at most p0's tumour, on
            p0's grid and batch). Needs a plan whose radiotherapy, if any, models delayed death
            with the same clearance rate.
        return_dying: also return the dying compartment at the last output day (None when the
            solve has no dying channel), to carry into a later solve.

    Returns:
        The field at the last output day, shaped like p0; with ``return_trajectory`` a tensor
        (len(days), *p0.shape). Every voxel is on the simplex. With ``return_dying`` a pair
        (that result, :class:`DyingCompartment` or None).
    """
    spacing = _check_spacing(spacing)
    p, batched = _as_batched_field(p0, spacing)
    _check_field(p.detach())
    output_days = _output_days(days)
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise ParameterError(f"dt must be a positive number of days, got {dt!r}.")
    if not (isinstance(jacobi_iters, int) and jacobi_iters >= 1):
        raise ParameterError(f"jacobi_iters must be an integer >= 1, got {jacobi_iters!r}.")
    if not (isinstance(omega, (int, float)) and 0 < omega <= 1):
        raise ParameterError(f"omega must be in (0, 1] so that each Jacobi sweep keeps probabilities non-negative, got {omega!r}.")
    if jacobi_variant not in ("conservative", "classic"):
        raise ParameterError(f"jacobi_variant must be 'conservative' or 'classic', got {jacobi_variant!r}.")
    k = p.shape[1]
    if not (isinstance(tumor_class, int) and 0 <= tumor_class < k):
        raise ParameterError(f"tumor_class must be a channel index in 0..{k - 1}, got {tumor_class!r}.")
    schema = schema_for(k, schema, tumour_index=tumor_class, sink_index=0 if removed_class is None else removed_class)
    sink = schema.removed_tumour_index if removed_class is None else schema.index(removed_class)
    grid = Grid(p.shape[0], k, tuple(p.shape[2:]), spacing, p.dtype, p.device)
    treatment = load_plan(plan, schema=schema)
    problem = _build_problem(grid, diffusion=diffusion, growth_rate=growth_rate, carrying_capacity=carrying_capacity,
                             cross_diffusion=cross_diffusion, tumour=tumor_class, sink=sink, plan=treatment, mask=mask,
                             schema=schema, reaction_hook=reaction_hook, jacobi_iters=jacobi_iters, omega=float(omega),
                             jacobi_variant=jacobi_variant, carried=dying)
    _limit_cross_diffusion_step(problem, float(dt))
    state, cohorts = _initial_state(problem, p, dying, batched)
    integrator = _Integrator(problem, float(dt), checkpoint, progress, cohorts)
    trajectory = None
    if return_trajectory and not torch.is_grad_enabled():  # the steps write each day into its slot: no stacking
        trajectory = state.new_empty((len(output_days), state.shape[0], grid.num_classes, *state.shape[2:]))
    snapshots = integrator.run(state, output_days, private=state is not p, out=trajectory)  # dying: a new tensor
    if trajectory is not None:
        result = trajectory if batched else trajectory[:, 0]
    else:
        if not batched:
            snapshots = [s[0] for s in snapshots]
        result = torch.stack(snapshots) if return_trajectory else snapshots[-1]
    if not return_dying:
        return result
    carried = integrator.dying_compartment(output_days[-1])
    if carried is not None and not batched:
        carried = DyingCompartment(carried.dying[0], [(d, m[0]) for d, m in carried.pending],
                                   carried.clearance_rate_per_day)
    return result, carried


def _initial_state(problem: _Problem, p: torch.Tensor, carried: DyingCompartment | None,
                   batched: bool) -> tuple[torch.Tensor, list[_Cohort]]:
    """The solver's state at day 0 (the K classes, plus the dying channel when there is one) and
    the carried cohorts still in their delay. A carried ``dying`` moves out of the tumour channel."""
    if problem.dying is None:
        return p, []
    if carried is None:
        return torch.cat([p, torch.zeros_like(p[:, :1])], dim=1), []

    def as_channel(t, what: str) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=p.dtype, device=p.device)
        if not batched:
            t = t[None]
        if t.dim() != p.dim() or t.shape[1] != 1 or tuple(t.shape[2:]) != tuple(p.shape[2:]) \
                or t.shape[0] not in (1, p.shape[0]):
            raise InputError(f"The carried {what} has shape {tuple(t.shape[0 if batched else 1:])}; it must be "
                             f"{'(B|1, 1, *S)' if batched else '(1, *S)'} on p0's grid {tuple(p.shape[2:])}.")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise InputError(f"The carried {what} must be finite and >= 0.")
        return t.expand(p.shape[0], *t.shape[1:])

    dying = as_channel(carried.dying, "dying compartment")
    tumour = p[:, problem.tumour:problem.tumour + 1]
    excess = float((dying - tumour).max())
    if excess > SIMPLEX_TOLERANCE:
        raise InputError(f"The carried dying compartment exceeds p0's tumour by up to {excess:.3g}: dying cells are a "
                         "part of the visible tumour. Scale it to the tumour it belongs to.")
    dying = torch.minimum(dying, tumour)
    viable = tumour - dying
    state = torch.cat([p[:, :problem.tumour], viable, p[:, problem.tumour + 1:], dying], dim=1)
    cohorts = []
    for delay, mass in carried.pending:
        if not (math.isfinite(delay) and delay > 0):
            raise InputError(f"A carried cohort's delay must be > 0 days (its clearance has not started), got {delay!r}.")
        cohorts.append(_Cohort(float(delay), torch.minimum(as_channel(mass, "cohort"), dying)))
    return state, cohorts
