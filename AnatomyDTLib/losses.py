"""Differentiable training losses of Anatomy-DT (paper Eq. 3, Defs. 3-4).

Fields are batched probability fields ``p`` (prediction) and ``q`` (target, usually one-hot) of
shape ``(B, K, *S)`` with ``S`` two (H, W) or three (D, H, W) spatial axes.

* :func:`soft_dice_loss` -- the segmentation term ``L_seg`` (soft Dice).
* :func:`soft_skeleton` -- the soft skeleton ``S(.)`` of clDice (Shit et al. 2021), built from
  soft erosion (min-pool, cross-shaped) and soft dilation (max-pool, full 3^d box).
* :func:`soft_cldice_loss` -- Def. 3 for one class channel; :func:`cldice_loss_classes` for several.
* :func:`overlap_loss` -- Def. 4, mean pairwise product of class probabilities.
* :func:`anatomy_topology_loss` -- ``L_ATL = lambda_1 sum_{k in K_cl} L_clDice + lambda_2 L_overlap``.
* :class:`AnatomyDTObjective` -- Eq. 3: ``sum_k L_seg + lambda_topo L_ATL + lambda_reg ||theta||^2``.

Choice of ``iters`` for the soft skeleton: each iteration peels one voxel layer, so ``iters`` must
exceed the half-width (in voxels) of the thickest structure whose centreline is wanted. With too
few iterations the skeleton of a thick structure lacks its centre (the residue of deeper erosion
levels is never added) and clDice under-weights it. Larger ``iters`` costs linearly more time and
memory; 10 covers structures up to ~20 voxels across.

Choice of ``eps``: ``1e-6`` only guards divisions by zero. It is small against any non-empty
structure (one voxel contributes 1 to the sums), so identical binary masks give a loss of order
``eps / |structure|`` (< 1e-6). Inputs are not checked for NaN or range [0, 1] (that would force a
device sync every step); callers pass probabilities (e.g. a softmax output) and one-hot targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, ParameterError

__all__ = [
    "soft_erode",
    "soft_dilate",
    "soft_open",
    "soft_skeleton",
    "soft_dice_loss",
    "soft_cldice_loss",
    "cldice_loss_classes",
    "overlap_loss",
    "anatomy_topology_loss",
    "squared_param_norm",
    "AnatomyDTObjective",
]


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------

def _check_field(x: torch.Tensor, name: str) -> None:
    """A (B, K, *S) tensor with 2 or 3 spatial axes."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim not in (4, 5):
        raise InputError(
            f"{name} must have shape (B, K, H, W) or (B, K, D, H, W), got {tuple(x.shape)}; "
            f"add the batch/channel axes with x[None] if needed."
        )


def _check_pair(p: torch.Tensor, q: torch.Tensor) -> None:
    _check_field(p, "p")
    _check_field(q, "q")
    if p.shape != q.shape:
        raise InputError(f"p and q have different shapes {tuple(p.shape)} and {tuple(q.shape)}; they must match.")


def _check_classes(classes: Iterable[int] | None, num_classes: int, what: str) -> list[int]:
    """Resolve a class list (``None`` -> all classes) and check every index is a channel."""
    if classes is None:
        return list(range(num_classes))
    try:
        out = [int(c) for c in classes]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be a sequence of channel indices, got {classes!r}.") from exc
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise InputError(f"{what} {bad} are outside the channel range 0..{num_classes - 1}.")
    return out


def _check_nonneg(**values: float) -> None:
    for name, v in values.items():
        if not v >= 0:  # also rejects NaN
            raise ParameterError(f"{name} must be >= 0, got {v}.")


def _check_iters(iters: int) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ParameterError(f"iters must be a non-negative integer, got {iters!r}.")


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ParameterError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")


# ----------------------------------------------------------------------------------------------
# soft morphology and soft skeleton
# ----------------------------------------------------------------------------------------------

def _axis_kernels(ndim: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(kernel, padding) of the 3-long pool along each spatial axis."""
    out = []
    for axis in range(ndim):
        kernel = tuple(3 if a == axis else 1 for a in range(ndim))
        padding = tuple(1 if a == axis else 0 for a in range(ndim))
        out.append((kernel, padding))
    return out


def _max_pool(x: torch.Tensor, kernel, padding) -> torch.Tensor:
    pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
    return pool(x, kernel_size=kernel, stride=1, padding=padding)


def soft_erode(x: torch.Tensor) -> torch.Tensor:
    """Soft erosion: min over the cross-shaped neighbourhood (min of the axis-aligned 3-min-pools).

    ``min_pool(x) = -max_pool(-x)``. Max-pool pads with -inf, so outside the image counts as +inf
    here: structures are not eroded from the image border.
    """
    _check_field(x, "x")
    spatial = x.ndim - 2
    pools = [-_max_pool(-x, k, pad) for k, pad in _axis_kernels(spatial)]
    out = pools[0]
    for other in pools[1:]:
        out = torch.minimum(out, other)
    return out


def soft_dilate(x: torch.Tensor) -> torch.Tensor:
    """Soft dilation: max-pool over the full 3x3 (2D) or 3x3x3 (3D) box."""
    _check_field(x, "x")
    spatial = x.ndim - 2
    return _max_pool(x, (3,) * spatial, (1,) * spatial)


def soft_open(x: torch.Tensor) -> torch.Tensor:
    """Soft morphological opening: dilation of the erosion."""
    return soft_dilate(soft_erode(x))


def soft_skeleton(x: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Soft skeleton ``S(x)`` of a (B, C, *S) field with values in [0, 1] (clDice, Shit et al. 2021).

    At erosion level ``j`` (``x_j`` = x eroded j times) the opening residue
    ``delta_j = relu(x_j - open(x_j))`` marks the centreline points of that level; the skeleton
    accumulates them as a soft union ``skel <- skel + relu(delta_j - skel * delta_j)`` for
    ``j = 0..iters``. On a binary input the result is binary and contained in the input.
    ``iters`` must exceed the half-width (voxels) of the thickest structure (see module docstring).
    """
    _check_field(x, "x")
    _check_iters(iters)
    skel = F.relu(x - soft_open(x))
    for _ in range(iters):
        x = soft_erode(x)
        delta = F.relu(x - soft_open(x))
        skel = skel + F.relu(delta - skel * delta)
    return skel


# ----------------------------------------------------------------------------------------------
# segmentation term
# ----------------------------------------------------------------------------------------------

def _spatial_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all axes after the first two: (B, C, *S) -> (B, C)."""
    return x.flatten(2).sum(-1)


def soft_dice_loss(p: torch.Tensor, q: torch.Tensor, classes: Sequence[int] | None = None, eps: float = 1e-6,
                   reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss ``1 - (2<p_k,q_k> + eps) / (<p_k,1> + <q_k,1> + eps)`` per sample and class.

    Args:
        p, q: (B, K, *S) prediction and target.
        classes: channels to include (default all).
        eps: smoothing in numerator *and* denominator: a class absent from both p and q scores a
            loss of 0 (matching the metric convention "both empty -> Dice 1"); otherwise it changes
            the value by O(eps / |structure|).
        reduction: ``"mean"`` (default) averages over batch and the chosen classes; ``"sum"``
            averages over the batch and sums over classes (``sum_k L_seg(p_k, q_k)`` of Eq. 3).
    """
    _check_pair(p, q)
    _check_nonneg(eps=eps)
    _check_reduction(reduction)
    cls = _check_classes(classes, p.shape[1], "classes")
    if not cls:
        raise InputError("classes is empty; give at least one channel for the Dice loss.")
    pk, qk = p[:, cls], q[:, cls].to(p.dtype)
    inter = _spatial_sum(pk * qk)
    denom = _spatial_sum(pk) + _spatial_sum(qk)
    loss = 1.0 - (2.0 * inter + eps) / (denom + eps)  # (B, |classes|)
    loss = loss.mean(0)
    return loss.mean() if reduction == "mean" else loss.sum()


# ----------------------------------------------------------------------------------------------
# clDice term (Def. 3)
# ----------------------------------------------------------------------------------------------

def _as_single_channel(x: torch.Tensor, name: str, spatial_dims: int | None) -> torch.Tensor:
    """Bring a one-class tensor (B, *S) or (B, 1, *S) to (B, 1, *S).

    With ``spatial_dims=None`` the layout is inferred: 3 axes -> (B, H, W); 5 axes ->
    (B, 1, D, H, W); 4 axes -> (B, 1, H, W) if axis 1 has size 1, else (B, D, H, W).
    Pass ``spatial_dims`` explicitly to resolve the (B, 1, H, W) vs (B, D=1, H, W) ambiguity.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if spatial_dims is None:
        if x.ndim == 3:
            spatial_dims = 2
        elif x.ndim == 5:
            spatial_dims = 3
        elif x.ndim == 4:
            spatial_dims = 2 if x.shape[1] == 1 else 3
        else:
            raise InputError(f"{name} must be (B, *S) or (B, 1, *S) with 2 or 3 spatial axes, got {tuple(x.shape)}.")
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if x.ndim == spatial_dims + 1:
        return x.unsqueeze(1)
    if x.ndim == spatial_dims + 2 and x.shape[1] == 1:
        return x
    raise InputError(
        f"{name} has shape {tuple(x.shape)}, which is neither (B, *S) nor (B, 1, *S) with {spatial_dims} spatial axes; "
        f"select one class channel first (p[:, k])."
    )


def _cldice_per_channel(p: torch.Tensor, q: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Def. 3 for every sample and channel of (B, C, *S) fields -> (B, C)."""
    sp, sq = soft_skeleton(p, iters), soft_skeleton(q, iters)
    x = _spatial_sum(sp * q) / (_spatial_sum(sp) + eps)  # topology precision
    y = _spatial_sum(sq * p) / (_spatial_sum(sq) + eps)  # topology sensitivity
    return 1.0 - 2.0 * x * y / (x + y + eps)


def soft_cldice_loss(p: torch.Tensor, q: torch.Tensor, iters: int = 10, eps: float = 1e-6,
                     spatial_dims: int | None = None) -> torch.Tensor:
    """Soft clDice loss of one class (Def. 3), averaged over the batch.

    ``X = <S(p), q> / (<S(p), 1> + eps)`` (topology precision),
    ``Y = <S(q), p> / (<S(q), 1> + eps)`` (topology sensitivity),
    ``L = 1 - 2XY / (X + Y + eps)``, computed per sample, then averaged over the batch.

    Shapes: (B, *S) or (B, 1, *S), 2 or 3 spatial axes (see ``spatial_dims``).
    ``eps`` only prevents division by zero. Consequence: a sample where the class is absent from
    both ``p`` and ``q`` contributes exactly 1 (a constant with zero gradient); identical non-empty
    binary masks give a loss of order ``eps / |skeleton|``.
    """
    _check_iters(iters)
    _check_nonneg(eps=eps)
    p1 = _as_single_channel(p, "p", spatial_dims)
    q1 = _as_single_channel(q, "q", spatial_dims)
    if p1.shape != q1.shape:
        raise InputError(f"p and q have different shapes {tuple(p.shape)} and {tuple(q.shape)}; they must match.")
    return _cldice_per_channel(p1, q1.to(p1.dtype), iters, eps).mean()


def cldice_loss_classes(p: torch.Tensor, q: torch.Tensor, classes: Sequence[int], iters: int = 10,
                        eps: float = 1e-6, reduction: str = "sum") -> torch.Tensor:
    """Soft clDice loss over several class channels of (B, K, *S) fields.

    ``reduction="sum"`` (default) gives ``sum_{k in classes} L_clDice(p_k, q_k)`` as in the ATL;
    ``"mean"`` divides by the number of classes. An empty class list gives 0.
    """
    _check_pair(p, q)
    _check_reduction(reduction)
    cls = _check_classes(classes, p.shape[1], "cl_classes")
    if not cls:
        return p.new_zeros(())
    _check_iters(iters)
    _check_nonneg(eps=eps)
    # all chosen channels at once: the soft skeleton acts on each channel separately
    per_class = _cldice_per_channel(p[:, cls], q[:, cls].to(p.dtype), iters, eps).mean(0)  # (|classes|,)
    return per_class.sum() if reduction == "sum" else per_class.mean()


# ----------------------------------------------------------------------------------------------
# overlap term (Def. 4) and ATL
# ----------------------------------------------------------------------------------------------

def overlap_loss(p: torch.Tensor) -> torch.Tensor:
    """Mean pairwise class overlap ``2/(K(K-1)) sum_{i<j} E_x[p_i p_j]`` (Def. 4), averaged over the batch.

    Uses ``sum_{i<j} p_i p_j = ((sum_k p_k)^2 - sum_k p_k^2) / 2`` (O(K) instead of O(K^2)); for
    one-hot fields both terms equal 1 at every voxel, so the loss is exactly 0. On the simplex it
    equals ``(1 - sum_k p_k^2) / (K(K-1))``: it penalises fuzzy, multi-class voxels.
    """
    _check_field(p, "p")
    k = p.shape[1]
    if k < 2:
        raise InputError(f"The overlap loss needs at least 2 classes, got K={k}.")
    pair_sum = 0.5 * (p.sum(1).square() - p.square().sum(1))  # (B, *S)
    return pair_sum.mean() * (2.0 / (k * (k - 1)))


def _atl_terms(p: torch.Tensor, q: torch.Tensor, cl_classes: Sequence[int], lambda_1: float, lambda_2: float,
               iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted (clDice sum, overlap); a term whose lambda is 0 is not computed (returned as 0)."""
    zero = p.new_zeros(())
    cl = cldice_loss_classes(p, q, cl_classes, iters=iters, eps=eps, reduction="sum") if lambda_1 != 0 else zero
    ov = overlap_loss(p) if lambda_2 != 0 else zero
    return cl, ov


def anatomy_topology_loss(p: torch.Tensor, q: torch.Tensor, cl_classes: Sequence[int], lambda_1: float = 1.0,
                          lambda_2: float = 1.0, iters: int = 10, eps: float = 1e-6) -> torch.Tensor:
    """Anatomy topology loss ``L_ATL = lambda_1 sum_{k in cl_classes} L_clDice(p_k, q_k) + lambda_2 L_overlap(p)``.

    ``cl_classes`` are the tubular / thin classes whose connectivity matters (e.g. white-matter
    tracts, cortex). A lambda of 0 switches its term off (it is then not even computed).
    """
    _check_pair(p, q)
    _check_nonneg(lambda_1=lambda_1, lambda_2=lambda_2)
    cl, ov = _atl_terms(p, q, cl_classes, lambda_1, lambda_2, iters, eps)
    return lambda_1 * cl + lambda_2 * ov


# ----------------------------------------------------------------------------------------------
# full objective (Eq. 3)
# ----------------------------------------------------------------------------------------------

def squared_param_norm(module: nn.Module, trainable_only: bool = True) -> torch.Tensor:
    """``||theta||^2``: sum of squared entries of the module's (trainable) parameters."""
    params = [t for t in module.parameters() if t.requires_grad or not trainable_only]
    if not params:
        return torch.zeros(())
    return torch.stack([t.square().sum() for t in params]).sum()


@dataclass
class AnatomyDTObjective:
    """Training objective of Eq. 3: ``L = sum_k L_seg(p_k, q_k) + lambda_topo L_ATL + lambda_reg ||theta||^2``.

    Attributes:
        seg_classes: channels in the Dice sum (``None`` -> all K).
        cl_classes: channels in the clDice part of the ATL (empty -> no clDice term).
        lambda_topo, lambda_1, lambda_2, lambda_reg: non-negative weights; 0 switches a term off.
        iters, eps: soft-skeleton iterations and division guard (see module docstring).

    Call ``objective(p, q, model=None)`` -> ``(total, components)``: ``total`` is a scalar tensor
    for ``backward()``; ``components`` holds floats for logging: ``seg`` (the Dice sum),
    ``cldice`` (unweighted clDice sum), ``overlap`` (unweighted), ``atl``
    (``lambda_1*cldice + lambda_2*overlap``), ``reg`` (``||theta||^2`` of ``model``) and
    ``total`` = ``seg + lambda_topo*atl + lambda_reg*reg``. A switched-off term (its lambda is 0,
    ``lambda_topo = 0`` for both ATL parts, or no ``model`` for ``reg``) is not computed and
    reported as 0.
    """

    seg_classes: Sequence[int] | None = None
    cl_classes: Sequence[int] = ()
    lambda_topo: float = 1.0
    lambda_1: float = 1.0
    lambda_2: float = 1.0
    lambda_reg: float = 0.0
    iters: int = 10
    eps: float = 1e-6

    def __post_init__(self):
        _check_nonneg(lambda_topo=self.lambda_topo, lambda_1=self.lambda_1, lambda_2=self.lambda_2,
                      lambda_reg=self.lambda_reg, eps=self.eps)
        _check_iters(self.iters)

    def __call__(self, p: torch.Tensor, q: torch.Tensor, model: nn.Module | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        _check_pair(p, q)
        seg = soft_dice_loss(p, q, classes=self.seg_classes, eps=self.eps, reduction="sum")
        zero = p.new_zeros(())
        if self.lambda_topo != 0:
            cl, ov = _atl_terms(p, q, self.cl_classes, self.lambda_1, self.lambda_2, self.iters, self.eps)
        else:
            cl, ov = zero, zero
        atl = self.lambda_1 * cl + self.lambda_2 * ov
        reg = squared_param_norm(model).to(p.device, p.dtype) if (model is not None and self.lambda_reg != 0) else zero
        total = seg + self.lambda_topo * atl + self.lambda_reg * reg
        components = {
            "seg": float(seg.detach()),
            "cldice": float(cl.detach()),
            "overlap": float(ov.detach()),
            "atl": float(atl.detach()),
            "reg": float(reg.detach()),
            "total": float(total.detach()),
        }
        return total, components
