"""Render example cases of the synthetic datasets into ``docs/figures/synthetic_examples.png``.

Three Voronoi and three Vessel cases (2D, 128 x 128 pixels) are shown as t0 labels, t1 labels
and the change between them. Run from the repository root::

    python docs/figures/make_synthetic_examples.py [--out PATH] [--seed 7] [--size 128]

Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from AnatomyDTLib.datasets import case_rng, class_names, generate_case  # noqa: E402

#: Colours per label (background, tumour, then tissue classes; vessel is label 2 in 'vessel').
VORONOI_COLOURS = ["#000000", "#e41a1c", "#8da0cb", "#a6d854", "#ffd92f", "#e78ac3", "#66c2a5", "#fc8d62",
                   "#b3b3b3", "#e5c494"]
VESSEL_COLOURS = ["#000000", "#e41a1c", "#f0f0f0", "#8da0cb", "#a6d854", "#ffd92f", "#e78ac3", "#66c2a5",
                  "#fc8d62", "#b3b3b3"]

#: Treatment of the three example rows of each kind (overrides the sampled treatment; the
#: t0 anatomy does not depend on it).
SCENARIOS = [
    {"treated": 0, "interval_days": 90},
    {"treated": 0, "interval_days": 120},
    {"treated": 1, "dose_gy": 60, "interval_days": 90},
]


def _rgb(labels, colours):
    from matplotlib.colors import to_rgb

    table = np.array([to_rgb(c) for c in colours])
    return table[labels]


def _difference_rgb(t0, t1):
    """Grey where unchanged tissue, red tumour gained, blue tumour lost, yellow tissue relabelled."""
    img = np.where((t0 > 0)[..., None], 0.25, 0.0) * np.ones(t0.shape + (3,))
    img[(t0 != 1) & (t1 == 1)] = (0.9, 0.1, 0.1)
    img[(t0 == 1) & (t1 != 1)] = (0.2, 0.4, 1.0)
    tissue_change = (t0 != t1) & (t0 != 1) & (t1 != 1)
    img[tissue_change] = (1.0, 0.85, 0.1)
    img[(t0 == 1) & (t1 == 1)] = (0.55, 0.1, 0.1)
    return img


def _title(case):
    t = case["treatment"]
    m = case["meta"]
    treat = f"RT {t['dose_gy']:.0f} Gy" if t["treated"] else "untreated"
    return f"{treat}, {t['interval_days']:.0f} d, tumour x{m['tumour_voxels_t1'] / max(m['tumour_voxels_t0'], 1):.2f}"


def render(out: Path, seed: int, size: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(kind, i) for kind in ("voronoi", "vessel") for i in range(len(SCENARIOS))]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)))
    for r, (kind, i) in enumerate(rows):
        case = generate_case(kind, size, case_rng(seed, i), treatment=SCENARIOS[i])
        colours = VORONOI_COLOURS if kind == "voronoi" else VESSEL_COLOURS
        panels = [_rgb(case["labels_t0"], colours), _rgb(case["labels_t1"], colours),
                  _difference_rgb(case["labels_t0"], case["labels_t1"])]
        names = ["t0", "t1", "change"]
        for c, (img, name) in enumerate(zip(panels, names)):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{kind} {i}: {name}" if c < 2 else _title(case), fontsize=8)
    fig.text(0.5, 0.005,
             "classes: " + ", ".join(class_names("voronoi")) + " | " + ", ".join(class_names("vessel"))
             + "\nchange: red tumour gained, dark red tumour kept, blue tumour lost, yellow tissue displaced"
             " (or vessel thickened)", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.025, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("synthetic_examples.png"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    print(render(args.out, args.seed, args.size))


if __name__ == "__main__":
    main()
