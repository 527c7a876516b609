"""Evaluation metrics for predicted anatomy: Dice, HD95 and (hard) clDice.

These are the *evaluation* counterparts of the training losses in :mod:`AnatomyDTLib.losses`.
They work on hard (binary) masks or integer label maps, given as numpy arrays or torch tensors
(tensors are detached and copied to the CPU; torch itself is not imported here).

Conventions (all chosen so that a metric is defined for every input and the choice is explicit):

* **Dice** ``2|A∩B| / (|A|+|B|)``: both masks empty -> ``1.0`` (perfect agreement on "absent"),
  exactly one empty -> ``0.0``.
* **HD95** (mm): surface voxels are ``mask AND NOT erosion(mask)`` with the full-connectivity
  structuring element (3x3 in 2D, 3x3x3 in 3D) and ``border_value=0``, so an object touching the
  image border has surface voxels on the border (its surface is closed by the image edge).
  For every surface voxel of A the Euclidean distance (``distance_transform_edt`` with
  ``sampling=spacing``) to the nearest surface voxel of B is taken, and vice versa.
  HD95 is the **maximum of the two directed 95th percentiles** (``numpy.percentile`` with linear
  interpolation, each voxel weighted equally) -- the convention of MONAI / nnU-Net-style evaluation
  and of DeepMind's ``surface_distance.compute_robust_hausdorff`` (which, unlike us, weights
  surface elements by their area). Both empty -> ``0.0``; exactly one empty -> ``empty_value``
  (default ``float('inf')``; pass e.g. :func:`image_diagonal_mm` for a finite penalty).
* **clDice** (hard): skeletons from :func:`skimage.morphology.skeletonize` (2D: Zhang's method,
  3D: Lee's method), ``Tprec = |S(P)∩G|/|S(P)|``, ``Tsens = |S(G)∩P|/|S(G)|``, clDice is their
  harmonic mean. Both empty -> ``1.0``; exactly one empty -> ``0.0``; if skeletonization removes
  every voxel of a non-empty mask (possible for tiny blobs), the mask itself is used as its skeleton.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError

__all__ = [
    "dice",
    "hd95",
    "cldice",
    "image_diagonal_mm",
    "per_class",
    "mean_over_classes",
    "finite_mean",
    "evaluate_labels",
]


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------

def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or array-like to a numpy array (no torch import)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} cannot be converted to an array ({exc}); pass a numpy array or torch tensor.") from exc
    if arr.dtype == object:
        raise InputError(f"{name} is not a numeric array (dtype=object); pass a numpy array or torch tensor.")
    if arr.ndim == 0:
        raise InputError(f"{name} is a scalar; pass a mask array with at least one dimension.")
    return arr


def _as_binary(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a boolean mask, rejecting anything other than 0/1 (or False/True) values."""
    arr = _to_numpy(x, name)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{name} has dtype {arr.dtype}; pass a binary mask (bool, or numbers 0 and 1).")
    bad = ~((arr == 0) | (arr == 1))
    if bad.any():
        example = arr[bad].flat[0]
        raise InputError(
            f"{name} is not binary: it contains values other than 0 and 1 (e.g. {example!r}, "
            f"{int(bad.sum())} voxels). Threshold probabilities first (e.g. p > 0.5) or compare a label "
            f"map with one class (labels == k)."
        )
    return arr.astype(bool)


def _binary_pair(pred: Any, gt: Any, ndims: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a (prediction, ground truth) pair of binary masks of equal shape."""
    p = _as_binary(pred, "pred")
    g = _as_binary(gt, "gt")
    if p.shape != g.shape:
        raise InputError(f"pred and gt have different shapes {p.shape} and {g.shape}; they must be on the same grid.")
    if ndims is not None and p.ndim not in ndims:
        raise InputError(
            f"Masks must have {' or '.join(map(str, ndims))} dimensions, got shape {p.shape}; "
            f"pass a single 2D slice or 3D volume (no batch or channel axes)."
        )
    return p, g


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Validate a voxel spacing (array axis order, mm); ``None`` means 1 per axis."""
    if spacing is None:
        return (1.0,) * ndim
    try:
        sp = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    except (TypeError, ValueError) as exc:
        raise InputError(f"spacing {spacing!r} is not a sequence of numbers.") from exc
    if len(sp) != ndim:
        raise InputError(f"spacing has {len(sp)} values but the masks have {ndim} axes; give one spacing per array axis.")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"spacing must be finite and positive, got {sp}.")
    return sp


def _labels(x: Any, name: str) -> np.ndarray:
    """Validate an integer label map (integer dtype, or float with integral values)."""
    arr = _to_numpy(x, name)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{name} has dtype {arr.dtype}; pass an integer label map.")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise InputError(f"{name} is not an integer label map (non-integer or non-finite values); pass class labels.")
    return arr


# ----------------------------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------------------------

def dice(pred: Any, gt: Any) -> float:
    """Dice overlap ``2|A∩B| / (|A|+|B|)`` of two binary masks of any dimension.

    Both empty -> 1.0 (the structure is correctly predicted absent); exactly one empty -> 0.0.
    """
    p, g = _binary_pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


# ----------------------------------------------------------------------------------------------
# HD95
# ----------------------------------------------------------------------------------------------

def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Length in mm of the diagonal of the image extent ``sqrt(sum((n_i * s_i)^2))``.

    No distance between two voxels of the image exceeds it, so it is a natural finite HD95 penalty
    when exactly one mask is empty (``hd95(..., empty_value=image_diagonal_mm(shape, spacing))``).
    """
    shape = tuple(int(n) for n in shape)
    if not shape or any(n < 1 for n in shape):
        raise InputError(f"shape must be a non-empty sequence of positive sizes, got {shape}.")
    sp = _spacing(spacing, len(shape))
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp))))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its full-connectivity erosion (outside the image = background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _directed_distances(src_surface: np.ndarray, dst_surface: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from every surface voxel of ``src`` to the nearest surface voxel of ``dst``."""
    dist_to_dst = ndimage.distance_transform_edt(~dst_surface, sampling=spacing)
    return dist_to_dst[src_surface]


def hd95(pred: Any, gt: Any, spacing: Sequence[float] | None = None, empty_value: float = float("inf")) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two binary 2D or 3D masks.

    Args:
        pred, gt: binary masks of the same 2D or 3D shape.
        spacing: voxel size per array axis in mm (array axis order, not ITK's x,y,z order unless
            the array is in that order). ``None`` -> 1 per axis, i.e. the result is in voxels.
        empty_value: returned when exactly one of the masks is empty (default ``inf``).

    Returns:
        ``max(P95(d(∂A -> ∂B)), P95(d(∂B -> ∂A)))`` where ``∂X`` is the set of surface voxels
        (mask minus its full-connectivity erosion, border_value=0), ``d`` is the Euclidean distance
        from each surface voxel to the nearest surface voxel of the other mask and ``P95`` is
        ``numpy.percentile(..., 95)`` (linear interpolation, voxels equally weighted).
        Both masks empty -> 0.0; exactly one empty -> ``empty_value``.
    """
    p, g = _binary_pair(pred, gt, ndims=(2, 3))
    sp = _spacing(spacing, p.ndim)
    p_empty, g_empty = not p.any(), not g.any()
    if p_empty and g_empty:
        return 0.0
    if p_empty or g_empty:
        return float(empty_value)
    sp_surface, sg_surface = _surface(p), _surface(g)
    d_pg = _directed_distances(sp_surface, sg_surface, sp)
    d_gp = _directed_distances(sg_surface, sp_surface, sp)
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


# ----------------------------------------------------------------------------------------------
# clDice (hard skeletons)
# ----------------------------------------------------------------------------------------------

def _skeleton(mask: np.ndarray) -> np.ndarray:
    """Topological skeleton of a non-empty mask; falls back to the mask if thinning removes everything."""
    from skimage.morphology import skeletonize  # scikit-image is only needed for this metric

    skel = skeletonize(mask).astype(bool)
    if not skel.any():
        return mask.copy()
    return skel


def cldice(pred: Any, gt: Any) -> float:
    """Hard centreline Dice (clDice, Shit et al. 2021) of two binary 2D or 3D masks.

    ``Tprec = |S(P)∩G| / |S(P)|`` (how much of the predicted centreline lies inside the truth),
    ``Tsens = |S(G)∩P| / |S(G)|`` (how much of the true centreline is covered by the prediction),
    ``clDice = 2 Tprec Tsens / (Tprec + Tsens)`` (0 if both are 0).
    ``S`` is :func:`skimage.morphology.skeletonize`. Both masks empty -> 1.0; exactly one
    empty -> 0.0. A cut in a thin structure removes part of ``S(G)`` from ``P`` and lowers Tsens.
    """
    p, g = _binary_pair(pred, gt, ndims=(2, 3))
    p_empty, g_empty = not p.any(), not g.any()
    if p_empty and g_empty:
        return 1.0
    if p_empty or g_empty:
        return 0.0
    sp, sg = _skeleton(p), _skeleton(g)
    tprec = np.logical_and(sp, g).sum() / sp.sum()
    tsens = np.logical_and(sg, p).sum() / sg.sum()
    if tprec + tsens == 0:
        return 0.0
    return float(2.0 * tprec * tsens / (tprec + tsens))


# ----------------------------------------------------------------------------------------------
# per-class evaluation of label maps
# ----------------------------------------------------------------------------------------------

def _label_pair(pred_labels: Any, gt_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _labels(pred_labels, "pred_labels")
    g = _labels(gt_labels, "gt_labels")
    if p.shape != g.shape:
        raise InputError(
            f"pred_labels and gt_labels have different shapes {p.shape} and {g.shape}; they must be on the same grid."
        )
    return p, g


def _class_list(classes: Iterable[int]) -> list[int]:
    try:
        out = [int(c) for c in classes]
    except (TypeError, ValueError) as exc:
        raise InputError(f"classes must be a sequence of integer labels, got {classes!r}.") from exc
    if not out:
        raise InputError("classes is empty; give at least one class label to evaluate.")
    return out


def per_class(metric: Callable[..., float], pred_labels: Any, gt_labels: Any, classes: Iterable[int],
              **kw) -> dict[int, float]:
    """Apply a binary ``metric(pred_mask, gt_mask, **kw)`` to ``labels == k`` for every class ``k``."""
    p, g = _label_pair(pred_labels, gt_labels)
    return {k: float(metric(p == k, g == k, **kw)) for k in _class_list(classes)}


def finite_mean(values: Iterable[float]) -> tuple[float, int]:
    """Mean of the finite values and the number of non-finite (inf/NaN) values skipped.

    Returns ``(nan, n)`` if no value is finite.
    """
    vals = np.asarray(list(values), dtype=float)
    finite = np.isfinite(vals)
    n_skipped = int((~finite).sum())
    mean = float(vals[finite].mean()) if finite.any() else float("nan")
    return mean, n_skipped


def mean_over_classes(metric: Callable[..., float], pred_labels: Any, gt_labels: Any, classes: Iterable[int],
                      skip_nonfinite: bool = False, **kw) -> float:
    """Mean of :func:`per_class` values over ``classes``.

    With ``skip_nonfinite=True`` infinite/NaN values (e.g. HD95 with one empty mask) are left out
    (see :func:`finite_mean`); otherwise they propagate into the mean.
    """
    values = per_class(metric, pred_labels, gt_labels, classes, **kw).values()
    if skip_nonfinite:
        return finite_mean(values)[0]
    return float(np.mean(list(values)))


def evaluate_labels(pred_labels: Any, gt_labels: Any, classes: Iterable[int],
                    spacing: Sequence[float] | None = None, hd95_empty_value: float = float("inf")) -> dict:
    """Dice, HD95 (mm) and clDice of every class of two 2D/3D label maps, plus their means.

    Returns a dict with
        ``dice``, ``hd95``, ``cldice``: ``{class: value}``;
        ``mean_dice``, ``mean_cldice``: plain means over ``classes``;
        ``mean_hd95``: mean over the classes whose HD95 is finite (NaN if none is);
        ``hd95_skipped``: how many classes were left out of ``mean_hd95`` because their HD95 was
        infinite (exactly one of prediction / truth empty, with the default ``hd95_empty_value``).
    """
    p, g = _label_pair(pred_labels, gt_labels)
    if p.ndim not in (2, 3):
        raise InputError(f"Label maps must be 2D or 3D, got shape {p.shape}.")
    cls = _class_list(classes)
    sp = _spacing(spacing, p.ndim)
    out: dict[str, Any] = {
        "dice": per_class(dice, p, g, cls),
        "hd95": per_class(hd95, p, g, cls, spacing=sp, empty_value=hd95_empty_value),
        "cldice": per_class(cldice, p, g, cls),
    }
    out["mean_dice"] = float(np.mean(list(out["dice"].values())))
    out["mean_cldice"] = float(np.mean(list(out["cldice"].values())))
    out["mean_hd95"], out["hd95_skipped"] = finite_mean(out["hd95"].values())
    return out
