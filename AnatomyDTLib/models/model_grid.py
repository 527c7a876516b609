"""Running a model on its own grid and answering on the input's grid.

A learned model's convolution kernels are in voxels, so it must see the voxel size it was trained
on (the checkpoint stores it, e.g. 4 mm for the default brain model). A baseline on any grid —
1 mm isotropic, 0.8 × 0.8 × 6 mm, 2 mm — is therefore

1. **brought to the model grid**: each axis is resized so that its voxel size is as close as
   possible to the model's while the image keeps its physical extent (``n_model = round(n · h /
   h_model)``). Axes that get coarser are block-averaged (``area``: class fractions, exact
   volumes, no aliasing); axes that get finer are linearly interpolated. Both keep a field on the
   simplex.
2. **forecast there**;
3. **brought back as a change**: the answer is ``p0 + upsample(p_model(t) − p0_model)`` on the
   input grid, projected onto the simplex. Where the model predicts no change the input's own
   fine detail (a 1 mm cortex ribbon, say) is returned untouched, instead of the blur a plain
   down-and-up resampling would give it.

Plan arrays follow the anatomy: dose maps (Gy) are resampled like fields, resection masks and the
domain mask where more than half of a model voxel is covered.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..simplex import project_off_simplex_

_SAME_SPACING_TOLERANCE = 0.02  # relative: closer than 2 % counts as the model's own voxel size


def model_grid_shape(shape: Sequence[int], spacing: Sequence[float], model_spacing: Sequence[float]) -> tuple[int, ...]:
    """Voxels per axis on the model grid covering the same extent (at least 1 per axis)."""
    return tuple(max(1, int(round(n * h / hm))) for n, h, hm in zip(shape, spacing, model_spacing))


def needs_resampling(spacing: Sequence[float], model_spacing: Sequence[float] | None) -> bool:
    """True when the input voxel size differs from the model's by more than 2 % on some axis."""
    if model_spacing is None:
        return False
    return any(abs(h - hm) > _SAME_SPACING_TOLERANCE * hm for h, hm in zip(spacing, model_spacing))


def resize_field(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resize (C, *S) to (C, *shape): block-average the axes that shrink, interpolate the ones that grow."""
    shape = tuple(int(n) for n in shape)
    src = tuple(x.shape[1:])
    if src == shape:
        return x
    linear = "trilinear" if len(shape) == 3 else "bilinear"
    work = x[None].to(torch.float32)
    shrunk = tuple(min(a, b) for a, b in zip(src, shape))
    if shrunk != src:
        work = F.interpolate(work, size=shrunk, mode="area")
    if shrunk != shape:
        work = F.interpolate(work, size=shape, mode=linear, align_corners=False)
    return work[0].to(x.dtype)


def resize_array(a: np.ndarray, shape: Sequence[int], *, mask: bool) -> np.ndarray:
    """Resize a numpy volume like :func:`resize_field`; a mask keeps voxels more than half covered."""
    t = torch.as_tensor(np.asarray(a, dtype=np.float32))[None]
    out = resize_field(t, shape)[0].numpy()
    return out > 0.5 if mask else out.astype(np.float64)


def resize_plan(plan, shape: Sequence[int]):
    """The plan with its arrays (resection masks, dose map in Gy) resized to ``shape``."""
    if plan is None:
        return None
    return plan.map_arrays(lambda array, kind: resize_array(array, shape, mask=kind == "resection_mask"))


def actual_spacing(shape: Sequence[int], spacing: Sequence[float], new_shape: Sequence[int]) -> tuple[float, ...]:
    """Voxel size (mm) of the resized grid: same physical extent, ``new_shape`` voxels."""
    return tuple(float(n * h / m) for n, h, m in zip(shape, spacing, new_shape))


def changes_to_input_grid(p0: torch.Tensor, p0_model: torch.Tensor, trajectory_model: torch.Tensor) -> torch.Tensor:
    """(T, K, *S) answer on the input grid: ``p0`` plus the model's upsampled change, on the simplex."""
    shape = tuple(p0.shape[1:])
    out = torch.empty((trajectory_model.shape[0],) + tuple(p0.shape), dtype=p0.dtype, device=p0.device)
    for i in range(trajectory_model.shape[0]):
        change = resize_field(trajectory_model[i] - p0_model, shape).to(p0.dtype)
        torch.add(p0, change, out=out[i])
        # the change sums to ~0 per voxel (both model fields are on the simplex and resampling is
        # linear), so only voxels pushed below 0 (fine detail the coarse change overrides) or off
        # by rounding need the projection
        project_off_simplex_(out[i], dim=0)
    return out
