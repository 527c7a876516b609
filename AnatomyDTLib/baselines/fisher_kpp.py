"""Fisher–KPP baseline: a tumour-only reaction–diffusion model with three fitted scalars.

    ∂t u = ∇·(D ∇u) + ρ u (1 − u),        u(0) = S · u_baseline,   S = exp(−γ · dose_gy)

u is the tumour density (Fisher 1937; Kolmogorov et al. 1937). D (mm²/day), ρ (1/day) and the
radiosensitivity γ (1/Gy) are single numbers shared by all cases, fitted by gradient descent
through our differentiable IMEX solver (:func:`AnatomyDTLib.solver.simulate` on the two-class
field [1 − u, u], so only the tumour diffuses; the body mask is a no-flux boundary). The
treatment acts as an instantaneous surviving fraction S of the dose given on day 0 (the synthetic
sets' reading of ``dose_gy``, docs/learning.md), so a treated tumour starts lower and the fit
decides how much treatment matters.

The anatomy does not move: the forecast is the tumour u over the baseline tissue,
``p = u·e_tumour + (1 − u)·tissue``, where ``tissue`` is the one-hot baseline label map with the
baseline tumour voxels refilled by their nearest tissue label (what a shrinking tumour gives
back). Away from the tumour the forecast equals the baseline exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ..operators import recommended_jacobi_iters
from ..solver import simulate
from .common import body_mask, case_days, check_static_batch

MIN_DIFFUSION = 1e-6  # mm²/day, keeps D > 0 where softplus underflows


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def refill_tumour(labels: np.ndarray, tumour: int, background: int) -> np.ndarray:
    """Label map with every tumour voxel replaced by the label of the nearest tissue voxel.

    Tissue = neither tumour nor background; without any tissue, background is used.
    """
    tissue = (labels != tumour) & (labels != background)
    if not tissue.any():
        return np.where(labels == tumour, background, labels)
    _, index = ndimage.distance_transform_edt(~tissue, return_indices=True)
    nearest = labels[tuple(index)]
    return np.where(labels == tumour, nearest, labels)


class FisherKPP(nn.Module):
    """Fisher–KPP tumour growth with a fitted D, ρ and treatment kill γ; the anatomy stays fixed."""

    def __init__(self, num_classes: int, ndim: int, tumour_index: int = 1, background_index: int = 0,
                 dt_days: float = 4.0, diffusion_init: float = 0.05, growth_init: float = 0.02,
                 kill_init: float = 0.02, jacobi_tolerance: float = 0.05, max_jacobi_iters: int = 20):
        super().__init__()
        self.num_classes = num_classes
        self.ndim = ndim
        self.tumour = tumour_index
        self.background = background_index
        self.dt_days = float(dt_days)
        self.jacobi_tolerance = float(jacobi_tolerance)
        self.max_jacobi_iters = int(max_jacobi_iters)
        self.raw_diffusion = nn.Parameter(torch.tensor(_inverse_softplus(diffusion_init)))
        self.raw_growth = nn.Parameter(torch.tensor(_inverse_softplus(growth_init)))
        self.raw_kill = nn.Parameter(torch.tensor(_inverse_softplus(kill_init)))

    def diffusion(self) -> torch.Tensor:
        """D in mm²/day."""
        return F.softplus(self.raw_diffusion) + MIN_DIFFUSION

    def growth_rate(self) -> torch.Tensor:
        """ρ in 1/day."""
        return F.softplus(self.raw_growth)

    def kill(self) -> torch.Tensor:
        """γ in 1/Gy: surviving fraction exp(−γ·dose) of the dose given on day 0."""
        return F.softplus(self.raw_kill)

    def tissue_field(self, p0: torch.Tensor) -> torch.Tensor:
        """(B, K, *S) one-hot baseline anatomy with the tumour refilled by the nearest tissue."""
        labels = p0.detach().argmax(1).cpu().numpy()
        filled = np.stack([refill_tumour(lab, self.tumour, self.background) for lab in labels])
        onehot = F.one_hot(torch.as_tensor(filled, device=p0.device), self.num_classes)
        return onehot.movedim(-1, 1).to(p0.dtype)

    def forward(self, batch) -> torch.Tensor:
        check_static_batch(batch)
        p0 = batch.p0
        days = case_days(batch)
        dose = torch.tensor([float(tr.get("dose_gy", 0.0)) for tr in batch.treatments], dtype=p0.dtype,
                            device=p0.device)
        survival = torch.exp(-self.kill() * dose).reshape((-1,) + (1,) * self.ndim)
        u0 = p0[:, self.tumour] * survival
        field = torch.stack([1.0 - u0, u0], dim=1)
        d = self.diffusion()
        iters = recommended_jacobi_iters(self.dt_days, float(d.detach()), batch.spacing, tolerance=self.jacobi_tolerance,
                                         minimum=2, maximum=self.max_jacobi_iters)
        mask = None if batch.mask is None else batch.mask > 0.5
        traj = simulate(field, spacing=batch.spacing, days=batch.days, dt=self.dt_days, diffusion=d,
                        growth_rate=self.growth_rate(), carrying_capacity=1.0, tumor_class=1, removed_class=0,
                        mask=mask, jacobi_iters=iters, return_trajectory=True)
        index = torch.as_tensor([batch.days.index(t) for t in days], device=p0.device)
        u = traj[index, torch.arange(len(days), device=p0.device), 1].unsqueeze(1)
        e_t = F.one_hot(torch.tensor(self.tumour), self.num_classes).to(p0).reshape((1, -1) + (1,) * self.ndim)
        out = u * e_t + (1.0 - u) * self.tissue_field(p0)
        m = body_mask(batch)
        return out if m is None else torch.where(m, out, p0)

    def fitted(self) -> dict:
        """The fitted scalars with units, for reports."""
        with torch.no_grad():
            return {"D_mm2_per_day": float(self.diffusion()), "rho_per_day": float(self.growth_rate()),
                    "gamma_per_gy": float(self.kill())}
