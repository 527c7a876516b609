"""The learned model behind the :class:`~AnatomyDTLib.predict.ForecastModel` protocol.

``LearnedForecastModel.forecast(p0, spacing=, days=, plan=, mask=, progress=)`` runs one
rollout of the trained :class:`~AnatomyDTLib.models.growth.AnatomyDTModel` on a single
baseline field (K, *S) and returns (len(days), K, *S), like the mechanistic ``pde-only`` model.

Treatment: a :class:`~AnatomyDTLib.plan.TreatmentPlan` both acts in the solver (its LQ kill,
chemotherapy and resection terms) and gives the time-dependent FiLM features
(:mod:`.conditioning`). For the synthetic benchmarks, whose treatment is a set of static
variables, pass ``treatment={"treated": 1, "dose_gy": 60}`` instead (dose delivered on day 0);
then the plan must be empty, because the dose would otherwise act twice.
"""

from __future__ import annotations

import torch

from .. import __version__
from ..errors import InputError
from ..plan import TreatmentPlan, load_plan
from ..schema import BRAIN_SCHEMA, ClassSchema
from ..state import field_to_labels
from .conditioning import Conditioning
from .growth import AnatomyDTModel
from .model_grid import actual_spacing, changes_to_input_grid, model_grid_shape, needs_resampling, resize_field, resize_plan


def schema_from_names(names, tumour_index: int, sink_index: int, background_index: int = 0) -> ClassSchema:
    """The brain schema if the names are the brain classes, else a schema with these names."""
    names = tuple(names)
    if names == BRAIN_SCHEMA.names:
        return BRAIN_SCHEMA
    colors = ClassSchema.generic(len(names), tumour_index, sink_index).colors
    return ClassSchema(names, colors, names[tumour_index], names[sink_index], names[background_index])


def resolve_device(device: str) -> torch.device:
    """"auto" → CUDA when present, else CPU; "cuda" without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available; use 'cpu' or 'auto'.")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    return torch.device(device)


class LearnedForecastModel:
    """A trained Anatomy-DT model as a forecast model (``name``, ``version``, ``forecast``)."""

    name = "anatomy-dt-learned"

    def __init__(self, model: AnatomyDTModel, class_names, *, background_index: int = 0, device: str = "cpu",
                 info: dict | None = None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names)
        self.schema = schema_from_names(self.class_names, model.tumour_index, model.sink_index, background_index)
        self.info = dict(info or {})
        self.background_index = int(background_index)
        self.version = f"{__version__}"

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def forecast(self, p0: torch.Tensor, *, spacing, days, plan=None, mask=None, progress=None,
                 treatment: dict | None = None) -> torch.Tensor:
        """(len(days), K, *S) forecast of the (K, *S) baseline ``p0`` at the increasing ``days``.

        Args:
            p0: baseline field on the simplex, channels in this model's class order.
            spacing: mm per axis, array order.
            days: output days (days after the baseline).
            plan: treatment plan (TreatmentPlan, dict, path or None).
            mask: optional (*S) domain mask; nothing changes outside it.
            progress: solver callback ``progress(day, horizon)``.
            treatment: static synthetic-dataset treatment variables instead of a plan.
        """
        if not isinstance(p0, torch.Tensor):
            p0 = torch.as_tensor(p0)
        if p0.dim() - 1 != self.model.ndim:
            raise InputError(f"This model was trained on {self.model.ndim}D fields; the baseline is {p0.dim() - 1}D.")
        if p0.shape[0] != self.num_classes:
            raise InputError(f"The baseline has {p0.shape[0]} classes but the model was trained on {self.num_classes} "
                             f"({self.class_names}).")
        treatment_plan = load_plan(plan, schema=self.schema) if not isinstance(plan, TreatmentPlan) else plan
        if treatment is not None:
            if not treatment_plan.is_empty():
                raise InputError("Give either static treatment variables or a treatment plan, not both.")
            conditioning = Conditioning.from_static([treatment])
        else:
            conditioning = Conditioning.from_plans([treatment_plan])
        days = [float(d) for d in (days if hasattr(days, "__len__") else [days])]
        spacing = tuple(float(h) for h in spacing)
        work = p0.to(device=self.device, dtype=torch.float32)
        m = None
        if mask is not None:
            m = torch.as_tensor(mask).to(device=self.device)
            if tuple(m.shape) != tuple(p0.shape[1:]):
                raise InputError(f"The mask has shape {tuple(m.shape)} but the baseline grid is {tuple(p0.shape[1:])}.")
            m = (m > 0.5 if torch.is_floating_point(m) else m.bool()).to(torch.float32)
        elif self.info.get("body_mask", False):
            # as in training: the body only (field_to_labels: argmax with ties to the lower class, as
            # torch.argmax, ~4x faster on a strided class axis)
            m = (field_to_labels(work) != self.background_index).to(torch.float32)
        run_plan = None if treatment_plan.is_empty() else treatment_plan
        resample = needs_resampling(spacing, self.model_spacing)
        if resample:  # run on the model's voxel size, answer on the input grid (models/model_grid.py)
            shape = model_grid_shape(work.shape[1:], spacing, self.model_spacing)
            fine, work = work, resize_field(work, shape)
            spacing = actual_spacing(fine.shape[1:], spacing, shape)
            m = None if m is None else (resize_field(m[None], shape)[0] > 0.5).to(torch.float32)
            run_plan = resize_plan(run_plan, shape)
        with torch.no_grad():
            traj, aux = self.model(work[None], spacing=spacing, days=days, conditioning=conditioning,
                                 mask=None if m is None else m[None], plan=run_plan, schema=self.schema,
                                 progress=progress)
            out = traj[:, 0]
            if resample:
                out = changes_to_input_grid(fine, aux["p0_visible"][0], out)
        return out.to(device=p0.device, dtype=p0.dtype)

    @property
    def model_spacing(self) -> tuple[float, ...] | None:
        """Voxel size (mm, array order) the model was trained on; None = use any grid as it is."""
        spacing = self.info.get("spacing")
        if not spacing or len(spacing) != self.model.ndim:
            return None
        return tuple(float(h) for h in spacing)
