"""PNG figures of a prediction, drawn with NumPy alone (no plotting library).

Two figures, both as (H, W, 3) uint8 RGB arrays, and a PNG encoder:

* :func:`overlay_montage` — the anatomy in three planes (axial, coronal, sagittal; one plane for
  2D) through the centre of the baseline tumour, one row per time point. The background is the
  FLAIR when given, else a grey rendering of the baseline labels; every class is drawn as a
  coloured contour, and the baseline tumour is repeated as a dashed yellow contour on every
  predicted row so growth or shrinkage is visible at a glance. Planes are shown in physical proportions
  (anisotropic voxels are stretched to their size in mm) and in radiological convention
  (patient right on the left of axial and coronal panels, superior at the top).
* :func:`volume_chart` — volume (mL) over days, one small panel per class with its own
  y range, so a 30 mL tumour is not flattened by a 600 mL white matter.

Drawing uses a small built-in 5x7 bitmap font (upper case), so figures look the same on every
machine and need no extra package: the library's dependencies stay those of the 3D Slicer
extension.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Sequence

import numpy as np

from .io import Geometry
from .schema import ClassSchema

__all__ = ["overlay_montage", "volume_chart", "png_bytes", "MAX_MONTAGE_ROWS"]

MAX_MONTAGE_ROWS = 5
"""Time points shown in the montage: the baseline plus up to 4 predicted days (the last always)."""

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_GREY_TEXT = (90, 90, 90)
_BASELINE_TUMOUR = (255, 220, 0)  # yellow
_PANEL_BACKGROUND = (0, 0, 0)
_PANEL_PX = 230.0  # the largest physical extent among the planes is drawn this many pixels long

# ----------------------------------------------------------------------------------------------
# A 5x7 bitmap font ('#' = ink). Lower-case text is drawn in upper case; unknown characters as '?'.
# ----------------------------------------------------------------------------------------------

_GLYPH_ROWS = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    " ": "..... ..... ..... ..... ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
}
_GLYPHS = {ch: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool)
           for ch, rows in _GLYPH_ROWS.items()}
_GLYPH_W, _GLYPH_H = 5, 7
_REPLACEMENTS = {"\u2014": "-", "\u2013": "-", "\u00d7": "X", "\u00b2": "2"}


def _glyph(ch: str) -> np.ndarray:
    ch = _REPLACEMENTS.get(ch, ch).upper()
    return _GLYPHS.get(ch, _GLYPHS["?"])


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of ``text`` drawn at ``scale``."""
    return (max(len(text) * (_GLYPH_W + 1) - 1, 0) * scale, _GLYPH_H * scale)


# ----------------------------------------------------------------------------------------------
# Canvas
# ----------------------------------------------------------------------------------------------


class _Canvas:
    """An RGB uint8 image with the few drawing operations the figures need (clipped to the image)."""

    def __init__(self, height: int, width: int, background=_WHITE):
        self.rgb = np.empty((int(height), int(width), 3), dtype=np.uint8)
        self.rgb[:] = background

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[:2]

    def fill(self, y0: int, x0: int, y1: int, x1: int, color) -> None:
        """Fill rows y0..y1-1, columns x0..x1-1."""
        h, w = self.shape
        y0, y1, x0, x1 = max(int(y0), 0), min(int(y1), h), max(int(x0), 0), min(int(x1), w)
        if y0 < y1 and x0 < x1:
            self.rgb[y0:y1, x0:x1] = color

    def text(self, x: int, y: int, text: str, color=_BLACK, scale: int = 1, anchor: str = "left") -> None:
        """Draw ``text`` with its top at ``y``; ``anchor`` "left", "centre" or "right" refers to ``x``."""
        width, _ = text_size(text, scale)
        if anchor == "centre":
            x -= width // 2
        elif anchor == "right":
            x -= width
        for i, ch in enumerate(text):
            mask = np.kron(_glyph(ch), np.ones((scale, scale), dtype=bool))
            self._stamp(int(y), int(x) + i * (_GLYPH_W + 1) * scale, mask, color)

    def _stamp(self, y: int, x: int, mask: np.ndarray, color) -> None:
        h, w = self.shape
        mh, mw = mask.shape
        ys, xs = slice(max(y, 0), min(y + mh, h)), slice(max(x, 0), min(x + mw, w))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            return
        sub = mask[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x]
        self.rgb[ys, xs][sub] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        """A straight line of ``width`` pixels (square pen)."""
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs = np.rint(np.linspace(x0, x1, n)).astype(int)
        ys = np.rint(np.linspace(y0, y1, n)).astype(int)
        lo = -(width // 2)
        for dy in range(lo, lo + width):
            for dx in range(lo, lo + width):
                self._points(ys + dy, xs + dx, color)

    def _points(self, ys: np.ndarray, xs: np.ndarray, color) -> None:
        h, w = self.shape
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        self.rgb[ys[ok], xs[ok]] = color

    def blit(self, y: int, x: int, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        self.rgb[y:y + h, x:x + w] = image


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 RGB array as PNG (8-bit truecolour, no interlace)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"png_bytes needs an (H, W, 3) array, got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
            + chunk(b"IEND", b""))


def _rgb255(color: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(round(255 * min(max(float(c), 0.0), 1.0))) for c in color)  # type: ignore[return-value]


def _ink(color: Sequence[float]) -> tuple[int, int, int]:
    """A class colour dark enough to read on white (light colours such as cream are darkened)."""
    r, g, b = (min(max(float(c), 0.0), 1.0) for c in color)
    luminance = 0.299 * r + 0.587 * g + 0.114 * b
    factor = 0.55 / luminance if luminance > 0.55 else 1.0
    return _rgb255((r * factor, g * factor, b * factor))


# ----------------------------------------------------------------------------------------------
# Orientation: array -> (S, P, L)-aligned volume, so planes are shown the same way for any header
# ----------------------------------------------------------------------------------------------


def _lps_aligned_axes(geometry: Geometry) -> tuple[list[int], list[bool], tuple[float, ...]] | None:
    """How to permute and flip a (z, y, x) array so its axes run S, P, L (increasing); None if oblique.

    Returns (permutation of array axes, flip per output axis, spacing per output axis in mm).
    """
    d = geometry.direction_matrix  # columns: voxel axes i, j, k in LPS
    dominant = [int(np.argmax(np.abs(d[:, a]))) for a in range(3)]
    if sorted(dominant) != [0, 1, 2] or min(np.max(np.abs(d), axis=0)) < 0.7:
        return None
    perm, flips, spacing = [], [], []
    for lps_axis in (2, 1, 0):  # output axes: S, P, L
        voxel_axis = dominant.index(lps_axis)
        perm.append(2 - voxel_axis)  # array axis of voxel axis a is 2 - a
        flips.append(bool(d[lps_axis, voxel_axis] < 0))
        spacing.append(geometry.spacing[voxel_axis])
    return perm, flips, tuple(spacing)


def _orient(volume: np.ndarray, axes) -> np.ndarray:
    perm, flips, _ = axes
    out = np.transpose(volume, perm)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=axis)
    return out


class _Planes:
    """The planes shown for a volume: (name, slicer(volume) -> 2D array, row spacing, col spacing, edge letters)."""

    def __init__(self, geometry: Geometry, centre_labels: np.ndarray, tumour_index: int):
        self.ndim = geometry.ndim
        if self.ndim == 2:
            self.axes = None
            sy, sx = geometry.spacing_array_order
            self.views = [("plane", lambda v: v, sy, sx, None)]
            return
        self.axes = _lps_aligned_axes(geometry)
        oriented = self.orient(centre_labels)
        if self.axes is None:
            sz, sy, sx = geometry.spacing_array_order
            names, letters = ("slice (array axis 0)", "slice (array axis 1)", "slice (array axis 2)"), (None,) * 3
        else:
            sz, sy, sx = self.axes[2]
            names, letters = ("axial", "coronal", "sagittal"), (("R", "L"), ("R", "L"), ("A", "P"))
        tumour = np.argwhere(oriented == tumour_index)
        points = tumour if len(tumour) else np.argwhere(np.ones(oriented.shape, dtype=bool))
        c = np.rint(points.mean(axis=0)).astype(int)
        # Superior at the top: S increases with the array row, so coronal and sagittal rows are flipped.
        flip_rows = self.axes is not None
        self.views = [
            (names[0], lambda v: v[c[0]], sy, sx, letters[0]),
            (names[1], (lambda v: v[::-1, c[1]]) if flip_rows else (lambda v: v[:, c[1]]), sz, sx, letters[1]),
            (names[2], (lambda v: v[::-1, :, c[2]]) if flip_rows else (lambda v: v[:, :, c[2]]), sz, sy, letters[2]),
        ]

    def orient(self, volume: np.ndarray) -> np.ndarray:
        return volume if self.ndim == 2 or self.axes is None else _orient(volume, self.axes)


def _resample_plane(plane: np.ndarray, row_mm: float, col_mm: float, px_per_mm: float) -> np.ndarray:
    """Nearest-neighbour resampling of a 2D plane to ``px_per_mm`` pixels per mm on both axes."""
    rows = max(1, int(round(plane.shape[0] * row_mm * px_per_mm)))
    cols = max(1, int(round(plane.shape[1] * col_mm * px_per_mm)))
    ri = np.minimum(((np.arange(rows) + 0.5) / (row_mm * px_per_mm)).astype(int), plane.shape[0] - 1)
    ci = np.minimum(((np.arange(cols) + 0.5) / (col_mm * px_per_mm)).astype(int), plane.shape[1] - 1)
    return plane[np.ix_(ri, ci)]


def _contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (image edges count as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _grey_from_labels(labels: np.ndarray, schema: ClassSchema) -> np.ndarray:
    """A FLAIR-like grey rendering of labels in [0, 1] (brain classes get FLAIR-like intensities)."""
    levels = np.linspace(0.25, 0.8, schema.num_classes)
    preset = {"background": 0.0, "tumour": 0.9, "white_matter": 0.5, "grey_matter": 0.7, "lateral_ventricles": 0.15}
    for k, name in enumerate(schema.names):
        levels[k] = preset.get(name, levels[k])
    levels[schema.background_index] = 0.0
    return levels[labels.astype(np.int64)]


def _window(image: np.ndarray) -> np.ndarray:
    """Image intensities scaled to [0, 1] between the 1st and 99.5th percentile of non-zero voxels."""
    values = image[np.isfinite(image) & (image != 0)]
    if values.size == 0:
        return np.zeros(image.shape, dtype=np.float32)
    lo, hi = np.percentile(values, [1.0, 99.5])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return (image != 0).astype(np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _choose_rows(days: Sequence[float], limit: int) -> list[int]:
    """Indices of at most ``limit`` predicted days, evenly spread, always including the last."""
    n = len(days)
    if n <= limit:
        return list(range(n))
    picks = np.unique(np.rint(np.linspace(0, n - 1, limit)).astype(int))
    return [int(i) for i in picks]


def overlay_montage(baseline_labels: np.ndarray, predictions: Sequence[tuple[float, np.ndarray]], geometry: Geometry,
                    schema: ClassSchema, *, image: np.ndarray | None = None, title: str = "") -> np.ndarray:
    """Contours of the baseline and predicted anatomy in three planes through the baseline tumour centre.

    Args:
        baseline_labels: baseline class labels, array order (2D or 3D).
        predictions: (day, labels) per predicted day, labels on the same grid. At most
            ``MAX_MONTAGE_ROWS - 1`` days are shown (evenly spread, the last always).
        geometry: the grid's geometry (spacing for physical proportions, direction for orientation).
        schema: class names and colours.
        image: optional FLAIR on the same grid (shown in grey); else the baseline labels in grey.
        title: line of text at the top.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    baseline_labels = np.asarray(baseline_labels)
    planes = _Planes(geometry, baseline_labels, schema.tumour_index)
    background = _window(np.asarray(image, dtype=np.float32)) if image is not None \
        else _grey_from_labels(baseline_labels, schema)
    background = planes.orient(background)
    shown = [predictions[i] for i in _choose_rows([d for d, _ in predictions], MAX_MONTAGE_ROWS - 1)]
    rows = [("DAY 0 (BASELINE)", planes.orient(baseline_labels), False)]
    rows += [(f"DAY {day:g}", planes.orient(np.asarray(labels)), True) for day, labels in shown]

    extents = [max(fn(background).shape[0] * rmm, fn(background).shape[1] * cmm) for _, fn, rmm, cmm, _ in planes.views]
    largest = max(max(extents), 1e-6)
    px_per_mm = _PANEL_PX / largest
    panel_sizes = [_resample_plane(fn(background), rmm, cmm, px_per_mm).shape for _, fn, rmm, cmm, _ in planes.views]

    gap, label_w, top, scale = 8, 130, 46, 2
    title = title or "AnatomyDT prediction"
    col_w = [w for _, w in panel_sizes]
    row_h = max(h for h, _ in panel_sizes) + 16
    width = max(label_w + sum(col_w) + gap * (len(col_w) + 1), text_size(title, scale)[0] + 2 * gap, 420)
    items = [(schema.names[k], _rgb255(schema.colors[k])) for k in range(schema.num_classes)
             if k != schema.background_index]
    items.append(("baseline tumour (dashed, on predicted rows)", _BASELINE_TUMOUR))
    legend = _legend_layout(items, width, gap)
    legend_h = (max(line for line, _, _ in legend) + 1) * 18 + 6
    height = top + row_h * len(rows) + legend_h + gap
    canvas = _Canvas(height, width)
    canvas.text(gap, 8, title, _BLACK, scale)

    x = label_w + gap
    for (name, *_), w in zip(planes.views, col_w):
        canvas.text(x + w // 2, top - 11, name, _GREY_TEXT, 1, anchor="centre")
        x += w + gap
    tumour_base = baseline_labels == schema.tumour_index
    for r, (label, labels, predicted) in enumerate(rows):
        y = top + r * row_h
        canvas.text(gap, y + row_h // 2 - 7, label, _BLACK, 1)
        x = label_w + gap
        for (name, fn, rmm, cmm, letters), (h, w) in zip(planes.views, panel_sizes):
            grey = _resample_plane(fn(background), rmm, cmm, px_per_mm)
            panel = np.repeat((np.clip(grey, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
            lab = _resample_plane(fn(labels), rmm, cmm, px_per_mm)
            for k in range(schema.num_classes):
                if k == schema.background_index:
                    continue
                panel[_contour(lab == k)] = _rgb255(schema.colors[k])
            if predicted:  # dashed, so a predicted contour on the same pixels still shows between the dashes
                base = _contour(_resample_plane(fn(planes.orient(tumour_base)), rmm, cmm, px_per_mm))
                rr, cc = np.indices(base.shape)
                panel[base & (((rr + cc) // 3) % 2 == 0)] = _BASELINE_TUMOUR
            canvas.blit(y, x, panel)
            if letters is not None:
                canvas.text(x + 2, y + 2, letters[0], (200, 200, 200), 1)
                canvas.text(x + w - 2, y + 2, letters[1], (200, 200, 200), 1, anchor="right")
            x += w + gap

    # Legend: class colours, then the baseline tumour contour (wrapped onto several lines if needed).
    for line, x, (name, color) in legend:
        y = height - legend_h - gap + 6 + line * 18
        canvas.fill(y + 2, x, y + 12, x + 16, color)
        canvas.line(x, y + 2, x + 15, y + 2, _GREY_TEXT)
        canvas.line(x, y + 11, x + 15, y + 11, _GREY_TEXT)
        canvas.text(x + 22, y + 4, name, _BLACK, 1)
    return canvas.rgb


def _legend_layout(items, width: int, gap: int) -> list[tuple[int, int, tuple]]:
    """(line, x, item) for each legend item, wrapping before an item that would cross the right edge."""
    layout, line, x = [], 0, gap
    for item in items:
        item_w = 22 + text_size(item[0])[0]
        if x > gap and x + item_w > width - gap:
            line, x = line + 1, gap
        layout.append((line, x, item))
        x += item_w + 18
    return layout


# ----------------------------------------------------------------------------------------------
# Volume chart
# ----------------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(target - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-6:
        if t >= lo - step * 1e-6:
            ticks.append(round(t, 10))
        t += step
    return ticks


def _tick_label(value: float, step: float) -> str:
    """``value`` with as many decimals as the tick step needs (at most 4)."""
    decimals = next((d for d in range(5) if abs(round(step, d) - step) <= 1e-9 * max(1.0, abs(step))), 4)
    return f"{value:.{decimals}f}"


def volume_chart(rows: Sequence[tuple[float, dict]], schema: ClassSchema, *, title: str = "") -> np.ndarray:
    """Volume (mL) against day, one panel per non-background class.

    Args:
        rows: (day, {class name: volume in mL}) per time point, day 0 = baseline.
        schema: class names and colours.
        title: line of text at the top.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    classes = [k for k in range(schema.num_classes) if k != schema.background_index]
    days = np.array([float(d) for d, _ in rows])
    n_cols = 2 if len(classes) > 1 else 1
    n_rows = math.ceil(len(classes) / n_cols)
    panel_w, panel_h = 360, 220
    margin_l, margin_r, margin_t, margin_b = 64, 16, 26, 40
    top = 34
    width = n_cols * (panel_w + margin_l + margin_r)
    height = top + n_rows * (panel_h + margin_t + margin_b)
    canvas = _Canvas(height, width)
    canvas.text(10, 8, title or "Predicted volumes", _BLACK, 2)
    x_ticks = nice_ticks(0.0, float(days.max()) if days.size and days.max() > 0 else 1.0, 6)
    x_hi = max(x_ticks[-1], float(days.max()) if days.size else 1.0)
    for n, k in enumerate(classes):
        name = schema.names[k]
        values = np.array([float(v.get(name, 0.0)) for _, v in rows])
        ox = (n % n_cols) * (panel_w + margin_l + margin_r) + margin_l
        oy = top + (n // n_cols) * (panel_h + margin_t + margin_b) + margin_t
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        pad = max(0.08 * (hi - lo), 0.02 * max(abs(hi), 1e-3), 1e-3)
        lo, hi = max(lo - pad, 0.0), hi + pad
        y_ticks = [t for t in nice_ticks(lo, hi, 5)] or [lo]
        lo, hi = min(lo, y_ticks[0]), max(hi, y_ticks[-1])
        y_step = (y_ticks[1] - y_ticks[0]) if len(y_ticks) > 1 else max(hi - lo, 1.0)
        x_step = (x_ticks[1] - x_ticks[0]) if len(x_ticks) > 1 else x_hi

        def px(day: float) -> float:
            return ox + day / x_hi * (panel_w - 1)

        def py(vol: float) -> float:
            return oy + panel_h - 1 - (vol - lo) / (hi - lo) * (panel_h - 1)

        ink = _ink(schema.colors[k])
        canvas.text(ox + panel_w // 2, oy - 18, f"{name} (mL)", ink, 1, anchor="centre")
        for t in y_ticks:
            canvas.line(ox, py(t), ox + panel_w - 1, py(t), (232, 232, 232))
            canvas.text(ox - 6, int(py(t)) - 3, _tick_label(t, y_step), _GREY_TEXT, 1, anchor="right")
        for t in x_ticks:
            canvas.line(px(t), oy + panel_h - 1, px(t), oy + panel_h + 3, _GREY_TEXT)
            canvas.text(int(px(t)), oy + panel_h + 7, _tick_label(t, x_step), _GREY_TEXT, 1, anchor="centre")
        canvas.line(ox, oy, ox, oy + panel_h - 1, _GREY_TEXT)
        canvas.line(ox, oy + panel_h - 1, ox + panel_w - 1, oy + panel_h - 1, _GREY_TEXT)
        canvas.text(ox + panel_w // 2, oy + panel_h + 20, "days from baseline", _GREY_TEXT, 1, anchor="centre")
        order = np.argsort(days, kind="stable")
        points = [(px(days[i]), py(values[i])) for i in order]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            canvas.line(x0, y0, x1, y1, ink, width=2)
        for x0, y0 in points:
            canvas.fill(int(round(y0)) - 3, int(round(x0)) - 3, int(round(y0)) + 4, int(round(x0)) + 4, ink)
    return canvas.rgb
