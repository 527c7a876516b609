"""Render ``docs/figures/brain_cohort_montage.png``: synthetic phantom patients over time.

One row per patient (a different treatment pattern each), one column per scan: the FLAIR-like
image on the axial slice through the baseline tumour centre (radiological view: anterior up,
patient right on the left), with contours of the tumour (red) and lateral ventricles (blue), the
day and tumour volume (mL), and the resection-cavity volume when there is one.
Run from the repository root (needs matplotlib)::

    python docs/figures/make_brain_cohort_montage.py [--seed 3] [--out docs/figures/brain_cohort_montage.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from AnatomyDTLib.brain.phantom import case_rng, simulate_patient  # noqa: E402
from AnatomyDTLib.schema import BRAIN_SCHEMA  # noqa: E402

ROWS = [("none", 0), ("rt_only", 1), ("stupp", 2), ("surgery_stupp", 3)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("brain_cohort_montage.png")))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patients = [(pattern, simulate_patient(case_rng(args.seed, i), pattern=pattern)) for pattern, i in ROWS]
    ncols = max(len(p.scans) for _, p in patients)
    fig, axes = plt.subplots(len(patients), ncols, figsize=(2.3 * ncols, 2.6 * len(patients)),
                             facecolor="black", squeeze=False)
    tumour, vent = BRAIN_SCHEMA.tumour_index, BRAIN_SCHEMA.index("lateral_ventricles")
    for row, (pattern, patient) in enumerate(patients):
        base = patient.scans[0].labels == tumour
        z = int(round(np.argwhere(base)[:, 0].mean())) if base.any() else patient.site_index[0]
        for col in range(ncols):
            ax = axes[row, col]
            ax.set_axis_off()
            if col >= len(patient.scans):
                continue
            scan = patient.scans[col]
            # the atlas grid's rows run posterior -> anterior and its columns patient left -> right;
            # flip both for the radiological view (anterior up, patient right on the image's left)
            ys, xs = np.nonzero(patient.scans[0].flair[z] > 0)
            crop = (slice(ys.max() + 2, max(ys.min() - 3, 0), -1), slice(xs.max() + 2, max(xs.min() - 3, 0), -1))
            img = scan.flair[z][crop]
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.3, interpolation="bilinear")
            lab = scan.labels[z][crop]
            for mask, colour in ((lab == tumour, "#ff3b30"), (lab == vent, "#34aadc")):
                if mask.any():
                    ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)
            if scan.cavity_ml > 0:
                ax.text(0.03, 0.03, f"cavity {scan.cavity_ml:.0f} mL", color="#ffd60a", fontsize=7,
                        transform=ax.transAxes)
            ax.set_title(f"day {scan.day:g}: {scan.tumour_ml:.1f} mL", color="white", fontsize=8)
            if col == 0:
                ax.text(-0.04, 0.5, pattern.replace("_", " + "), color="white", fontsize=9, rotation=90,
                        va="center", ha="right", transform=ax.transAxes)
    fig.suptitle("Synthetic phantom patients on the MNI152 atlas (FLAIR-like image; red tumour, blue ventricles)",
                 color="white", fontsize=10)
    fig.tight_layout(rect=(0.02, 0, 1, 0.97))
    fig.savefig(args.out, dpi=110, facecolor="black")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
