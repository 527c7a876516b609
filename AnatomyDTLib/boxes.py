"""Box arithmetic of the no-grad solver: a box is a tuple of slices, one per spatial axis, in the
grid's voxel indices (or in a region's, where a function says so). Pure Python, no torch: the
stepper (:mod:`AnatomyDTLib.inference`), the fused kernel's adapter (:mod:`AnatomyDTLib.fused`)
and the solver's delayed-death bookkeeping all use these, so each operation is written once.
"""

from __future__ import annotations


def intersection(a, b):
    """The common part of two boxes, or None when they do not overlap."""
    common = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(c.start >= c.stop for c in common) else common


def union(a, b):
    """The smallest box holding both (None stands for no box)."""
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def union_all(boxes):
    """The smallest box holding all of them (None entries skipped; None when there are none)."""
    total = None
    for box in boxes:
        total = union(total, box)
    return total


def relative(inner, outer) -> tuple[slice, ...]:
    """The box ``inner`` (grid slices) in the coordinates of the box ``outer`` that contains it."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def shifted(box, origin):
    """A box in a region's coordinates moved to the grid's (``origin``: the region's first voxel;
    its negative moves a grid box into the region's coordinates). None stays None."""
    if box is None:
        return None
    return tuple(slice(b.start + o, b.stop + o) for b, o in zip(box, origin))


def dilate(box, margin: int, spatial_shape):
    """``box`` grown by ``margin`` voxels on every side, clipped to a grid of ``spatial_shape``."""
    return tuple(slice(max(0, b.start - margin), min(n, b.stop + margin)) for b, n in zip(box, spatial_shape))


def dilate_or_none(box, margin: int, spatial_shape):
    """:func:`dilate`, passing None through."""
    return None if box is None else dilate(box, margin, spatial_shape)


def contains(outer, inner) -> bool:
    """Whether the box ``outer`` holds the box ``inner`` entirely."""
    return all(o.start <= i.start and i.stop <= o.stop for i, o in zip(inner, outer))


def from_bounds(bounds):
    """The box of a flat (z0, z1, y0, y1, x0, x1) array, as the numba kernels write boxes."""
    return tuple(slice(int(bounds[2 * a]), int(bounds[2 * a + 1])) for a in range(len(bounds) // 2))
