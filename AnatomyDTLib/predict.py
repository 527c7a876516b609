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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from . import __version__
from .errors import Cancelled, InputError
from .io import Geometry
from .parameters import PDEParameters
from .plan import TreatmentPlan, load_plan
from .schema import ClassSchema, DEFAULT_SCHEMA
from .solver import simulate
from .state import AnatomyState

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
        raise InputError("The default trained model is not bundled with this version; use model 'pde-only' "
                         "(the mechanistic model with literature parameters) or give a weights file.")
    if not path.is_file():
        raise InputError(f"Model file {str(path)!r} not found; give 'default', 'pde-only' or a path to a weights file.")
    from .models import load_checkpoint  # the learned models (Growth CNN) live there

    return load_checkpoint(path, device=device)


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

    def state(self, index: int) -> AnatomyState:
        return AnatomyState(self.fields[index], self.geometry, self.schema)

    def labels(self, index: int) -> np.ndarray:
        """Predicted labelmap at ``days[index]`` (argmax), array order."""
        return self.state(index).to_labels()

    def tumour_probability(self, index: int) -> np.ndarray:
        """Tumour probability map at ``days[index]`` in [0, 1], float32, array order."""
        return self.fields[index, self.schema.tumour_index].detach().cpu().numpy().astype(np.float32)

    def volumes_ml(self) -> list[tuple[float, dict[str, float]]]:
        """Per output day, the class volumes in mL (argmax voxel count × voxel volume); day 0 = baseline."""
        rows = [(0.0, self.baseline.class_volumes_ml())]
        rows += [(d, self.state(i).class_volumes_ml()) for i, d in enumerate(self.days)]
        return rows

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
    return Prediction(days_list, fields.cpu(), baseline.geometry, schema, forecaster.name, forecaster.version, baseline)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available; use 'cpu' or 'auto'.")
    if device not in ("cpu", "cuda"):
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    return torch.device(device)
