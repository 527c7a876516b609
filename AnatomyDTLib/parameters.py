"""PDE parameters as a documented JSON file (``anatomydt simulate --params P.json``).

Format (every key optional; classes are named by the class schema, synonyms allowed)::

    {
      "diffusion_mm2_per_day": {"tumour": 0.05},             # D_k per class; unnamed classes get 0
      "tumour_diffusion_by_tissue_mm2_per_day":               # optional: tumour D(x) from the tissue it is in
          {"white_matter": 0.1, "grey_matter": 0.01,          #   (Swanson 2000: white/grey ratio 5-10);
           "background": 0.01, "lateral_ventricles": 0.01},   #   unnamed tissues give the tumour D = 0
      "growth_rate_per_day": 0.03,                            # α, logistic proliferation rate
      "carrying_capacity": 1.0,                               # κ in (0, 1]
      "cross_diffusion_mm2_per_day":                          # χ_kj: row class k drifts along ∇p_j of column class j
          {"lateral_ventricles": {"tumour": -0.005}},         #   negative = pushed away (mass effect)
      "dt_days": 1.0, "jacobi_iters": 2, "omega": 1.0         # solver settings
    }

Lists instead of dicts are accepted for ``diffusion_mm2_per_day`` (K values) and
``cross_diffusion_mm2_per_day`` (K×K). Unknown keys are errors, so that a typo never silently
falls back to a default.

Cross-diffusion must keep Eq. 2 well-posed on the simplex: for every entry, D_column + D_row + χ
>= 0 wherever the two classes can mix, with the tumour's smallest tissue-dependent D (docs/solver.md,
"Cross-diffusion: well-posedness and the explicit step limit"). A repulsion stronger than that makes
the mixture of the two classes diffuse backwards; such files are refused with the entry named.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, ParameterError
from .schema import ClassSchema, DEFAULT_SCHEMA

_KEYS = {
    "diffusion_mm2_per_day", "tumour_diffusion_by_tissue_mm2_per_day", "growth_rate_per_day", "carrying_capacity",
    "cross_diffusion_mm2_per_day", "dt_days", "jacobi_iters", "omega",
}


@dataclass
class PDEParameters:
    """Coefficients of Eq. 2 and the solver settings, by class name.

    Attributes:
        diffusion: D_k in mm²/day by class name (missing classes: 0).
        tumour_diffusion_by_tissue: if set, the tumour's D(x) is the tissue-weighted mean of these
            values over the non-tumour classes at x in the initial anatomy (mm²/day).
        growth_rate: α in 1/day.
        carrying_capacity: κ in (0, 1].
        cross_diffusion: χ[row][column] in mm²/day by class names.
        dt_days, jacobi_iters, omega: solver settings.
    """

    diffusion: dict = field(default_factory=dict)
    tumour_diffusion_by_tissue: dict | None = None
    growth_rate: float = 0.03
    carrying_capacity: float = 1.0
    cross_diffusion: dict = field(default_factory=dict)
    dt_days: float = 1.0
    jacobi_iters: int = 2
    omega: float = 1.0

    @classmethod
    def load(cls, source, schema: ClassSchema = DEFAULT_SCHEMA) -> "PDEParameters":
        """Read parameters from a JSON file path, a dict, or None (defaults)."""
        if source is None:
            return cls.brain_defaults() if schema is DEFAULT_SCHEMA else cls()
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise InputError(f"Parameter file {str(path)!r} not found.")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ParameterError(f"Parameter file {str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                                     f"column {exc.colno}.") from exc
        else:
            data = dict(source)
        return cls.from_dict(data, schema)

    @classmethod
    def from_dict(cls, data: dict, schema: ClassSchema = DEFAULT_SCHEMA) -> "PDEParameters":
        if not isinstance(data, dict):
            raise ParameterError(f"Parameters must be a JSON object, got {type(data).__name__}.")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ParameterError(f"Unknown parameter key(s) {unknown}; allowed keys are {sorted(_KEYS)}.")
        params = cls()
        if "diffusion_mm2_per_day" in data:
            params.diffusion = _per_class(data["diffusion_mm2_per_day"], schema, "diffusion_mm2_per_day", "mm²/day")
        if data.get("tumour_diffusion_by_tissue_mm2_per_day") is not None:
            params.tumour_diffusion_by_tissue = _per_class(data["tumour_diffusion_by_tissue_mm2_per_day"], schema,
                                                           "tumour_diffusion_by_tissue_mm2_per_day", "mm²/day")
        params.growth_rate = _number(data, "growth_rate_per_day", params.growth_rate, "1/day", low=0.0)
        params.carrying_capacity = _number(data, "carrying_capacity", params.carrying_capacity, "", low=0.0, high=1.0,
                                           strict_low=True)
        if "cross_diffusion_mm2_per_day" in data:
            params.cross_diffusion = _matrix(data["cross_diffusion_mm2_per_day"], schema)
        params.dt_days = _number(data, "dt_days", params.dt_days, "days", low=0.0, strict_low=True)
        params.omega = _number(data, "omega", params.omega, "", low=0.0, high=1.0, strict_low=True)
        iters = data.get("jacobi_iters", params.jacobi_iters)
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise ParameterError(f"jacobi_iters must be an integer >= 1, got {iters!r}.")
        params.jacobi_iters = iters
        params.check_well_posed(schema)
        return params

    def cross_diffusion_margins(self, schema: ClassSchema = DEFAULT_SCHEMA) -> list[tuple[str, str, float]]:
        """(row, column, margin) for every non-zero χ entry: margin = min D_column + min D_row + χ (mm²/day).

        The projected PDE in a mixture of the two classes has diffusivity
        ½(D_j + D_k + χ_kj p_k + χ_jk p_j), so it is well-posed only if every margin is >= 0. Each
        class's D is its constant; the tumour's, with ``tumour_diffusion_by_tissue``, is the smallest
        it takes in any voxel: the smallest tissue value (0 for tissues not named) or the fallback
        used in pure-tumour voxels.
        """
        tumour = schema.names[schema.tumour_index]
        d = {name: float(self.diffusion.get(name, 0.0)) for name in schema.names}
        if self.tumour_diffusion_by_tissue is not None:
            listed = self.tumour_diffusion_by_tissue
            tissues = [listed.get(n, 0.0) for n in schema.names if n != tumour]
            fallback = float(np.mean(list(listed.values()))) if listed else 0.0
            d[tumour] = min(tissues + [fallback])
        margins = []
        for row, cols in self.cross_diffusion.items():
            for col, chi in cols.items():
                if chi != 0:
                    margins.append((row, col, d[col] + d[row] + chi))
        return margins

    def check_well_posed(self, schema: ClassSchema = DEFAULT_SCHEMA) -> None:
        """Raise :class:`ParameterError` if a χ entry makes Eq. 2 ill-posed (see :meth:`cross_diffusion_margins`)."""
        bad = [(r, c, m) for r, c, m in self.cross_diffusion_margins(schema) if m < -1e-12]
        if bad:
            items = "; ".join(f"{r} <- {c}: χ = {self.cross_diffusion[r][c]:g} but D_{c} + D_{r} = "
                              f"{m - self.cross_diffusion[r][c]:g} (margin {m:.3g})" for r, c, m in bad)
            raise ParameterError(
                f"cross_diffusion_mm2_per_day makes Eq. 2 ill-posed on the simplex ({items}). A class k pushed away "
                "from class j faster than D_j + D_k (mm²/day, the tumour's smallest tissue-dependent value) makes "
                "their mixture diffuse backwards, so the result depends on rounding and on the grid. Keep "
                "|χ| <= D_j + D_k, better half of it (docs/solver.md, 'Cross-diffusion: well-posedness').")

    @classmethod
    def brain_defaults(cls) -> "PDEParameters":
        """Literature-range glioma parameters for the brain schema (a mechanistic prior, not fitted).

        D_tumour 0.2 mm²/day in white matter and 0.02 in grey matter (Swanson 2000: ratio 5–10) and
        along the ventricles and the background; α = 0.05/day (high-grade glioma range 0.005–0.1/day).
        The Fisher–KPP front speed 2√(Dα) is then 0.2 mm/day in white matter before the projection's
        sharing with the displaced tissue (README, "Conservation") roughly halves the effective D.
        Ventricles, cortex and white matter are pushed away from the tumour by χ = −0.01 mm²/day
        (mass effect). The tissues do not diffuse themselves, so Eq. 2 on the simplex is well-posed
        only for |χ| <= D_tumour at every voxel (docs/solver.md, "Cross-diffusion: well-posedness");
        χ is half the smallest tumour D, which also keeps Δt = 1 day stable for 1 mm voxels.
        (Until this was found the defaults had χ = −0.1 / −0.05 and D_tumour = 0 in the ventricles,
        ill-posed in grey matter and the ventricles.)
        """
        return cls(
            diffusion={},
            tumour_diffusion_by_tissue={"background": 0.02, "white_matter": 0.2, "grey_matter": 0.02,
                                        "lateral_ventricles": 0.02},
            growth_rate=0.05,
            carrying_capacity=1.0,
            cross_diffusion={"lateral_ventricles": {"tumour": -0.01}, "grey_matter": {"tumour": -0.01},
                             "white_matter": {"tumour": -0.01}},
            dt_days=1.0, jacobi_iters=2, omega=1.0,
        )

    def to_dict(self) -> dict:
        """JSON-ready dict in the file format."""
        out = {
            "diffusion_mm2_per_day": dict(self.diffusion),
            "growth_rate_per_day": self.growth_rate,
            "carrying_capacity": self.carrying_capacity,
            "cross_diffusion_mm2_per_day": {k: dict(v) for k, v in self.cross_diffusion.items()},
            "dt_days": self.dt_days, "jacobi_iters": self.jacobi_iters, "omega": self.omega,
        }
        if self.tumour_diffusion_by_tissue is not None:
            out["tumour_diffusion_by_tissue_mm2_per_day"] = dict(self.tumour_diffusion_by_tissue)
        return out

    def simulate_kwargs(self, p0: torch.Tensor, schema: ClassSchema) -> dict:
        """Keyword arguments for :func:`AnatomyDTLib.simulate` built for the field ``p0`` (K, *S)."""
        k = schema.num_classes
        d = torch.zeros(k, dtype=p0.dtype, device=p0.device)
        for name, value in self.diffusion.items():
            d[schema.index(name)] = value
        diffusion: torch.Tensor = d
        if self.tumour_diffusion_by_tissue is not None:
            by_index = {schema.index(n): v for n, v in self.tumour_diffusion_by_tissue.items()}
            diffusion = tissue_weighted_diffusion(p0, d, by_index, schema.tumour_index)
        chi = np.zeros((k, k))
        for row, cols in self.cross_diffusion.items():
            for col, value in cols.items():
                chi[schema.index(row), schema.index(col)] = value
        return dict(diffusion=diffusion, growth_rate=self.growth_rate, carrying_capacity=self.carrying_capacity,
                    cross_diffusion=chi if np.any(chi) else None, tumor_class=schema.tumour_index, dt=self.dt_days,
                    jacobi_iters=self.jacobi_iters, omega=self.omega)


def tissue_weighted_diffusion(p0: torch.Tensor, per_class: torch.Tensor, tumour_by_tissue: dict[int, float],
                              tumour_index: int) -> torch.Tensor:
    """A (K, *S) diffusion field where the tumour's D(x) depends on the tissue at x (mm²/day).

    D_tumour(x) = Σ_j D_j^tissue p_j(x) / Σ_j p_j(x) over the non-tumour classes j of the initial
    anatomy p0 (K, *S). Where p0 is pure tumour (no tissue information), the mean of the given
    tissue values is used, so the tumour can still spread out of its own core. The other
    classes keep their scalar D. The tissue map is frozen at p0: D does not follow the
    anatomy as it deforms, which keeps the diffusion operator linear.
    """
    k = p0.shape[0]
    weights = torch.zeros(k, dtype=p0.dtype, device=p0.device)
    for j, value in tumour_by_tissue.items():
        if j == tumour_index:
            raise ParameterError("tumour_diffusion_by_tissue cannot name the tumour class itself; name the tissues it invades.")
        if not (math.isfinite(value) and value >= 0):
            raise ParameterError(f"Tissue diffusion values must be finite and >= 0 mm²/day, got {value}.")
        weights[j] = value
    tissue = p0.clone()
    tissue[tumour_index] = 0.0
    tissue_sum = tissue.sum(dim=0)
    weighted = torch.einsum("k,k...->...", weights, tissue)
    fallback = float(np.mean(list(tumour_by_tissue.values()))) if tumour_by_tissue else 0.0
    d_tumour = torch.where(tissue_sum > 1e-6, weighted / torch.clamp(tissue_sum, min=1e-6), torch.full_like(weighted, fallback))
    field_ = per_class.reshape((k,) + (1,) * (p0.dim() - 1)).expand_as(p0).clone()
    field_[tumour_index] = d_tumour
    return field_


def _per_class(value, schema: ClassSchema, key: str, unit: str) -> dict:
    if isinstance(value, list):
        if len(value) != schema.num_classes:
            raise ParameterError(f"{key} lists {len(value)} values but there are {schema.num_classes} classes {list(schema.names)}.")
        value = dict(zip(schema.names, value))
    if not isinstance(value, dict):
        raise ParameterError(f"{key} must be an object {{class: value}} or a list of {schema.num_classes} values.")
    out = {}
    for name, v in value.items():
        try:
            canonical = schema.names[schema.index(name)]
        except InputError as exc:
            raise ParameterError(f"{key}: {exc}") from exc
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ParameterError(f"{key}.{name} must be a finite number >= 0 {unit}, got {v!r}.")
        out[canonical] = float(v)
    return out


def _matrix(value, schema: ClassSchema) -> dict:
    key = "cross_diffusion_mm2_per_day"
    if isinstance(value, list):
        k = schema.num_classes
        if len(value) != k or any(not isinstance(r, list) or len(r) != k for r in value):
            raise ParameterError(f"{key} as a list must be {k}×{k}.")
        value = {schema.names[i]: {schema.names[j]: value[i][j] for j in range(k) if value[i][j]} for i in range(k)}
    if not isinstance(value, dict):
        raise ParameterError(f"{key} must be an object {{row class: {{column class: χ}}}} or a K×K list.")
    out: dict = {}
    for row, cols in value.items():
        if not isinstance(cols, dict):
            raise ParameterError(f"{key}.{row} must be an object {{column class: χ}}.")
        try:
            r = schema.names[schema.index(row)]
        except InputError as exc:
            raise ParameterError(f"{key}: {exc}") from exc
        for col, v in cols.items():
            try:
                c = schema.names[schema.index(col)]
            except InputError as exc:
                raise ParameterError(f"{key}.{row}: {exc}") from exc
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ParameterError(f"{key}.{row}.{col} must be a finite number (mm²/day), got {v!r}.")
            if r == c and v != 0:
                raise ParameterError(f"{key}.{row}.{col}: the diagonal χ_kk is not part of Eq. 2; use diffusion_mm2_per_day.")
            out.setdefault(r, {})[c] = float(v)
    return out


def _number(data: dict, key: str, default: float, unit: str, *, low: float | None = None, high: float | None = None,
            strict_low: bool = False) -> float:
    v = data.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ParameterError(f"{key} must be a finite number {unit}, got {v!r}.")
    if low is not None and (v <= low if strict_low else v < low):
        raise ParameterError(f"{key} must be {'>' if strict_low else '>='} {low:g} {unit}, got {v}.")
    if high is not None and v > high:
        raise ParameterError(f"{key} must be <= {high:g} {unit}, got {v}.")
    return float(v)
