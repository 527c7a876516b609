"""Prediction: from a baseline anatomy and a treatment plan to future anatomies, on the input's grid.

This is the one place where a model is chosen and run; the CLI (``anatomydt predict``), the
qt-free Slicer scene logic and the digital-twin calibration all call :func:`predict`.

A *forecast model* is any object with::

    name: str                 # e.g. "pde-only", written into output files
    version: str
    def forecast(self, p0, *, spacing, days, plan, mask=None, progress=None) -> torch.Tensor

``p0`` is a (K, *S) float tensor on the simplex in the brain schema's channel order, ``spacing``
the mm per axis in array order, ``days`` increasing output days, ``plan`` a loaded
:class:`~AnatomyDTLib.plan.TreatmentPlan` whose arrays are on p0's grid. It returns a
(len(days), K, *S) tensor on p0's grid. Models that work at a fixed resolution resample inside
``forecast`` and answer on the input grid.

Optional attributes, checked by :func:`predict` before any work: ``spatial_ndim`` (2 or 3; a
model that only works on 3D volumes refuses a 2D baseline with a clear message; the learned
model's ``model.ndim`` is read when ``spatial_ndim`` is absent) and ``class_names`` (the class
order the model was trained on, which must be the baseline schema's). The mechanistic
``pde-only`` model works in 2D and 3D.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from . import __version__
from .errors import AnatomyDTError, Cancelled, InputError
from .io import Geometry
from .parameters import PDEParameters
from .plan import TreatmentPlan, load_plan
from .schema import ClassSchema, DEFAULT_SCHEMA
from .solver import simulate
from .state import AnatomyState, labels_volumes_ml

ProgressCallback = Callable[[float], None]
"""Called with the fraction done in [0, 1]."""


class ForecastModel(Protocol):
    name: str
    version: str

    def forecast(self, p0: torch.Tensor, *, spacing, days, plan: TreatmentPlan, mask=None,
                 progress: Callable[[float, float], None] | None = None) -> torch.Tensor: ...


@dataclass
class PDEOnlyModel:
    """The mechanistic model alone: Eq. 2 with fixed (literature or user) parameters."""

    parameters: PDEParameters = field(default_factory=PDEParameters.brain_defaults)
    schema: ClassSchema = DEFAULT_SCHEMA
    name: str = "pde-only"
    version: str = __version__

    def forecast(self, p0, *, spacing, days, plan, mask=None, progress=None) -> torch.Tensor:
        work = p0.to(torch.float32)  # single precision is ample for inference and twice as fast
        kwargs = self.parameters.simulate_kwargs(work, self.schema)
        out = simulate(work, spacing=spacing, days=list(days), plan=plan, mask=mask, schema=self.schema,
                       return_trajectory=True, progress=progress, **kwargs)
        return out.to(p0.dtype)


def bundled_model_path() -> Path:
    """Where the default trained weights live in a checkout or an installed extension."""
    return Path(__file__).resolve().parent.parent / "Resources" / "Models" / "anatomydt_default.pt"


def load_model(model: "str | ForecastModel" = "pde-only", *, device: str = "cpu") -> ForecastModel:
    """Resolve ``"default"``, ``"pde-only"``, a weights file path, or an already built model."""
    if not isinstance(model, str):
        return model
    if model == "pde-only":
        return PDEOnlyModel()
    path = bundled_model_path() if model == "default" else Path(model)
    if model == "default" and not path.is_file():
        raise InputError("The default trained model is not bundled with this version of AnatomyDT yet; use the "
                         "mechanistic model with literature parameters instead (model 'pde-only'; on the command "
                         "line: --model pde-only), or give a weights file written by 'anatomydt train'.")
    if not path.is_file():
        raise InputError(f"Model file {str(path)!r} not found; give 'default', 'pde-only' or a path to a weights file.")
    try:
        from .models import load_checkpoint  # the learned models (Growth CNN) live there
    except ImportError as exc:
        _check_weights_file_readable(path)
        raise InputError(f"Cannot use the weights file {str(path)!r}: the learned models are not available in this "
                         f"installation ({exc}). Use --model pde-only, or update AnatomyDT.") from exc
    try:
        return load_checkpoint(path, device=device)
    except AnatomyDTError:
        raise
    except Exception as exc:  # a damaged or foreign file must give a message, never a traceback
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"Cannot load the model weights file {str(path)!r} ({type(exc).__name__}: {detail}); it is "
                         "corrupt, truncated or not an AnatomyDT weights file. Re-copy it, retrain with "
                         "'anatomydt train', or use --model pde-only.") from exc


def _check_weights_file_readable(path: Path) -> None:
    """Raise :class:`InputError` unless ``path`` opens as a PyTorch file (without running code from it)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files (zip, pickle, EOF, runtime)
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"Cannot read the model weights file {str(path)!r}: it is corrupt or truncated, or not a "
                         f"PyTorch file at all ({type(exc).__name__}: {detail}). Re-copy it, or use --model pde-only."
                         ) from exc


@dataclass
class Prediction:
    """Predicted anatomies at the requested days, on the baseline's grid.

    Attributes:
        days: output days (days from baseline).
        fields: (len(days), K, *S) probability fields.
        geometry: the baseline's geometry (spacing, origin, direction).
        schema: class names and colours.
        model_name, model_version: what produced it (written into output tags).
        baseline: the baseline anatomy state.
    """

    days: list[float]
    fields: torch.Tensor
    geometry: Geometry
    schema: ClassSchema
    model_name: str
    model_version: str
    baseline: AnatomyState
    _labels: dict = field(default_factory=dict, repr=False, compare=False)  # index -> argmax labels, computed once
    _volumes: list = field(default_factory=list, repr=False, compare=False)  # volumes_ml rows, computed once
    _baseline_labels: np.ndarray | None = field(default=None, repr=False, compare=False)  # predict() has them already

    def state(self, index: int) -> AnatomyState:
        return AnatomyState(self.fields[index], self.geometry, self.schema)

    def labels(self, index: int) -> np.ndarray:
        """Predicted labelmap at ``days[index]`` (argmax), array order (a copy; the argmax is computed once)."""
        if index not in self._labels:
            self._labels[index] = self.state(index).to_labels()
        return self._labels[index].copy()

    def tumour_probability(self, index: int) -> np.ndarray:
        """Tumour probability map at ``days[index]`` in [0, 1], float32, array order."""
        return self.fields[index, self.schema.tumour_index].detach().cpu().numpy().astype(np.float32)

    def volumes_ml(self) -> list[tuple[float, dict[str, float]]]:
        """Per output day, the class volumes in mL (argmax voxel count × voxel volume); day 0 = baseline.
        Computed once (the CSV, the figure and the printed table all ask); each call returns a copy."""
        if not self._volumes:
            baseline = self.baseline.to_labels() if self._baseline_labels is None else self._baseline_labels
            rows = [(0.0, baseline)] + [(d, self.labels(i)) for i, d in enumerate(self.days)]
            self._volumes.extend((d, labels_volumes_ml(labels, self.geometry, self.schema)) for d, labels in rows)
        return [(d, dict(volumes)) for d, volumes in self._volumes]

    def segment_tags(self) -> dict[str, str]:
        """Tags written on every predicted segment (read by Slicer's DICOM SEG export)."""
        return {
            "DICOM.SegmentAlgorithmType": "AUTOMATIC",
            "DICOM.SegmentAlgorithmName": f"AnatomyDT {self.model_name} {self.model_version}",
            "AnatomyDT.ModelVersion": self.model_version,
        }


def predict(baseline: AnatomyState, *, days, plan=None, model: "str | ForecastModel" = "pde-only",
            device: str = "cpu", mask=None, progress: ProgressCallback | None = None,
            cancel: Callable[[], bool] | None = None) -> Prediction:
    """Forecast the anatomy at ``days`` after the baseline under ``plan``.

    Args:
        baseline: the baseline anatomy (field on the simplex + geometry), e.g. from
            :meth:`AnatomyState.from_file`.
        days: a day or increasing days after the baseline scan.
        plan: treatment plan (dict, JSON path, TreatmentPlan or None); arrays must be on the
            baseline grid (callers resample files with the geometry).
        model: "pde-only", "default", a weights path, or a model object.
        device: "cpu", "cuda" or "auto".
        progress: called with the fraction done (0..1).
        cancel: polled during the run; returning True stops it with :class:`Cancelled`.
    """
    days_list = [float(days)] if np.ndim(days) == 0 else [float(d) for d in days]
    if not days_list or any(d <= 0 for d in days_list) or days_list != sorted(days_list):
        raise InputError(f"Prediction days must be > 0 and increasing (days after the baseline scan), got {days_list}.")
    schema = baseline.schema
    if baseline.field.dim() - 1 not in (2, 3):
        raise InputError(f"The baseline must be 2D or 3D, got {baseline.field.dim() - 1} spatial axes.")
    labels = baseline.to_labels()
    if not (labels == schema.tumour_index).any():
        raise InputError("The baseline segmentation has no tumour voxels; check the segment-to-class mapping "
                         "(a segment named e.g. 'Tumor' is needed) or pass an explicit class map.")
    torch_device = _resolve_device(device)
    treatment = load_plan(plan, schema=schema)
    forecaster = load_model(model, device=str(torch_device))
    _check_model_fits(forecaster, baseline)
    horizon = days_list[-1]

    def on_step(day: float, _horizon: float) -> None:
        if cancel is not None and cancel():
            raise Cancelled("prediction cancelled by the user")
        if progress is not None:
            progress(min(1.0, day / horizon))

    p0 = baseline.field.to(torch_device)
    with torch.no_grad():
        fields = forecaster.forecast(p0, spacing=baseline.geometry.spacing_array_order, days=days_list, plan=treatment,
                                     mask=mask, progress=on_step)
    if progress is not None:
        progress(1.0)
    return Prediction(days_list, fields.cpu(), baseline.geometry, schema, forecaster.name, forecaster.version, baseline,
                      _baseline_labels=labels)


def model_spatial_ndim(forecaster) -> int | None:
    """The number of spatial axes a model works on (2 or 3), or None if it works on both (or does not say)."""
    ndim = getattr(forecaster, "spatial_ndim", None)
    if ndim is None:
        ndim = getattr(getattr(forecaster, "model", None), "ndim", None)
    return int(ndim) if isinstance(ndim, int) and not isinstance(ndim, bool) else None


def _check_model_fits(forecaster, baseline: AnatomyState) -> None:
    """Refuse, before running, a baseline the model cannot take: wrong dimension or class order."""
    name = getattr(forecaster, "name", "the model")
    model_ndim = model_spatial_ndim(forecaster)
    data_ndim = baseline.field.dim() - 1
    if model_ndim is not None and model_ndim != data_ndim:
        hint = (" Give the 3D segmentation (all slices), or use model 'pde-only' (--model pde-only), which also "
                "works on 2D slices.") if model_ndim == 3 else " Give a baseline of the dimension the model was trained on."
        raise InputError(f"Model {name!r} works on {model_ndim}D volumes, but the baseline segmentation is "
                         f"{data_ndim}D (shape {tuple(baseline.field.shape[1:])}).{hint}")
    names = getattr(forecaster, "class_names", None)
    if names is not None and list(names) != list(baseline.schema.names):
        raise InputError(f"Model {name!r} was trained on the classes {list(names)}, but the baseline has the classes "
                         f"{list(baseline.schema.names)}; use a model trained on these classes.")


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available; use 'cpu' or 'auto'.")
    if device not in ("cpu", "cuda"):
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    return torch.device(device)
