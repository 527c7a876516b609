"""The learned Anatomy-DT model: Eq. 2 with learnable physics, a growth-rate field and a Growth CNN.

One rollout evolves a batch of baseline fields p0 (B, K, *S) with the differentiable IMEX solver
(:func:`AnatomyDTLib.solver.simulate`) over days [0, T]. Three learned parts enter Eq. 2:

1. **Learnable physics.** Self-diffusion D_k = softplus(d_k) + 10⁻⁶ > 0 (mm²/day) per class, and a
   repulsion strength r_kj = softplus(ρ_kj) >= 0 (mm²/day) per ordered class pair j != k. In the
   sign convention of Eq. 2 / :class:`~AnatomyDTLib.operators.CrossDiffusionOperator` (class k
   drifts with velocity Σ_j χ_kj ∇p_j, χ < 0 = pushed away) the model uses χ_kj = -r_kj: every
   interaction learned here is a *repulsion* (mass effect, exclusivity), never an attraction.
2. **Growth-rate field** α(x) = k_max·sigmoid(g(x)) (1/day) of the logistic tumour growth
   r_tumour = α p (1 - p/κ). ``spatial_alpha=True``: g is a small CNN of the baseline anatomy p0,
   FiLM-conditioned on the treatment at day 0 and the baseline tumour volume, computed once per
   rollout; its total variation is penalised (``lambda_tv``). ``spatial_alpha=False`` (ablation):
   one scalar α per case from the same conditioning.
3. **Growth CNN** (residual reaction through the solver's ``reaction_hook``). At every step it
   reads the current field p, the baseline p0 and — through FiLM — the time-dependent treatment
   features (:mod:`.conditioning`) plus the current and baseline tumour volumes, and outputs a
   logit correction δ(x, t) (K channels, projected to zero mean over classes). The reaction is

       dp/dt = A · ( softmax(log(p + ε) + δ) − softmax(log(p + ε)) ),      A = correction_rate_per_day

   It sums to zero over classes (it only moves probability between classes), is exactly zero for
   δ = 0 (the CNN's last layer starts at zero, so training starts from the pure PDE), and moves
   each voxel at most A·Δt ≤ 1 of the way between two compositions on the simplex per step, so
   an explicit step stays within ε·A·Δt of the simplex (the solver's projection removes the rest).

Everything is plain PyTorch: gradients reach the CNN weights, the α-field weights, D and r
through the whole unrolled rollout (Jacobi sweeps, upwind cross-diffusion, simplex projection).

Units: time in days (Δt = ``dt_days``), D and χ in mm²/day, α and A in 1/day. The CNN kernels
are in voxels (3×3 or 3×3×3, dilated), i.e. the model assumes roughly the voxel size it was
trained on (1 mm for the synthetic benchmarks).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..errors import InputError
from ..operators import recommended_jacobi_iters
from ..schema import ClassSchema
from ..solver import simulate
from .conditioning import NUM_FEATURES, Conditioning
from .physics import cross_diffusion_tendency
from .visibility import VisibilityCoding

#: Global state features appended to the treatment features of the Growth CNN's FiLM:
#: log1p(current tumour volume)/10, log1p(baseline tumour volume)/10, log((current+1)/(baseline+1)).
NUM_STATE_FEATURES = 3
_LOG_EPS = 1e-3  # ε of the logit-space correction
MIN_DIFFUSION = 1e-6  # mm²/day: floor of D_k (softplus alone underflows to 0 in float32)


def _inverse_softplus(y: float) -> float:
    y = max(float(y), 1e-6)
    return y + math.log(-math.expm1(-y))


class FiLMConvNet(nn.Module):
    """3×3(×3) dilated convolutions with SiLU and FiLM after each, then a 1×1 head.

    FiLM: h ← h·(1 + γ) + β with (γ, β) per hidden layer and channel from an MLP of the
    conditioning vector. The head starts at zero weight, so the net initially outputs its bias.
    Replicate padding keeps the image border from looking like an extra class.
    """

    def __init__(self, ndim: int, in_channels: int, hidden: int, out_channels: int, dilations: Sequence[int],
                 cond_features: int, film_hidden: int, head_bias: float = 0.0):
        super().__init__()
        if ndim not in (2, 3):
            raise InputError(f"The model works on 2D or 3D fields, got {ndim} spatial axes.")
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.ndim = ndim
        self.hidden = hidden
        layers = []
        channels = in_channels
        for d in dilations:
            layers.append(conv(channels, hidden, 3, padding=d, dilation=d, padding_mode="replicate"))
            channels = hidden
        self.convs = nn.ModuleList(layers)
        self.film = nn.Sequential(nn.Linear(cond_features, film_hidden), nn.SiLU(),
                                  nn.Linear(film_hidden, 2 * hidden * len(layers)))
        nn.init.zeros_(self.film[-1].weight)  # FiLM starts as the identity
        nn.init.zeros_(self.film[-1].bias)
        self.head = conv(hidden, out_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, head_bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        film = self.film(cond).view(cond.shape[0], len(self.convs), 2, self.hidden)
        ones = (1,) * self.ndim
        h = x
        for i, conv in enumerate(self.convs):
            h = F.silu(conv(h))
            gamma = film[:, i, 0].reshape(cond.shape[0], self.hidden, *ones)
            beta = film[:, i, 1].reshape(cond.shape[0], self.hidden, *ones)
            h = h * (1.0 + gamma) + beta
        return self.head(h)


class AnatomyDTModel(nn.Module):
    """Learnable Eq. 2 + α field + Growth CNN; :meth:`forward` is one differentiable rollout.

    Args:
        model_config: the ``model`` section of a :class:`~AnatomyDTLib.models.config.Config`.
        num_classes: K.
        ndim: 2 or 3 spatial axes.
        tumour_index: channel of the tumour (logistic growth, treatment).
        sink_index: channel receiving tumour removed by treatment.
    """

    def __init__(self, model_config: dict, num_classes: int, ndim: int, tumour_index: int = 1, sink_index: int = 0):
        super().__init__()
        if num_classes < 2:
            raise InputError(f"The model needs at least 2 classes, got {num_classes}.")
        if not 0 <= tumour_index < num_classes or not 0 <= sink_index < num_classes:
            raise InputError(f"tumour_index {tumour_index} / sink_index {sink_index} outside 0..{num_classes - 1}.")
        cfg = dict(model_config)
        self.cfg = cfg
        self.num_classes = num_classes
        self.ndim = ndim
        self.tumour_index = tumour_index
        self.sink_index = sink_index
        k = num_classes
        # --- physics ---------------------------------------------------------------------------
        dinit = cfg["diffusion_init_mm2_per_day"]
        dvals = torch.tensor(dinit if isinstance(dinit, list) else [dinit] * k, dtype=torch.float32)
        raw_d = (dvals - MIN_DIFFUSION).apply_(_inverse_softplus)
        if cfg["learn_diffusion"]:
            self.raw_diffusion = nn.Parameter(raw_d)
        else:
            self.register_buffer("raw_diffusion", raw_d)
        self.use_cross = bool(cfg["cross_diffusion"])
        self.well_posed = bool(cfg.get("well_posed_cross_diffusion", False))
        if self.use_cross:
            if self.well_posed:  # r_kj = (D_j + D_k) sigmoid(rho_kj): start at the requested r, inside the bound
                pair = dvals[:, None] + dvals[None, :]
                frac = torch.clamp(cfg["repulsion_init_mm2_per_day"] / pair, 0.01, 0.99)
                raw_r = torch.log(frac / (1.0 - frac)).to(torch.float32)
            else:
                raw_r = torch.full((k, k), _inverse_softplus(cfg["repulsion_init_mm2_per_day"]), dtype=torch.float32)
            if cfg["learn_cross_diffusion"]:
                self.raw_repulsion = nn.Parameter(raw_r)
            else:
                self.register_buffer("raw_repulsion", raw_r)
            self.register_buffer("offdiag", 1.0 - torch.eye(k))
        # --- visibility coding of the tumour channel (models/visibility.py) ----------------------
        self.visibility = None
        if cfg.get("visibility_threshold") is not None:
            self.visibility = VisibilityCoding(
                k, tumour_index, infiltrated_classes=cfg.get("infiltrated_classes"), excluded=(sink_index,),
                threshold=float(cfg["visibility_threshold"]), length_mm=float(cfg.get("infiltration_length_mm", 4.0)),
                sharpness=float(cfg.get("visibility_sharpness", 0.1)), learn=bool(cfg.get("learn_visibility", True)))
        # --- growth-rate field -----------------------------------------------------------------
        k_max = float(cfg["k_max_per_day"])
        bias = math.log(cfg["alpha_init_per_day"] / (k_max - cfg["alpha_init_per_day"]))  # logit(alpha0/k_max)
        cond0 = NUM_FEATURES + 1  # treatment at day 0 + baseline tumour volume
        if cfg["spatial_alpha"]:
            self.alpha_net = FiLMConvNet(ndim, k, cfg["alpha_channels"], 1, cfg["cnn_dilations"], cond0,
                                         cfg["film_hidden"], head_bias=bias)
            self.alpha_head = None
        else:
            self.alpha_net = None
            self.alpha_head = nn.Linear(cond0, 1)
            nn.init.zeros_(self.alpha_head.weight)
            nn.init.constant_(self.alpha_head.bias, bias)
        # --- Growth CNN ------------------------------------------------------------------------
        if cfg["growth_cnn"]:
            self.growth_net = FiLMConvNet(ndim, 2 * k, cfg["cnn_channels"], k, cfg["cnn_dilations"],
                                          NUM_FEATURES + NUM_STATE_FEATURES, cfg["film_hidden"])
        else:
            self.growth_net = None

    # ------------------------------------------------------------------------------------------
    # physics parameters
    # ------------------------------------------------------------------------------------------
    def diffusion(self) -> torch.Tensor:
        """D_k (K,) in mm²/day: softplus(d_k) + 1e-6, strictly positive even where softplus underflows."""
        return F.softplus(self.raw_diffusion) + MIN_DIFFUSION

    def repulsion(self) -> torch.Tensor | None:
        """r_kj (K, K) in mm²/day, >= 0 with zero diagonal; None without cross-diffusion.

        With ``well_posed_cross_diffusion`` r_kj = (D_j + D_k)·sigmoid(ρ_kj) < D_j + D_k, so the
        well-posedness condition D_j + D_k + χ_kj >= 0 (docs/solver.md) holds by construction.
        """
        if not self.use_cross:
            return None
        if self.well_posed:
            d = self.diffusion()
            return (d[:, None] + d[None, :]) * torch.sigmoid(self.raw_repulsion) * self.offdiag
        return F.softplus(self.raw_repulsion) * self.offdiag

    def cross_diffusion(self) -> torch.Tensor | None:
        """χ_kj = -r_kj (K, K) in mm²/day, the solver's sign convention (χ < 0: pushed away)."""
        r = self.repulsion()
        return None if r is None else -r

    def jacobi_iters(self, spacing: Sequence[float]) -> int:
        if self.cfg["jacobi_iters"] != "auto":
            return int(self.cfg["jacobi_iters"])
        d_max = float(self.diffusion().detach().max())
        return recommended_jacobi_iters(float(self.cfg["dt_days"]), d_max, spacing, tolerance=self.cfg["jacobi_tolerance"],
                                        minimum=2, maximum=int(self.cfg["max_jacobi_iters"]))

    # ------------------------------------------------------------------------------------------
    # learned fields
    # ------------------------------------------------------------------------------------------
    def _tumour_volume(self, p: torch.Tensor, mask: torch.Tensor | None, voxel_volume: float) -> torch.Tensor:
        t = p[:, self.tumour_index]
        if mask is not None:
            t = t * mask[:, 0]
        return t.flatten(1).sum(1) * voxel_volume  # (B,) mm^ndim

    def growth_rate_field(self, p0: torch.Tensor, cond0: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
        """α (B, *S) in 1/day from the baseline, the day-0 treatment features and the baseline tumour volume."""
        k_max = float(self.cfg["k_max_per_day"])
        c = torch.cat([cond0, torch.log1p(v0)[:, None] / 10.0], dim=1)
        if self.alpha_net is not None:
            return k_max * torch.sigmoid(self.alpha_net(p0, c))[:, 0]
        a = k_max * torch.sigmoid(self.alpha_head(c))[:, 0]  # (B,)
        return a.reshape((-1,) + (1,) * self.ndim).expand((-1,) + tuple(p0.shape[2:]))

    def _make_hook(self, p0: torch.Tensor, conditioning: Conditioning, mask, v0: torch.Tensor, spacing):
        """The solver's reaction hook: Growth CNN correction + cross-diffusion (both explicit at p^n)."""
        rate = float(self.cfg["correction_rate_per_day"])
        net = self.growth_net
        use_ckpt = bool(self.cfg["solver_checkpoint"])
        chi = self.cross_diffusion()
        dt = float(self.cfg["dt_days"])
        voxel_volume = float(math.prod(spacing))

        def correction(p: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            delta = net(torch.cat([p, p0], dim=1), cond)
            delta = delta - delta.mean(dim=1, keepdim=True)  # softmax is shift-invariant: zero-mean logits
            logits = torch.log(torch.clamp(p, min=0.0) + _LOG_EPS)
            return rate * (torch.softmax(logits + delta, dim=1) - torch.softmax(logits, dim=1))

        def hook(p: torch.Tensor, t: float) -> torch.Tensor:
            out = None
            if chi is not None:  # the upwinded fluxes of every class pair: most of a step's saved tensors
                if use_ckpt and torch.is_grad_enabled():
                    out = torch_checkpoint(cross_diffusion_tendency, p, chi.to(p.dtype), spacing, dt, mask,
                                           use_reentrant=False)
                else:
                    out = cross_diffusion_tendency(p, chi.to(p.dtype), spacing, dt, mask)
            if net is not None:
                v = self._tumour_volume(p, mask, voxel_volume)
                state = torch.stack([torch.log1p(v) / 10.0, torch.log1p(v0) / 10.0,
                                     torch.log((v + 1.0) / (v0 + 1.0))], dim=1)
                cond = torch.cat([conditioning.features(t, dtype=p.dtype, device=p.device), state], dim=1)
                if use_ckpt and torch.is_grad_enabled():
                    extra = torch_checkpoint(correction, p, cond, use_reentrant=False)
                else:
                    extra = correction(p, cond)
                out = extra if out is None else out + extra
            return out

        return hook

    # ------------------------------------------------------------------------------------------
    # rollout
    # ------------------------------------------------------------------------------------------
    def forward(self, p0: torch.Tensor, *, spacing: Sequence[float], days: Sequence[float], conditioning: Conditioning,
                mask: torch.Tensor | None = None, plan=None, schema: ClassSchema | None = None,
                progress: Callable[[float, float], None] | None = None) -> tuple[torch.Tensor, dict]:
        """Evolve p0 (B, K, *S) to the increasing ``days``; returns ((len(days), B, K, *S), aux).

        ``conditioning`` has one schedule per batch item; ``mask`` (B|1, *S) restricts the
        dynamics to a domain; ``plan`` (one for the batch) adds the solver's own treatment terms.
        ``aux`` holds ``alpha`` (B, *S), the growth-rate field in 1/day, and ``p0_visible``, the
        baseline as the returned trajectory labels it (with visibility coding: the decoded encoded
        baseline, the reference of "no change"; without: ``p0``).

        With visibility coding (``visibility_threshold``) the rollout evolves tumour *densities*:
        p0 is encoded before and every output day decoded after (models/visibility.py), so the
        returned trajectory is what a scan would show.
        """
        if p0.dim() != self.ndim + 2 or p0.shape[1] != self.num_classes:
            raise InputError(f"The model expects a (B, {self.num_classes}, *S) field with {self.ndim} spatial axes, "
                             f"got shape {tuple(p0.shape)}.")
        if len(conditioning) != p0.shape[0]:
            raise InputError(f"{len(conditioning)} treatment schedules for a batch of {p0.shape[0]} cases.")
        spacing = tuple(float(h) for h in spacing)
        voxel_volume = float(math.prod(spacing))
        m = None
        if mask is not None:
            m = mask.to(dtype=p0.dtype, device=p0.device).reshape((-1, 1) + tuple(p0.shape[2:]))
        p0_visible = p0
        if self.visibility is not None:
            p0 = self.visibility.encode(p0, spacing, m)
            p0_visible = self.visibility.decode(p0)
        v0 = self._tumour_volume(p0, m, voxel_volume)
        cond0 = conditioning.features(0.0, dtype=p0.dtype, device=p0.device)
        alpha = self.growth_rate_field(p0, cond0, v0)
        hook = None
        if self.growth_net is not None or self.use_cross:
            hook = self._make_hook(p0, conditioning, m, v0, spacing)
        traj = simulate(p0, spacing=spacing, days=list(days), dt=float(self.cfg["dt_days"]),
                        diffusion=self.diffusion().to(p0.dtype), growth_rate=alpha,
                        carrying_capacity=float(self.cfg["carrying_capacity"]),
                        cross_diffusion=None,  # applied by the hook, gradient-safe (see .physics)
                        tumor_class=self.tumour_index, removed_class=self.sink_index, plan=plan, schema=schema,
                        mask=None if mask is None else mask.reshape((-1,) + tuple(p0.shape[2:])) > 0.5,
                        jacobi_iters=self.jacobi_iters(spacing), omega=float(self.cfg["omega"]),
                        reaction_hook=hook, checkpoint=bool(self.cfg["solver_checkpoint"]),
                        return_trajectory=True, progress=progress)
        if self.visibility is not None:
            traj = self.visibility.decode_trajectory(traj)
        return traj, {"alpha": alpha, "p0_visible": p0_visible}


def total_variation(field: torch.Tensor) -> torch.Tensor:
    """Mean absolute forward difference of a (B, *S) field over all spatial axes (anisotropic TV)."""
    total = field.new_zeros(())
    for dim in range(1, field.dim()):
        n = field.shape[dim]
        if n > 1:
            total = total + (field.narrow(dim, 1, n - 1) - field.narrow(dim, 0, n - 1)).abs().mean()
    return total


def parameter_groups(model: AnatomyDTModel) -> dict[str, list[str]]:
    """Names of the trainable parameters by part: physics, alpha, growth_cnn (for reports and tests)."""
    groups: dict[str, list[str]] = {"physics": [], "alpha": [], "growth_cnn": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("raw_") or name.startswith("visibility."):
            groups["physics"].append(name)
        elif name.startswith("alpha_"):
            groups["alpha"].append(name)
        elif name.startswith("growth_net"):
            groups["growth_cnn"].append(name)
    return groups
