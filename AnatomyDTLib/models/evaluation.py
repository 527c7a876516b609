"""K-fold cross-validated evaluation (``anatomydt evaluate``): train on K-1 folds, test on the K-th.

For every fold k the model is trained (:func:`AnatomyDTLib.models.training.train`, run directory
``OUT/fold_k``) on the other folds, its best-validation checkpoint forecasts every test case at
full resolution from the baseline to the follow-up day, and the argmax labels are compared with
the follow-up labels by :func:`AnatomyDTLib.metrics.evaluate_labels` (Dice, HD95 in mm with the
data's spacing — pixels for the synthetic sets, which have 1 mm spacing — and hard clDice).

Conventions (written into the report):

* **overall** = mean over the foreground classes (every class except the background/outside
  class, which is fixed by construction in the synthetic sets and would inflate the scores);
* a class absent from both prediction and truth scores Dice 1, HD95 0, clDice 1; a class present
  in exactly one of them gets HD95 = the image diagonal (a finite worst case);
* per fold, metrics are averaged over that fold's test cases; the report gives the mean ± sample
  standard deviation (ddof = 1) of the K fold means, as the paper's "5-fold, μ ± σ";
* the *identity* baseline (follow-up = baseline) is scored on the same test cases for reference.

Files in ``OUT``: ``fold_k/`` (training runs and ``test_cases.csv``), ``per_case.csv``,
``summary.csv`` and ``summary.md``.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, OutputExistsError, ParameterError
from ..metrics import evaluate_labels, image_diagonal_mm
from ..state import labels_to_field
from .checkpoint import load_checkpoint
from .config import Config
from .data import Case, DatasetInfo, fold_assignment, load_cases
from .training import init_distributed, train

METRICS = ("dice", "hd95", "cldice")
MODELS = ("anatomy-dt", "identity")


def case_row(fold: int, case: Case, model: str, result: dict, names: list[str], foreground: list[int],
             seconds: float) -> dict:
    """One per-case results row: identity, treatment, wall time and every metric of ``result``."""
    row = {"fold": fold, "case": case.name, "model": model, "interval_days": case.interval_days,
           "treated": case.treatment.get("treated", ""), "dose_gy": case.treatment.get("dose_gy", ""),
           "seconds": round(seconds, 4)}
    for metric in METRICS:
        values = result[metric]
        for k, name in enumerate(names):
            row[f"{metric}_{name}"] = values[k]
        row[f"{metric}_overall"] = float(np.mean([values[k] for k in foreground]))
    return row


def per_case_columns(names: list[str]) -> list[str]:
    """Columns of a per-case results CSV: case identity, then every metric per class and overall."""
    cols = ["fold", "case", "model", "interval_days", "treated", "dose_gy", "seconds"]
    for metric in METRICS:
        cols += [f"{metric}_{n}" for n in names] + [f"{metric}_overall"]
    return cols


def predict_case(forecaster, case: Case, info: DatasetInfo, cfg: Config) -> np.ndarray:
    """Argmax labels forecast for one case at its follow-up day (whole image)."""
    k = len(info.class_names)
    soften = float(cfg.data["soften_px"]) * min(case.spacing)
    p0 = labels_to_field(case.labels_t0, k, soften_mm=soften, spacing=case.spacing if soften > 0 else None)
    mask = (case.labels_t0 != info.background_index) if cfg.data["body_mask"] else None
    field = forecaster.forecast(p0, spacing=case.spacing, days=[case.interval_days], treatment=case.treatment,
                                mask=mask)
    return field[-1].argmax(0).cpu().numpy()


def score_fold(checkpoint, test_cases: list[Case], info: DatasetInfo, cfg: Config, fold: int,
               device: str = "cpu") -> list[dict]:
    """Per-case metric rows of the learned model and the identity baseline on one fold's test cases."""
    forecaster = load_checkpoint(checkpoint, device=device)
    names = info.class_names
    classes = list(range(len(names)))
    foreground = [k for k in classes if k != info.background_index]
    rows = []
    flushing = torch.set_flush_denormal(True)
    try:
        for case in test_cases:
            tic = time.perf_counter()
            pred = predict_case(forecaster, case, info, cfg)
            seconds = time.perf_counter() - tic
            diag = image_diagonal_mm(case.labels_t0.shape, case.spacing)
            for model, labels in (("anatomy-dt", pred), ("identity", case.labels_t0)):
                result = evaluate_labels(labels, case.labels_t1, classes, spacing=case.spacing, hd95_empty_value=diag)
                rows.append(case_row(fold, case, model, result, names, foreground,
                                      seconds if model == "anatomy-dt" else 0.0))
    finally:
        if flushing:
            torch.set_flush_denormal(False)
    return rows


def write_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Write result rows as CSV (floats with 6 significant digits), in the given column order."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in columns})


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV as dicts of strings (what :func:`write_rows` wrote)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def summarise(rows: list[dict], names: list[str], background_index: int, models=MODELS) -> list[dict]:
    """Mean ± sd over folds of the per-fold means, for every model, scope (overall / class) and metric."""
    folds = sorted({int(r["fold"]) for r in rows})
    scopes = ["overall"] + [n for k, n in enumerate(names)]
    out = []
    for model in models:
        for scope in scopes:
            for metric in METRICS:
                col = f"{metric}_{scope}"
                per_fold = []
                for f in folds:
                    values = [float(r[col]) for r in rows if r["model"] == model and int(r["fold"]) == f]
                    per_fold.append(float(np.mean(values)) if values else float("nan"))
                arr = np.array(per_fold, dtype=float)
                sd = float(np.std(arr, ddof=1)) if len(arr) > 1 else float("nan")
                out.append({"model": model, "scope": scope, "metric": metric, "mean": float(np.mean(arr)), "sd": sd,
                            **{f"fold_{f}": v for f, v in zip(folds, per_fold)}})
    return out


def _pm(entry: dict, percent: bool) -> str:
    scale = 100.0 if percent else 1.0
    mean, sd = entry["mean"] * scale, entry["sd"] * scale
    return f"{mean:.2f} ± {sd:.2f}" if not math.isnan(sd) else f"{mean:.2f}"


def write_report(out: Path, rows: list[dict], info: DatasetInfo, cfg: Config, folds: int, data_dir,
                 fold_facts: dict[int, dict]) -> tuple[Path, Path]:
    """summary.csv and summary.md from the per-case rows."""
    names = info.class_names
    summary = summarise(rows, names, info.background_index)
    fold_ids = sorted({int(r["fold"]) for r in rows})
    columns = ["model", "scope", "metric", "mean", "sd"] + [f"fold_{f}" for f in fold_ids]
    write_rows(out / "summary.csv", summary, columns)
    get = {(e["model"], e["scope"], e["metric"]): e for e in summary}
    n_cases = len({(r["fold"], r["case"]) for r in rows})
    fg = [n for k, n in enumerate(names) if k != info.background_index]
    lines = [
        "# Cross-validated evaluation",
        "",
        f"- data: `{data_dir}` ({info.kind}, {n_cases} test cases in folds {fold_ids} of {folds}, "
        f"spacing {list(info.spacing)} mm; HD95 in mm = pixels at 1 mm)",
        f"- configuration: seed {cfg.training['seed']}, fold_seed {cfg.data['fold_seed']}, spatial_alpha "
        f"{cfg.model['spatial_alpha']}, growth_cnn {cfg.model['growth_cnn']}, lambda_topo {cfg.loss['lambda_topo']}",
        f"- machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "- overall = mean over the foreground classes " + ", ".join(fg) + "; mean ± sd over the fold means (ddof 1)",
        "",
        "## Overall",
        "",
        "| model | DSC (%) | HD95 (mm) | clDice (%) |",
        "|---|---|---|---|",
    ]
    for model in MODELS:
        lines.append(f"| {model} | {_pm(get[(model, 'overall', 'dice')], True)} | "
                     f"{_pm(get[(model, 'overall', 'hd95')], False)} | {_pm(get[(model, 'overall', 'cldice')], True)} |")
    for model in MODELS:
        lines += ["", f"## Per class: {model}", "", "| class | DSC (%) | HD95 (mm) | clDice (%) |", "|---|---|---|---|"]
        for name in names:
            lines.append(f"| {name} | {_pm(get[(model, name, 'dice')], True)} | {_pm(get[(model, name, 'hd95')], False)} | "
                         f"{_pm(get[(model, name, 'cldice')], True)} |")
    lines += ["", "## Per fold (anatomy-dt)", "",
              "| fold | test cases | DSC (%) | HD95 (mm) | clDice (%) | epochs | best epoch | train time (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for f in fold_ids:
        n = len([r for r in rows if int(r["fold"]) == f and r["model"] == "anatomy-dt"])
        facts = fold_facts.get(f, {})
        d = get[("anatomy-dt", "overall", "dice")][f"fold_{f}"] * 100
        h = get[("anatomy-dt", "overall", "hd95")][f"fold_{f}"]
        c = get[("anatomy-dt", "overall", "cldice")][f"fold_{f}"] * 100
        lines.append(f"| {f} | {n} | {d:.2f} | {h:.2f} | {c:.2f} | {facts.get('epochs_run', '')} | "
                     f"{facts.get('best_epoch', '')} | {facts.get('train_seconds', float('nan')):.0f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return out / "summary.md", out / "summary.csv"


def cross_validate(data_dir, config: Config, out_dir, *, folds: int = 5, only_folds=None, device: str = "auto",
                   resume: bool = False, force: bool = False, progress: bool = True, log=print) -> dict:
    """Run the K-fold protocol; returns {"summary_md", "summary_csv", "per_case_csv", "rows"} (rank 0)."""
    out = Path(out_dir)
    cases, info = load_cases(data_dir)
    config.check_classes(len(info.class_names))
    assignment = fold_assignment(len(cases), folds, int(config.data["fold_seed"]))
    fold_list = list(range(folds)) if only_folds is None else sorted(set(only_folds))
    bad = [f for f in fold_list if not 0 <= f < folds]
    if bad:
        raise ParameterError(f"--only-folds {bad} outside 0..{folds - 1}.")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not (resume or force):
        raise OutputExistsError(f"Output directory {out} is not empty; pass --resume to reuse finished folds or "
                                "--force to start over.")
    ctx = init_distributed(device)
    try:
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            config.save(out / "config.json")
            (out / "folds.json").write_text(json.dumps({"folds": folds, "fold_seed": config.data["fold_seed"],
                                                        "assignment": {c.name: int(f) for c, f in zip(cases, assignment)}},
                                                       indent=1) + "\n")
        ctx.barrier()
        fold_facts: dict[int, dict] = {}
        for k in fold_list:
            run = out / f"fold_{k}"
            done = run / "done.json"
            if not (resume and done.is_file()):
                partial = resume and (run / "last.pt").is_file()
                if ctx.is_main:
                    log(f"fold {k}/{folds - 1}: training on the other {folds - 1} folds" + (" (resuming)" if partial else ""))
                train(data_dir, None if partial else Config.from_dict(config.to_dict()), run, fold=k, folds=folds,
                      resume=partial, force=force or (resume and not partial), device=device, progress=progress,
                      ctx=ctx, log=log)
            fold_facts[k] = json.loads(done.read_text()) if done.is_file() else {}
            scored = run / "test_cases.csv"
            if ctx.is_main and not (resume and scored.is_file() and scored.stat().st_mtime >= done.stat().st_mtime):
                test = [c for c, f in zip(cases, assignment) if f == k]
                rows = score_fold(run / "best.pt", test, info, config, k, device=str(ctx.device))
                write_rows(scored, rows, per_case_columns(info.class_names))
                mean = np.mean([r["dice_overall"] for r in rows if r["model"] == "anatomy-dt"])
                log(f"fold {k}: test DSC (overall) {100 * mean:.2f} % on {len(test)} cases")
            ctx.barrier()
        result = {}
        if ctx.is_main:
            rows = []
            for k in range(folds):
                path = out / f"fold_{k}" / "test_cases.csv"
                if path.is_file():
                    rows += read_rows(path)
                    if k not in fold_facts and (out / f"fold_{k}" / "done.json").is_file():
                        fold_facts[k] = json.loads((out / f"fold_{k}" / "done.json").read_text())
            if not rows:
                raise InputError("No fold was scored.")
            write_rows(out / "per_case.csv", rows, per_case_columns(info.class_names))
            md, csv_path = write_report(out, rows, info, config, folds, data_dir, fold_facts)
            result = {"summary_md": md, "summary_csv": csv_path, "per_case_csv": out / "per_case.csv", "rows": rows}
        ctx.barrier()
        return result
    finally:
        ctx.close()
