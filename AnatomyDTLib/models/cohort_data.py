"""Brain cohorts as training cases: one case per patient, every follow-up scan a target.

A cohort directory (``anatomydt make-dataset brain`` or ``anatomydt import-cohort``; format in
docs/brain_data.md) lists each patient's scans with their days and one treatment plan. For
training, a patient becomes one :class:`~AnatomyDTLib.models.data.Case`: the baseline labelmap
(time point 0), every later scan with a known day as ``(day, labels)``, and the plan with its
arrays (dose map in Gy, resection masks) read onto the baseline grid. One rollout from the
baseline through all follow-up days then scores every scan of the patient.

Crops: a crop box (voxels, centred on the baseline tumour) cuts labels and plan arrays alike
(:func:`AnatomyDTLib.plan.crop_plan`), so the treatment acts where it acted in the full image.

Labels are held as uint8 and dose maps as float32 (about 10 MB per patient on the 2 mm grid),
because every training process holds the whole cohort.

All scans of a patient must share the baseline's grid (the phantom cohort does; imported
cohorts should be resampled to one grid per patient first). Patients with fewer than two scans
with known days, or without tumour at baseline, are skipped with a note, never silently.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import read_labelmap
from ..schema import BRAIN_SCHEMA
from .data import Case, DatasetInfo


def _compact(plan):
    """The plan with its dose map in float32 (Gy): a cohort is held in memory by every training process."""
    rt = plan.radiotherapy
    if rt is not None and isinstance(rt.dose_map, np.ndarray):
        plan = replace(plan, radiotherapy=replace(rt, dose_map=rt.dose_map.astype(np.float32)))
    return plan


def _read_labels(path: Path):
    volume = read_labelmap(path)
    return np.asarray(volume.labels), volume.geometry


def load_cohort_cases(directory, log=None) -> tuple[list[Case], DatasetInfo]:
    """Patients of a cohort directory as training cases (see the module docstring)."""
    from ..brain.cohort import load_cohort
    from ..commands._common import plan_array_loader

    patients = load_cohort(directory)
    cases, skipped = [], []
    spacing = None
    for patient in patients:
        points = [tp for tp in patient.timepoints if tp.day_known]
        if len(points) < 2 or points[0].index != 0:
            skipped.append(f"{patient.case}: fewer than two scans with known days")
            continue
        labels0, geometry = _read_labels(points[0].segmentation)
        if not (labels0 == BRAIN_SCHEMA.tumour_index).any():
            skipped.append(f"{patient.case}: no tumour at baseline")
            continue
        followups = []
        for tp in points[1:]:
            labels, geo = _read_labels(tp.segmentation)
            if labels.shape != labels0.shape or not np.allclose(geo.spacing, geometry.spacing):
                raise InputError(f"{patient.case}: scan {tp.index} ({tp.segmentation}) is not on the baseline grid "
                                 f"({labels.shape} vs {labels0.shape}); resample the patient's scans to one grid.")
            followups.append((float(tp.day - points[0].day), labels.astype(np.uint8)))
        plan = _compact(patient.load_plan(BRAIN_SCHEMA).with_loaded_arrays(plan_array_loader(geometry, labels0.shape),
                                                                           grid_shape=labels0.shape))
        case_spacing = tuple(float(s) for s in geometry.spacing_array_order)
        spacing = spacing or case_spacing
        last_day, last = followups[-1]
        cases.append(Case(patient.case, labels0.astype(np.uint8), last, last_day, {}, case_spacing,
                          tuple(followups), plan))
    if not cases:
        raise InputError(f"The cohort in {directory} has no usable patient (each needs a baseline with tumour and a "
                         f"follow-up with a known day): {'; '.join(skipped[:5])}.")
    if skipped and log is not None:
        log(f"skipped {len(skipped)} patient(s): {'; '.join(skipped[:5])}")
    info = DatasetInfo("brain-cohort", list(BRAIN_SCHEMA.names), BRAIN_SCHEMA.tumour_index,
                       BRAIN_SCHEMA.names.index(BRAIN_SCHEMA.background), 3, spacing)
    return cases, info
