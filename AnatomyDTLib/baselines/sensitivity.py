"""Sensitivity sweeps of §3.3 / appendix Figure 7 for a trained Anatomy-DT model.

Two kinds of sweep (the ``kind`` column of ``sensitivity.csv``):

* **inference** — solver and physics settings that a trained model can be run with unchanged:
  the time step Δt, the number of Jacobi sweeps m, the relaxation ω, the cross-diffusion strength
  χ (the learned repulsion r_kj scaled by a factor), the carrying capacity κ and the grid
  resolution (the test cases resampled by nearest neighbour to N pixels over the same physical
  extent, spacing 128/N mm for 128-px data; HD95 stays in mm). One trained checkpoint (fold 0
  of the cross-validation) forecasts the first ``cases`` test cases of fold 0 for every value.
  Cheap: one rollout per case and value.
* **retrain** — training-time settings: the TV weight λ_tv of the growth-rate field and the
  bound k_max of the growth rate. For every value the model is retrained on fold 0's training
  cases with a small budget (``epochs``, ``max_train_cases``; the reference value is retrained
  with the same budget, so the points of one sweep are comparable with each other — not with the
  fully trained model) and scored on the same test cases.

Every point is the mean ± sd over the test cases of the overall DSC (%, mean over the
foreground classes) and HD95 (mm), plus the tumour DSC. Settings outside the model's validated
range (e.g. Δt · correction rate > 1) are run as asked: showing where the model breaks is the
point of the sweep.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..metrics import evaluate_labels, image_diagonal_mm
from ..models.config import Config
from ..models.data import Case, DatasetInfo

CSV_COLUMNS = ["sweep", "kind", "parameter", "value", "dice_mean", "dice_sd", "hd95_mean", "hd95_sd",
               "tumour_dice_mean", "tumour_dice_sd", "cases", "seconds", "note"]

#: Sweep name -> (kind, parameter shown, unit) in the order of the plots.
SWEEPS = {
    "dt": ("inference", "Δt (days)", "model.dt_days"),
    "jacobi": ("inference", "Jacobi sweeps m", "model.jacobi_iters"),
    "omega": ("inference", "relaxation ω", "model.omega"),
    "resolution": ("inference", "grid size N (px)", "resampled test cases"),
    "chi": ("inference", "χ scale (× learned repulsion)", "r_kj scale"),
    "kappa": ("inference", "carrying capacity κ", "model.carrying_capacity"),
    "lambda_tv": ("retrain", "λ_tv", "loss.lambda_tv"),
    "k_max": ("retrain", "k_max (1/day)", "model.k_max_per_day"),
}


def sweep_values(quick: bool, native_size: int, dt_days: float) -> dict[str, list]:
    """The values of every sweep (full: five or six points; quick: two or three)."""
    if quick:
        return {"dt": [dt_days / 2, dt_days], "jacobi": [1, 4], "omega": [0.6, 1.0],
                "resolution": [max(16, native_size // 2), native_size], "chi": [0.0, 1.0, 4.0], "kappa": [0.5, 1.0],
                "lambda_tv": [0.0, 0.1], "k_max": [0.05, 0.2]}
    sizes = [n for n in (64, 96, 128, 192, 256) if n <= 2 * native_size] or [native_size]
    return {"dt": [dt_days * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)], "jacobi": [1, 2, 4, 8, 16],
            "omega": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], "resolution": sizes, "chi": [0.0, 0.5, 1.0, 2.0, 4.0],
            "kappa": [0.5, 0.7, 0.85, 1.0], "lambda_tv": [0.0, 0.01, 0.1, 1.0], "k_max": [0.02, 0.05, 0.1, 0.2, 0.5]}


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------

def score(forecaster, cases: list[Case], info: DatasetInfo, cfg: Config) -> dict:
    """Mean ± sd over ``cases`` of the overall DSC (%), HD95 (mm) and tumour DSC (%) of forecasts."""
    from ..models.evaluation import predict_case

    classes = list(range(len(info.class_names)))
    foreground = [k for k in classes if k != info.background_index]
    dice, hd, tumour = [], [], []
    for case in cases:
        pred = predict_case(forecaster, case, info, cfg)
        diag = image_diagonal_mm(case.labels_t0.shape, case.spacing)
        r = evaluate_labels(pred, case.labels_t1, classes, spacing=case.spacing, hd95_empty_value=diag)
        dice.append(100 * float(np.mean([r["dice"][k] for k in foreground])))
        hd.append(float(np.mean([r["hd95"][k] for k in foreground])))
        tumour.append(100 * r["dice"][info.tumour_index])

    def ms(values):
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")

    (dm, ds), (hm, hs), (tm, ts) = ms(dice), ms(hd), ms(tumour)
    return {"dice_mean": dm, "dice_sd": ds, "hd95_mean": hm, "hd95_sd": hs, "tumour_dice_mean": tm,
            "tumour_dice_sd": ts, "cases": len(cases)}


def resample_case(case: Case, size: int) -> Case:
    """The case on an N-pixel grid over the same extent (nearest neighbour; spacing scaled)."""
    shape = case.labels_t0.shape
    index = np.ix_(*[np.minimum((np.arange(size) + 0.5) * n / size, n - 1).astype(int) for n in shape])
    spacing = tuple(s * n / size for s, n in zip(case.spacing, shape))
    return Case(case.name, case.labels_t0[index], case.labels_t1[index], case.interval_days, case.treatment, spacing)


@contextlib.contextmanager
def overridden(forecaster, **settings):
    """Run the forecaster's model with some ``model`` configuration keys changed (restored after)."""
    cfg = forecaster.model.cfg
    saved = {k: cfg[k] for k in settings}
    cfg.update(settings)
    try:
        yield forecaster
    finally:
        cfg.update(saved)


@contextlib.contextmanager
def scaled_repulsion(forecaster, factor: float):
    """Scale the learned repulsion r_kj (χ_kj = −r_kj) by ``factor`` (restored after)."""
    model = forecaster.model
    if not getattr(model, "use_cross", False):
        yield forecaster
        return
    raw = model.raw_repulsion
    saved = raw.detach().clone()
    with torch.no_grad():
        r = torch.nn.functional.softplus(saved) * float(factor)
        r = r.clamp(min=1e-6)
        raw.copy_(r + torch.log(-torch.expm1(-r)))  # inverse softplus
    try:
        yield forecaster
    finally:
        with torch.no_grad():
            raw.copy_(saved)


# ----------------------------------------------------------------------------------------------
# sweeps
# ----------------------------------------------------------------------------------------------

def _row(sweep: str, value, result: dict, seconds: float, note: str = "") -> dict:
    kind, parameter, _ = SWEEPS[sweep]
    return {"sweep": sweep, "kind": kind, "parameter": parameter, "value": value, **result,
            "seconds": round(seconds, 2), "note": note}


def inference_sweeps(checkpoint, cases: list[Case], info: DatasetInfo, cfg: Config, values: dict,
                     skip=(), log=print) -> list[dict]:
    """Rows of the inference sweeps (Δt, m, ω, resolution, χ, κ) for one trained checkpoint."""
    from ..models import load_checkpoint

    forecaster = load_checkpoint(checkpoint, device="cpu")
    trained = dict(forecaster.model.cfg)
    rows = []

    def run(sweep, value, context, cases_=cases, note=""):
        tic = time.perf_counter()
        with context:
            result = score(forecaster, cases_, info, cfg)
        rows.append(_row(sweep, value, result, time.perf_counter() - tic, note))
        log(f"  sensitivity {sweep} = {value}: DSC {result['dice_mean']:.2f} %, HD95 {result['hd95_mean']:.2f} mm")

    auto_m = forecaster.model.jacobi_iters(cases[0].spacing)
    for sweep in ("dt", "jacobi", "omega", "resolution", "chi", "kappa"):
        if sweep in skip:
            continue
        for v in values[sweep]:
            if sweep == "dt":
                run(sweep, v, overridden(forecaster, dt_days=float(v)),
                    note="trained value" if math.isclose(v, trained["dt_days"]) else "")
            elif sweep == "jacobi":
                run(sweep, v, overridden(forecaster, jacobi_iters=int(v)),
                    note=f"trained: {trained['jacobi_iters']} (= {auto_m} sweeps)")
            elif sweep == "omega":
                run(sweep, v, overridden(forecaster, omega=float(v)),
                    note="trained value" if math.isclose(v, trained["omega"]) else "")
            elif sweep == "resolution":
                native = cases[0].labels_t0.shape[0]
                run(sweep, v, contextlib.nullcontext(), [resample_case(c, int(v)) for c in cases],
                    note=f"native {native} px; spacing {native / v:.3g} mm")
            elif sweep == "chi":
                r = forecaster.model.repulsion()
                mean_r = float(r.detach().sum() / max(1, r.shape[0] * (r.shape[0] - 1))) * float(v) if r is not None else 0.0
                run(sweep, v, scaled_repulsion(forecaster, float(v)), note=f"mean r_kj {mean_r:.4g} mm²/day")
            elif sweep == "kappa":
                run(sweep, v, overridden(forecaster, carrying_capacity=float(v)),
                    note="trained value" if math.isclose(v, trained["carrying_capacity"]) else "")
    return rows


def retrain_sweeps(data_dir, cases: list[Case], info: DatasetInfo, base: Config, values: dict, out_dir, *, folds: int,
                   epochs: int, max_train_cases: int, resume: bool, skip=(), log=print) -> list[dict]:
    """Rows of the retrain sweeps (λ_tv, k_max): fold 0 retrained with a small budget per value."""
    from ..models.checkpoint import load_checkpoint
    from ..models.training import train

    rows = []
    for sweep, (section, key) in (("lambda_tv", ("loss", "lambda_tv")), ("k_max", ("model", "k_max_per_day"))):
        if sweep in skip:
            continue
        for v in values[sweep]:
            d = base.to_dict()
            d[section][key] = v
            d["training"].update({"epochs": int(epochs), "max_train_cases": int(max_train_cases), "patience": 0})
            if key == "k_max_per_day":
                d["model"]["alpha_init_per_day"] = min(d["model"]["alpha_init_per_day"], 0.5 * v)
            cfg = Config.from_dict(d)
            run = Path(out_dir) / f"{sweep}_{v:g}"
            tic = time.perf_counter()
            if not (resume and (run / "done.json").is_file()):
                train(data_dir, cfg, run, fold=0, folds=folds, force=True, device="cpu", progress=False,
                      log=lambda *_: None)
            result = score(load_checkpoint(run / "best.pt", device="cpu"), cases, info, cfg)
            facts = json.loads((run / "done.json").read_text())
            rows.append(_row(sweep, v, result, time.perf_counter() - tic,
                             f"retrained {facts['epochs_run']} epochs on ≤{max_train_cases or 'all'} cases"))
            log(f"  sensitivity {sweep} = {v}: DSC {result['dice_mean']:.2f} %, HD95 {result['hd95_mean']:.2f} mm")
    return rows


def write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in CSV_COLUMNS})


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for c in CSV_COLUMNS:
            if c not in ("sweep", "kind", "parameter", "note"):
                r[c] = float(r[c]) if r[c] not in ("", "nan") else float("nan")
    return rows


def plot(rows: list[dict], out_dir) -> list[Path]:
    """One PNG per sweep (DSC and HD95 against the value) and a grid of all: ``sensitivity.png``.

    Error bars are standard errors of the mean over the test cases (sd / √n).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    sweeps = [s for s in SWEEPS if any(r["sweep"] == s for r in rows)]
    paths = []

    def sem(r, key):  # standard error of the mean over the cases (the sd itself would hide every effect)
        sd = r[f"{key}_sd"]
        return 0.0 if math.isnan(sd) else sd / math.sqrt(max(1.0, float(r["cases"])))

    def draw(ax, sweep):
        mine = sorted([r for r in rows if r["sweep"] == sweep], key=lambda r: float(r["value"]))
        x = [float(r["value"]) for r in mine]
        ax.errorbar(x, [r["dice_mean"] for r in mine], yerr=[sem(r, "dice") for r in mine],
                    color="tab:blue", marker="o", capsize=3, label="DSC (%)")
        ax.set_xlabel(SWEEPS[sweep][1])
        ax.set_ylabel("DSC (%)", color="tab:blue")
        twin = ax.twinx()
        twin.errorbar(x, [r["hd95_mean"] for r in mine], yerr=[sem(r, "hd95") for r in mine],
                      color="tab:red", marker="s", capsize=3, linestyle="--", label="HD95 (mm)")
        twin.set_ylabel("HD95 (mm)", color="tab:red")
        if sweep in ("dt", "jacobi", "k_max", "resolution") and min(x) > 0:
            ax.set_xscale("log", base=2)
        ax.set_title(f"{sweep} ({SWEEPS[sweep][0]}); mean ± s.e., {int(mine[0]['cases'])} cases", fontsize=9)

    for sweep in sweeps:
        fig, ax = plt.subplots(figsize=(4.2, 3.2), dpi=110)
        draw(ax, sweep)
        fig.tight_layout()
        path = out / f"sensitivity_{sweep}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    if sweeps:
        cols = 4
        nrows = math.ceil(len(sweeps) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.3 * nrows), dpi=100, squeeze=False)
        for ax, sweep in zip(axes.flat, sweeps):
            draw(ax, sweep)
        for ax in list(axes.flat)[len(sweeps):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "sensitivity.png")
        plt.close(fig)
        paths.append(out / "sensitivity.png")
    return paths
