"""Held-out accuracy of brain forecast models on phantom patients: the numbers of the model card.

For every held-out patient the baseline scan (time point 0) and its treatment plan go through
:func:`AnatomyDTLib.predict.predict` — exactly what ``anatomydt predict`` runs — with each model,
to every follow-up day; each prediction is scored against that follow-up scan. Models:

* the trained model (``--model``, default: the bundled ``Resources/Models/anatomydt_default.pt``);
* ``pde-only``: the mechanistic model with literature parameters;
* ``no-change``: the baseline itself as the prediction.

Metrics per class (tumour, white matter, grey matter, lateral ventricles): Dice and HD95 (mm,
``AnatomyDTLib.metrics``; a class present in only one of the two maps gets HD95 = the image
diagonal). Horizons are binned by follow-up day. Reported: mean Dice and median HD95 per model,
class and horizon bin, plus the tumour-volume error.

    anatomydt make-dataset brain --n 40 --seed 7 --out heldout      # patients never used in training
    python benchmarks/brain_default_model.py --cohort heldout --out results_brain [--model RUN/best.pt]

Writes ``per_scan.csv`` and ``summary.md`` into ``--out`` and prints the summary.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from AnatomyDTLib.brain.cohort import load_cohort
from AnatomyDTLib.commands._common import plan_array_loader
from AnatomyDTLib.io import read_labelmap
from AnatomyDTLib.metrics import dice, hd95, image_diagonal_mm
from AnatomyDTLib.predict import bundled_model_path, load_model, predict
from AnatomyDTLib.schema import BRAIN_SCHEMA
from AnatomyDTLib.state import AnatomyState, labels_to_field

CLASSES = ("tumour", "white_matter", "grey_matter", "lateral_ventricles")
HORIZON_BINS = ((0, 60), (60, 120), (120, 10_000))


def horizon_label(day: float) -> str:
    for lo, hi in HORIZON_BINS:
        if lo < day <= hi:
            return f"{lo}-{hi} d" if hi < 10_000 else f">{lo} d"
    return "?"


def score(pred: np.ndarray, truth: np.ndarray, spacing, diagonal: float) -> dict:
    row = {}
    for name in CLASSES:
        k = BRAIN_SCHEMA.index(name)
        a, b = pred == k, truth == k
        row[f"dice_{name}"] = float(dice(a, b))
        row[f"hd95_{name}"] = float(hd95(a, b, spacing, empty_value=diagonal))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    k = BRAIN_SCHEMA.tumour_index
    row["tumour_ml_pred"] = float((pred == k).sum()) * voxel_ml
    row["tumour_ml_true"] = float((truth == k).sum()) * voxel_ml
    return row


def evaluate(cohort: Path, model_path: str, max_patients: int, threads: int, start: int = 0, log=print) -> list[dict]:
    torch.set_num_threads(threads)
    models = {"anatomy-dt": load_model(model_path), "pde-only": load_model("pde-only")}
    rows = []
    patients = load_cohort(cohort)[start:]
    patients = patients[: max_patients or None]
    for i, patient in enumerate(patients):
        points = [tp for tp in patient.timepoints if tp.day_known]
        base = read_labelmap(points[0].segmentation)
        labels0 = np.asarray(base.labels).astype(np.int64)
        spacing = base.geometry.spacing_array_order
        diagonal = image_diagonal_mm(labels0.shape, spacing)
        plan = patient.load_plan(BRAIN_SCHEMA).with_loaded_arrays(plan_array_loader(base.geometry, labels0.shape),
                                                                  grid_shape=labels0.shape)
        follow = [(float(tp.day - points[0].day), np.asarray(read_labelmap(tp.segmentation).labels)) for tp in points[1:]]
        days = [d for d, _ in follow]
        state = AnatomyState(labels_to_field(labels0, len(BRAIN_SCHEMA.names)), base.geometry, BRAIN_SCHEMA)
        predictions = {"no-change": [labels0] * len(days)}
        seconds = {}
        for name, model in models.items():
            tic = time.perf_counter()
            result = predict(state, days=days, plan=plan, model=model)
            seconds[name] = time.perf_counter() - tic
            predictions[name] = [result.labels(j) for j in range(len(days))]
        pattern = "none" if plan.is_empty() else "+".join(
            x for x, on in (("surgery", plan.surgeries), ("rt", plan.radiotherapy is not None), ("chemo", plan.chemotherapy))
            if on)
        for j, (day, truth) in enumerate(follow):
            for name, preds in predictions.items():
                row = {"patient": patient.case, "treatment": pattern, "day": day, "horizon": horizon_label(day),
                       "model": name, "seconds": round(seconds.get(name, 0.0), 2)}
                row.update(score(preds[j], truth, spacing, diagonal))
                rows.append(row)
        log(f"[{i + 1}/{len(patients)}] {patient.case} ({pattern}, days {days}): "
            + ", ".join(f"{m} tumour Dice {np.mean([r['dice_tumour'] for r in rows if r['patient'] == patient.case and r['model'] == m]):.3f}"
                        for m in ("anatomy-dt", "pde-only", "no-change")))
    return rows


def summarise(rows: list[dict]) -> str:
    models = ("anatomy-dt", "pde-only", "no-change")
    horizons = [horizon_label(hi if hi < 10_000 else lo + 1) for lo, hi in HORIZON_BINS]
    lines = [f"{len({r['patient'] for r in rows})} held-out patients, {len(rows) // len(models)} follow-up scans; "
             "Dice: mean, HD95: median (mm)", ""]
    for metric, agg, unit in (("dice", np.mean, ""), ("hd95", np.median, " mm")):
        lines += [f"### {'Dice' if metric == 'dice' else 'HD95'} by class and horizon", "",
                  "| class | horizon | scans | " + " | ".join(models) + " |", "|---" * (3 + len(models)) + "|"]
        for name in CLASSES:
            for h in horizons + ["all"]:
                sel = [r for r in rows if h == "all" or r["horizon"] == h]
                n = len(sel) // len(models)
                if not n:
                    continue
                cells = []
                for m in models:
                    vals = [r[f"{metric}_{name}"] for r in sel if r["model"] == m]
                    cells.append(f"{agg(vals):.3f}" if metric == "dice" else f"{agg(vals):.1f}")
                lines.append(f"| {name} | {h} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Tumour volume", "", "| model | median abs. error (mL) | median rel. error |", "|---|---|---|"]
    for m in models:
        err = [abs(r["tumour_ml_pred"] - r["tumour_ml_true"]) for r in rows if r["model"] == m]
        rel = [abs(r["tumour_ml_pred"] - r["tumour_ml_true"]) / max(r["tumour_ml_true"], 0.1) for r in rows if r["model"] == m]
        lines.append(f"| {m} | {np.median(err):.1f} | {100 * np.median(rel):.0f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", required=True, help="held-out phantom cohort (anatomydt make-dataset brain)")
    ap.add_argument("--model", default=str(bundled_model_path()), help="weights file (default: the bundled model)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--max-patients", type=int, default=0, help="score only the first N patients (0 = all)")
    ap.add_argument("--start", type=int, default=0, help="skip the first N patients (to split a run; see --merge)")
    ap.add_argument("--merge", nargs="*", default=[], help="per_scan.csv files of earlier parts to include in the summary")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    rows = []
    for part in args.merge:  # earlier parts of a split run (same cohort and model)
        with open(part, newline="") as fh:
            rows += [{k: (v if k in ("patient", "treatment", "horizon", "model") else float(v)) for k, v in r.items()}
                     for r in csv.DictReader(fh)]
    rows += evaluate(Path(args.cohort), args.model, args.max_patients, args.threads, args.start)
    with open(out / "per_scan.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = (f"# Held-out phantom evaluation\n\n- cohort: `{args.cohort}`; model: `{args.model}`\n"
            f"- machine: {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}; "
            f"wall time {time.perf_counter() - tic:.0f} s\n\n" + summarise(rows))
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
