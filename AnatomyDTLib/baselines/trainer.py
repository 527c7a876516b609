"""One training loop and one K-fold protocol for every baseline that is not the learned model.

The folds, the train/validation split and the scoring are those of ``anatomydt evaluate``
(:mod:`AnatomyDTLib.models.evaluation`): case i is in fold ``fold_assignment(n, K, fold_seed)[i]``,
the validation cases come from :func:`~AnatomyDTLib.models.data.split_cases` with the learned
model's ``seed`` and ``val_fraction``, training batches are cropped around the baseline tumour
(``crop``) and grouped by follow-up interval (:func:`~AnatomyDTLib.models.data.epoch_batches`),
and each test case is scored on the whole image by
:func:`AnatomyDTLib.metrics.evaluate_labels` into the same per-case rows.

Training: Adam with a fixed epoch budget, gradient-norm clipping, the segmentation term of
Eq. 3 (soft Dice summed over all classes, :func:`AnatomyDTLib.losses.soft_dice_loss`) as the
loss for every baseline, and the weights of the epoch with the best validation Dice (mean hard
Dice of the validation cases, the learned model's criterion) are kept. Initial weights from
``torch.manual_seed(seed)``, batch order from ``default_rng([seed, epoch])``: a run is repeatable.

Files of one method (``OUT``): ``fold_k/model.pt`` (weights, method, settings),
``fold_k/history.csv`` (per epoch), ``fold_k/test_cases.csv`` (per test case, evaluation columns),
``fold_k/predictions.npz`` (forecast label maps of the test cases) and ``fold_k/done.json``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, OutputExistsError, ParameterError
from ..losses import soft_dice_loss
from ..metrics import evaluate_labels, image_diagonal_mm
from ..models.config import Config
from ..models.data import Case, DatasetInfo, epoch_batches, fold_assignment, load_cases, make_batch, split_cases
from ..models.evaluation import case_row, per_case_columns, read_rows, write_rows
from ..models.training import _hard_dice

NEURAL_METHODS = ("unet", "convlstm", "neuralode")
TRAINED_METHODS = NEURAL_METHODS + ("fisher-kpp",)
DEFAULT_LR = {"unet": 1e-3, "convlstm": 1e-3, "neuralode": 1e-3, "fisher-kpp": 0.05}


@dataclass
class BaselineSettings:
    """Training budget and sizes of a baseline (units: days for times)."""

    epochs: int = 10
    lr: float | None = None  # None: DEFAULT_LR of the method
    batch_size: int = 4
    crop: int = 96
    hidden: int = 16
    step_days: float = 10.0  # ConvLSTM step (days)
    ode_step_days: float = 20.0  # NeuralODE fixed RK4 step (days)
    dt_days: float = 4.0  # Fisher–KPP solver step (days)
    seed: int = 0
    grad_clip: float = 1.0
    max_train_cases: int = 0
    threads: int = 1  # torch CPU threads (0 = torch's default); small convolutions scale poorly with threads
    extra: dict = field(default_factory=dict)

    def learning_rate(self, method: str) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[method])


def build_baseline(method: str, info: DatasetInfo, settings: BaselineSettings) -> torch.nn.Module:
    """A freshly initialised baseline for the dataset (weights from ``torch.manual_seed(seed)``)."""
    from .fisher_kpp import FisherKPP
    from .networks import ConvLSTMForecaster, NeuralODEForecaster, UNetForecaster

    torch.manual_seed(int(settings.seed))
    k, nd = len(info.class_names), info.ndim
    if method == "unet":
        return UNetForecaster(k, nd, hidden=settings.hidden)
    if method == "convlstm":
        return ConvLSTMForecaster(k, nd, hidden=settings.hidden, step_days=settings.step_days)
    if method == "neuralode":
        return NeuralODEForecaster(k, nd, hidden=settings.hidden, step_days=settings.ode_step_days)
    if method == "fisher-kpp":
        return FisherKPP(k, nd, tumour_index=info.tumour_index, background_index=info.background_index,
                         dt_days=settings.dt_days)
    raise ParameterError(f"Unknown baseline {method!r}; choose one of {list(TRAINED_METHODS)}.")


def baseline_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Segmentation term of Eq. 3: soft Dice summed over all classes, averaged over the batch."""
    return soft_dice_loss(pred, target, reduction="sum")


def _batch(cases: list[Case], info: DatasetInfo, crop: int):
    return make_batch(cases, info, crop=crop, soften_px=0.0, body_mask=True)


@torch.no_grad()
def validation_dice(model: torch.nn.Module, cases: list[Case], info: DatasetInfo, batch_size: int) -> float:
    """Mean hard Dice (over classes, then cases) of whole-image forecasts of ``cases``."""
    if not cases:
        return float("nan")
    model.eval()
    total = 0.0
    ordered = sorted(cases, key=lambda c: c.interval_days)
    for s in range(0, len(ordered), batch_size):
        batch = _batch(ordered[s:s + batch_size], info, crop=0)
        dice, _ = _hard_dice(model(batch), batch.target, info.tumour_index)
        total += float(dice.sum())
    return total / len(cases)


def fit(model: torch.nn.Module, method: str, train_cases: list[Case], val_cases: list[Case], info: DatasetInfo,
        settings: BaselineSettings, log=print) -> list[dict]:
    """Train ``model`` in place for ``settings.epochs`` epochs; keeps the best-validation weights.

    Returns one dict per epoch (epoch, train_loss, val_dice, seconds, improved).
    """
    if not train_cases:
        raise ParameterError("No training cases; give more cases or a smaller val_fraction.")
    train_cases = train_cases[:settings.max_train_cases] if settings.max_train_cases else train_cases
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate(method))
    intervals = [c.interval_days for c in train_cases]
    best, best_state, history, seconds = -math.inf, None, [], 0.0
    for epoch in range(settings.epochs):
        tic = time.perf_counter()
        model.train()
        losses = []
        for idx in epoch_batches(len(train_cases), settings.batch_size, settings.seed, epoch, intervals):
            batch = _batch([train_cases[i] for i in idx], info, crop=settings.crop)
            loss = baseline_loss(model(batch), batch.target)
            if not torch.isfinite(loss):
                raise ParameterError(f"The {method} training loss became {float(loss)} in epoch {epoch + 1}; "
                                     "lower the learning rate.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()) * len(idx))
        val = validation_dice(model, val_cases, info, settings.batch_size)
        score = val if not math.isnan(val) else -float(np.sum(losses))
        improved = score > best
        if improved:
            best, best_state = score, copy.deepcopy(model.state_dict())
        seconds += time.perf_counter() - tic
        row = {"epoch": epoch + 1, "train_loss": float(np.sum(losses)) / len(train_cases), "val_dice": val,
               "seconds": seconds, "improved": int(improved)}
        history.append(row)
        log(f"  {method} epoch {epoch + 1}/{settings.epochs}: train loss {row['train_loss']:.4f}, val Dice {val:.4f}, "
            f"{seconds:.0f} s" + (" *" if improved else ""))
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


@torch.no_grad()
def predict_labels(model: torch.nn.Module, case: Case, info: DatasetInfo) -> np.ndarray:
    """Argmax forecast label map of one case at its follow-up day (whole image)."""
    model.eval()
    return model(_batch([case], info, crop=0))[0].argmax(0).cpu().numpy()


def score_cases(method: str, fold: int, cases: list[Case], predictions: list[np.ndarray], info: DatasetInfo,
                seconds: list[float]) -> list[dict]:
    """Per-case rows (the columns of ``anatomydt evaluate``) for forecasts of ``cases``."""
    names = info.class_names
    classes = list(range(len(names)))
    foreground = [k for k in classes if k != info.background_index]
    rows = []
    for case, labels, sec in zip(cases, predictions, seconds):
        diag = image_diagonal_mm(case.labels_t0.shape, case.spacing)
        result = evaluate_labels(labels, case.labels_t1, classes, spacing=case.spacing, hd95_empty_value=diag)
        rows.append(case_row(fold, case, method, result, names, foreground, sec))
    return rows


def _write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", "train_loss", "val_dice", "seconds", "improved"])
        writer.writeheader()
        writer.writerows(history)


def run_fold(method: str, cases: list[Case], info: DatasetInfo, config: Config, settings: BaselineSettings, fold: int,
             folds: int, run: Path, log=print) -> list[dict]:
    """Train ``method`` on the folds other than ``fold``, forecast and score the test fold; write ``run``."""
    train_cases, val_cases, test_cases = split_cases(
        cases, fold=fold, folds=folds, fold_seed=int(config.data["fold_seed"]), seed=int(config.training["seed"]),
        val_fraction=float(config.training["val_fraction"]), max_train_cases=int(config.training["max_train_cases"]))
    if any(getattr(c, "plan", None) is not None for c in cases):
        raise InputError("The baselines support the synthetic datasets (static treatment variables), not brain "
                         "cohorts with treatment plans.")
    run.mkdir(parents=True, exist_ok=True)
    flushing = torch.set_flush_denormal(True)  # denormal tails of diffused fields are ~100x slower on CPUs
    threads_before = torch.get_num_threads()
    if settings.threads > 0:
        torch.set_num_threads(int(settings.threads))
    try:
        tic = time.perf_counter()
        model = build_baseline(method, info, settings)
        log(f"{method} fold {fold}/{folds - 1}: training on {len(train_cases)} cases ({len(val_cases)} for validation)")
        history = fit(model, method, train_cases, val_cases, info, settings, log)
        train_seconds = time.perf_counter() - tic
        preds, secs = [], []
        for case in test_cases:
            t0 = time.perf_counter()
            preds.append(predict_labels(model, case, info))
            secs.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads_before)
        if flushing:
            torch.set_flush_denormal(False)
    rows = score_cases(method, fold, test_cases, preds, info, secs)
    torch.save({"method": method, "settings": asdict(settings), "state_dict": model.state_dict(),
                "class_names": info.class_names}, run / "model.pt")
    _write_history(run / "history.csv", history)
    np.savez_compressed(run / "predictions.npz", **{c.name: p.astype(np.uint8) for c, p in zip(test_cases, preds)})
    write_rows(run / "test_cases.csv", rows, per_case_columns(info.class_names))
    facts = {"method": method, "fold": fold, "folds": folds, "train_cases": len(train_cases), "val_cases": len(val_cases),
             "test_cases": len(test_cases), "epochs_run": len(history),
             "best_epoch": max(history, key=lambda r: (r["improved"], r["epoch"]))["epoch"] if history else 0,
             "train_seconds": train_seconds, "test_seconds": float(sum(secs)), "settings": asdict(settings)}
    if hasattr(model, "fitted"):
        facts["fitted"] = model.fitted()
    (run / "done.json").write_text(json.dumps(facts, indent=1) + "\n")
    mean = np.mean([r["dice_overall"] for r in rows]) if rows else float("nan")
    log(f"{method} fold {fold}: test DSC (overall) {100 * mean:.2f} % on {len(rows)} cases, "
        f"{train_seconds + sum(secs):.0f} s")
    return rows


def cross_validate_baseline(method: str, data_dir, out_dir, config: Config, settings: BaselineSettings, *,
                            folds: int = 5, only_folds=None, resume: bool = False, force: bool = False,
                            log=print) -> list[dict]:
    """K-fold protocol of ``anatomydt evaluate`` for one baseline; returns the per-case rows of every fold.

    With ``resume`` a fold whose ``test_cases.csv`` exists is reused; ``force`` allows a non-empty
    ``out_dir`` (its fold files are replaced).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not (resume or force):
        raise OutputExistsError(f"Output directory {out} is not empty; pass --resume to reuse finished folds or "
                                "--force to start over.")
    cases, info = load_cases(data_dir)
    assignment = fold_assignment(len(cases), folds, int(config.data["fold_seed"]))
    fold_list = list(range(folds)) if only_folds is None else sorted(set(only_folds))
    rows = []
    for k in fold_list:
        run = out / f"fold_{k}"
        done = run / "test_cases.csv"
        if not (resume and done.is_file() and (run / "done.json").is_file()):
            run_fold(method, cases, info, config, settings, k, folds, run, log)
        rows += read_rows(done)  # as stored: a resumed benchmark gives exactly the same numbers
    names = {c.name for c, f in zip(cases, assignment) if f in fold_list}
    if {r["case"] for r in rows} != names:
        raise InputError(f"The stored folds of {out} do not match this dataset's folds; rerun with --force.")
    return rows
