"""Training of the learned Anatomy-DT model (``anatomydt train``), single process or DDP.

One optimisation step: a batch of baseline fields (cropped around the baseline tumour) is rolled
out by the differentiable solver to each case's follow-up day; Eq. 3 (soft Dice summed over
classes + λ_topo·ATL + λ_reg·||θ||²) plus λ_tv·TV(α/k_max) is back-propagated through the whole
rollout; Adam with a cosine learning-rate schedule updates the CNN weights, the α-field weights,
D_k and r_kj.

Run directory (``--out RUN``)::

    config.json    the resolved configuration (a resumed run uses it)
    split.json     case names of the train / validation / test parts
    metrics.csv    one row per epoch (see :data:`CSV_COLUMNS`)
    last.pt        full training state after the last finished epoch (model, optimiser, counters)
    best.pt        model checkpoint of the best validation epoch (load with models.load_checkpoint)
    done.json      written when training ends (epochs run, best epoch, wall time, stopped early)
    ddp/rank{r}.pt final weights of every process (DDP runs only; they must be identical)

Determinism: the initial weights come from ``torch.manual_seed(seed)``, the validation split from
``default_rng([seed, fold+1])`` and the batches of epoch e from ``default_rng([seed, e])``; nothing
else is random. The same seed, data, configuration and thread count therefore give the same
numbers, and a resumed run continues exactly where it stopped.

Data parallelism: started by ``torchrun --nproc_per_node N -m AnatomyDTLib train ...`` (or
``python -m torch.distributed.run``), every process builds the same model, DDP averages the
gradients (gloo on CPU, NCCL on CUDA), each process rolls out every N-th batch of the same epoch
order, validation sums are all-reduced, and only rank 0 writes files. The learning rate is not
scaled with N: the global batch is N × ``batch_size``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import InputError, OutputExistsError, ParameterError
from ..losses import AnatomyDTObjective
from .checkpoint import atomic_torch_save, save_checkpoint
from .conditioning import Conditioning
from .config import Config
from .data import Case, DatasetInfo, epoch_batches, load_cases, make_batch, split_cases
from .forecast import resolve_device
from .growth import AnatomyDTModel, total_variation

CSV_COLUMNS = ("epoch", "lr", "train_loss", "train_seg", "train_cldice", "train_overlap", "train_tv", "val_loss",
               "val_dice", "val_tumour_dice", "diffusion_mean", "repulsion_mean", "seconds", "improved")
_RUN_FILES = ("config.json", "split.json", "metrics.csv", "last.pt", "best.pt", "done.json")


# ----------------------------------------------------------------------------------------------
# distributed context
# ----------------------------------------------------------------------------------------------

@dataclass
class DistContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if self.device.type == "cuda":
            t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) and join the process group.

    Without WORLD_SIZE (or WORLD_SIZE=1) this is a plain single-process context.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device(f"cuda:{local}")
        torch.cuda.set_device(dev)
    ctx = DistContext(rank, world, local, dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        ctx.owns_group = True
    return ctx


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out_dir: Path
    best_checkpoint: Path
    epochs_run: int
    best_epoch: int
    best_score: float  # value of the monitored quantity at the best epoch (val Dice, or a loss)
    train_seconds: float
    stopped_early: bool
    history: list[dict]


def objective_from_config(cfg: Config) -> AnatomyDTObjective:
    lo = cfg.loss
    return AnatomyDTObjective(seg_classes=lo["seg_classes"], cl_classes=tuple(lo["cl_classes"]),
                              lambda_topo=lo["lambda_topo"], lambda_1=lo["lambda_1"], lambda_2=lo["lambda_2"],
                              lambda_reg=lo["lambda_reg"], iters=lo["skeleton_iters"])


def build_model(cfg: Config, info: DatasetInfo) -> AnatomyDTModel:
    """A freshly initialised model for the dataset (initialised from ``torch.manual_seed(seed)``)."""
    torch.manual_seed(int(cfg.training["seed"]))
    return AnatomyDTModel(cfg.model, len(info.class_names), info.ndim, tumour_index=info.tumour_index,
                          sink_index=info.background_index)


def _learning_rate(cfg: Config, epoch: int, epochs: int) -> float:
    """Cosine decay from lr to lr·lr_min_fraction over the configured epochs."""
    t = cfg.training
    frac = float(t["lr_min_fraction"])
    progress = epoch / max(1, epochs - 1)
    return float(t["lr"]) * (frac + (1.0 - frac) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _fmt(x) -> str:
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.8g}"
    return str(x)


# ----------------------------------------------------------------------------------------------
# weight averaging
# ----------------------------------------------------------------------------------------------

class WeightAverage:
    """Exponential moving average of the trainable weights: shadow ← d·shadow + (1 - d)·weight.

    The average of the last ~1/(1 - d) optimiser steps is a smoother model than the last iterate
    of noisy small-batch training; validation, best.pt and the evaluation use it.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the model's weights and the averaged ones (call twice to restore)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                tmp = p.detach().clone()
                p.copy_(self.shadow[n])
                self.shadow[n].copy_(tmp)


# ----------------------------------------------------------------------------------------------
# one epoch
# ----------------------------------------------------------------------------------------------

def _rollout_batch(model, batch):
    """Roll the batch out to its follow-up days; (N, K, *S) predictions matching ``batch.target``."""
    if batch.plan is not None:
        conditioning = Conditioning.from_plans([batch.plan])
    else:
        conditioning = Conditioning.from_static(batch.treatments)
    traj, aux = model(batch.p0, spacing=batch.spacing, days=batch.days, conditioning=conditioning, mask=batch.mask,
                      plan=batch.plan, schema=batch.schema)
    day = torch.as_tensor([d for d, _ in batch.pairs], device=traj.device)
    item = torch.as_tensor([b for _, b in batch.pairs], device=traj.device)
    return traj[day, item], aux


def _batch_loss(core: AnatomyDTModel, objective, cfg: Config, pred, target, aux):
    loss, comp = objective(pred, target, model=core if cfg.loss["lambda_reg"] else None)
    tv = pred.new_zeros(())
    if core.alpha_net is not None and cfg.loss["lambda_tv"] > 0:
        tv = total_variation(aux["alpha"] / float(cfg.model["k_max_per_day"]))
        loss = loss + cfg.loss["lambda_tv"] * tv
    comp["tv"] = float(tv.detach())
    comp["total"] = float(loss.detach())
    return loss, comp


def _hard_dice(pred: torch.Tensor, target: torch.Tensor, tumour: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per case: mean hard Dice over classes (both empty = 1) and the tumour's hard Dice."""
    k = pred.shape[1]
    a = torch.nn.functional.one_hot(pred.argmax(1), k).movedim(-1, 1).to(torch.float64)
    b = torch.nn.functional.one_hot(target.argmax(1), k).movedim(-1, 1).to(torch.float64)
    inter = (a * b).flatten(2).sum(-1)
    total = a.flatten(2).sum(-1) + b.flatten(2).sum(-1)
    d = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return d.mean(1), d[:, tumour]


def validate(core: AnatomyDTModel, cases: list[Case], info: DatasetInfo, cfg: Config, ctx: DistContext,
             objective) -> dict:
    """Validation loss and hard Dice over ``cases`` (whole images, no crop), summed over processes."""
    sums = [0.0, 0.0, 0.0, 0.0]
    mine = cases[ctx.rank::ctx.world_size]
    core.eval()
    bs = int(cfg.training["batch_size"])
    ordered = sorted(mine, key=lambda c: c.interval_days)
    with torch.no_grad():
        for s in range(0, len(ordered), bs):
            group = ordered[s:s + bs]
            batch = make_batch(group, info, crop=0, soften_px=cfg.data["soften_px"], body_mask=cfg.data["body_mask"],
                               pool=int(cfg.data["pool"]),
                               device=ctx.device)
            pred, aux = _rollout_batch(core, batch)
            loss, _ = _batch_loss(core, objective, cfg, pred, batch.target, aux)
            dice, tumour = _hard_dice(pred, batch.target, info.tumour_index)
            sums[0] += float(loss) * len(group)
            # A brain patient has several follow-ups (targets) per case: average them per batch.
            sums[1] += float(dice.mean()) * len(group)
            sums[2] += float(tumour.mean()) * len(group)
            sums[3] += len(group)
    sums = ctx.all_reduce_sum(sums)
    n = max(sums[3], 1.0)
    if sums[3] == 0:
        return {"val_loss": float("nan"), "val_dice": float("nan"), "val_tumour_dice": float("nan")}
    return {"val_loss": sums[0] / n, "val_dice": sums[1] / n, "val_tumour_dice": sums[2] / n}


def _train_epoch(model, core, optimizer, objective, cfg, train_cases, info, ctx, epoch, epochs, show_progress,
                 average: WeightAverage | None = None):
    t = cfg.training
    intervals = [c.interval_days for c in train_cases] if t["interval_bucketing"] else None
    all_batches = epoch_batches(len(train_cases), int(t["batch_size"]), int(t["seed"]), epoch, intervals,
                                ctx.world_size)
    mine = all_batches[ctx.rank::ctx.world_size]
    model.train()
    keys = ("total", "seg", "cldice", "overlap", "tv")
    sums = [0.0] * (len(keys) + 1)
    from tqdm import tqdm

    bar = tqdm(mine, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", file=sys.stderr, leave=False,
               disable=not (show_progress and ctx.is_main) or os.environ.get("ANATOMYDT_NO_PROGRESS") == "1")
    params = [p for p in core.parameters() if p.requires_grad]
    for idx in bar:
        batch = make_batch([train_cases[i] for i in idx], info, crop=int(t["crop"]), soften_px=cfg.data["soften_px"],
                           body_mask=cfg.data["body_mask"], device=ctx.device, pool=int(cfg.data["pool"]))
        pred, aux = _rollout_batch(model, batch)
        loss, comp = _batch_loss(core, objective, cfg, pred, batch.target, aux)
        if not torch.isfinite(loss):
            raise ParameterError(f"The training loss became {float(loss)} in epoch {epoch + 1} (cases {batch.names}); "
                                 "lower training.lr or model.dt_days.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, float(t["grad_clip"]))
        optimizer.step()
        if average is not None:
            average.update(core)
        b = len(idx)
        for i, key in enumerate(keys):
            sums[i] += comp[key] * b
        sums[-1] += b
        bar.set_postfix(loss=f"{comp['total']:.4f}")
    bar.close()
    sums = ctx.all_reduce_sum(sums)
    n = max(sums[-1], 1.0)
    return {f"train_{k if k != 'total' else 'loss'}": sums[i] / n for i, k in enumerate(keys)}


# ----------------------------------------------------------------------------------------------
# run directory
# ----------------------------------------------------------------------------------------------

def _prepare_out_dir(out: Path, config: Config | None, resume: bool, force: bool, epochs: int | None) -> Config:
    """Check the run directory and resolve the configuration (read-only; every process runs it)."""
    if resume:
        if not (out / "last.pt").is_file() or not (out / "config.json").is_file():
            raise InputError(f"Cannot resume: {out} has no last.pt/config.json from an earlier 'anatomydt train' run.")
        stored = Config.load(out / "config.json")
        if config is not None:
            a, b = stored.to_dict(), config.to_dict()
            a["training"].pop("epochs"), b["training"].pop("epochs")
            if a != b:
                raise ParameterError(f"--config differs from the configuration of the run in {out} (other than "
                                     "training.epochs); resume without --config or start a new run.")
            stored.training["epochs"] = config.training["epochs"]
        config = stored
    else:
        if config is None:
            raise ParameterError("A configuration is needed (--config) unless --resume is given.")
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a directory; choose another --out.")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise OutputExistsError(f"Run directory {out} is not empty; pass --resume to continue it or --force to "
                                    "start over (the earlier run files are replaced).")
    if epochs is not None:
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ParameterError(f"--epochs must be an integer >= 1, got {epochs!r}.")
        config.training["epochs"] = epochs
    return config


def _write_csv_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k, "")) for k in CSV_COLUMNS})


def read_metrics(path) -> list[dict]:
    """Rows of a run's metrics.csv as dicts of strings."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _truncate_csv(path: Path, last_epoch: int) -> None:
    """Keep the rows of epochs <= last_epoch (a crash after the CSV write but before last.pt)."""
    if not path.is_file():
        return
    rows = [r for r in read_metrics(path) if int(r["epoch"]) <= last_epoch]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------

def train(data_dir, config: Config | None, out_dir, *, fold: int | None = None, folds: int | None = None,
          resume: bool = False, force: bool = False, device: str = "auto", epochs: int | None = None,
          progress: bool = True, ctx: DistContext | None = None, log=print) -> TrainResult:
    """Train a model on ``data_dir`` (the folds other than ``fold`` when given) into ``out_dir``.

    Args:
        data_dir: a dataset written by ``anatomydt make-dataset``.
        config: the configuration (None with ``resume``: the run's stored one).
        out_dir: the run directory (see the module docstring for its files).
        fold, folds: hold out fold ``fold`` (0-based) of ``folds``; without them all cases train.
        resume: continue the run in ``out_dir`` from its last.pt.
        force: replace the files of an earlier run in ``out_dir``.
        device: "auto", "cpu" or "cuda".
        epochs: override training.epochs (e.g. to extend a resumed run).
        ctx: an existing distributed context (default: from the environment).
    """
    out = Path(out_dir)
    own_ctx = ctx is None
    ctx = init_distributed(device) if own_ctx else ctx
    flushing = torch.set_flush_denormal(True)  # denormal tails of diffused fields are 100x slower on CPU
    threads_before = torch.get_num_threads()
    try:
        cfg = _prepare_out_dir(out, config, resume, force, epochs)
        t = cfg.training
        if t["threads"] > 0:
            torch.set_num_threads(int(t["threads"]))
        elif ctx.distributed and ctx.device.type == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        cases, info = load_cases(data_dir)
        cfg.check_classes(len(info.class_names))
        train_cases, val_cases, test_cases = split_cases(
            cases, fold=fold, folds=folds, fold_seed=int(cfg.data["fold_seed"]), seed=int(t["seed"]),
            val_fraction=float(t["val_fraction"]), max_train_cases=int(t["max_train_cases"]))
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if not resume and force:
                for name in _RUN_FILES:
                    (out / name).unlink(missing_ok=True)
            cfg.save(out / "config.json")
            (out / "split.json").write_text(json.dumps({
                "data": str(Path(data_dir).resolve()), "fold": fold, "folds": folds,
                "fold_seed": cfg.data["fold_seed"], "train": [c.name for c in train_cases],
                "val": [c.name for c in val_cases], "test": [c.name for c in test_cases]}, indent=1) + "\n")
        ctx.barrier()
        result = _fit(cfg, info, train_cases, val_cases, out, ctx, resume, progress, log,
                      {"data": str(Path(data_dir).resolve()), "kind": info.kind, "fold": fold, "folds": folds,
                       "spacing": [float(h) * int(cfg.data["pool"]) for h in info.spacing],
                       "data_spacing": list(info.spacing), "body_mask": bool(cfg.data["body_mask"])})
        ctx.barrier()
        return result
    finally:
        if flushing:
            torch.set_flush_denormal(False)
        torch.set_num_threads(threads_before)
        if own_ctx:
            ctx.close()


def _fit(cfg: Config, info: DatasetInfo, train_cases, val_cases, out: Path, ctx: DistContext, resume: bool,
         progress: bool, log, run_info: dict) -> TrainResult:
    t = cfg.training
    epochs = int(t["epochs"])
    core = build_model(cfg, info).to(ctx.device)
    physics = [p for n, p in core.named_parameters() if p.requires_grad and n.startswith("raw_")]
    learned = [p for n, p in core.named_parameters() if p.requires_grad and not n.startswith("raw_")]
    groups = [{"params": learned, "lr_scale": 1.0}]
    if physics:
        groups.append({"params": physics, "lr_scale": float(t["physics_lr_scale"])})
    optimizer = torch.optim.Adam(groups, lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
    start_epoch, best_score, best_epoch, bad_epochs, seconds, history = 0, math.inf, -1, 0, 0.0, []
    stopped_early = False
    state = {}
    if resume:
        state = torch.load(out / "last.pt", map_location=ctx.device, weights_only=True)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        bad_epochs, seconds = int(state["bad_epochs"]), float(state["train_seconds"])
        stopped_early = bool(state.get("stopped_early", False))
        if ctx.is_main:
            _truncate_csv(out / "metrics.csv", start_epoch)
            history = read_metrics(out / "metrics.csv") if (out / "metrics.csv").is_file() else []
    model = core
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(core, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    average = WeightAverage(core, t["ema_decay"]) if t["ema_decay"] > 0 else None
    if resume and average is not None and "average" in state:
        for n, v in state["average"].items():
            average.shadow[n].copy_(v)
    objective = objective_from_config(cfg)
    monitor_val = bool(val_cases)
    monitor = t["monitor"] if monitor_val else "train_loss"
    patience = int(t["patience"])
    min_delta = float(t["min_delta"])
    if ctx.is_main:
        log(f"training on {len(train_cases)} cases ({len(val_cases)} for validation), {ctx.world_size} process(es) "
            f"on {ctx.device}, {torch.get_num_threads()} thread(s) each; epochs {start_epoch + 1}..{epochs}")
    completed = start_epoch
    for epoch in range(start_epoch, epochs):
        if stopped_early:
            break
        tic = time.perf_counter()
        lr = _learning_rate(cfg, epoch, epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        row = {"epoch": epoch + 1, "lr": lr}
        row.update(_train_epoch(model, core, optimizer, objective, cfg, train_cases, info, ctx, epoch, epochs, progress,
                                average))
        if average is not None:
            average.swap(core)  # evaluate and save the averaged weights
        row.update(validate(core, val_cases, info, cfg, ctx, objective) if monitor_val else
                   {"val_loss": float("nan"), "val_dice": float("nan"), "val_tumour_dice": float("nan")})
        row["diffusion_mean"] = float(core.diffusion().detach().mean())
        r = core.repulsion()
        row["repulsion_mean"] = float(r.detach().sum() / max(1, r.shape[0] * (r.shape[0] - 1))) if r is not None else 0.0
        score = -row["val_dice"] if monitor == "val_dice" else row[monitor]
        improved = score < best_score - min_delta
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch + 1, 0
        else:
            bad_epochs += 1
        stopped_early = patience > 0 and bad_epochs >= patience
        seconds += time.perf_counter() - tic
        row["seconds"] = seconds
        row["improved"] = int(improved)
        history.append(row)
        completed = epoch + 1
        if ctx.is_main:
            _write_csv_row(out / "metrics.csv", row)
            if improved:
                save_checkpoint(core, out / "best.pt", info.class_names, background_index=info.background_index,
                                info={**run_info, "epoch": epoch + 1, "val_loss": row["val_loss"],
                                      "val_dice": row["val_dice"], "weights": "average" if average else "last"})
        if average is not None:
            average.swap(core)  # back to the optimiser's weights
        if ctx.is_main:
            state_out = {"epoch": epoch, "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                         "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                         "train_seconds": seconds, "stopped_early": stopped_early}
            if average is not None:
                state_out["average"] = average.shadow
            atomic_torch_save(state_out, out / "last.pt")
            log(f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
                f"val Dice {row['val_dice']:.4f} (tumour {row['val_tumour_dice']:.4f}), {seconds:.0f} s"
                + (" *" if improved else "") + (" — early stop" if stopped_early else ""))
    if ctx.distributed:
        ddp_dir = out / "ddp"
        if ctx.is_main:
            ddp_dir.mkdir(exist_ok=True)
        ctx.barrier()
        torch.save({k: v.detach().cpu() for k, v in core.state_dict().items()}, ddp_dir / f"rank{ctx.rank}.pt")
    epochs_run = completed
    best_value = -best_score if monitor == "val_dice" else best_score
    if ctx.is_main:
        (out / "done.json").write_text(json.dumps({
            "epochs_run": epochs_run, "best_epoch": best_epoch, "best_value": best_value,
            "monitor": monitor, "stopped_early": stopped_early,
            "train_seconds": seconds, "world_size": ctx.world_size, "device": str(ctx.device),
            "threads_per_process": torch.get_num_threads(), **run_info}, indent=1) + "\n")
    return TrainResult(out, out / "best.pt", epochs_run, best_epoch, best_value, seconds, stopped_early, history)
