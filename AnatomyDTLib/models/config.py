"""Configuration of the learned Anatomy-DT model and of its training: one JSON file, four sections.

A configuration file (``configs/voronoi.json``, ``configs/vessel.json``, ``configs/ci_tiny.json``) is
a JSON object with the sections ``model``, ``loss``, ``training`` and ``data``. Every key is
optional (the defaults below apply) and every key is documented here and in ``docs/learning.md``;
an unknown key or an out-of-range value raises :class:`~AnatomyDTLib.errors.ParameterError`, so a
typo never silently falls back to a default.

Units: time in days, diffusion and cross-diffusion in mm²/day (the synthetic benchmarks have 1 mm
pixels, so mm = px there), rates in 1/day, lengths of the CNN kernels in voxels.

Why dataclasses with a key table: the table (:data:`MODEL_KEYS` ...) is the single source for the
defaults, the validation and the documentation, and :meth:`Config.to_dict` writes back exactly
the resolved values, which are stored in every checkpoint and run directory.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, ParameterError

# key -> (default, description). The description is what docs/learning.md shows.
MODEL_KEYS: dict[str, tuple[Any, str]] = {
    "dt_days": (4.0, "largest solver time step (days); rollouts run from day 0 to each case's interval_days"),
    "jacobi_iters": ("auto", "Jacobi sweeps per step, or 'auto' = recommended_jacobi_iters(dt, max D, spacing, jacobi_tolerance)"),
    "jacobi_tolerance": (0.05, "unresolved fraction of each step's diffusion allowed by 'auto' (see operators.recommended_jacobi_iters)"),
    "max_jacobi_iters": (20, "upper bound of the 'auto' sweep count"),
    "omega": (1.0, "Jacobi relaxation factor in (0, 1]"),
    "spatial_alpha": (True, "ablation switch: true = growth-rate field alpha(x) from a CNN, false = one scalar alpha per case"),
    "k_max_per_day": (0.1, "upper bound of the tumour growth rate: alpha = k_max * sigmoid(g) (1/day)"),
    "alpha_init_per_day": (0.01, "initial growth rate alpha everywhere (1/day), < k_max"),
    "alpha_channels": (16, "hidden channels of the alpha-field CNN"),
    "growth_cnn": (True, "ablation switch: the Growth CNN residual reaction on/off"),
    "cnn_channels": (16, "hidden channels of the Growth CNN"),
    "cnn_dilations": ([1, 2, 4], "dilation of each 3x3(x3) hidden convolution of both CNNs (receptive field 1 + 2*sum)"),
    "correction_rate_per_day": (0.2, "maximum rate A of the Growth CNN correction (1/day); dt_days * A must be <= 1"),
    "film_hidden": (32, "hidden width of the FiLM conditioning MLPs"),
    "carrying_capacity": (1.0, "tumour carrying capacity kappa in (0, 1]"),
    "diffusion_init_mm2_per_day": (0.05, "initial self-diffusion D_k (mm²/day): one number, or one per class"),
    "learn_diffusion": (True, "train D_k (kept positive by softplus)"),
    "repulsion_init_mm2_per_day": (0.02, "initial repulsion strength r_kj >= 0 (mm²/day), chi_kj = -r_kj for j != k"),
    "learn_cross_diffusion": (True, "train r_kj (kept positive by softplus)"),
    "cross_diffusion": (True, "use the cross-diffusion term at all (false: chi = 0)"),
    "well_posed_cross_diffusion": (False, "bound every repulsion by the well-posedness condition: r_kj = (D_j + D_k) * sigmoid(rho_kj) <= D_j + D_k"),
    "visibility_threshold": (None, "tumour density tau in (0, 1) above which a scan shows tumour (models/visibility.py: the baseline label becomes a density with an invisible infiltration tail, forecasts are labelled by p_tumour > tau); null = off, the tumour channel is labelled by argmax"),
    "infiltration_length_mm": (4.0, "initial e-folding length lambda (mm) of the tumour density at the visible margin (visibility coding)"),
    "infiltrated_classes": (None, "channels the invisible tumour tail may occupy and from which the tissue under the tumour is taken (null = all but tumour and sink)"),
    "visibility_sharpness": (0.1, "width of the soft visibility step as a fraction of tau (keeps the training loss differentiable)"),
    "learn_visibility": (True, "train tau and lambda of the visibility coding"),
    "solver_checkpoint": (False, "recompute each solver step in the backward pass (less memory, ~40 % slower)"),
}

LOSS_KEYS: dict[str, tuple[Any, str]] = {
    "seg_classes": (None, "channels in the soft-Dice sum of Eq. 3 (null = all classes)"),
    "lambda_topo": (1.0, "weight of the anatomy topology loss (ATL); 0 = topology loss off (ablation switch)"),
    "lambda_1": (1.0, "weight of the clDice part of the ATL"),
    "lambda_2": (1.0, "weight of the overlap part of the ATL"),
    "cl_classes": ([], "channels whose centreline is preserved by clDice (e.g. [2] = vessel)"),
    "skeleton_iters": (10, "soft-skeleton iterations (must exceed the half-width in voxels of the structures)"),
    "lambda_reg": (0.0, "weight of ||theta||^2 (Eq. 3)"),
    "lambda_tv": (0.01, "weight of the total variation of alpha(x)/k_max (mean absolute forward difference)"),
}

TRAINING_KEYS: dict[str, tuple[Any, str]] = {
    "epochs": (10, "maximum number of epochs"),
    "batch_size": (1, "cases per optimisation step (per process with DDP)"),
    "lr": (3e-3, "Adam learning rate"),
    "lr_min_fraction": (0.1, "cosine schedule: final learning rate as a fraction of lr (1 = constant)"),
    "physics_lr_scale": (3.0, "learning-rate multiplier of the physics parameters (softplus-parametrised D_k, r_kj)"),
    "weight_decay": (0.0, "Adam weight decay"),
    "grad_clip": (1.0, "clip the global gradient norm to this value (0 = off)"),
    "seed": (0, "seed of the model initialisation, the validation split and the batch order"),
    "crop": (96, "train on crops of this many voxels per axis centred on the baseline tumour (0 = whole image)"),
    "interval_bucketing": (True, "group cases of similar interval_days into batches (shorter rollouts)"),
    "val_fraction": (0.1, "fraction of the training cases held out for early stopping and best-model selection"),
    "monitor": ("val_dice", "best-model / early-stopping criterion: 'val_dice' (mean hard Dice, higher is better) or 'val_loss'"),
    "ema_decay": (0.98, "exponential moving average of the weights (0 = off); validation and best.pt use the averaged weights"),
    "patience": (4, "early stopping: stop after this many epochs without a validation improvement (0 = off)"),
    "min_delta": (1e-4, "smallest decrease of the validation loss that counts as an improvement"),
    "max_train_cases": (0, "use at most this many training cases (0 = all); for quick runs"),
    "threads": (0, "torch CPU threads per process (0 = leave torch's default)"),
}

DATA_KEYS: dict[str, tuple[Any, str]] = {
    "fold_seed": (0, "seed of the case-to-fold assignment of cross-validation"),
    "soften_px": (0.0, "Gaussian softening (voxels) of the one-hot baseline before the rollout (0 = one-hot)"),
    "body_mask": (True, "synthetic data: restrict the dynamics to the body (label != background); outside nothing changes"),
    "pool": (1, "average-pool labels, masks and plan arrays by this integer factor per axis: the model works on a grid "
                "pool x coarser than the data (stored in the checkpoint; forecasts resample to it)"),
}

SECTIONS = {"model": MODEL_KEYS, "loss": LOSS_KEYS, "training": TRAINING_KEYS, "data": DATA_KEYS}


def _defaults(table: dict) -> dict:
    return {k: copy.deepcopy(v[0]) for k, v in table.items()}


@dataclass
class Config:
    """A fully resolved configuration: every key of every section has a validated value."""

    model: dict = field(default_factory=lambda: _defaults(MODEL_KEYS))
    loss: dict = field(default_factory=lambda: _defaults(LOSS_KEYS))
    training: dict = field(default_factory=lambda: _defaults(TRAINING_KEYS))
    data: dict = field(default_factory=lambda: _defaults(DATA_KEYS))

    def to_dict(self) -> dict:
        return {"model": copy.deepcopy(self.model), "loss": copy.deepcopy(self.loss),
                "training": copy.deepcopy(self.training), "data": copy.deepcopy(self.data)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "Config":
        if not isinstance(data, dict):
            raise ParameterError(f"{source}: the configuration must be a JSON object with sections "
                                 f"{sorted(SECTIONS)}, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(SECTIONS) - {"comment", "_comment"})
        if unknown:
            raise ParameterError(f"{source}: unknown section(s) {unknown}; allowed: {sorted(SECTIONS)}.")
        cfg = cls()
        for name, table in SECTIONS.items():
            section = data.get(name, {})
            if not isinstance(section, dict):
                raise ParameterError(f"{source}: section {name!r} must be an object.")
            bad = sorted(set(section) - set(table) - {"comment", "_comment"})
            if bad:
                raise ParameterError(f"{source}: unknown key(s) {bad} in section {name!r}; allowed keys are {sorted(table)}.")
            resolved = getattr(cfg, name)
            for key, value in section.items():
                if key in ("comment", "_comment"):
                    continue
                resolved[key] = value
        cfg.validate(source)
        return cfg

    @classmethod
    def load(cls, path) -> "Config":
        """Read and validate a configuration file."""
        p = Path(path)
        if not p.is_file():
            raise InputError(f"Configuration file {str(p)!r} not found.")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ParameterError(f"Configuration file {str(p)!r} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                                 f"column {exc.colno}.") from exc
        return cls.from_dict(data, source=str(p))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # ------------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        m, lo, t, d = self.model, self.loss, self.training, self.data
        where = f"{source}: "
        _positive(m, "dt_days", where)
        if m["jacobi_iters"] != "auto":
            _integer(m, "jacobi_iters", where, 1)
        _in_range(m, "jacobi_tolerance", where, 1e-6, 0.99)
        _integer(m, "max_jacobi_iters", where, 1)
        _in_range(m, "omega", where, 1e-6, 1.0)
        for key in ("spatial_alpha", "growth_cnn", "learn_diffusion", "learn_cross_diffusion", "cross_diffusion",
                    "solver_checkpoint", "well_posed_cross_diffusion", "learn_visibility"):
            _boolean(m, key, where)
        _positive(m, "k_max_per_day", where)
        _positive(m, "alpha_init_per_day", where)
        if not m["alpha_init_per_day"] < m["k_max_per_day"]:
            raise ParameterError(f"{where}model.alpha_init_per_day ({m['alpha_init_per_day']}) must be < k_max_per_day "
                                 f"({m['k_max_per_day']}).")
        for key in ("alpha_channels", "cnn_channels", "film_hidden"):
            _integer(m, key, where, 1)
        dil = m["cnn_dilations"]
        if not (isinstance(dil, list) and dil and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in dil)):
            raise ParameterError(f"{where}model.cnn_dilations must be a non-empty list of integers >= 1, got {dil!r}.")
        _positive(m, "correction_rate_per_day", where)
        if m["dt_days"] * m["correction_rate_per_day"] > 1.0 + 1e-12:
            raise ParameterError(
                f"{where}model.dt_days * correction_rate_per_day = {m['dt_days'] * m['correction_rate_per_day']:g} > 1: "
                "the explicit correction step would overshoot (leave the simplex); lower one of them.")
        _in_range(m, "carrying_capacity", where, 1e-6, 1.0)
        dinit = m["diffusion_init_mm2_per_day"]
        values = dinit if isinstance(dinit, list) else [dinit]
        if not values or not all(_is_number(v) and v > 0 for v in values):
            raise ParameterError(f"{where}model.diffusion_init_mm2_per_day must be a number > 0 or a list of them "
                                 f"(mm²/day), got {dinit!r}.")
        _non_negative(m, "repulsion_init_mm2_per_day", where)
        if m["visibility_threshold"] is not None:
            _in_range(m, "visibility_threshold", where, 1e-3, 0.9)
        if not (_is_number(m["infiltration_length_mm"]) and m["infiltration_length_mm"] > 0.2):
            raise ParameterError(f"{where}infiltration_length_mm must be a number > 0.2 (mm), got {m['infiltration_length_mm']!r}.")
        if m["infiltrated_classes"] is not None:
            _int_list(m, "infiltrated_classes", where, allow_empty=False)
        _in_range(m, "visibility_sharpness", where, 1e-3, 1.0)
        # loss
        if lo["seg_classes"] is not None:
            _int_list(lo, "seg_classes", where, allow_empty=False)
        _int_list(lo, "cl_classes", where, allow_empty=True)
        for key in ("lambda_topo", "lambda_1", "lambda_2", "lambda_reg", "lambda_tv"):
            _non_negative(lo, key, where)
        _integer(lo, "skeleton_iters", where, 0)
        # training
        for key in ("epochs", "batch_size"):
            _integer(t, key, where, 1)
        _positive(t, "lr", where)
        _positive(t, "physics_lr_scale", where)
        _in_range(t, "lr_min_fraction", where, 0.0, 1.0)
        _non_negative(t, "weight_decay", where)
        _non_negative(t, "grad_clip", where)
        for key in ("seed", "crop", "patience", "max_train_cases", "threads"):
            _integer(t, key, where, 0)
        if 0 < t["crop"] < 16:
            raise ParameterError(f"{where}training.crop must be 0 (whole image) or >= 16 voxels, got {t['crop']}.")
        _boolean(t, "interval_bucketing", where)
        _in_range(t, "val_fraction", where, 0.0, 0.5)
        if t["monitor"] not in ("val_dice", "val_loss"):
            raise ParameterError(f"{where}training.monitor must be 'val_dice' or 'val_loss', got {t['monitor']!r}.")
        _in_range(t, "ema_decay", where, 0.0, 0.9999)
        _non_negative(t, "min_delta", where)
        # data
        _integer(d, "fold_seed", where, 0)
        _non_negative(d, "soften_px", where)
        _boolean(d, "body_mask", where)
        _integer(d, "pool", where, 1)
        if t["crop"] and t["crop"] % d["pool"]:
            raise ParameterError(f"{where}training.crop ({t['crop']}) must be a multiple of data.pool ({d['pool']}).")

    def check_classes(self, num_classes: int) -> None:
        """Check the class indices and per-class lists against the data's K."""
        for key in ("seg_classes", "cl_classes", "infiltrated_classes"):
            section = self.model if key == "infiltrated_classes" else self.loss
            values = section[key] or []
            bad = [c for c in values if not 0 <= c < num_classes]
            if bad:
                raise ParameterError(f"{'model' if section is self.model else 'loss'}.{key} {bad} are not channels of this dataset (0..{num_classes - 1}).")
        dinit = self.model["diffusion_init_mm2_per_day"]
        if isinstance(dinit, list) and len(dinit) != num_classes:
            raise ParameterError(f"model.diffusion_init_mm2_per_day lists {len(dinit)} values but the data have "
                                 f"{num_classes} classes.")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(section, key, where):
    v = section[key]
    if not (_is_number(v) and v > 0):
        raise ParameterError(f"{where}{key} must be a number > 0, got {v!r}.")


def _non_negative(section, key, where):
    v = section[key]
    if not (_is_number(v) and v >= 0):
        raise ParameterError(f"{where}{key} must be a number >= 0, got {v!r}.")


def _in_range(section, key, where, lo, hi):
    v = section[key]
    if not (_is_number(v) and lo <= v <= hi):
        raise ParameterError(f"{where}{key} must be a number in [{lo:g}, {hi:g}], got {v!r}.")


def _integer(section, key, where, minimum):
    v = section[key]
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
        raise ParameterError(f"{where}{key} must be an integer >= {minimum}, got {v!r}.")


def _boolean(section, key, where):
    if not isinstance(section[key], bool):
        raise ParameterError(f"{where}{key} must be true or false, got {section[key]!r}.")


def _int_list(section, key, where, allow_empty):
    v = section[key]
    if not (isinstance(v, list) and (v or allow_empty)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)):
        raise ParameterError(f"{where}{key} must be a list of class indices >= 0, got {v!r}.")


def config_reference_markdown() -> str:
    """Markdown tables of every configuration key, default and meaning (used for docs/learning.md)."""
    lines = []
    for name, table in SECTIONS.items():
        lines += [f"#### `{name}`", "", "| key | default | meaning |", "|---|---|---|"]
        for key, (default, text) in table.items():
            lines.append(f"| `{key}` | `{json.dumps(default)}` | {text} |")
        lines.append("")
    return "\n".join(lines)
