"""How well could *any* forecast do on the calibration benchmark's hard cases, given what the scans show?

The calibration target of the digital-twin issue is a tumour DSC >= 0.80 on the held-out phantom
patients where "no change" scores <= 0.65 (the hard cases of ``calibration_phantom.py``). Almost all
of them are lesions that shrink after radiotherapy: the question a forecast must answer is which
part of the last scan's lesion is still visible at the next scan. This script measures how much
of that answer is in the information a forecast has, independently of any model:

* **confined ceiling**: the best DSC of any forecast that keeps a subset of the last scan's lesion
  (2·|A∩B| / (|A∩B| + |B|), A = last lesion, B = the scan forecast): what a perfect shrinkage model
  could reach; it is < 1 only where the lesion grows or moves out of A.
* **volume oracle + one cue**: a forecast that is told the true volume |B| and keeps the |B| voxels
  of A that rank highest on one observable cue. The cues: the depth inside the last lesion (mm;
  what a restart from the last labels codes as density), the signed depth in the first scan's
  lesion (the oldest, densest part at the start of radiotherapy, where a hypoxic core would
  survive), the mean signed depth over the history's scans, the last FLAIR (Gaussian-smoothed,
  σ 1 voxel, divided by the white-matter median), and the negated planned dose (Gy). Scores
  of cues are z-normalised over A; ties break by voxel order.
* **volume oracle + in-sample logistic**: the same, ranking by a logistic regression of "still
  tumour at B" on all cues *fitted to B itself*: an optimistic bound for any voxel-wise predictor
  built from these cues, because no forecast can fit to the answer.

None of these is a method; a forecast has to find the volume too. If even the oracles stay below
the target, the target is beyond the information in the scans (for this phantom), whatever the
model. Optionally ``--calibrated RUN/per_patient.csv`` adds the calibrated forecast's own DSC per
case (from ``calibration_phantom.py`` with the same ``--history-scans``).

    python benchmarks/calibration_ceiling.py --cohort /tmp/brain/cohort_test --history-scans 2 \\
        --calibrated docs/results/calibration_carried/per_patient.csv --out ceiling_two_scans

Writes ``per_case.csv`` and ``summary.md`` into ``--out`` (refuses an existing folder without
``--force``) and prints the summary. Runs in about 15 s.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import minimize

from AnatomyDTLib.brain.cohort import load_cohort
from AnatomyDTLib.calibration import load_plan_on_grid
from AnatomyDTLib.io import read_image_on_grid, read_labelmap
from AnatomyDTLib.metrics import dice
from AnatomyDTLib.schema import BRAIN_SCHEMA

TUMOUR = BRAIN_SCHEMA.tumour_index
WHITE_MATTER = BRAIN_SCHEMA.index("white_matter")
HARD_CASE_NO_CHANGE_DICE = 0.65   # as calibration_phantom.py
TARGET_DICE = 0.80
CUES = ("last_depth", "first_depth", "history_depth", "flair", "low_dose")
CUE_LABELS = {"last_depth": "depth in the last lesion", "first_depth": "signed depth in the first scan's lesion",
              "history_depth": "mean signed depth over the history", "flair": "last FLAIR (smoothed)",
              "low_dose": "lower planned dose"}


def signed_depth_mm(mask: np.ndarray, spacing_zyx) -> np.ndarray:
    """Distance (mm) to the mask's boundary: positive inside, negative outside."""
    if not mask.any():
        return np.full(mask.shape, -1e3, dtype=np.float64)
    return (ndi.distance_transform_edt(mask, sampling=spacing_zyx)
            - ndi.distance_transform_edt(~mask, sampling=spacing_zyx))


def keep_top(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean selection of the ``count`` highest scores (ties: the earlier voxel first)."""
    order = np.lexsort((np.arange(scores.size), -scores))
    chosen = np.zeros(scores.size, dtype=bool)
    chosen[order[:count]] = True
    return chosen


def zscore(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def in_sample_logistic(features: np.ndarray, outcome: np.ndarray) -> np.ndarray:
    """Scores of a (lightly L2-regularised) logistic regression of ``outcome`` on ``features``,
    fitted to the same voxels it scores."""
    design = np.column_stack([features, np.ones(len(features))])

    def loss(w):
        z = design @ w
        return (np.logaddexp(0.0, z).sum() - (outcome * z).sum() + 1e-3 * (w @ w),
                design.T @ (1.0 / (1.0 + np.exp(-z)) - outcome) + 2e-3 * w)

    weights = minimize(loss, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B").x
    return design @ weights


def cue_maps(patient, history_scans: int, labels: list[np.ndarray], geometry) -> dict[str, np.ndarray | None]:
    """Full-grid maps of every cue on the last history scan's grid (None = not available)."""
    spacing = geometry.spacing_array_order
    last = labels[history_scans - 1] == TUMOUR
    flair = read_image_on_grid(patient.timepoints[history_scans - 1].image, geometry, labels[0].shape)
    white = labels[history_scans - 1] == WHITE_MATTER
    reference = float(np.median(flair[white])) if white.any() else float(np.median(flair))
    maps = {"last_depth": signed_depth_mm(last, spacing),
            "first_depth": signed_depth_mm(labels[0] == TUMOUR, spacing),
            "history_depth": np.mean([signed_depth_mm(l == TUMOUR, spacing) for l in labels[:history_scans]], axis=0),
            "flair": ndi.gaussian_filter(flair.astype(np.float64), 1.0) / (reference or 1.0),
            "low_dose": None}
    if patient.plan is not None:
        radiotherapy = load_plan_on_grid(str(patient.plan), geometry, labels[0].shape).radiotherapy
        if radiotherapy is not None and isinstance(radiotherapy.dose_map, np.ndarray):
            maps["low_dose"] = -radiotherapy.dose_map.astype(np.float64)
    return maps


def evaluate_case(patient, history_scans: int) -> dict | None:
    """The ceilings of one patient, or None when it is not a hard case (or not eligible)."""
    needed = history_scans + 1
    if len(patient.timepoints) < needed:
        return None
    volumes = [read_labelmap(t.segmentation, BRAIN_SCHEMA) for t in patient.timepoints[:needed]]
    labels = [v.labels for v in volumes]
    if any(l.shape != labels[0].shape for l in labels):
        raise SystemExit(f"{patient.case}: its scans are on different grids; this analysis needs one grid")
    if not all((l == TUMOUR).any() for l in labels):
        return None
    last, target = labels[history_scans - 1] == TUMOUR, labels[history_scans] == TUMOUR
    no_change = float(dice(last, target))
    if no_change > HARD_CASE_NO_CHANGE_DICE:
        return None
    geometry = volumes[history_scans - 1].geometry
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    overlap = int((last & target).sum())
    row = {"case": patient.case,
           "days": "/".join(f"{t.day:g}" for t in patient.timepoints[:needed]),
           "last_ml": round(float(last.sum()) * voxel_ml, 3), "target_ml": round(float(target.sum()) * voxel_ml, 3),
           "target_inside_last": round(overlap / int(target.sum()), 3),
           "no_change_dice": no_change,
           "confined_ceiling_dice": 2.0 * overlap / (overlap + int(target.sum()))}
    maps = cue_maps(patient, history_scans, labels, geometry)
    outcome = target[last]
    count = min(int(target.sum()), int(last.sum()))
    features = []
    for cue in CUES:
        if maps[cue] is None:
            row[f"{cue}_dice"] = math.nan
            continue
        score = zscore(maps[cue][last])
        features.append(score)
        kept = np.zeros_like(last)
        kept[last] = keep_top(score, count)
        row[f"{cue}_dice"] = float(dice(kept, target))
    kept = np.zeros_like(last)
    if outcome.all() or not outcome.any():
        kept[last] = outcome
    else:
        kept[last] = keep_top(in_sample_logistic(np.column_stack(features), outcome.astype(np.float64)), count)
    row["in_sample_logistic_dice"] = float(dice(kept, target))
    return row


def summarise(rows: list[dict], history_scans: int, calibrated: dict[str, float]) -> str:
    columns = [("no change", "no_change_dice")]
    if calibrated:
        columns.append(("calibrated forecast (its run)", "calibrated_dice"))
    columns += [("confined ceiling (perfect shrinkage, any model)", "confined_ceiling_dice")]
    columns += [(f"volume oracle + {CUE_LABELS[c]}", f"{c}_dice") for c in CUES]
    columns += [("volume oracle + in-sample logistic on all cues", "in_sample_logistic_dice")]
    lines = [f"Hard cases (no change <= {HARD_CASE_NO_CHANGE_DICE}) of the calibration benchmark, history scans "
             f"0-{history_scans - 1}, forecast of scan {history_scans}: {len(rows)} cases.", "",
             f"| forecast | tumour DSC mean | median | >= {TARGET_DICE:.2f} |", "|---|---|---|---|"]
    for label, key in columns:
        values = [r[key] for r in rows if not math.isnan(r.get(key, math.nan))]
        if not values:
            continue
        lines.append(f"| {label} | {np.mean(values):.3f} | {np.median(values):.3f} | "
                     f"{sum(v >= TARGET_DICE for v in values)} of {len(values)} |")
    return "\n".join(lines)


def read_calibrated(path: Path | None) -> dict[str, float]:
    if path is None:
        return {}
    with open(path) as fh:
        return {r["case"]: float(r["calibrated_dice"]) for r in csv.DictReader(fh) if r.get("calibrated_dice")}


def write_outputs(out: Path, rows: list[dict], summary: str, force: bool,
                  script: str = "benchmarks/calibration_ceiling.py", arguments: list[str] | None = None) -> None:
    """per_case.csv and summary.md, written to a temporary folder that replaces ``out`` at the end;
    the summary ends with the command (``script`` and ``arguments``, by default this process's)."""
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))  # same file system: rename works
    keys = list(rows[0]) if rows else ["case"]
    with open(staging / "per_case.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    command = f"python {script} " + " ".join(sys.argv[1:] if arguments is None else arguments)
    (staging / "summary.md").write_text(f"{summary}\n\nCommand: `{command}`\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", type=Path, required=True, help="phantom cohort folder (manifest.csv)")
    parser.add_argument("--history-scans", type=int, default=2,
                        help="scans in the history (2: scans 0-1 -> scan 2, the issue's protocol)")
    parser.add_argument("--patients", type=int, default=40, help="look at the first N patients of the cohort")
    parser.add_argument("--calibrated", type=Path, help="per_patient.csv of a calibration_phantom.py run to compare")
    parser.add_argument("--out", type=Path, help="folder for per_case.csv and summary.md")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.history_scans < 1:
        parser.error("--history-scans must be at least 1")
    calibrated = read_calibrated(args.calibrated)
    rows = []
    for patient in load_cohort(args.cohort)[:args.patients]:
        row = evaluate_case(patient, args.history_scans)
        if row is None:
            continue
        if calibrated:
            row["calibrated_dice"] = calibrated.get(patient.case, math.nan)
        rows.append(row)
        print(f"{row['case']} days {row['days']:>11}: {row['last_ml']:6.2f} -> {row['target_ml']:6.2f} mL; DSC no change "
              f"{row['no_change_dice']:.2f}, confined ceiling {row['confined_ceiling_dice']:.2f}, oracle + first-scan "
              f"depth {row['first_depth_dice']:.2f}, + in-sample logistic {row['in_sample_logistic_dice']:.2f}",
              flush=True)
    summary = summarise(rows, args.history_scans, calibrated)
    print()
    print(summary)
    if args.out is not None:
        write_outputs(args.out, rows, summary, args.force)
        print(f"\nwrote {args.out}/per_case.csv and summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
