"""Anatomy completion: fill white matter, cortex and ventricles from the atlas by registration.

Public datasets (BraTS, UCSF-ALPTDG, LUMIERE) label only the tumour. To simulate, AnatomyDT
needs the surrounding anatomy, so :func:`complete_anatomy` registers the atlas FLAIR-like image
(:mod:`.atlas`) to the patient's FLAIR with SimpleITK and carries the atlas anatomy over:

1. **Affine** (12 parameters): Mattes mutual information (50 bins, about 50 000 random samples
   (at least 20 %) with a fixed seed), regular-step gradient descent with physical shift scales, 3 resolution levels
   (coarsest voxel about 8 mm, then halving down to the patient's grid; smoothing sigma half the
   shrunk voxel), initialised by aligning the images' intensity moments.
2. **Deformable** (optional): fast symmetric-forces demons on top of the affine, after matching the
   warped atlas histogram to the patient's FLAIR; the displacement field is smoothed with a
   Gaussian of 2 mm (diffusion-like regularisation) and the tumour region of the patient image is
   replaced by the warped atlas so that it exerts no force.
3. The tumour (dilated by 5 mm) is masked out of the metric, so the lesion -- which the atlas
   does not have -- does not pull the registration.
4. The atlas class maps are resampled linearly onto the patient grid and the most probable class
   is kept (a soft nearest neighbour); the patient's tumour labels overwrite the result, and an
   optional cavity mask is set to background.

Measured on the test phantom (atlas under a known 3D rotation/scale/translation on a 3 mm grid,
with a tumour): see docs/brain_data.md for the Dice values.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ..errors import InputError
from ..io import Geometry
from ..schema import BRAIN_SCHEMA
from .atlas import load_atlas_arrays

TUMOUR_MASK_MARGIN_MM = 5.0
DEMONS_SMOOTHING_MM = 2.0


def _image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    return geometry.apply_to_sitk(sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32)))


def _normalise(flair: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scale so that the brain's 99th percentile is 1 (robust to the scanner's arbitrary units)."""
    values = flair[mask] if mask.any() else flair.ravel()
    top = float(np.percentile(values, 99)) if values.size else 1.0
    return (flair / top).astype(np.float32) if top > 0 else flair.astype(np.float32)


def complete_anatomy(tumour_labels: np.ndarray, flair: np.ndarray, geometry: Geometry, *, deformable: bool = False,
                     cavity_mask: np.ndarray | None = None, atlas_spacing: int = 2, affine_iterations: int = 200,
                     demons_iterations: int = 40, progress: Callable[[float], None] | None = None,
                     ) -> tuple[np.ndarray, dict]:
    """Complete a tumour-only segmentation with atlas anatomy registered to the patient's FLAIR.

    Args:
        tumour_labels: labelmap on the patient grid (array order z, y, x) in the brain schema; only
            its tumour class is used and kept.
        flair: the patient's FLAIR on the same grid (any units; skull-stripped or not).
        geometry: the patient grid (mm, LPS).
        deformable: add a B-spline stage after the affine one (slower, follows local shape).
        cavity_mask: optional bool mask of a resection cavity, set to background in the result.
        atlas_spacing: atlas resolution in mm (2 is bundled).
        affine_iterations: affine optimiser iterations per resolution level.
        demons_iterations: iterations of the deformable (demons) stage.
        progress: optional callable receiving the fraction done in [0, 1].

    Returns:
        ``(labels, report)``: uint8 labels on the patient grid (brain schema) and a dict with
        ``metric`` (final Mattes MI, lower is better), ``metric_name``, ``transform`` (the
        SimpleITK transform mapping patient points to atlas points), ``affine_matrix`` and
        ``affine_translation_mm``, ``stop_condition``, ``deformable`` and ``seconds``.

    Raises:
        InputError: shapes differ, arrays are not 3D, or the FLAIR is empty/non-finite.
    """
    start = time.perf_counter()
    report_progress = progress or (lambda _f: None)
    labels_in = np.asarray(tumour_labels)
    flair = np.asarray(flair, dtype=np.float32)
    if labels_in.shape != flair.shape:
        raise InputError(f"The segmentation {labels_in.shape} and the FLAIR {flair.shape} must be on the same grid; "
                         "resample the segmentation onto the FLAIR first (nearest neighbour).")
    if flair.ndim != 3 or geometry.ndim != 3:
        raise InputError("Anatomy completion needs 3D volumes (a 3D FLAIR and segmentation).")
    if not np.isfinite(flair).all() or float(flair.max()) <= float(flair.min()):
        raise InputError("The FLAIR image is constant or has NaN/inf values; give the patient's FLAIR scan.")
    atlas = load_atlas_arrays(atlas_spacing)
    tumour = labels_in == BRAIN_SCHEMA.tumour_index
    head = flair > np.percentile(flair, 5) if (flair <= 0).mean() < 0.05 else flair > 0
    fixed = _image(_normalise(flair, head), geometry)
    moving = _image(_normalise(atlas.flair, atlas.brain_mask), atlas.geometry)
    metric_mask = head & ~ndi.binary_dilation(tumour, iterations=max(1, int(round(
        TUMOUR_MASK_MARGIN_MM / min(geometry.spacing)))))
    if metric_mask.sum() < 1000:
        metric_mask = head
    fixed_mask = _image(metric_mask.astype(np.uint8), geometry)
    fixed_mask = sitk.Cast(fixed_mask, sitk.sitkUInt8)

    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = _registration(fixed_mask, int(metric_mask.sum()))
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=affine_iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    shrinks, sigmas = _pyramid(min(geometry.spacing), coarsest_mm=8.0)
    reg.SetShrinkFactorsPerLevel(shrinks)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    weight = 0.5 if deformable else 0.9
    _watch(reg, report_progress, 0.0, weight, 3 * affine_iterations)
    affine = reg.Execute(fixed, moving)
    metric = reg.GetMetricValue()
    stop = reg.GetOptimizerStopConditionDescription()
    transform: sitk.Transform = affine
    if deformable:
        transform, demons_metric = _demons(fixed, moving, affine, tumour, geometry, demons_iterations,
                                           lambda f: report_progress(0.5 + 0.4 * f))
        stop = f"affine: {stop}; demons: {demons_iterations} iterations, final mean squared difference {demons_metric:.4g}"
    labels = _warp_atlas_labels(atlas, transform, geometry, flair.shape)
    labels[tumour] = BRAIN_SCHEMA.tumour_index
    if cavity_mask is not None:
        labels[np.asarray(cavity_mask, bool) & ~tumour] = BRAIN_SCHEMA.background_index
    report_progress(1.0)
    matrix, translation = _affine_parts(affine)
    report = {"metric": float(metric), "metric_name": "Mattes mutual information (negative; lower is better)",
              "transform": transform, "affine_matrix": matrix, "affine_translation_mm": translation,
              "stop_condition": stop, "deformable": bool(deformable), "seconds": time.perf_counter() - start}
    return labels, report


def _demons(fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, tumour: np.ndarray, geometry: Geometry,
            iterations: int, progress: Callable[[float], None]) -> tuple[sitk.Transform, float]:
    """Demons refinement on top of ``affine``; returns the composite transform and the final metric."""
    warped = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    matched = sitk.HistogramMatching(warped, fixed, numberOfHistogramLevels=64, numberOfMatchPoints=15,
                                     thresholdAtMeanIntensity=True)
    fixed_array = sitk.GetArrayFromImage(fixed)
    lesion = ndi.binary_dilation(tumour, iterations=max(1, int(round(TUMOUR_MASK_MARGIN_MM / min(geometry.spacing)))))
    fixed_array = np.where(lesion, sitk.GetArrayFromImage(matched), fixed_array).astype(np.float32)
    target = geometry.apply_to_sitk(sitk.GetImageFromArray(fixed_array))
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(int(iterations))
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(DEMONS_SMOOTHING_MM)
    demons.SetUseImageSpacing(True)
    count = {"n": 0}

    def on_iteration():
        count["n"] += 1
        progress(min(1.0, count["n"] / max(int(iterations), 1)))

    demons.AddCommand(sitk.sitkIterationEvent, on_iteration)
    field = demons.Execute(target, matched)
    displacement = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([affine, displacement]), float(demons.GetMetric())


def _pyramid(spacing_mm: float, coarsest_mm: float) -> tuple[list[int], list[float]]:
    """Shrink factors halving from a coarsest voxel of about ``coarsest_mm`` down to 1, with Gaussian
    smoothing sigmas (mm) of half the shrunk voxel size (0 at full resolution)."""
    shrinks = []
    factor = max(1, int(round(coarsest_mm / spacing_mm)))
    while factor > 1:
        shrinks.append(factor)
        factor //= 2
    shrinks.append(1)
    sigmas = [0.5 * f * spacing_mm if f > 1 else 0.0 for f in shrinks]
    return shrinks, sigmas


def _registration(fixed_mask: sitk.Image, mask_voxels: int) -> sitk.ImageRegistrationMethod:
    """Mattes MI on about 50 000 random samples (at least 20 %) of the masked fixed image, fixed seed."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(min(1.0, max(0.2, 50000.0 / max(mask_voxels, 1)))), 20240601)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _watch(reg: sitk.ImageRegistrationMethod, progress: Callable[[float], None], offset: float, weight: float,
           expected_iterations: int) -> None:
    count = {"n": 0}

    def on_iteration():
        count["n"] += 1
        progress(offset + weight * min(1.0, count["n"] / max(expected_iterations, 1)))

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)


def _affine_parts(affine: sitk.Transform) -> tuple[list[list[float]], list[float]]:
    """Matrix and translation (mm) of the affine part, mapping patient (fixed) points to atlas points."""
    composite = sitk.CompositeTransform(affine)
    inner = composite.GetNthTransform(composite.GetNumberOfTransforms() - 1)
    try:
        a = sitk.AffineTransform(inner)
    except (RuntimeError, TypeError):
        return np.eye(3).tolist(), [0.0, 0.0, 0.0]
    return np.asarray(a.GetMatrix()).reshape(3, 3).tolist(), list(a.GetTranslation())


def _warp_atlas_labels(atlas, transform: sitk.Transform, geometry: Geometry, shape: tuple[int, ...]) -> np.ndarray:
    """Atlas labels on the patient grid: per-class maps resampled linearly, then the most probable class."""
    reference = geometry.apply_to_sitk(sitk.Image([int(n) for n in reversed(shape)], sitk.sitkUInt8))
    k = BRAIN_SCHEMA.num_classes
    best = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    for c in range(k):
        if c == BRAIN_SCHEMA.tumour_index:
            continue
        default = 1.0 if c == BRAIN_SCHEMA.background_index else 0.0
        prob = _image((atlas.labels == c).astype(np.float32), atlas.geometry)
        warped = sitk.GetArrayFromImage(sitk.Resample(prob, reference, transform, sitk.sitkLinear, default,
                                                      sitk.sitkFloat32))
        better = warped > best
        labels[better] = c
        best = np.maximum(best, warped)
    return labels
