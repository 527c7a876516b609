"""Synthetic longitudinal brain-tumour patients on the MNI152 atlas (the ground-truth simulator).

Everything a phantom patient shows is SYNTHETIC: the healthy anatomy is the real MNI ICBM 2009a
atlas (:mod:`.atlas`), the tumour, its treatment and its images are simulated here. The
simulator is deliberately *richer* than the AnatomyDT PDE (:func:`AnatomyDTLib.solver.simulate`)
and has its own numerics, so that a model fitted to these data is not just recovering its own
equations. Units: mm, days, Gy, mL.

Model (material frame = atlas coordinates ``X``; the image frame ``x = X + u(X)`` is deformed)
-----------------------------------------------------------------------------------------------
Tumour cell density ``c`` (fraction of the carrying capacity) and the density ``d`` of lethally
irradiated ("dying") cells evolve as::

    dc/dt = div(D(X) grad c) + rho c (1 - c - d) - k_TMZ(t) c  - sum_f delta(t - t_f) (1 - S_f(X)) c
    D(X)  = D_w diag(1 + (a - 1) e_i(X)^2) * 3/(a + 2)   in white matter (axis-aligned part of a
            fibre tensor; e = pseudo-fibre direction: the least-varying direction of the smoothed
            white-matter map, from its structure tensor)
          = D_w / ratio                                 in grey matter (cortical and deep)
          = 0                                           in CSF, ventricles, outside the brain and
                                                        in a resection cavity (no-flux walls)
    S_f   = exp(-alpha d' - beta d'^2),  d' = dose_f / OER(c + d)
            LQ survival of fraction f (beta = alpha / (alpha/beta)); OER rises smoothly from 1 to the
            patient's hypoxic oxygen enhancement ratio where living + dying cells fill 60-95 % of
            the space (hypoxic bulk), so dense tumour responds slowly until it re-oxygenates

Cells killed by fraction ``f`` join ``d``: they still occupy space and look like tumour until
``t_f + delay``, then are cleared exponentially with the patient's half-life. Temozolomide
(concurrent and adjuvant windows) kills at ``k_TMZ`` 1/day while active, immediately.

Numerics: explicit finite volumes (harmonic-mean face coefficients, zero-flux box walls) with the
time step bounded by the diffusion stability limit, ``0.2 / rho`` and the plan's breakpoints;
the logistic reaction is integrated exactly over each step for the current occupancy ``1 - d``.
The tumour is seeded as a 3 mm Gaussian at a random white-matter site and grown untreated until
its visible volume reaches the patient's baseline size; that moment is day 0 (the baseline scan).

Visibility: the merged ``tumour`` class (tumour core + oedema, as in the 5-class schema) is where
``c + d`` exceeds 0.06 in white matter, 0.12 in deep grey and 0.25 in the cortex
(:data:`VISIBLE_DENSITY`): vasogenic oedema spreads along white matter and spares the cortex. The
FLAIR lesion signal (1.1, a smooth +-8 % texture, the densest core 15 % darker) fades in around
these thresholds; each scan then gets a global intensity factor, an extra bias field and Rician
noise inside the brain.

Mass effect: at every scan (and at surgery / RT planning) the swelling lesion
``s = kappa * smoothstep((c + d) / threshold; 0.5 -> 3) + kappa_cav(t) * cavity`` is the volume
source of ``(laplacian - 1/L^2) phi = -s`` solved on the brain's bounding box with ``phi = 0`` on
its faces (discrete sine transform on a grid twice as coarse), ``u = -grad phi`` tapered to 0
within 10 mm of the brain surface (rigid skull). Tissue labels and the FLAIR-like image are
pulled back through ``X = x - u(X)`` (fixed-point iteration), which displaces the ventricles and
nearby tissue away from a growing tumour and lets them return when it shrinks. A resection cavity
keeps a fluid "pressure" that relaxes with a 90-day time constant (``kappa_cav``), so it
collapses partly over the follow-up.

Surgery removes the tumour bulk (``c + d >= 0.3``) in order of distance from the nearest point
of the brain surface (the approach) until the patient's extent of resection is reached, plus a
margin of 1 voxel of visible tumour; removed voxels become a cavity (background class, CSF-like
FLAIR 0.08). Radiotherapy is planned on day of the first fraction: CTV = visible tumour plus
cavity grown by 15 mm inside the brain, dose = prescription x Gaussian-blurred (sigma 4 mm)
CTV indicator, written as the plan's ``dose_map``.

Radiotherapy also divides the dose by an oxygen enhancement ratio in the densely packed bulk (see
``S_f``), so large dense tumours respond slowly until they re-oxygenate.

Not modelled (it is a phantom): necrosis from hypoxia, contrast enhancement, true DTI tractography,
pseudo-progression, radiation necrosis, steroid effects, real scanner physics, skull, recurrence
away from the treated region, inter-patient anatomical variability (every patient is the MNI
brain, deformed only by its tumour).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from typing import Callable, Mapping

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from ..errors import ParameterError
from ..io import Geometry
from ..plan import DEFAULT_ALPHA_BETA_GY, DEFAULT_ALPHA_PER_GY, load_plan, weekly_fraction_days
from ..schema import BRAIN_SCHEMA
from .atlas import load_atlas_arrays
from .flair import FLAIR_INTENSITY, bias_field

PHANTOM_VERSION = "1.0.0"
VISIBLE_DENSITY = {"white_matter": 0.06, "deep_grey": 0.12, "grey_matter": 0.25}
"""c + d above which tissue is labelled tumour and is bright on FLAIR, by tissue: vasogenic oedema
spreads along white matter and spares the cortex, so white matter shows a lower density."""
BULK_RAMP = (0.3, 0.8)
"""c + d ramp (from, to) of the mass-effect source and the surgical target threshold (from)."""
SEED_SIGMA_MM = 3.0
SKULL_TAPER_MM = 10.0
CTV_MARGIN_MM = 15.0
DOSE_PENUMBRA_SIGMA_MM = 4.0
CAVITY_COLLAPSE_DAYS = 90.0
NOMINAL_TMZ_KILL_RATE_PER_DAY = 0.02
"""Kill rate written into plan files (the population value a clinician would assume)."""

#: Per-patient biology: (low, high) sampled uniformly, or log-uniformly for the ``log`` ones.
BIOLOGY_RANGES = {
    "diffusion_wm_mm2_per_day": (0.01, 0.3),      # log-uniform; Swanson 2000, Harpold 2007
    "wm_gm_ratio": (5.0, 10.0),                   # D_white / D_grey
    "proliferation_per_day": (0.005, 0.1),        # log-uniform rho
    "anisotropy": (1.5, 3.0),                     # along-fibre / across-fibre diffusion in WM
    "alpha_per_gy": (0.03, 0.07),                 # LQ alpha; alpha/beta fixed at 10 Gy
    "rt_death_delay_days": (7.0, 28.0),           # lethally hit cells stay visible this long
    "clearance_half_life_days": (10.0, 45.0),     # then clear with this half-life
    "tmz_kill_rate_per_day": (0.0, 0.02),         # 0 = resistant (unmethylated MGMT)
    "hypoxic_oer": (1.5, 3.0),                    # oxygen enhancement ratio in the dense (hypoxic) bulk
    "mass_effect": (0.5, 1.0),                    # fraction of the bulk volume that displaces tissue
    "push_range_mm": (20.0, 60.0),                # screening length L of the displacement (compressibility)
    "extent_of_resection": (0.7, 1.0),            # fraction of the bulk removed by surgery
}
LOG_UNIFORM = {"diffusion_wm_mm2_per_day", "proliferation_per_day"}
"""The :data:`BIOLOGY_RANGES` entries drawn log-uniformly (the others uniformly)."""
FRONT_SPEED_RANGE_MM_PER_DAY = (0.02, 0.15)
"""Accepted Fisher-KPP front speed 2 sqrt(D_w rho) (7-55 mm/year); other (D, rho) draws are redrawn."""
BASELINE_VOLUME_ML = (5.0, 40.0)
FOLLOW_UP_DAYS = (30, 180)
N_FOLLOW_UPS = (2, 4)

#: Treatment patterns and their probabilities.
TREATMENT_PATTERNS = {
    "none": 0.15,            # natural history (watch and wait)
    "rt_only": 0.15,         # 60 Gy / 30 x 2 Gy, Mon-Fri
    "stupp": 0.30,           # biopsy, then RT + concurrent TMZ + 6 adjuvant cycles
    "surgery_stupp": 0.30,   # resection, then Stupp from 3-5 weeks after surgery
    "surgery_only": 0.10,    # resection alone
}


@dataclass
class Biology:
    """One patient's hidden tumour biology (see :data:`BIOLOGY_RANGES` for units and ranges)."""

    diffusion_wm_mm2_per_day: float
    wm_gm_ratio: float
    proliferation_per_day: float
    anisotropy: float
    alpha_per_gy: float
    rt_death_delay_days: float
    clearance_half_life_days: float
    tmz_kill_rate_per_day: float
    mass_effect: float
    push_range_mm: float
    extent_of_resection: float
    hypoxic_oer: float
    alpha_beta_gy: float = DEFAULT_ALPHA_BETA_GY

    @property
    def front_speed_mm_per_day(self) -> float:
        """Fisher-KPP front speed 2 sqrt(D_w rho) in white matter (mm/day)."""
        return 2.0 * math.sqrt(self.diffusion_wm_mm2_per_day * self.proliferation_per_day)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["front_speed_mm_per_day"] = self.front_speed_mm_per_day
        return d


def front_speed_accepted(diffusion_wm_mm2_per_day: float, proliferation_per_day: float) -> bool:
    """Whether the Fisher-KPP front speed 2 sqrt(D_w rho) (mm/day) lies in :data:`FRONT_SPEED_RANGE_MM_PER_DAY`,
    the condition of the phantom's prior on (D_w, rho)."""
    speed = 2.0 * math.sqrt(diffusion_wm_mm2_per_day * proliferation_per_day)
    return FRONT_SPEED_RANGE_MM_PER_DAY[0] <= speed <= FRONT_SPEED_RANGE_MM_PER_DAY[1]


def sample_biology(rng: np.random.Generator) -> Biology:
    """Draw a :class:`Biology` (redrawing D, rho until the front speed is in its range)."""
    values = {}
    for _ in range(1000):
        for name in ("diffusion_wm_mm2_per_day", "proliferation_per_day"):
            lo, hi = BIOLOGY_RANGES[name]
            values[name] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if front_speed_accepted(values["diffusion_wm_mm2_per_day"], values["proliferation_per_day"]):
            break
    for name, (lo, hi) in BIOLOGY_RANGES.items():
        if name not in LOG_UNIFORM:
            values[name] = float(rng.uniform(lo, hi))
    return Biology(**values)


def _with_overrides(bio: Biology, overrides: Mapping[str, float] | None) -> Biology:
    """``bio`` with the named values replaced; an unknown name or a non-finite value is refused."""
    if not overrides:
        return bio
    known = {f.name for f in fields(Biology)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ParameterError(f"Unknown biology value(s) {unknown}; choose from {sorted(known)}.")
    bad = {k: v for k, v in overrides.items() if not math.isfinite(float(v))}
    if bad:
        raise ParameterError(f"Biology overrides must be finite numbers; got {bad}.")
    return replace(bio, **{k: float(v) for k, v in overrides.items()})


# --------------------------------------------------------------------------------------------
# The atlas as a simulation domain (computed once per spacing)
# --------------------------------------------------------------------------------------------


@dataclass
class _Domain:
    labels: np.ndarray
    flair: np.ndarray
    mask: np.ndarray
    tissues: np.ndarray
    geometry: Geometry
    h: tuple[float, float, float]           # spacing in array order (mm)
    fibre_sq: np.ndarray                      # (3, *S) squared components of the fibre direction
    skull_taper: np.ndarray                   # 0 at the brain surface -> 1 deeper than SKULL_TAPER_MM
    depth_mm: np.ndarray                      # distance to the outside of the brain (mm)
    sites: np.ndarray                         # (N, 3) candidate tumour-site indices
    bias: np.ndarray                          # the atlas FLAIR's bias field
    brain_box: tuple[slice, slice, slice]


@lru_cache(maxsize=2)
def _domain(spacing: int) -> _Domain:
    atlas = load_atlas_arrays(spacing)
    h = atlas.geometry.spacing_array_order
    mask = atlas.brain_mask
    wm = (atlas.tissues == 3).astype(np.float32)
    smooth = ndi.gaussian_filter(wm, [2.0 / s for s in h])
    grads = np.gradient(smooth, *h)
    idx = np.nonzero(mask)
    tensor = np.empty((idx[0].size, 3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            comp = ndi.gaussian_filter(grads[i] * grads[j], [4.0 / s for s in h])[idx]
            tensor[:, i, j] = comp
            tensor[:, j, i] = comp
    _, vectors = np.linalg.eigh(tensor)
    fibre = vectors[:, :, 0]  # eigenvector of the smallest eigenvalue: least-varying direction
    fibre_sq = np.full((3,) + mask.shape, 1.0 / 3.0, np.float32)
    for i in range(3):
        fibre_sq[i][idx] = fibre[:, i] ** 2
    depth = ndi.distance_transform_edt(mask, sampling=h).astype(np.float32)
    taper = np.clip(depth / SKULL_TAPER_MM, 0.0, 1.0).astype(np.float32)
    sites = _site_candidates(atlas, depth, h)
    box = ndi.find_objects(mask.astype(np.uint8))[0]
    return _Domain(atlas.labels, atlas.flair, mask, atlas.tissues, atlas.geometry, h, fibre_sq, taper, depth,
                   sites, bias_field(mask.shape), box)


def _site_candidates(atlas, depth: np.ndarray, h) -> np.ndarray:
    """White-matter voxels 2+ mm inside WM, 15+ mm deep in the brain, within 20 mm of the cortex or
    ventricles, above the tentorium (LPS z > -10 mm)."""
    wm_label = atlas.labels == BRAIN_SCHEMA.index("white_matter")
    inside_wm = ndi.distance_transform_edt(wm_label, sampling=h) >= 2.0
    to_cortex = ndi.distance_transform_edt(atlas.labels != BRAIN_SCHEMA.index("grey_matter"), sampling=h)
    to_vent = ndi.distance_transform_edt(atlas.labels != BRAIN_SCHEMA.index("lateral_ventricles"), sampling=h)
    zz = np.arange(atlas.labels.shape[0]) * atlas.geometry.spacing[2] * atlas.geometry.direction_matrix[2, 2] \
        + atlas.geometry.origin[2]
    supratentorial = (zz > -10.0)[:, None, None]
    ok = inside_wm & (depth >= 15.0) & ((to_cortex <= 20.0) | (to_vent <= 20.0)) & supratentorial
    return np.argwhere(ok)


# --------------------------------------------------------------------------------------------
# Patient
# --------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """One time point of a phantom patient on the full atlas grid (array order z, y, x)."""

    day: float
    labels: np.ndarray           # uint8, brain schema
    flair: np.ndarray            # float32 FLAIR-like image
    tumour_ml: float             # visible tumour (merged class) volume in the image frame
    cavity_ml: float
    max_displacement_mm: float


@dataclass
class PhantomPatient:
    """A simulated patient: scans, the plan (as a plan-format dict plus arrays), and the hidden truth."""

    scans: list[Scan]
    plan: dict                                # plan format v1; file paths as placeholders (see below)
    plan_arrays: dict                         # "resection_mask" / "dose_map" -> full-grid array
    pattern: str
    biology: Biology
    site_index: tuple[int, int, int]
    site_mm: tuple[float, float, float]       # LPS
    geometry: Geometry
    pregrowth_days: float
    info: dict = field(default_factory=dict)

    def truth(self) -> dict:
        """The hidden ground truth as a JSON-ready dict."""
        return {"generator": "AnatomyDTLib.brain.phantom", "generator_version": PHANTOM_VERSION,
                "pattern": self.pattern, "biology": self.biology.to_dict(),
                "site_index_zyx": list(self.site_index), "site_lps_mm": list(self.site_mm),
                "pregrowth_days": self.pregrowth_days,
                "scans": [{"day": s.day, "tumour_ml": s.tumour_ml, "cavity_ml": s.cavity_ml,
                           "max_displacement_mm": s.max_displacement_mm} for s in self.scans],
                **self.info}


@dataclass
class _Schedule:
    scan_days: list[float]
    surgery_day: float | None
    rt_days: list[float]
    rt_dose_per_fraction: float
    tmz_windows: list[tuple[float, float]]
    rt_start: float | None


def _sample_schedule(rng: np.random.Generator, pattern: str) -> _Schedule:
    """Scan days and treatment days (all draws made whatever the pattern, for stable streams)."""
    n_fu = int(rng.integers(N_FOLLOW_UPS[0], N_FOLLOW_UPS[1] + 1))
    days: list[float] = []
    while len(days) < n_fu:
        d = float(rng.integers(FOLLOW_UP_DAYS[0], FOLLOW_UP_DAYS[1] + 1))
        if all(abs(d - e) >= 14 for e in days):
            days.append(d)
    surgery_day = float(rng.integers(2, 11))
    rt_delay_after_surgery = float(rng.integers(21, 36))
    rt_start_biopsy = float(rng.integers(14, 29))
    scan_days = [0.0] + sorted(days)
    has_surgery = pattern.startswith("surgery")
    rt_start = None
    if pattern in ("rt_only", "stupp"):
        rt_start = rt_start_biopsy
    elif pattern == "surgery_stupp":
        rt_start = surgery_day + rt_delay_after_surgery
    rt_days = weekly_fraction_days(rt_start, 30, 5) if rt_start is not None else []
    tmz: list[tuple[float, float]] = []
    if pattern in ("stupp", "surgery_stupp"):
        end = rt_days[-1] + 1.0
        tmz.append((rt_start, end))
        first = end + 28.0
        tmz += [(first + 28.0 * k, first + 28.0 * k + 5.0) for k in range(6)]
    return _Schedule(scan_days, surgery_day if has_surgery else None, list(rt_days), 2.0, tmz, rt_start)


class _Tumour:
    """Tumour state and numerics on a box of the atlas grid (material frame)."""

    def __init__(self, dom: _Domain, bio: Biology, site: np.ndarray, box: tuple[slice, ...]):
        self.dom, self.bio, self.box = dom, bio, box
        self.h = dom.h
        shape = tuple(s.stop - s.start for s in box)
        self.shape = shape
        self.tissues = dom.tissues[box]
        self.mask = dom.mask[box]
        self.cavity = np.zeros(shape, bool)
        labels = dom.labels[box]
        self.threshold = np.where(labels == BRAIN_SCHEMA.index("white_matter"), VISIBLE_DENSITY["white_matter"],
                                  np.where(labels == BRAIN_SCHEMA.index("grey_matter"), VISIBLE_DENSITY["grey_matter"],
                                           VISIBLE_DENSITY["deep_grey"])).astype(np.float32)
        local = site - np.array([s.start for s in box])
        grid = np.indices(shape, dtype=np.float32)
        r2 = sum(((grid[a] - local[a]) * self.h[a]) ** 2 for a in range(3))
        self.c = (np.exp(-r2 / (2 * SEED_SIGMA_MM ** 2)) * self._invadable()).astype(np.float32)
        self.pending: list[tuple[float, np.ndarray]] = []   # (release day, killed density)
        self.pending_sum = np.zeros(shape, np.float32)      # sum of the pending arrays
        self.clearing = np.zeros(shape, np.float32)
        self._active: tuple[slice, ...] | None = None
        self._steps_left = 0
        self._faces()

    def _invadable(self) -> np.ndarray:
        return ((self.tissues >= 2) & self.mask & ~self.cavity).astype(np.float32)

    def _faces(self) -> None:
        """Face coefficients D_face / h^2 (1/day) per axis; harmonic means, zero at walls."""
        bio = self.bio
        a = bio.anisotropy
        base = np.where(self.tissues == 3, bio.diffusion_wm_mm2_per_day,
                        np.where(self.tissues == 2, bio.diffusion_wm_mm2_per_day / bio.wm_gm_ratio, 0.0))
        base = (base * self._invadable()).astype(np.float32)
        wm = self.tissues == 3
        self.k = []
        for ax in range(3):
            aniso = np.where(wm, (1.0 + (a - 1.0) * self.dom.fibre_sq[ax][self.box]) * 3.0 / (a + 2.0), 1.0)
            d = (base * aniso).astype(np.float32)
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[ax] = slice(None, -1)
            hi[ax] = slice(1, None)
            d0, d1 = d[tuple(lo)], d[tuple(hi)]
            with np.errstate(invalid="ignore", divide="ignore"):
                face = np.where((d0 > 0) & (d1 > 0), 2 * d0 * d1 / (d0 + d1), 0.0)
            self.k.append((face / self.h[ax] ** 2).astype(np.float32))
        self.dt_stable = 0.9 / max(2.0 * sum(float(k.max(initial=0.0)) for k in self.k), 1e-9)

    @property
    def dying(self) -> np.ndarray:
        return self.clearing + self.pending_sum

    def visible(self) -> np.ndarray:
        return ((self.c + self.dying) >= self.threshold) & self.mask

    _ACTIVE_MARGIN = 8  # voxels around the support of c and d that the explicit stencil updates

    def _active_box(self) -> tuple[slice, ...]:
        """Sub-box holding every voxel with c or d above 1e-9, plus a margin (recomputed every few steps)."""
        if self._steps_left > 0 and self._active is not None:
            self._steps_left -= 1
            return self._active
        support = (self.c > 1e-9) | (self.clearing > 1e-9) | (self.pending_sum > 1e-9)
        objects = ndi.find_objects(support.astype(np.uint8))
        if not objects or objects[0] is None:
            self._active = tuple(slice(0, 1) for _ in self.shape)
        else:
            m = self._ACTIVE_MARGIN
            self._active = tuple(slice(max(0, s.start - m), min(n, s.stop + m)) for s, n in zip(objects[0], self.shape))
        self._steps_left = self._ACTIVE_MARGIN - 2  # the support spreads at most one voxel per step
        return self._active

    def step(self, dt: float, kill_rate: float) -> None:
        """Advance c (and the clearing of dying cells) by ``dt`` days: diffusion, logistic growth, TMZ."""
        box = self._active_box()
        c = self.c[box]
        div = np.zeros_like(c)
        for ax, k in enumerate(self.k):
            kb = list(box)
            kb[ax] = slice(box[ax].start, box[ax].stop - 1)
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[ax] = slice(None, -1)
            hi[ax] = slice(1, None)
            flux = k[tuple(kb)] * (c[tuple(hi)] - c[tuple(lo)])
            div[tuple(lo)] += flux
            div[tuple(hi)] -= flux
        c += dt * div
        np.clip(c, 0.0, None, out=c)
        cap = np.clip(1.0 - self.clearing[box] - self.pending_sum[box], 0.0, 1.0)
        growth = np.exp((self.bio.proliferation_per_day * dt) * cap)
        with np.errstate(invalid="ignore", divide="ignore"):
            new = np.where(cap > 1e-6, cap * c * growth / (cap + c * (growth - 1.0)), c)
        if kill_rate > 0:
            new *= math.exp(-kill_rate * dt)
        self.c[box] = new
        self.clearing[box] *= math.exp(-math.log(2.0) / self.bio.clearance_half_life_days * dt)

    def release(self, day: float) -> None:
        keep = []
        for release_day, arr in self.pending:
            if release_day <= day + 1e-9:
                self.clearing += arr
                self.pending_sum -= arr
            else:
                keep.append((release_day, arr))
        self.pending = keep

    def irradiate(self, day: float, dose_gy: np.ndarray) -> None:
        a = self.bio.alpha_per_gy
        b = a / self.bio.alpha_beta_gy
        # hypoxic radioresistance: the dose is divided by the OER where the tissue is densely packed
        # (living + dying cells), so the bulk responds slowly until it thins out and re-oxygenates
        oer = 1.0 + (self.bio.hypoxic_oer - 1.0) * _smoothstep(self.c + self.dying, 0.6, 0.95)
        effective = dose_gy / oer
        survival = np.exp(-a * effective - b * effective * effective).astype(np.float32)
        killed = self.c * (1.0 - survival)
        self.c = self.c * survival
        self.pending.append((day + self.bio.rt_death_delay_days, killed))
        self.pending_sum += killed

    def resect(self, removed: np.ndarray) -> None:
        self.cavity |= removed
        self.c[removed] = 0.0
        self.clearing[removed] = 0.0
        self.pending_sum[removed] = 0.0
        for _, arr in self.pending:
            arr[removed] = 0.0
        self._faces()


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


class _Imager:
    """Mass-effect displacement and image formation for a tumour state."""

    def __init__(self, dom: _Domain, tumour: _Tumour, bio: Biology, rng: np.random.Generator):
        self.dom, self.t, self.bio = dom, tumour, bio
        field = ndi.gaussian_filter(rng.standard_normal(tumour.shape).astype(np.float32),
                                    [4.0 / hh for hh in tumour.h])
        self.texture = 1.0 + 0.08 * field / max(float(field.std()), 1e-6)

    def displacement(self, cavity_pressure: float) -> np.ndarray:
        """u (3, *brain box) in mm, array-axis components, from the current bulk and cavity.

        Solves ``(laplacian - 1/L^2) phi = -s`` on the brain's bounding box with phi = 0 on its
        faces (discrete sine transform) on a grid twice as coarse (smooth field), then
        ``u = -grad phi``, interpolated back and tapered to 0 at the brain surface.
        """
        t, dom = self.t, self.dom
        region = dom.brain_box
        shape = tuple(r.stop - r.start for r in region)
        # the swelling lesion (tumour bulk and vasogenic oedema) is the volume source
        source_t = self.bio.mass_effect * _smoothstep((t.c + t.dying) / t.threshold, 0.5, 3.0) * t.mask
        if cavity_pressure > 0:
            source_t = source_t + cavity_pressure * t.cavity.astype(np.float32)
        if not source_t.any():
            return np.zeros((3,) + shape, np.float32)
        full = np.zeros(dom.mask.shape, np.float32)
        full[t.box] = source_t
        source = full[region]
        coarse = _block_mean2(source)
        hc = [2.0 * hh for hh in t.h]
        spectrum = sfft.dstn(coarse, type=1, workers=2)
        eig = np.zeros(coarse.shape, np.float64)
        for ax in range(3):
            n = coarse.shape[ax]
            k = np.arange(1, n + 1, dtype=np.float64)
            lam = (2.0 * np.cos(np.pi * k / (n + 1)) - 2.0) / hc[ax] ** 2
            view = [1, 1, 1]
            view[ax] = -1
            eig = eig + lam.reshape(view)
        phi = sfft.idstn(spectrum / (1.0 / self.bio.push_range_mm ** 2 - eig), type=1, workers=2).astype(np.float32)
        zoom = [a / b for a, b in zip(shape, coarse.shape)]
        phi = ndi.zoom(phi, zoom, order=1, grid_mode=True, mode="nearest")[:shape[0], :shape[1], :shape[2]]
        u = np.stack([-g for g in np.gradient(phi, *t.h)])
        return (u * dom.skull_taper[region]).astype(np.float32)

    def pullback(self, u: np.ndarray, iterations: int = 2) -> np.ndarray:
        """Material coordinates X (voxel units, 3 x brain box) of each image-frame voxel x: X = x - u(X)."""
        grid = np.indices(u.shape[1:], dtype=np.float32)
        uv = u / np.asarray(self.t.h, np.float32).reshape(3, 1, 1, 1)
        X = grid - uv
        for _ in range(iterations - 1):
            X = grid - np.stack([ndi.map_coordinates(uv[a], X, order=1, mode="nearest") for a in range(3)])
        return X

    def material_images(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, flair, cavity) in the material frame on the full grid."""
        t, dom = self.t, self.dom
        box = t.box
        labels = dom.labels.copy()
        flair = dom.flair.astype(np.float32).copy()
        cavity = np.zeros(labels.shape, bool)
        lab = labels[box]
        total = t.c + t.dying
        tumour = t.visible() & (lab != BRAIN_SCHEMA.index("lateral_ventricles"))
        lab[tumour] = BRAIN_SCHEMA.tumour_index
        lab[t.cavity] = BRAIN_SCHEMA.background_index
        w = _smoothstep(total / t.threshold, 0.4, 1.8) * t.mask
        # lesion signal: bright oedema/infiltration, the densest core a little darker, with a smooth texture
        lesion = FLAIR_INTENSITY["lesion"] * (1.0 - 0.15 * _smoothstep(t.c, 0.85, 1.0)) * self.texture
        fl = flair[box]
        fl += w * (lesion * dom.bias[box] - fl)
        if t.cavity.any():
            cav = ndi.gaussian_filter(t.cavity.astype(np.float32), [1.0 / hh for hh in t.h])
            fl += cav * (FLAIR_INTENSITY["csf"] - fl)
        cavity[box] = t.cavity
        return labels, flair, cavity

    def warp(self, u: np.ndarray, arrays: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """Full-grid arrays pulled back through u (``order`` 0 = nearest, 1 = linear).

        Only the part of the brain box where the displacement exceeds a quarter voxel is resampled;
        elsewhere the images are left as they are (an error below 0.25 voxel).
        """
        h = np.asarray(self.t.h, np.float32).reshape(3, 1, 1, 1)
        moving = (np.abs(u) / h).max(axis=0) > 0.25
        out = [array.copy() for array, _ in arrays]
        objects = ndi.find_objects(moving.astype(np.uint8))
        if not objects or objects[0] is None:
            return out
        sub = tuple(slice(max(0, s.start - 2), min(n, s.stop + 2)) for s, n in zip(objects[0], moving.shape))
        X = self.pullback(u[(slice(None),) + sub])
        region = tuple(slice(r.start + s.start, r.start + s.stop) for r, s in zip(self.dom.brain_box, sub))
        for result, (array, order) in zip(out, arrays):
            result[region] = ndi.map_coordinates(array[region], X, order=order, mode="nearest")
        return out

    def image(self, cavity_pressure: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Image-frame (labels, flair, cavity) on the full grid and the largest displacement (mm)."""
        u = self.displacement(cavity_pressure)
        labels_m, flair_m, cavity_m = self.material_images()
        labels, flair, cavity = self.warp(u, [(labels_m, 0), (flair_m, 1), (cavity_m.astype(np.uint8), 0)])
        labels[~self.dom.mask] = BRAIN_SCHEMA.background_index
        magnitude = float(np.sqrt((u ** 2).sum(0)).max())
        return labels, flair, cavity.astype(bool), magnitude


def _block_mean2(a: np.ndarray) -> np.ndarray:
    """Mean over 2x2x2 blocks (zero-padded at the far end)."""
    pad = [(0, n % 2) for n in a.shape]
    a = np.pad(a, pad)
    z, y, x = (n // 2 for n in a.shape)
    return a.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5))


def _box_around(dom: _Domain, site: np.ndarray, radius_mm: float) -> tuple[slice, ...]:
    out = []
    for ax in range(3):
        r = int(math.ceil(radius_mm / dom.h[ax]))
        lo = max(dom.brain_box[ax].start - 1, int(site[ax]) - r, 0)
        hi = min(dom.brain_box[ax].stop + 1, int(site[ax]) + r + 1, dom.mask.shape[ax])
        out.append(slice(lo, hi))
    return tuple(out)


def _scan_noise(flair: np.ndarray, mask: np.ndarray, rng: np.random.Generator, scale: float,
                bias: tuple[float, ...], noise_sd: float) -> np.ndarray:
    """Per-scan appearance: global scale, extra bias field, Rician noise inside the brain (0 outside)."""
    image = flair * scale * (bias_field(flair.shape, bias) / bias_field(flair.shape, (0, 0, 0, 0)))
    inside = image[mask]
    n1 = rng.normal(0.0, noise_sd, inside.shape).astype(np.float32)
    n2 = rng.normal(0.0, noise_sd, inside.shape).astype(np.float32)
    out = np.zeros(flair.shape, np.float32)
    out[mask] = np.sqrt((inside + n1) ** 2 + n2 ** 2)
    return out


def simulate_patient(rng: np.random.Generator, *, spacing: int = 2, pattern: str | None = None,
                     baseline_volume_ml: float | None = None,
                     biology_overrides: Mapping[str, float] | None = None,
                     progress: Callable[[str], None] | None = None) -> PhantomPatient:
    """Simulate one synthetic patient from its random generator.

    Args:
        rng: the patient's generator (:func:`case_rng`). Draws are made in a fixed order whatever
            the pattern, so overriding ``pattern`` keeps the patient's biology, tumour site, baseline
            size, scan days and image noise; overriding ``baseline_volume_ml`` keeps the biology, site
            and schedule (the noise realisation may differ).
        spacing: atlas spacing in mm (2 is committed).
        pattern: force a treatment pattern (a key of :data:`TREATMENT_PATTERNS`) instead of drawing it.
        baseline_volume_ml: force the baseline visible volume target (mL) instead of drawing it.
        biology_overrides: replace some of the drawn :class:`Biology` values (field name -> value,
            units as in :data:`BIOLOGY_RANGES`). The biology is still drawn first, so the site,
            baseline size, schedule and image noise stay the patient's: the same patient with, for
            example, another radiosensitivity (what-if and identifiability studies).

    Returns:
        A :class:`PhantomPatient` with one :class:`Scan` per time point (day 0 first).
    """
    if pattern is not None and pattern not in TREATMENT_PATTERNS:
        raise ParameterError(f"Unknown treatment pattern {pattern!r}; choose one of {sorted(TREATMENT_PATTERNS)}.")
    dom = _domain(int(spacing))
    bio = _with_overrides(sample_biology(rng), biology_overrides)
    site = dom.sites[int(rng.integers(len(dom.sites)))]
    v0 = float(rng.uniform(*BASELINE_VOLUME_ML))
    names = list(TREATMENT_PATTERNS)
    drawn = names[int(rng.choice(len(names), p=np.array(list(TREATMENT_PATTERNS.values()))))]
    pattern = pattern or drawn
    v0 = float(baseline_volume_ml) if baseline_volume_ml is not None else v0
    schedule = _sample_schedule(rng, pattern)
    appearance = [(float(rng.uniform(0.93, 1.07)), tuple(float(x) for x in rng.uniform(-0.03, 0.03, 4)))
                  for _ in range(len(schedule.scan_days))]
    noise_rng = np.random.default_rng(rng.integers(0, 2 ** 63 - 1))

    horizon = schedule.scan_days[-1]
    r0 = (3.0 * v0 / (4.0 * math.pi)) ** (1.0 / 3.0) * 10.0  # mm
    radius = 1.8 * r0 + bio.front_speed_mm_per_day * horizon + 30.0
    tumour = _Tumour(dom, bio, site, _box_around(dom, site, radius))
    imager = _Imager(dom, tumour, bio, noise_rng)
    voxel_ml = dom.geometry.voxel_volume_ml

    # Pre-growth: untreated until the visible (material-frame) volume reaches the target, which
    # the mass effect then inflates by roughly half the displaced bulk.
    target = v0 / (1.0 + 0.5 * bio.mass_effect)
    pre_days = 0.0
    dt_pre = min(tumour.dt_stable, 0.2 / bio.proliferation_per_day, 25.0)
    for _ in range(5000):
        if tumour.visible().sum() * voxel_ml >= target:
            break
        tumour.step(dt_pre, 0.0)
        pre_days += dt_pre

    rt_dose: np.ndarray | None = None
    plan_arrays: dict[str, np.ndarray] = {}
    scans: list[Scan] = []
    surgery_day = schedule.surgery_day
    events = set(schedule.scan_days) | set(schedule.rt_days)
    events |= {d + bio.rt_death_delay_days for d in schedule.rt_days}
    for s, e in schedule.tmz_windows:
        events |= {s, e}
    if surgery_day is not None:
        events.add(surgery_day)
    times = sorted(t for t in events if 0.0 <= t <= horizon)
    scan_index = 0
    dt_max = min(tumour.dt_stable, 0.2 / bio.proliferation_per_day, 5.0)

    def cavity_pressure(day: float) -> float:
        if surgery_day is None or day < surgery_day:
            return 0.0
        return bio.mass_effect * math.exp(-(day - surgery_day) / CAVITY_COLLAPSE_DAYS)

    for i, day in enumerate(times):
        tumour.release(day)
        if scan_index < len(schedule.scan_days) and abs(day - schedule.scan_days[scan_index]) < 1e-9:
            labels, flair, cavity, umax = imager.image(cavity_pressure(day))
            scale, bias = appearance[scan_index]
            flair = _scan_noise(flair, dom.mask, noise_rng, scale, bias, 0.012)
            scans.append(Scan(day, labels, flair, float((labels == BRAIN_SCHEMA.tumour_index).sum()) * voxel_ml,
                              float(cavity.sum()) * voxel_ml, umax))
            scan_index += 1
            if progress is not None:
                progress(f"day {day:g}: tumour {scans[-1].tumour_ml:.1f} mL")
        if surgery_day is not None and abs(day - surgery_day) < 1e-9:
            removed = _resection(dom, tumour, bio)
            u = imager.displacement(cavity_pressure(day))
            before = tumour.cavity.copy()
            tumour.resect(removed)
            plan_arrays["resection_mask"] = _to_image_frame(dom, imager, u, tumour.cavity & ~before)
        if schedule.rt_start is not None and abs(day - schedule.rt_start) < 1e-9:
            u = imager.displacement(cavity_pressure(day))
            dose_full = _dose_map(dom, tumour, imager, u, schedule.rt_dose_per_fraction * len(schedule.rt_days))
            plan_arrays["dose_map"] = dose_full
            rt_dose = dose_full[tumour.box] / len(schedule.rt_days)
        if rt_dose is not None:
            for _ in range(schedule.rt_days.count(day)):
                tumour.irradiate(day, rt_dose)
        if i + 1 < len(times):
            t0, t1 = day, times[i + 1]
            mid = 0.5 * (t0 + t1)
            kill = bio.tmz_kill_rate_per_day if any(s <= mid < e for s, e in schedule.tmz_windows) else 0.0
            n_steps = max(1, int(math.ceil((t1 - t0) / dt_max - 1e-9)))
            for _ in range(n_steps):
                tumour.step((t1 - t0) / n_steps, kill)

    plan = _plan_dict(schedule)
    geometry = dom.geometry
    site_mm = tuple(float(v) for v in geometry.ijk_to_lps()[:3] @ np.array([site[2], site[1], site[0], 1.0]))
    info = {"baseline_target_ml": v0, "box_zyx": [[s.start, s.stop] for s in tumour.box]}
    return PhantomPatient(scans, plan, plan_arrays, pattern, bio, tuple(int(v) for v in site), site_mm, geometry,
                          pre_days, info)


def _to_image_frame(dom: _Domain, imager: _Imager, u: np.ndarray, material_mask: np.ndarray) -> np.ndarray:
    """A tumour-box material-frame mask as a full-grid image-frame uint8 mask."""
    full = np.zeros(dom.mask.shape, np.uint8)
    full[imager.t.box] = material_mask
    return imager.warp(u, [(full, 0)])[0]


def _resection(dom: _Domain, tumour: _Tumour, bio: Biology) -> np.ndarray:
    """Material-frame voxels removed: bulk nearest the surgical approach up to the extent, plus 1 voxel."""
    total = tumour.c + tumour.dying
    bulk = (total >= BULK_RAMP[0]) & tumour.mask
    if not bulk.any():
        bulk = tumour.visible()
    if not bulk.any():
        return np.zeros(tumour.shape, bool)
    idx = np.argwhere(bulk)
    centroid = idx.mean(axis=0)
    # approach: the nearest point of the brain surface to the bulk centroid
    depth = dom.depth_mm[tumour.box]
    outside = depth <= dom.h[0]
    surf = np.argwhere(outside)
    if len(surf):
        d2 = (((surf - centroid) * np.asarray(dom.h)) ** 2).sum(1)
        entry = surf[int(np.argmin(d2))]
    else:
        entry = centroid
    order = np.argsort((((idx - entry) * np.asarray(dom.h)) ** 2).sum(1), kind="stable")
    n_remove = max(1, int(round(bio.extent_of_resection * len(idx))))
    removed = np.zeros(tumour.shape, bool)
    sel = idx[order[:n_remove]]
    removed[sel[:, 0], sel[:, 1], sel[:, 2]] = True
    visible = tumour.visible()
    removed |= ndi.binary_dilation(removed) & visible
    removed &= tumour.tissues >= 2
    return removed


def _dose_map(dom: _Domain, tumour: _Tumour, imager: _Imager, u: np.ndarray, total_gy: float) -> np.ndarray:
    """Total planned dose (Gy) on the full grid in the image frame at planning time."""
    target_m = tumour.visible() | tumour.cavity
    target = _to_image_frame(dom, imager, u, target_m).astype(bool)
    if not target.any():
        return np.zeros(dom.mask.shape, np.float32)
    dist = ndi.distance_transform_edt(~target, sampling=dom.h)
    ctv = (dist <= CTV_MARGIN_MM) & dom.mask
    dose = ndi.gaussian_filter(ctv.astype(np.float32), [DOSE_PENUMBRA_SIGMA_MM / hh for hh in dom.h])
    dose = np.clip(dose / max(float(dose[target].min()), 1e-3), 0.0, 1.0) * total_gy
    return np.where(dom.mask, dose, 0.0).astype(np.float32)


def _plan_dict(schedule: _Schedule) -> dict:
    """The plan in format v1 with placeholders ``resection_mask.nii.gz`` / ``dose_map.nii.gz``."""
    plan: dict = {"version": 1}
    if schedule.surgery_day is not None:
        plan["surgery"] = [{"day": schedule.surgery_day, "resection_mask": "resection_mask.nii.gz"}]
    if schedule.rt_start is not None:
        plan["radiotherapy"] = {"start_day": schedule.rt_start, "fractions": len(schedule.rt_days),
                                "dose_per_fraction_gy": schedule.rt_dose_per_fraction, "fractions_per_week": 5,
                                "dose_map": "dose_map.nii.gz", "alpha_per_gy": DEFAULT_ALPHA_PER_GY,
                                "alpha_beta_gy": DEFAULT_ALPHA_BETA_GY}
    if schedule.tmz_windows:
        plan["chemotherapy"] = [{"agent": "temozolomide", "kill_rate_per_day": NOMINAL_TMZ_KILL_RATE_PER_DAY,
                                 "windows": [[s, e] for s, e in schedule.tmz_windows]}]
    return plan


def check_plan_dict(plan: dict, base_dir) -> None:
    """Validate a written phantom plan with the plan reader (files must exist in ``base_dir``)."""
    load_plan(plan, schema=BRAIN_SCHEMA, base_dir=base_dir)


def case_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of phantom case ``index`` in a cohort with ``seed`` (independent of the cohort size)."""
    return np.random.default_rng([int(seed), int(index), 5])
