"""Visibility coding: the tumour channel is a cell density, and a scan shows it only above a threshold.

Why. A FLAIR tumour label is not "the voxel is mostly tumour": the hyperintensity (oedema with
infiltrating cells) appears where the tumour cell density exceeds a low detection threshold τ
(Swanson et al. 2000 / Konukoglu et al. 2010 use ≈ 16 % of the carrying capacity for T2/FLAIR;
the synthetic phantom uses 6–25 % by tissue, docs/brain_data.md). A model that labels voxels by
argmax instead (tumour where p_T > the other classes, i.e. p_T ≳ 0.5) starts each forecast from
a one-hot tumour with no invisible infiltration around it, and has to kill ≳ 50 % of the cells
before a treated margin disappears from the scan, where the truth needs only a few per cent.
That mismatch is why the first default brain model hardly showed treatment response.

What. Two maps around the unchanged Eq. 2 rollout (:class:`VisibilityCoding`):

* :meth:`~VisibilityCoding.encode` turns a labelled baseline into a density field: inside the
  tumour label p_T = min(1, τ·exp(d_in/λ)), outside it an invisible infiltration tail
  p_T = τ·exp(-d_out/λ) in the infiltrated tissues (white / grey matter for brains), where
  d_in / d_out (mm) are the distances to the label boundary and λ (mm) is the infiltration length
  (the Fisher–KPP travelling front has exactly this exponential edge, λ = sqrt(D/ρ)). The rest
  of each voxel's mass is its tissue: outside the tumour the baseline's own classes, inside it
  the tissue of the nearest non-tumour voxel (what the tumour is assumed to have infiltrated).
* :meth:`~VisibilityCoding.decode` turns a density field back into what a scan shows:
  visibility v = sigmoid((p_T − τ)/(s·τ)) becomes the tumour channel and the other classes share
  1 − v in proportion to their densities. With the soft step (width s·τ) the losses of training
  stay differentiable; its argmax is the tumour exactly where p_T > τ (unless ≥ 3 other classes
  tie below it, which a labelled baseline does not produce).

The boundary sits half a voxel (of the finest axis) outside the last tumour voxel, so
``decode(encode(labels))`` gives back the labels exactly. τ and λ are trained with the rest of
the model (τ = sigmoid(raw) ∈ (0, 1), λ = softplus(raw) + 0.1 mm).

Units: distances and λ in mm, τ a fraction of the carrying capacity.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import nn

#: Tail densities below this are set to 0: keeps the active box (the region the solver works on)
#: small; the tail carries no visible signal there (≥ 100× below any useful threshold).
TAIL_CUTOFF = 1e-4
MIN_LENGTH_MM = 0.1
VISIBLE_MARGIN = 1.05
"""A given core density is kept at least this multiple of τ, so the coded lesion stays visible."""


def _logit(x: float) -> float:
    return math.log(x / (1.0 - x))


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class VisibilityCoding(nn.Module):
    """Label ↔ density coding of the tumour channel with a learnable threshold τ and length λ.

    Args:
        num_classes: K.
        tumour_index: channel of the tumour.
        infiltrated_classes: channels the invisible tail may enter and from which the tissue under
            the tumour is taken (brain: white and grey matter). None = every class but the tumour
            and ``excluded``.
        excluded: channels never infiltrated (e.g. background / sink).
        threshold: initial τ in (0, 1).
        length_mm: initial λ in mm.
        sharpness: width of the soft visibility step as a fraction of τ.
        learn: train τ and λ (``learn_threshold`` / ``learn_length`` choose them one by one).
    """

    def __init__(self, num_classes: int, tumour_index: int, *, infiltrated_classes: Sequence[int] | None = None,
                 excluded: Sequence[int] = (), threshold: float = 0.15, length_mm: float = 4.0,
                 sharpness: float = 0.1, learn: bool = True, learn_threshold: bool | None = None,
                 learn_length: bool | None = None):
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"visibility threshold must be in (0, 1), got {threshold}")
        if length_mm <= MIN_LENGTH_MM:
            raise ValueError(f"infiltration length must exceed {MIN_LENGTH_MM} mm, got {length_mm}")
        self.num_classes = int(num_classes)
        self.tumour_index = int(tumour_index)
        if infiltrated_classes is None:
            infiltrated_classes = [k for k in range(num_classes) if k != tumour_index and k not in set(excluded)]
        self.infiltrated = sorted(int(k) for k in infiltrated_classes if int(k) != tumour_index)
        self.sharpness = float(sharpness)
        raw_tau = torch.tensor(_logit(threshold), dtype=torch.float32)
        raw_len = torch.tensor(_inverse_softplus(length_mm - MIN_LENGTH_MM), dtype=torch.float32)
        for name, value, trained in (("raw_threshold", raw_tau, learn if learn_threshold is None else learn_threshold),
                                     ("raw_length", raw_len, learn if learn_length is None else learn_length)):
            if trained:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def threshold(self) -> torch.Tensor:
        """τ: tumour density at which the scan shows tumour (fraction of carrying capacity)."""
        return torch.sigmoid(self.raw_threshold)

    def length_mm(self) -> torch.Tensor:
        """λ (mm): e-folding length of the density at the visible margin."""
        return F.softplus(self.raw_length) + MIN_LENGTH_MM

    # ------------------------------------------------------------------------------------------
    def encode(self, p0: torch.Tensor, spacing: Sequence[float], mask: torch.Tensor | None = None,
               core_density: torch.Tensor | None = None, core_order: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, *S) baseline field (its argmax = the labels) → density field on the simplex.

        ``core_density`` (B|1, *S), optional: a tumour density to use inside the visible lesion
        instead of the coded profile τ·exp(d_in/λ), where it is finite — e.g. what a model fitted
        to earlier scans says the lesion holds (calibration). It is kept in [1.05·τ, 1] so the
        lesion stays visible: the field's labels are still the baseline's.

        ``core_order`` (B|1, *S), optional (not with ``core_density``): keep the coded profile's
        density *values* inside the lesion (so its tumour mass and labels), but rearrange them
        so that the densest go where ``core_order`` is highest — e.g. where a model fitted to the
        history says the lesion is oldest. Ties and non-finite values keep the coded order
        (:func:`rearranged_by`)."""
        if core_density is not None and core_order is not None:
            raise ValueError("give core_density or core_order, not both")
        labels = p0.detach().argmax(1).cpu().numpy()
        body = None if mask is None else (mask.detach().reshape(labels.shape) > 0.5).cpu().numpy()
        geometry = [_tumour_geometry(labels[b], spacing, self.tumour_index, self.infiltrated,
                                     None if body is None else body[b]) for b in range(labels.shape[0])]
        if all(g is None for g in geometry):
            return p0
        tau, lam = self.threshold().to(p0.dtype), self.length_mm().to(p0.dtype)
        out = []
        for b, g in enumerate(geometry):
            if g is None:
                out.append(p0[b])
                continue
            inside, d_in, d_out, tail_ok, hidden = (torch.as_tensor(a, device=p0.device) for a in g)
            core = torch.clamp(tau * torch.exp(d_in.to(p0.dtype) / lam), max=1.0)
            if core_density is not None:
                given = core_density[min(b, core_density.shape[0] - 1)].to(core)
                core = torch.where(torch.isfinite(given), torch.clamp(given, min=VISIBLE_MARGIN * float(tau), max=1.0),
                                   core)
            if core_order is not None:
                key = core_order[min(b, core_order.shape[0] - 1)].to(core)
                core = rearranged_by(core, key, inside)
            tail = tau * torch.exp(-d_out.to(p0.dtype) / lam) * tail_ok.to(p0.dtype)
            tail = torch.where(tail < TAIL_CUTOFF, torch.zeros_like(tail), tail)
            e_tumour = F.one_hot(torch.full_like(hidden, self.tumour_index), self.num_classes)
            e_hidden = F.one_hot(hidden, self.num_classes)
            e_tumour, e_hidden = (torch.movedim(e, -1, 0).to(p0.dtype) for e in (e_tumour, e_hidden))
            in_field = core * e_tumour + (1.0 - core) * e_hidden
            base = p0[b] * (1.0 - e_tumour)  # outside: the baseline's tissue, any soft tumour part dropped
            base = base / base.sum(0, keepdim=True).clamp_min(1e-12)
            out_field = tail * e_tumour + (1.0 - tail) * base
            out.append(torch.where(inside[None], in_field, out_field))
        return torch.stack(out)

    def decode(self, p: torch.Tensor) -> torch.Tensor:
        """(N, K, *S) density field → visible composition (tumour channel = soft visibility).

        Trajectories (T, B, K, *S) are decoded as (T·B, K, *S); see :meth:`decode_trajectory`.
        """
        tau = self.threshold().to(p.dtype)
        t = self.tumour_index
        visible = torch.sigmoid((p[:, t] - tau) / (self.sharpness * tau))
        keep = torch.ones(p.shape[1], dtype=p.dtype, device=p.device)
        keep[t] = 0.0
        rest = p * keep.reshape((1, -1) + (1,) * (p.dim() - 2))
        rest_sum = rest.sum(1, keepdim=True)
        q = rest * ((1.0 - visible)[:, None] / rest_sum.clamp_min(1e-6))
        return q + visible[:, None] * (1.0 - keep).reshape((1, -1) + (1,) * (p.dim() - 2))

    def decode_trajectory(self, traj: torch.Tensor) -> torch.Tensor:
        """(T, B, K, *S) density trajectory → visible compositions of the same shape."""
        return self.decode(traj.flatten(0, 1)).reshape(traj.shape)


def rearranged_by(values: torch.Tensor, key: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``values`` with its entries inside ``where`` permuted so that their order follows ``key``.

    The multiset of values inside ``where`` is unchanged (so their sum); the largest goes to the
    voxel with the largest key. Voxels whose key is not finite rank below every finite key, and
    ties of the key (and those voxels) are broken by the values' own order, so an uninformative
    key (constant, or all NaN) gives ``values`` back. Outside ``where`` nothing changes.
    """
    index = where.reshape(-1)
    v = values.reshape(-1)[index].detach().cpu().numpy()
    k = key.reshape(-1)[index].detach().cpu().numpy().astype(np.float64)
    finite = np.isfinite(k)
    k = np.where(finite, k, -np.inf)
    rank = np.lexsort((v, k, finite))       # ascending: non-finite keys first, then by key, then by value
    arranged = np.empty_like(v)
    arranged[rank] = np.sort(v)
    out = values.clone().reshape(-1)
    out[index] = torch.as_tensor(arranged, device=values.device)
    return out.reshape(values.shape)


def _tumour_geometry(labels: np.ndarray, spacing: Sequence[float], tumour: int, infiltrated: Sequence[int],
                     body: np.ndarray | None):
    """Distances (mm) and masks of one labelled case, or None without tumour.

    Returns (inside, d_in, d_out, tail_ok, hidden): the tumour mask; the distance inside it to the
    margin and outside it to the tumour, both measured from the half-voxel boundary (> 0); where
    the tail may be (infiltrated tissue in the body); the tissue class assumed under each voxel.
    """
    inside = labels == tumour
    if not inside.any():
        return None
    sampling = tuple(float(h) for h in spacing)
    half = 0.5 * min(sampling)
    d_in = np.where(inside, ndi.distance_transform_edt(inside, sampling=sampling) - half, 0.0)
    d_out = np.where(inside, 0.0, ndi.distance_transform_edt(~inside, sampling=sampling) - half)
    tissue = np.isin(labels, list(infiltrated))
    tail_ok = tissue & ~inside
    if body is not None:
        tail_ok &= body
    if tissue.any():
        _, index = ndi.distance_transform_edt(~tissue, sampling=sampling, return_indices=True)
        hidden = labels[tuple(index)]
    else:  # nothing infiltrable in view: the tumour sits on the nearest non-tumour class
        _, index = ndi.distance_transform_edt(inside, sampling=sampling, return_indices=True)
        hidden = labels[tuple(index)]
    hidden = np.where(inside, hidden, labels)
    return (inside, d_in.astype(np.float32), d_out.astype(np.float32), tail_ok, hidden.astype(np.int64))
