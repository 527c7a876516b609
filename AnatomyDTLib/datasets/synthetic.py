"""Synthetic paired (pre-treatment, post-treatment) anatomy label maps.

Two generators follow appendix A of the Anatomy-DT paper:

``voronoi``
    A smooth elliptical "body" split into organ-like regions by a soft Voronoi partition
    (random sites, every pixel assigned to its nearest site after a smooth domain warp, so
    boundaries are curved and smooth). A tumour is seeded near the centre as a thresholded
    Gaussian blob. Between the two time points the tumour grows (or shrinks under
    treatment) and the neighbouring tissue is pushed away by a real deformation field.

``vessel``
    A branching random-walk skeleton (a binary tree whose segments are persistent random
    walks) is dilated into tapered vessels; the rest of the body is filled with a soft
    Voronoi partition into lobes. A tumour is seeded next to a vessel. Between the time
    points the vessels thicken and the tumour front advances with a speed that is boosted
    close to the vessels, so it grows preferentially along them.

Class layout (tumour is always class 1, background always class 0)::

    voronoi:  0 background (outside the body), 1 tumour, 2 .. 1+n_regions organ regions
    vessel:   0 background (outside the body), 1 tumour, 2 vessel, 3 .. 2+n_lobes lobes

Units: all lengths are in voxels (pixels in 2D); written volumes have 1 mm spacing, so a
voxel is 1 mm (1 mm^2 in 2D, 1 mm^3 in 3D). Time is in days, dose in Gy.

The generator is its own ground-truth simulator; it does NOT solve a reaction-diffusion
PDE. The t0 -> t1 dynamics are:

1. **Tumour burden** (voxel count, i.e. area in 2D and volume in 3D) follows exponential
   growth with a linear-quadratic (LQ) radiotherapy response, dose delivered at t0::

       S      = exp(-(alpha + beta * fraction_gy) * dose_gy)          (surviving fraction)
       factor = S * 2 ** (interval_days / doubling_days)
                + (1 - S) * exp(-interval_days / clearance_days)      (killed cells not yet cleared)
       n_t1   = round(n_t0 * factor)   (capped at max_tumour_fraction of the body)

   Untreated cases have dose 0, hence S = 1 and pure exponential growth.
2. **Tumour shape at t1.** If the tumour grows, t1 tumour = t0 tumour plus the
   ``n_t1 - n_t0`` candidate voxels that come first in a growth order:
   ``voronoi``: an anisotropic, heterogeneous Gaussian level set (Mahalanobis distance to
   the tumour centroid in a randomly oriented elongated metric, modulated by a smooth
   log-normal field); ``vessel``: the arrival time of a front started on the t0 tumour with
   local speed ``exp(h * noise) * (1 + vessel_boost * exp(-d_vessel^2 / (2 w^2)))``
   (a geodesic distance computed by fast marching on the grid). If the tumour shrinks it
   keeps its ``n_t1`` deepest voxels (largest distance to its own border, smooth noise).
3. **Mass effect.** The signed change of the tumour mask ``s = m_t1 - m_t0`` is a volume
   source (sink when shrinking); the displacement is ``u = mass_effect * grad(phi)`` with
   ``(laplacian - 1/push_range^2) phi = s`` (solved by FFT on a zero-padded grid). Near the
   tumour ``div u ~ s`` (tissue is pushed out by the added volume), far away it decays like
   ``exp(-r / push_range)``. The soft tissue channels (and, for ``vessel``, the distance to
   the vessel skeleton) are resampled through the inverse of ``x -> x + u(x)``; the body
   outline is held fixed (a rigid "skull").
4. **Vessels** (``vessel`` only) thicken by a per-case radius factor and move with the
   tissue. Vessel voxels are drawn over tumour voxels at both time points.

Determinism: every random number of a case comes from the ``numpy.random.Generator`` passed
in; :func:`make_dataset` gives case ``i`` the generator ``np.random.default_rng([seed, i])``
so a case does not depend on how many cases are generated. The random draws are made in a
fixed order whatever the options, so overriding the treatment of a case
(``treatment={...}``) changes its t1 map but never its t0 map.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from ..errors import InputError, OutputExistsError, ParameterError

GENERATOR_VERSION = "1.0.0"
KINDS = ("voronoi", "vessel")
MIN_SIZE, MAX_SIZE = 64, 256
BACKGROUND, TUMOUR, VESSEL = 0, 1, 2

#: Treatment variables recorded for every case (all floats).
TREATMENT_VARIABLES = ("treated", "dose_gy", "interval_days")
#: Fixed manifest columns; treatment variables follow them.
MANIFEST_COLUMNS = ("case", "kind", "size", "ndim", "seed", "labels_t0", "labels_t1") + TREATMENT_VARIABLES

# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
# Lengths given as fractions are multiplied by ``size`` (voxels). Pairs are (low, high) ranges
# sampled uniformly per case.
_COMMON_DEFAULTS = {
    "body_radius": (0.38, 0.46),       # semi-axes of the elliptical body, fraction of size
    "boundary_wiggle": 0.06,            # amplitude of the smooth domain warp, fraction of size
    "boundary_softness": 0.02,          # softmax temperature of the soft Voronoi, fraction of size
    "tumour_radius": (0.05, 0.08),      # t0 tumour radius, fraction of size
    "heterogeneity": 0.25,              # amplitude of the smooth log-normal growth heterogeneity
    "doubling_days": 50.0,              # untreated tumour-burden doubling time
    "interval_days": (30.0, 120.0),     # time between t0 and t1
    "p_treated": 0.5,                   # probability that a case is treated
    "dose_gy": (20.0, 70.0),            # total dose of treated cases (rounded to whole fractions)
    "fraction_gy": 2.0,                 # dose per fraction
    "alpha": 0.035,                     # LQ alpha, 1/Gy
    "alpha_beta": 10.0,                 # LQ alpha/beta ratio, Gy
    "clearance_days": 30.0,             # e-folding time of the removal of killed tumour cells
    "max_tumour_fraction": 0.35,        # cap of the tumour voxel count, fraction of the body
    "mass_effect": 0.8,                 # fraction of the tumour volume change that displaces tissue
    "push_range": 0.12,                 # decay length of the displacement, fraction of size
    "treatment": None,                  # dict overriding sampled treatment variables
}
VORONOI_DEFAULTS = {
    **_COMMON_DEFAULTS,
    "n_regions": 3,                     # organ regions (classes 2 .. 1+n_regions)
    "tumour_offset": 0.10,              # max distance of the tumour centre from the body centre
    "growth_anisotropy": (1.4, 2.2),    # long/short axis ratio of the growth metric
}
VESSEL_DEFAULTS = {
    **_COMMON_DEFAULTS,
    "n_lobes": 2,                       # lobes (classes 3 .. 2+n_lobes)
    "vessel_generations": 3,            # bifurcation levels of the vessel tree (root = 0)
    "root_radius": 0.022,               # root vessel radius, fraction of size
    "radius_taper": 0.75,               # child/parent radius ratio
    "segment_length": 0.26,             # root segment length, fraction of size
    "length_taper": 0.72,               # child/parent length ratio
    "tortuosity": 0.10,                 # direction noise of the walk, radians per sqrt(voxel)
    "branch_angle": (25.0, 50.0),       # degrees between a child and its parent direction
    "vessel_thickening": (1.3, 1.6),    # t1/t0 vessel radius ratio
    "vessel_boost": 6.0,                # extra front speed next to a vessel (speed = 1 + boost)
    "vessel_boost_width": 0.03,         # width of the fast corridor along vessels, fraction of size
}
_DEFAULTS = {"voronoi": VORONOI_DEFAULTS, "vessel": VESSEL_DEFAULTS}

_RANGES = {  # option -> (min, max) allowed for scalars and for both ends of pairs
    "body_radius": (0.2, 0.48), "boundary_wiggle": (0.0, 0.2), "boundary_softness": (1e-3, 0.2),
    "tumour_radius": (0.02, 0.2), "heterogeneity": (0.0, 1.0), "doubling_days": (1.0, 1e4),
    "interval_days": (0.0, 3650.0), "p_treated": (0.0, 1.0), "dose_gy": (0.0, 200.0),
    "fraction_gy": (0.1, 30.0), "alpha": (0.0, 2.0), "alpha_beta": (0.1, 1000.0),
    "clearance_days": (0.1, 1e4), "max_tumour_fraction": (0.01, 0.9), "mass_effect": (0.0, 1.0),
    "push_range": (0.01, 0.5), "n_regions": (1, 8), "tumour_offset": (0.0, 0.25),
    "growth_anisotropy": (1.0, 5.0), "n_lobes": (1, 8), "vessel_generations": (0, 5),
    "root_radius": (0.005, 0.06), "radius_taper": (0.3, 1.0), "segment_length": (0.05, 0.5),
    "length_taper": (0.3, 1.0), "tortuosity": (0.0, 2.0), "branch_angle": (5.0, 85.0),
    "vessel_thickening": (1.0, 3.0), "vessel_boost": (0.0, 100.0), "vessel_boost_width": (0.005, 0.2),
}
_INTEGER_OPTIONS = {"n_regions", "n_lobes", "vessel_generations"}


def default_options(kind: str) -> dict:
    """A copy of the default options of generator ``kind`` ('voronoi' or 'vessel')."""
    return dict(_DEFAULTS[_check_kind(kind)])


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ParameterError(f"Unknown synthetic dataset kind {kind!r}; choose one of {list(KINDS)}.")
    return kind


def _resolve_options(kind: str, options: dict) -> dict:
    """Defaults of ``kind`` updated with ``options``; unknown names and bad values raise ParameterError."""
    defaults = _DEFAULTS[_check_kind(kind)]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ParameterError(f"Unknown {kind} generator option(s) {unknown}; valid options are {sorted(defaults)}.")
    opts = dict(defaults)
    opts.update(options)
    for name, value in opts.items():
        if name == "treatment":
            opts[name] = _check_treatment_override(value)
            continue
        opts[name] = _check_option(name, value, isinstance(defaults[name], tuple))
    return opts


def _check_option(name, value, is_pair):
    lo, hi = _RANGES[name]
    values = tuple(value) if is_pair and isinstance(value, (tuple, list)) else (value,)
    if is_pair and len(values) not in (1, 2):
        raise ParameterError(f"Option {name} must be a number or a (low, high) pair, got {value!r}.")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ParameterError(f"Option {name} must be a finite number, got {v!r}.")
        if name in _INTEGER_OPTIONS and int(v) != v:
            raise ParameterError(f"Option {name} must be an integer, got {v!r}.")
        if not lo <= v <= hi:
            raise ParameterError(f"Option {name}={v!r} is outside its valid range [{lo}, {hi}].")
        out.append(int(v) if name in _INTEGER_OPTIONS else float(v))
    if is_pair:
        pair = (out[0], out[-1])
        if pair[0] > pair[1]:
            raise ParameterError(f"Option {name}={value!r} has low > high; give (low, high).")
        return pair
    return out[0]


def _check_treatment_override(value):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ParameterError(f"Option treatment must be a dict like {{'treated': 1, 'dose_gy': 60}}, got {value!r}.")
    unknown = sorted(set(value) - set(TREATMENT_VARIABLES))
    if unknown:
        raise ParameterError(f"Unknown treatment variable(s) {unknown}; valid ones are {list(TREATMENT_VARIABLES)}.")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v) or v < 0:
            raise ParameterError(f"Treatment variable {k} must be a finite number >= 0, got {v!r}.")
        out[k] = float(v)
    if "treated" in out and out["treated"] not in (0.0, 1.0):
        raise ParameterError(f"Treatment variable treated must be 0 or 1, got {out['treated']!r}.")
    return out


def _validate_geometry(size, ndim):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ParameterError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] voxels, got {size!r}.")
    if ndim not in (2, 3) or isinstance(ndim, bool):
        raise ParameterError(f"ndim must be 2 or 3, got {ndim!r}.")
    return int(size), int(ndim)


def class_names(kind: str, **options) -> list[str]:
    """Class names in label order for generator ``kind`` (``n_regions``/``n_lobes`` may be given)."""
    opts = _resolve_options(kind, options)
    if kind == "voronoi":
        return ["background", "tumour"] + [f"region_{k + 1}" for k in range(opts["n_regions"])]
    return ["background", "tumour", "vessel"] + [f"lobe_{k + 1}" for k in range(opts["n_lobes"])]


# ---------------------------------------------------------------------------------------------
# Random fields and geometry helpers
# ---------------------------------------------------------------------------------------------
def _uniform(rng, pair):
    lo, hi = pair
    return float(rng.uniform(lo, hi))


def _smooth_noise(shape, sigma, rng):
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma`` voxels."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / max(float(field.std()), 1e-8)


def _random_rotation(rng, ndim):
    """A uniformly random proper rotation matrix (ndim x ndim)."""
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit(v):
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _mahalanobis(coords, centre, rotation, axes):
    """sqrt(sum_i (R^T (x - c))_i^2 / a_i^2) on the grid; ``coords`` has shape (ndim, *shape)."""
    diff = coords - np.asarray(centre, np.float32).reshape((-1,) + (1,) * (coords.ndim - 1))
    local = np.tensordot(rotation.T.astype(np.float32), diff, axes=1)
    return np.sqrt(sum((local[i] / axes[i]) ** 2 for i in range(len(axes))))


def _normalised_axes(ratio, ndim, rng):
    """Semi-axes with product 1 whose longest/shortest ratio is ``ratio``."""
    if ndim == 2:
        axes = np.array([ratio, 1.0])
    else:
        axes = np.array([ratio, rng.uniform(1.0, ratio), 1.0])
    return axes / np.prod(axes) ** (1.0 / ndim)


def _body(coords, size, rng, opts, warp):
    """Elliptical body mask (slightly warped), its centre and semi-axes (voxels)."""
    ndim = coords.shape[0]
    centre = np.full(ndim, (size - 1) / 2.0) + rng.uniform(-0.02, 0.02, ndim) * size
    axes = np.array([_uniform(rng, opts["body_radius"]) for _ in range(ndim)]) * size
    rotation = _random_rotation(rng, ndim)
    body = _mahalanobis(coords + 0.5 * warp, centre, rotation, axes) <= 1.0
    return body, centre, axes


def _sample_sites(rng, n, body, centre, axes, min_sep):
    """``n`` random points inside the inner 75% of the body, at least ``min_sep`` apart when possible."""
    ndim = len(centre)
    sites = []
    sep = min_sep
    while len(sites) < n:
        for _ in range(200):
            p = centre + rng.uniform(-0.75, 0.75, ndim) * axes
            idx = tuple(np.clip(np.round(p).astype(int), 0, np.array(body.shape) - 1))
            inside = np.sum(((p - centre) / axes) ** 2) <= 0.75 ** 2 and body[idx]
            if inside and all(np.linalg.norm(p - s) >= sep for s in sites):
                sites.append(p)
                break
        else:
            sep *= 0.8  # crowded: relax the separation (deterministic given rng)
    return np.array(sites)


def _soft_voronoi(coords, sites, weights, warp, temperature):
    """Soft Voronoi channels ``softmax(-(|x + warp - s_k| + w_k) / T)`` of shape (K, *shape), float32."""
    x = coords + warp
    dist = np.stack([
        np.sqrt(sum((x[i] - s[i]) ** 2 for i in range(len(s)))) + w for s, w in zip(sites, weights)
    ])
    logits = -(dist - dist.min(axis=0, keepdims=True)) / temperature
    p = np.exp(logits)
    return (p / p.sum(axis=0, keepdims=True)).astype(np.float32)


def _domain_warp(shape, size, rng, amplitude):
    """Smooth random vector field (ndim, *shape) of typical magnitude ``amplitude * size`` voxels."""
    return np.stack([_smooth_noise(shape, 0.12 * size, rng) for _ in shape]) * np.float32(amplitude * size)


# ---------------------------------------------------------------------------------------------
# Treatment and tumour dynamics
# ---------------------------------------------------------------------------------------------
def _sample_treatment(rng, opts):
    """Draw (treated, dose_gy, interval_days), then apply the ``treatment`` override.

    Always makes the same three draws so that an override never shifts later random numbers.
    """
    u_treat, u_dose, u_interval = rng.uniform(size=3)
    treated = float(u_treat < opts["p_treated"])
    lo, hi = opts["dose_gy"]
    frac = opts["fraction_gy"]
    dose = round((lo + u_dose * (hi - lo)) / frac) * frac
    lo_t, hi_t = opts["interval_days"]
    treatment = {"treated": treated, "dose_gy": float(dose) if treated else 0.0,
                 "interval_days": float(round(lo_t + u_interval * (hi_t - lo_t)))}
    override = opts["treatment"] or {}
    treatment.update(override)
    if "treated" in override and override["treated"] == 0.0 and "dose_gy" not in override:
        treatment["dose_gy"] = 0.0
    if treatment["treated"] == 0.0 and treatment["dose_gy"] > 0.0:
        raise ParameterError(f"An untreated case cannot have dose_gy={treatment['dose_gy']}; set treated=1 or dose_gy=0.")
    return treatment


def surviving_fraction(dose_gy: float, alpha: float = 0.035, alpha_beta: float = 10.0,
                       fraction_gy: float = 2.0) -> float:
    """Linear-quadratic surviving fraction ``exp(-(alpha + beta * d) * D)`` of a fractionated dose D (Gy)."""
    beta = alpha / alpha_beta
    return float(math.exp(-(alpha + beta * fraction_gy) * dose_gy))


def tumour_burden_factor(treatment: dict, opts: dict) -> tuple[float, float]:
    """(t1/t0 tumour voxel-count factor, surviving fraction) of the dose-response model."""
    s = surviving_fraction(treatment["dose_gy"], opts["alpha"], opts["alpha_beta"], opts["fraction_gy"])
    t = treatment["interval_days"]
    growth = 2.0 ** (t / opts["doubling_days"])
    residue = math.exp(-t / opts["clearance_days"])
    return s * growth + (1.0 - s) * residue, s


def _target_count(n0, factor, capacity):
    return int(min(round(n0 * factor), capacity))


def _grow(t0_mask, order, candidates, n_add):
    """t0 mask plus the ``n_add`` candidate voxels with the smallest ``order`` value."""
    out = t0_mask.copy()
    idx = np.flatnonzero(candidates)
    n_add = min(n_add, idx.size)
    if n_add <= 0:
        return out
    chosen = idx[np.argpartition(order.ravel()[idx], n_add - 1)[:n_add]]
    out.ravel()[chosen] = True
    return out


def _keep_attached(mask, seed_mask):
    """Drop connected components of ``mask`` that do not contain a voxel of ``seed_mask``."""
    lab, _ = ndi.label(mask)
    keep = np.unique(lab[seed_mask & mask])
    return np.isin(lab, keep[keep > 0])


def _shrink(t0_mask, n_keep, noise, heterogeneity):
    """Keep the ``n_keep`` deepest voxels of the tumour (distance to its border, smooth noise)."""
    if n_keep <= 0:
        return np.zeros_like(t0_mask)
    depth = ndi.distance_transform_edt(t0_mask) * np.exp(heterogeneity * noise)
    return _grow(np.zeros_like(t0_mask), -depth, t0_mask, n_keep)


def _displacement(source, length, strength):
    """Displacement u = strength * grad(phi), (laplacian - 1/length^2) phi = source; shape (ndim, *shape).

    A unit volume source pushes the surrounding tissue outwards by exactly the flux of a unit
    volume near the source; the push decays like exp(-r / length). Solved spectrally on a grid
    zero-padded by 3 * length to avoid wrap-around.
    """
    shape = source.shape
    pad = int(math.ceil(3 * length))
    full = [sfft.next_fast_len(n + pad, real=True) for n in shape]
    spec = sfft.rfftn(source.astype(np.float64), s=full, workers=-1)
    ks = [2 * np.pi * sfft.fftfreq(n) for n in full[:-1]] + [2 * np.pi * sfft.rfftfreq(full[-1])]
    grids = np.meshgrid(*ks, indexing="ij", sparse=True)
    k2 = sum(k ** 2 for k in grids)
    phi_hat = -spec / (k2 + 1.0 / length ** 2)
    crop = tuple(slice(0, n) for n in shape)
    u = [sfft.irfftn(1j * k * phi_hat, s=full, workers=-1)[crop] for k in grids]
    return (strength * np.stack(u)).astype(np.float32)


def _inverse_map(coords, u, iterations=6):
    """Positions x with x + u(x) = y for every grid point y (fixed-point iteration)."""
    x = coords.copy()
    for _ in range(iterations):
        ux = np.stack([ndi.map_coordinates(c, x, order=1, mode="nearest") for c in u])
        x = coords - ux
    return x


def _resample(fields, positions):
    """Sample each array of ``fields`` (K, *shape) at ``positions`` (ndim, *shape), linear."""
    return np.stack([ndi.map_coordinates(f, positions, order=1, mode="nearest") for f in fields])


def _tumour_blob(coords, centre, radius, rng, noise, heterogeneity):
    """Thresholded anisotropic Gaussian blob: Mahalanobis distance <= radius, noisy border."""
    ndim = coords.shape[0]
    axes = _normalised_axes(rng.uniform(1.0, 1.3), ndim, rng)
    dist = _mahalanobis(coords, centre, _random_rotation(rng, ndim), axes)
    return dist * np.exp(-0.5 * heterogeneity * noise) <= radius


def _tumour_update(t0, growth_order, candidates, capacity, treatment, opts, noise):
    """Tumour mask at t1 and the dynamics summary (see the module docstring, steps 1-2)."""
    factor, survival = tumour_burden_factor(treatment, opts)
    n0 = int(t0.sum())
    n1 = _target_count(n0, factor, capacity)
    if n1 >= n0:
        t1 = _keep_attached(_grow(t0, growth_order, candidates & ~t0, n1 - n0), t0)
    else:
        t1 = _shrink(t0, n1, noise, opts["heterogeneity"])
    return t1, {"growth_factor": factor, "surviving_fraction": survival,
                "target_tumour_voxels_t1": n1}


def _mass_effect_positions(coords, t0, t1, size, opts):
    """Inverse-deformation sample positions and max displacement (voxels) for the tumour change."""
    source = t1.astype(np.float32) - t0.astype(np.float32)
    if opts["mass_effect"] == 0.0 or not source.any():
        return coords, 0.0
    u = _displacement(source, opts["push_range"] * size, opts["mass_effect"])
    return _inverse_map(coords, u), float(np.sqrt((u ** 2).sum(axis=0)).max())


# ---------------------------------------------------------------------------------------------
# Voronoi generator
# ---------------------------------------------------------------------------------------------
def _tissue_channels(coords, size, rng, opts, n_classes, body, centre, axes, warp):
    sites = _sample_sites(rng, n_classes, body, centre, axes, 0.8 * float(axes.min()) / math.sqrt(n_classes))
    weights = rng.uniform(-0.04, 0.04, n_classes) * size
    return _soft_voronoi(coords, sites, weights, warp, opts["boundary_softness"] * size), sites


def _assemble(body, tissue, first_label, tumour=None, vessel=None):
    """Label map: tissue argmax inside the body, then tumour (1), then vessel (2) on top."""
    labels = np.where(body, first_label + np.argmax(tissue, axis=0), BACKGROUND).astype(np.uint8)
    if tumour is not None:
        labels[tumour & body] = TUMOUR
    if vessel is not None:
        labels[vessel & body] = VESSEL
    return labels


def generate_voronoi_case(size: int, rng: np.random.Generator, ndim: int = 2, **options) -> dict:
    """One Voronoi case: organ regions, a central tumour, and its post-treatment evolution.

    Args:
        size: edge length of the cubic/square grid in voxels, 64..256.
        rng: the random generator (all randomness of the case comes from it).
        ndim: 2 (default) or 3.
        **options: overrides of :data:`VORONOI_DEFAULTS` (see ``docs/datasets.md``).

    Returns:
        dict with ``labels_t0`` and ``labels_t1`` (uint8 arrays of shape ``(size,) * ndim``,
        labels 0 background, 1 tumour, 2.. regions), ``treatment`` (dict of floats
        ``treated``, ``dose_gy``, ``interval_days``) and ``meta`` (JSON-serialisable details).
    """
    size, ndim = _validate_geometry(size, ndim)
    opts = _resolve_options("voronoi", options)
    shape = (size,) * ndim
    coords = np.indices(shape, dtype=np.float32)

    warp = _domain_warp(shape, size, rng, opts["boundary_wiggle"])
    body, centre, axes = _body(coords, size, rng, opts, warp)
    tissue, sites = _tissue_channels(coords, size, rng, opts, opts["n_regions"], body, centre, axes, warp)

    direction = _unit(rng.standard_normal(ndim))
    t_centre = centre + direction * rng.uniform(0, opts["tumour_offset"]) * size
    noise0 = _smooth_noise(shape, 0.06 * size, rng)
    t0 = _tumour_blob(coords, t_centre, _uniform(rng, opts["tumour_radius"]) * size, rng, noise0,
                      opts["heterogeneity"]) & body

    treatment = _sample_treatment(rng, opts)
    ratio = _uniform(rng, opts["growth_anisotropy"])
    g_axes = _normalised_axes(ratio, ndim, rng)
    g_rotation = _random_rotation(rng, ndim)
    noise1 = _smooth_noise(shape, 0.08 * size, rng)

    centroid = np.array(ndi.center_of_mass(t0))
    order = _mahalanobis(coords, centroid, g_rotation, g_axes) * np.exp(-opts["heterogeneity"] * noise1)
    capacity = int(opts["max_tumour_fraction"] * body.sum())
    t1, dyn = _tumour_update(t0, order, body, capacity, treatment, opts, noise1)

    positions, max_push = _mass_effect_positions(coords, t0, t1, size, opts)
    tissue1 = _resample(tissue, positions)

    labels_t0 = _assemble(body, tissue, 2, t0)
    labels_t1 = _assemble(body, tissue1, 2, t1)
    meta = {
        "kind": "voronoi", "size": size, "ndim": ndim, "generator_version": GENERATOR_VERSION,
        "class_names": class_names("voronoi", n_regions=opts["n_regions"]),
        "body_centre": centre.tolist(), "body_semi_axes": axes.tolist(), "region_sites": sites.tolist(),
        "tumour_centre": centroid.tolist(), "growth_axis": g_rotation[:, 0].tolist(),
        "growth_anisotropy": ratio, "tumour_voxels_t0": int(t0.sum()),
        "tumour_voxels_t1": int((labels_t1 == TUMOUR).sum()), "max_displacement_voxels": max_push,
        **dyn, "options": _jsonable(opts),
    }
    return {"labels_t0": labels_t0, "labels_t1": labels_t1, "treatment": treatment, "meta": meta}


# ---------------------------------------------------------------------------------------------
# Vessel generator
# ---------------------------------------------------------------------------------------------
def _perpendicular(direction, rng):
    """A random unit vector perpendicular to ``direction`` (2D: one of the two normals)."""
    if len(direction) == 2:
        normal = np.array([-direction[1], direction[0]])
        return normal if rng.uniform() < 0.5 else -normal
    v = rng.standard_normal(3)
    return _unit(v - v.dot(direction) * direction)


class _Occupancy:
    """Skeleton points of the finished segments with their segment ids (for the no-crossing rule)."""

    def __init__(self, ndim):
        self.points = np.zeros((0, ndim))
        self.ids = np.zeros(0, int)
        self.tree = None

    def add(self, points, seg_id):
        from scipy.spatial import cKDTree

        self.points = np.concatenate([self.points, points])
        self.ids = np.concatenate([self.ids, np.full(len(points), seg_id)])
        self.tree = cKDTree(self.points)

    def near(self, point, radius, exempt):
        """True if a point of a segment not in ``exempt`` lies within ``radius`` of ``point``."""
        if self.tree is None:
            return False
        hits = self.tree.query_ball_point(point, radius)
        return any(self.ids[h] not in exempt for h in hits)


def _walk_segment(start, direction, length, rng, depth, margin, occupancy, family, clearance, tortuosity,
                  step=0.5):
    """Persistent random walk from ``start``; returns points (n, ndim), final direction, completed flag.

    The direction diffuses by ``tortuosity`` (radians per sqrt(voxel)) per step. The walk stops
    early where the body depth falls below ``margin`` (it would leave the body) or where it
    comes within ``clearance`` voxels of another segment (vessels do not cross); the parent
    and sibling segments (``family``) are exempt while the walk is within ``2 * clearance``
    of its start, where it necessarily lies close to them.
    """
    pos, d = np.array(start, float), _unit(np.array(direction, float))
    points = [pos.copy()]
    high = np.array(depth.shape) - 1
    for _ in range(int(length / step)):
        d = _unit(d + tortuosity * math.sqrt(step) * rng.standard_normal(len(d)))
        nxt = pos + step * d
        if depth[tuple(np.clip(np.round(nxt).astype(int), 0, high))] < margin:
            return np.array(points), d, False
        exempt = family if np.linalg.norm(nxt - start) < 2 * clearance else ()
        if occupancy.near(nxt, clearance, exempt):
            return np.array(points), d, False
        pos = nxt
        points.append(pos.copy())
    return np.array(points), d, True


def _vessel_tree(rng, opts, size, body, centre, axes):
    """Branching random-walk skeleton: points (n, ndim), radius and generation per point, #segments.

    A root enters at the body border (a "hilum") heading towards the centre; each segment is
    a persistent random walk that, unless it is of the last generation or was cut short,
    bifurcates into two children rotated by +-``branch_angle`` in a random plane; children have
    ``radius_taper`` times the radius and ``length_taper`` times the length of their parent.
    Segments are grown breadth first, so thick vessels claim space first.
    """
    ndim = len(centre)
    depth = ndi.distance_transform_edt(body)
    root_r = max(1.0, opts["root_radius"] * size)
    margin = root_r + 2.0
    start = centre + _unit(rng.standard_normal(ndim)) * axes * 0.97
    while depth[tuple(np.clip(np.round(start).astype(int), 0, size - 1))] < margin:
        start = start + 0.5 * _unit(centre - start)
    heading = _unit(_unit(centre - start) + 0.15 * rng.standard_normal(ndim))
    occupancy = _Occupancy(ndim)
    # queue entries: start, direction, generation, radius, length, id, family ids
    queue = [(start, heading, 0, root_r, opts["segment_length"] * size, 0, ())]
    pts, radii, gens, next_id = [], [], [], 1
    while queue:
        s, d, g, r, length, seg_id, family = queue.pop(0)
        seg, d_end, completed = _walk_segment(s, d, length * rng.uniform(0.8, 1.2), rng, depth, margin,
                                              occupancy, family, 2.0 * r + 1.0, opts["tortuosity"])
        occupancy.add(seg, seg_id)
        pts.append(seg)
        radii.append(np.full(len(seg), r))
        gens.append(np.full(len(seg), g))
        if g >= opts["vessel_generations"] or not completed:
            continue  # last generation, or stopped early at the border / another vessel
        perp = _perpendicular(d_end, rng)
        children = (next_id, next_id + 1)
        next_id += 2
        for sign, child_id in zip((1.0, -1.0), children):
            theta = math.radians(_uniform(rng, opts["branch_angle"]))
            child = math.cos(theta) * d_end + sign * math.sin(theta) * perp
            queue.append((seg[-1], child, g + 1, max(1.0, r * opts["radius_taper"]),
                          length * opts["length_taper"], child_id, (seg_id,) + children))
    return np.concatenate(pts), np.concatenate(radii), np.concatenate(gens), len(pts)


def _rasterise_tree(points, radii, shape):
    """Skeleton mask, distance to the skeleton and radius of the nearest skeleton voxel."""
    idx = np.clip(np.round(points).astype(int), 0, np.array(shape) - 1)
    skeleton = np.zeros(shape, bool)
    radius = np.zeros(shape, np.float32)
    flat = np.ravel_multi_index(idx.T, shape)
    order = np.argsort(radii)  # the thickest vessel wins where segments overlap
    skeleton.ravel()[flat] = True
    radius.ravel()[flat[order]] = radii[order]
    dist, nearest = ndi.distance_transform_edt(~skeleton, return_indices=True)
    return skeleton, dist.astype(np.float32), radius[tuple(nearest)]


def _vessel_tumour_centre(rng, points, radii, gens, depth, radius):
    """Tumour centre beside a random non-root skeleton point lying deep enough in the body.

    The centre is ``vessel radius + U(0.3, 0.9) * tumour radius`` voxels from the skeleton
    point in a random direction, so the tumour abuts or partly encases the vessel.
    """
    ok = np.flatnonzero((gens >= 1) & (depth[tuple(np.round(points).astype(int).T)] > 2.5 * radius))
    if ok.size == 0:
        ok = np.arange(len(points))
    j = ok[rng.integers(ok.size)]
    offset = _unit(rng.standard_normal(len(points[j]))) * (radii[j] + rng.uniform(0.3, 0.9) * radius)
    return points[j] + offset


def generate_vessel_case(size: int, rng: np.random.Generator, ndim: int = 2, **options) -> dict:
    """One Vessel case: vessel tree, lobes, a peri-vascular tumour and its evolution.

    Args:
        size: edge length of the cubic/square grid in voxels, 64..256.
        rng: the random generator (all randomness of the case comes from it).
        ndim: 2 (default) or 3.
        **options: overrides of :data:`VESSEL_DEFAULTS` (see ``docs/datasets.md``).

    Returns:
        dict with ``labels_t0``, ``labels_t1`` (uint8, 0 background, 1 tumour, 2 vessel,
        3.. lobes), ``treatment`` and ``meta`` as :func:`generate_voronoi_case`.
    """
    from skimage.graph import MCP_Geometric

    size, ndim = _validate_geometry(size, ndim)
    opts = _resolve_options("vessel", options)
    shape = (size,) * ndim
    coords = np.indices(shape, dtype=np.float32)

    warp = _domain_warp(shape, size, rng, opts["boundary_wiggle"])
    body, centre, axes = _body(coords, size, rng, opts, warp)
    lobes, sites = _tissue_channels(coords, size, rng, opts, opts["n_lobes"], body, centre, axes, warp)
    points, radii, gens, n_segments = _vessel_tree(rng, opts, size, body, centre, axes)
    _, skel_dist, skel_radius = _rasterise_tree(points, radii, shape)
    vessel0 = (skel_dist <= skel_radius) & body

    depth = ndi.distance_transform_edt(body)
    t_radius = _uniform(rng, opts["tumour_radius"]) * size
    t_centre = _vessel_tumour_centre(rng, points, radii, gens, depth, t_radius)
    noise0 = _smooth_noise(shape, 0.06 * size, rng)
    t0 = _tumour_blob(coords, t_centre, t_radius, rng, noise0, opts["heterogeneity"]) & body & ~vessel0

    treatment = _sample_treatment(rng, opts)
    thickening = _uniform(rng, opts["vessel_thickening"])
    noise1 = _smooth_noise(shape, 0.08 * size, rng)

    d_vessel = ndi.distance_transform_edt(~vessel0)
    width = opts["vessel_boost_width"] * size
    speed = np.exp(opts["heterogeneity"] * noise1) * (1.0 + opts["vessel_boost"] * np.exp(-d_vessel ** 2 / (2 * width ** 2)))
    boundary = t0 & ~ndi.binary_erosion(t0)
    arrival, _ = MCP_Geometric(np.where(body, 1.0 / speed, 1e6)).find_costs(np.argwhere(boundary))
    capacity = int(opts["max_tumour_fraction"] * (body & ~vessel0).sum())
    t1, dyn = _tumour_update(t0, arrival, body & ~vessel0, capacity, treatment, opts, noise1)

    positions, max_push = _mass_effect_positions(coords, t0, t1, size, opts)
    lobes1 = _resample(lobes, positions)
    dist1, rad1 = _resample(np.stack([skel_dist, skel_radius]), positions)
    vessel1 = (dist1 <= thickening * rad1) & body

    labels_t0 = _assemble(body, lobes, 3, t0, vessel0)
    labels_t1 = _assemble(body, lobes1, 3, t1, vessel1)
    meta = {
        "kind": "vessel", "size": size, "ndim": ndim, "generator_version": GENERATOR_VERSION,
        "class_names": class_names("vessel", n_lobes=opts["n_lobes"]),
        "body_centre": centre.tolist(), "body_semi_axes": axes.tolist(), "lobe_sites": sites.tolist(),
        "n_vessel_segments": n_segments, "vessel_thickening": thickening,
        "tumour_centre": np.array(ndi.center_of_mass(t0)).tolist(), "tumour_voxels_t0": int(t0.sum()),
        "tumour_voxels_t1": int((labels_t1 == TUMOUR).sum()), "max_displacement_voxels": max_push,
        **dyn, "options": _jsonable(opts),
    }
    return {"labels_t0": labels_t0, "labels_t1": labels_t1, "treatment": treatment, "meta": meta}


_GENERATORS = {"voronoi": generate_voronoi_case, "vessel": generate_vessel_case}


def generate_case(kind: str, size: int, rng: np.random.Generator, ndim: int = 2, **options) -> dict:
    """Dispatch to :func:`generate_voronoi_case` or :func:`generate_vessel_case`."""
    return _GENERATORS[_check_kind(kind)](size, rng, ndim, **options)


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case ``index`` of a dataset with ``seed`` (independent of the case count)."""
    return np.random.default_rng([int(seed), int(index)])


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Dataset files
# ---------------------------------------------------------------------------------------------
def _write_labels(array, path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    image.SetSpacing((1.0,) * array.ndim)
    sitk.WriteImage(image, str(path), True)


def _read_labels(path):
    import SimpleITK as sitk

    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise InputError(f"Cannot read label map {path}: {exc}. Regenerate the dataset.") from exc


def _check_dataset_args(kind, n, seed):
    _check_kind(kind)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ParameterError(f"The number of cases n must be a positive integer, got {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"seed must be an integer >= 0, got {seed!r}.")


def _check_out_dir(out_dir: Path, force: bool):
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"Output path {out_dir} exists and is not a directory; choose another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputExistsError(
            f"Output directory {out_dir} already exists and is not empty; pass --force (force=True) to replace it."
        )


def _move_into_place(tmp: Path, out_dir: Path):
    """Rename the finished temporary directory to ``out_dir``, replacing an existing one."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "data")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_dataset(kind: str, n: int, size: int, seed: int, out_dir, *, ndim: int = 2, force: bool = False,
                 progress: Callable[[int, int], None] | None = None, options: dict | None = None) -> Path:
    """Generate ``n`` cases of ``kind`` and write them to ``out_dir``; returns the directory.

    Writes ``case_XXXX_t0.nii.gz`` / ``case_XXXX_t1.nii.gz`` (uint8 labels, 1 mm spacing),
    ``manifest.csv`` (columns :data:`MANIFEST_COLUMNS`, paths relative to ``out_dir``) and
    ``dataset.json`` (class names, generator version, all resolved options). Case ``i`` uses
    ``np.random.default_rng([seed, i])``. Everything is written into a temporary sibling
    directory which is renamed into place at the end, so ``out_dir`` is never half written.

    Args:
        progress: optional ``callable(done, n)`` called after each case is written.
        options: generator options (see :func:`default_options`).

    Raises:
        OutputExistsError: ``out_dir`` exists and is not empty and ``force`` is False.
        ParameterError: bad kind, n, size, ndim, seed or options.
    """
    _check_dataset_args(kind, n, seed)
    size, ndim = _validate_geometry(size, ndim)
    options = dict(options or {})
    opts = _resolve_options(kind, options)
    out_dir = Path(out_dir).absolute()
    _check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        rows = []
        for i in range(n):
            case = generate_case(kind, size, case_rng(seed, i), ndim, **options)
            name = f"case_{i:04d}"
            _write_labels(case["labels_t0"], tmp / f"{name}_t0.nii.gz")
            _write_labels(case["labels_t1"], tmp / f"{name}_t1.nii.gz")
            rows.append({"case": name, "kind": kind, "size": size, "ndim": ndim, "seed": seed,
                         "labels_t0": f"{name}_t0.nii.gz", "labels_t1": f"{name}_t1.nii.gz",
                         **{k: case["treatment"][k] for k in TREATMENT_VARIABLES}})
            if progress is not None:
                progress(i + 1, n)
        _write_manifest(tmp / "manifest.csv", rows)
        _write_description(tmp / "dataset.json", kind, n, size, ndim, seed, opts)
        _check_out_dir(out_dir, force)  # re-check: something may have appeared meanwhile
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_manifest(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def _write_description(path, kind, n, size, ndim, seed, opts):
    names = class_names(kind, **({"n_regions": opts["n_regions"]} if kind == "voronoi" else {"n_lobes": opts["n_lobes"]}))
    description = {
        "kind": kind, "n": n, "size": size, "ndim": ndim, "seed": seed, "spacing_mm": [1.0] * ndim,
        "generator": "AnatomyDTLib.datasets.synthetic", "generator_version": GENERATOR_VERSION,
        "case_rng": "numpy.random.default_rng([seed, case_index])",
        "class_names": names, "tumour_label": TUMOUR, "background_label": BACKGROUND,
        "treatment_variables": list(TREATMENT_VARIABLES), "options": _jsonable(opts),
    }
    with open(path, "w") as fh:
        json.dump(description, fh, indent=2)


def load_dataset(directory) -> list[dict]:
    """Read a dataset written by :func:`make_dataset`.

    Returns one dict per manifest row with ``case``, ``kind``, ``size``, ``ndim``, ``seed``,
    ``labels_t0``/``labels_t1`` (uint8 arrays), ``path_t0``/``path_t1`` and ``treatment``
    (dict of floats: every column after the fixed ones).

    Raises:
        InputError: missing directory, manifest, column or label file, or an unreadable row.
    """
    directory = Path(directory)
    manifest = directory / "manifest.csv"
    if not manifest.is_file():
        raise InputError(f"No manifest.csv in {directory}; give a directory written by make-dataset.")
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in MANIFEST_COLUMNS if c not in columns]
        if missing:
            raise InputError(f"{manifest} lacks column(s) {missing}; expected at least {list(MANIFEST_COLUMNS)}.")
        rows = list(reader)
    fixed = set(MANIFEST_COLUMNS) - set(TREATMENT_VARIABLES)
    return [_load_row(directory, manifest, row, [c for c in columns if c not in fixed]) for row in rows]


def _load_row(directory, manifest, row, treatment_columns):
    paths = {}
    for key in ("labels_t0", "labels_t1"):
        path = directory / row[key]
        if not path.is_file():
            raise InputError(f"Label file {path} listed in {manifest} (case {row['case']}) does not exist.")
        paths[key] = path
    try:
        treatment = {c: float(row[c]) for c in treatment_columns}
        size, ndim, seed = int(row["size"]), int(row["ndim"]), int(row["seed"])
    except (TypeError, ValueError) as exc:
        raise InputError(f"Bad value in {manifest}, case {row.get('case')!r}: {exc}.") from exc
    return {"case": row["case"], "kind": row["kind"], "size": size, "ndim": ndim, "seed": seed,
            "labels_t0": _read_labels(paths["labels_t0"]), "labels_t1": _read_labels(paths["labels_t1"]),
            "path_t0": paths["labels_t0"], "path_t1": paths["labels_t1"], "treatment": treatment}
