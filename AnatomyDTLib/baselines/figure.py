"""Qualitative figure: ground-truth vs predicted contours per method (as the paper's Figure 4).

Rows are test cases, columns the baseline (day 0), the follow-up (truth) and one forecast per
method. Every forecast panel shows the forecast labels faintly, the true follow-up class
boundaries in red and the forecast ones in green, and the case's overall DSC in its title.
2D data only (3D: the middle slice of the first axis).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import LABELS


def _slice(labels: np.ndarray) -> np.ndarray:
    return labels if labels.ndim == 2 else labels[labels.shape[0] // 2]


def _contours(ax, labels: np.ndarray, classes, color: str, width: float) -> None:
    for k in classes:
        mask = (labels == k).astype(float)
        if 0 < mask.sum() < mask.size:
            ax.contour(mask, levels=[0.5], colors=color, linewidths=width)


def pick_cases(cases, count: int = 3) -> list:
    """Deterministic, varied cases: the largest tumour growth, the largest shrinkage, the median change."""
    if len(cases) <= count:
        return list(cases)

    def change(c):
        n0 = int((c.labels_t0 == 1).sum())
        return (int((c.labels_t1 == 1).sum()) + 1) / (n0 + 1)

    ordered = sorted(cases, key=change)
    chosen = [ordered[-1], ordered[0], ordered[len(ordered) // 2]]
    out = []
    for c in chosen + ordered:
        if c not in out:
            out.append(c)
    return out[:count]


def qualitative_figure(path, cases, predictions: dict[str, dict[str, np.ndarray]], dice: dict[str, dict[str, float]],
                       background_index: int = 0, num_classes: int | None = None) -> Path:
    """Write the figure; ``predictions[method][case name]`` are label maps, ``dice`` the overall DSC (0–1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    methods = [m for m in predictions if all(c.name in predictions[m] for c in cases)]
    k = num_classes or int(max(max(c.labels_t0.max(), c.labels_t1.max()) for c in cases)) + 1
    classes = [c for c in range(k) if c != background_index]
    palette = ListedColormap([(1, 1, 1), (0.85, 0.3, 0.3), (0.55, 0.7, 0.9), (0.7, 0.85, 0.6), (0.95, 0.85, 0.55),
                              (0.8, 0.7, 0.9), (0.6, 0.85, 0.85), (0.9, 0.7, 0.8)][:max(k, 2)])
    cols = 2 + len(methods)
    fig, axes = plt.subplots(len(cases), cols, figsize=(2.3 * cols, 2.4 * len(cases)), dpi=110, squeeze=False)
    for row, case in enumerate(cases):
        t0, t1 = _slice(case.labels_t0), _slice(case.labels_t1)
        tr = case.treatment
        dose = float(tr.get("dose_gy", 0.0))
        axes[row, 0].imshow(t0, cmap=palette, vmin=0, vmax=palette.N - 1, interpolation="nearest")
        axes[row, 0].set_title(f"{case.name} day 0\n{'%g Gy' % dose if dose else 'untreated'}", fontsize=7)
        axes[row, 1].imshow(t1, cmap=palette, vmin=0, vmax=palette.N - 1, interpolation="nearest")
        _contours(axes[row, 1], t1, classes, "red", 0.8)
        axes[row, 1].set_title(f"truth day {case.interval_days:g}", fontsize=7)
        for col, m in enumerate(methods, start=2):
            pred = _slice(predictions[m][case.name])
            ax = axes[row, col]
            ax.imshow(pred, cmap=palette, vmin=0, vmax=palette.N - 1, alpha=0.45, interpolation="nearest")
            _contours(ax, t1, classes, "red", 0.8)
            _contours(ax, pred, classes, "green", 0.8)
            d = dice.get(m, {}).get(case.name, math.nan)
            ax.set_title(f"{LABELS.get(m, m)}\nDSC {100 * d:.1f} %", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("truth (red) vs forecast (green) class boundaries", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
