"""Paired longitudinal cases for training and evaluation: loading, folds, crops and batches.

A *case* is a baseline label map, a follow-up label map, the days between them and the
treatment. The synthetic benchmarks (``anatomydt make-dataset``) are read with
:func:`AnatomyDTLib.datasets.load_dataset`; their spacing is 1 mm (so HD95 in mm = pixels).

Cross-validation folds: case i goes to fold ``perm[i] % folds`` where ``perm`` is the permutation
of ``numpy.random.default_rng(fold_seed)`` — balanced folds, independent of the training seed.
Within the training folds a ``val_fraction`` of cases (chosen by ``default_rng([seed, fold])``) is
held out for early stopping; the test fold is never seen during training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, ParameterError
from ..state import labels_to_field


@dataclass
class Case:
    """One longitudinal case. Labels are integer arrays (array axis order); days since the baseline.

    A synthetic case is one pair (baseline, follow-up at ``interval_days``) with static treatment
    variables. A brain-cohort case is a patient: the baseline, every follow-up scan as
    ``followups = ((day, labels), ...)`` (``labels_t1``/``interval_days`` are the last one), and its
    :class:`~AnatomyDTLib.plan.TreatmentPlan` with arrays on the labels' grid, which acts in the
    solver and gives the time-dependent conditioning features.
    """

    name: str
    labels_t0: np.ndarray
    labels_t1: np.ndarray
    interval_days: float
    treatment: dict
    spacing: tuple[float, ...]
    followups: tuple = ()
    plan: object = None

    def targets(self) -> tuple:
        """((day, labels), ...) of every follow-up, in increasing days."""
        return self.followups or ((self.interval_days, self.labels_t1),)


@dataclass
class DatasetInfo:
    """What a dataset directory says about itself."""

    kind: str
    class_names: list[str]
    tumour_index: int
    background_index: int
    ndim: int
    spacing: tuple[float, ...]


def load_cases(directory) -> tuple[list[Case], DatasetInfo]:
    """Read a dataset written by ``anatomydt make-dataset``: synthetic pairs (manifest.csv + dataset.json)
    or a longitudinal brain cohort (manifest.csv with case/timepoint/day columns, docs/brain_data.md)."""
    from ..datasets import load_dataset

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"Data directory {str(directory)!r} not found; create it with 'anatomydt make-dataset'.")
    description = directory / "dataset.json"
    if not description.is_file() and (directory / "manifest.csv").is_file():
        from .cohort_data import load_cohort_cases

        return load_cohort_cases(directory)
    if not description.is_file():
        raise InputError(f"No dataset.json in {directory}; give a directory written by 'anatomydt make-dataset'.")
    try:
        meta = json.loads(description.read_text())
        names = [str(n) for n in meta["class_names"]]
        ndim = int(meta["ndim"])
        spacing = tuple(float(s) for s in meta.get("spacing_mm", [1.0] * ndim))
        tumour = int(meta.get("tumour_label", 1))
        background = int(meta.get("background_label", 0))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{description} is not a valid dataset description: {exc}.") from exc
    rows = load_dataset(directory)
    if not rows:
        raise InputError(f"The dataset in {directory} has no cases.")
    cases = []
    for row in rows:
        tr = dict(row["treatment"])
        if "interval_days" not in tr:
            raise InputError(f"Case {row['case']} in {directory} has no interval_days; the follow-up time is needed.")
        interval = float(tr["interval_days"])
        if not interval > 0:
            raise InputError(f"Case {row['case']} has interval_days = {interval}; it must be > 0 days.")
        l0, l1 = np.asarray(row["labels_t0"]), np.asarray(row["labels_t1"])
        if l0.shape != l1.shape or l0.ndim != ndim:
            raise InputError(f"Case {row['case']}: label maps of shapes {l0.shape} / {l1.shape}, expected {ndim}D and equal.")
        if int(max(l0.max(), l1.max())) >= len(names):
            raise InputError(f"Case {row['case']} has labels beyond the {len(names)} classes {names}.")
        cases.append(Case(row["case"], l0.astype(np.int64), l1.astype(np.int64), interval, tr, spacing))
    info = DatasetInfo(str(meta.get("kind", "unknown")), names, tumour, background, ndim, spacing)
    return cases, info


def fold_assignment(n: int, folds: int, fold_seed: int) -> np.ndarray:
    """Fold index (0..folds-1) of each of ``n`` cases, balanced, from ``default_rng(fold_seed)``."""
    if not (isinstance(folds, int) and folds >= 2):
        raise ParameterError(f"--folds must be an integer >= 2, got {folds!r}.")
    if n < folds:
        raise ParameterError(f"{n} cases cannot be split into {folds} folds; give more cases or fewer folds.")
    perm = np.random.default_rng(int(fold_seed)).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[perm] = np.arange(n) % folds
    return out


def split_cases(cases: list[Case], *, fold: int | None, folds: int | None, fold_seed: int, seed: int,
                val_fraction: float, max_train_cases: int = 0) -> tuple[list[Case], list[Case], list[Case]]:
    """(train, val, test) lists: test = fold ``fold`` (empty without folds), val = part of the rest."""
    if fold is None:
        pool, test = list(cases), []
        fold_key = -1
    else:
        if folds is None:
            raise ParameterError("--fold needs --folds.")
        if not 0 <= fold < folds:
            raise ParameterError(f"--fold must be in 0..{folds - 1} (0-based), got {fold}.")
        which = fold_assignment(len(cases), folds, fold_seed)
        pool = [c for c, f in zip(cases, which) if f != fold]
        test = [c for c, f in zip(cases, which) if f == fold]
        fold_key = fold
    rng = np.random.default_rng([int(seed), fold_key + 1])
    order = rng.permutation(len(pool))
    n_val = int(round(val_fraction * len(pool)))
    if val_fraction > 0 and len(pool) >= 2:
        n_val = min(max(n_val, 1), len(pool) - 1)
    else:
        n_val = 0
    val = [pool[i] for i in sorted(order[:n_val])]
    train = [pool[i] for i in sorted(order[n_val:])]
    if max_train_cases:
        train = train[:max_train_cases]
    if not train:
        raise ParameterError("No training cases left; give more cases or a smaller val_fraction.")
    return train, val, test


def crop_box(labels_t0: np.ndarray, tumour: int, crop: int) -> tuple[slice, ...]:
    """A ``crop``-wide box (per axis) centred on the baseline tumour's centroid, clamped to the image."""
    shape = labels_t0.shape
    if crop <= 0 or all(crop >= n for n in shape):
        return tuple(slice(0, n) for n in shape)
    where = np.argwhere(labels_t0 == tumour)
    centre = where.mean(0) if len(where) else (np.array(shape) - 1) / 2.0
    box = []
    for c, n in zip(centre, shape):
        width = min(crop, n)
        start = int(round(c - width / 2.0))
        start = min(max(start, 0), n - width)
        box.append(slice(start, start + width))
    return tuple(box)


@dataclass
class Batch:
    """Tensors of a batch of cases cut to the same box size.

    ``target[n]`` is compared with the rollout of batch item ``pairs[n][1]`` at ``days[pairs[n][0]]``:
    one pair per synthetic case, one per follow-up scan of a brain patient.
    """

    p0: torch.Tensor          # (B, K, *S) baseline field
    target: torch.Tensor      # (N, K, *S) one-hot follow-ups
    mask: torch.Tensor | None  # (B, *S) float body mask
    days: list[float]         # increasing distinct follow-up days
    pairs: list[tuple[int, int]]  # per target: (index into days, batch item)
    treatments: list[dict]
    names: list[str]
    spacing: tuple[float, ...]
    plan: object = None       # one TreatmentPlan for the (single-case) batch, cropped like the labels
    schema: object = None     # ClassSchema naming the plan's classes (with a plan only)

    @property
    def day_index(self) -> list[int]:
        return [d for d, _ in self.pairs]


def pool_field(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average (C, *S) over blocks of ``factor`` voxels per axis (trailing partial blocks dropped).

    Averaging one-hot labels gives the class fractions of each coarse voxel, so a pooled field stays
    on the simplex and keeps the volumes exact; that is why the coarse model grid is made this way.
    """
    if factor == 1:
        return x
    pool = torch.nn.functional.avg_pool3d if x.dim() == 4 else torch.nn.functional.avg_pool2d
    return pool(x[None].to(torch.float32), factor)[0]


def _pool_plan(plan, factor: int):
    """Plan arrays on the pooled grid: dose maps averaged (Gy), masks where over half the block is removed."""
    if factor == 1:
        return plan

    def mean(a):
        return pool_field(torch.as_tensor(np.asarray(a, dtype=np.float32))[None], factor)[0].numpy()

    return plan.map_arrays(lambda array, kind: mean(array) > 0.5 if kind == "resection_mask"
                           else mean(array).astype(np.float64))


def _trim(box: tuple[slice, ...], factor: int) -> tuple[slice, ...]:
    """Shorten each slice to a multiple of ``factor`` voxels."""
    return tuple(slice(s.start, s.start + (s.stop - s.start) // factor * factor) for s in box)


def make_batch(cases: list[Case], info: DatasetInfo, *, crop: int, soften_px: float, body_mask: bool,
               device="cpu", pool: int = 1) -> Batch:
    """Stack cases into a batch; with ``crop`` > 0 each case is cut around its baseline tumour.

    A case with a treatment plan (brain cohorts) must be alone in its batch: the solver takes one
    plan per rollout. Its plan arrays (dose map, resection masks) are cut with the same box.
    With ``pool`` > 1 everything is block-averaged onto a grid ``pool`` times coarser
    (:func:`pool_field`); the batch's spacing is the coarse one.
    """
    k = len(info.class_names)
    with_plan = [c for c in cases if c.plan is not None]
    if with_plan and len(cases) != 1:
        raise ParameterError("Cases with a treatment plan (brain cohorts) are rolled out one per batch; set "
                             "training.batch_size to 1.")
    p0s, targets, masks, pairs = [], [], [], []
    shapes = set()
    days = sorted({day for c in cases for day, _ in c.targets()})
    plan = None
    for b, c in enumerate(cases):
        box = _trim(crop_box(c.labels_t0, info.tumour_index, crop), pool)
        l0 = c.labels_t0[box]
        soften = float(soften_px) * min(c.spacing)
        p0 = pool_field(labels_to_field(l0, k, soften_mm=soften, spacing=c.spacing if soften > 0 else None), pool)
        shapes.add(tuple(p0.shape[1:]))
        p0s.append(p0)
        for day, labels in c.targets():
            targets.append(pool_field(labels_to_field(labels[box], k), pool))
            pairs.append((days.index(day), b))
        inside = torch.as_tensor(l0 != info.background_index, dtype=torch.float32)
        masks.append((pool_field(inside[None], pool)[0] > 0.5).to(torch.float32) if pool > 1 else inside)
        if c.plan is not None:
            from ..plan import crop_plan

            plan = _pool_plan(crop_plan(c.plan, box), pool)
    if len(shapes) != 1:
        raise InputError(f"Cases of one batch have different shapes {sorted(shapes)}; use a crop or equal sizes.")
    mask = torch.stack(masks).to(device) if body_mask else None
    if mask is not None and bool((mask.flatten(1).sum(1) == 0).any()):
        mask = None  # a case without body voxels: no mask rather than an empty domain
    schema = None
    if plan is not None:
        from .forecast import schema_from_names

        schema = schema_from_names(info.class_names, info.tumour_index, info.background_index, info.background_index)
    spacing = tuple(float(h) * pool for h in cases[0].spacing)
    return Batch(torch.stack(p0s).to(device), torch.stack(targets).to(device), mask, days, pairs,
                 [c.treatment for c in cases], [c.name for c in cases], spacing, plan, schema)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, intervals: list[float] | None,
                  world_size: int = 1) -> list[list[int]]:
    """Case indices of every batch of an epoch, the same on every process.

    The order comes from ``default_rng([seed, epoch])``, so a resumed run sees the same batches.
    With ``intervals`` the shuffled cases are sorted by interval inside windows of 4 batches, so a
    batch holds similar follow-up times (its rollout runs to the longest one) while the batch order
    stays random. The number of batches is a multiple of ``world_size``; missing batches repeat
    earlier ones, so every DDP process runs the same number of steps.
    """
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = list(rng.permutation(n))
    if intervals is not None:
        window = 4 * batch_size
        order = [i for s in range(0, n, window) for i in sorted(order[s:s + window], key=lambda j: intervals[j])]
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    pad = (-len(batches)) % world_size
    return batches + batches[:pad]
