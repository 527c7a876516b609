"""Weights files of the learned model: what they hold, how they are written and validated.

A checkpoint is a ``torch.save`` dict holding only plain types and tensors (it loads with
``torch.load(weights_only=True)``, so opening a file never runs code from it)::

    format               "anatomydt-learned-model"   (anything else is a foreign file)
    format_version       1
    anatomydt_version    library version that wrote it
    model_config         the resolved ``model`` section of the training configuration
    class_names          class names in channel order (the schema of the training data)
    tumour_index, sink_index, background_index
    spatial_ndim         2 or 3
    conditioning_features  names of the FiLM treatment features (models.conditioning)
    state_dict           the weights
    info                 free-form training facts (epoch, validation loss, data kind, spacing ...)

Files are written atomically (temporary file + rename), so an interrupted save never leaves a
truncated checkpoint under the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .. import __version__
from ..errors import AnatomyDTError, InputError
from .conditioning import FEATURE_NAMES
from .config import Config
from .growth import AnatomyDTModel

CHECKPOINT_FORMAT = "anatomydt-learned-model"
CHECKPOINT_FORMAT_VERSION = 1
_REQUIRED = ("format_version", "model_config", "class_names", "tumour_index", "sink_index", "spatial_ndim",
             "state_dict")


def checkpoint_dict(model: AnatomyDTModel, class_names, *, background_index: int = 0, info: dict | None = None) -> dict:
    """The checkpoint content of ``model`` (weights copied to the CPU)."""
    if len(class_names) != model.num_classes:
        raise InputError(f"{len(class_names)} class names for a model with {model.num_classes} classes.")
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "anatomydt_version": __version__,
        "model_config": dict(model.cfg),
        "class_names": [str(n) for n in class_names],
        "tumour_index": int(model.tumour_index),
        "sink_index": int(model.sink_index),
        "background_index": int(background_index),
        "spatial_ndim": int(model.ndim),
        "conditioning_features": list(FEATURE_NAMES),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "info": dict(info or {}),
    }


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` to a temporary sibling, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: AnatomyDTModel, path, class_names, *, background_index: int = 0,
                    info: dict | None = None) -> Path:
    """Write ``model`` with its configuration and class names to ``path`` (atomically); returns the path."""
    atomic_torch_save(checkpoint_dict(model, class_names, background_index=background_index, info=info), path)
    return Path(path)


def read_checkpoint(path) -> dict:
    """Load and validate a checkpoint file without building the model.

    Raises:
        InputError: missing file; unreadable (corrupt or truncated) file; a file that is not an
            AnatomyDT learned-model checkpoint (foreign weights); a newer format version; missing
            or inconsistent entries.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Model weights file {str(path)!r} not found.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files (zip, pickle, EOF, runtime)
        raise InputError(f"Cannot read the model weights file {str(path)!r}: it is corrupt or truncated, or not a "
                         f"PyTorch file at all ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                         "Re-copy it or retrain with 'anatomydt train'.") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        what = f"a {type(data).__name__}" if not isinstance(data, dict) else \
            f"a dict with keys {sorted(map(str, data))[:8]}"
        raise InputError(f"{str(path)!r} is a PyTorch file but not an AnatomyDT learned-model checkpoint (foreign "
                         f"weights: {what}, no format tag {CHECKPOINT_FORMAT!r}). Give a file written by "
                         "'anatomydt train' (best.pt / last_model.pt).")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise InputError(f"The checkpoint {str(path)!r} lacks {missing}; it is damaged or from an incompatible writer.")
    version = data["format_version"]
    if not isinstance(version, int) or version < 1:
        raise InputError(f"The checkpoint {str(path)!r} has an invalid format_version {version!r}.")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise InputError(f"The checkpoint {str(path)!r} has format version {version}, newer than this AnatomyDT "
                         f"({__version__}) reads ({CHECKPOINT_FORMAT_VERSION}); update AnatomyDT.")
    names = data["class_names"]
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        raise InputError(f"The checkpoint {str(path)!r} has invalid class names {names!r}.")
    if data["spatial_ndim"] not in (2, 3):
        raise InputError(f"The checkpoint {str(path)!r} has spatial_ndim {data['spatial_ndim']!r}; expected 2 or 3.")
    if not isinstance(data["state_dict"], dict):
        raise InputError(f"The checkpoint {str(path)!r} has no weights dictionary.")
    return data


def build_model(data: dict, source: str = "checkpoint") -> AnatomyDTModel:
    """The :class:`AnatomyDTModel` described by a validated checkpoint dict, with its weights loaded."""
    try:
        cfg = Config.from_dict({"model": data["model_config"]}, source=source)
        model = AnatomyDTModel(cfg.model, len(data["class_names"]), int(data["spatial_ndim"]),
                               tumour_index=int(data["tumour_index"]), sink_index=int(data["sink_index"]))
    except AnatomyDTError as exc:
        raise InputError(f"The checkpoint {source} describes an invalid model: {exc}") from exc
    state = data["state_dict"]
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"The checkpoint {source} has a non-tensor weight {name!r}.")
        if torch.is_floating_point(value) and not torch.isfinite(value).all():
            raise InputError(f"The checkpoint {source} has NaN or infinite values in weight {name!r}; "
                             "the training diverged — use an earlier checkpoint.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"The weights in {source} do not match the model its configuration describes ({first}).") from exc
    model.eval()
    return model


def load_checkpoint(path, device: str = "cpu"):
    """Load a weights file as a ready :class:`~AnatomyDTLib.models.forecast.LearnedForecastModel`.

    ``device`` is "cpu", "cuda" or "auto". A corrupt, truncated or foreign file raises
    :class:`~AnatomyDTLib.errors.InputError` saying so.
    """
    from .forecast import LearnedForecastModel

    data = read_checkpoint(path)
    model = build_model(data, source=repr(str(path)))
    return LearnedForecastModel(model, data["class_names"], background_index=int(data.get("background_index", 0)),
                                device=device, info=data.get("info", {}))
