"""Longitudinal cohorts: the ``manifest.csv`` format, its reader/validator, and the phantom cohort writer.

A cohort is a directory with ONE ``manifest.csv``: one row per scan (patient x time point).
Training, evaluation and calibration read it through :func:`load_cohort`. Columns:

=============== ========== ============================================================================
column          required   meaning
=============== ========== ============================================================================
case            yes        patient identifier (rows of one patient share it)
timepoint       yes        integer index of the scan within the patient, 0 = baseline
day             yes        days since the patient's baseline scan (float); empty or ``nan`` = unknown
image           yes        FLAIR(-like) image, path relative to the manifest's directory
segmentation    yes        5-class labelmap (:data:`~AnatomyDTLib.schema.BRAIN_SCHEMA` values 0-4), relative path
plan            yes        treatment plan JSON (docs/plan.md), relative path; empty = not recorded
anatomy         no         ``complete`` (all 5 classes labelled) or ``missing`` (only tumour/background
                           are meaningful; run :mod:`.completion` first); default ``complete``
source          no         where the row comes from (``phantom``, ``brats2021``, ...)
tumour_ml       no         tumour-class volume in mL (informative)
=============== ========== ============================================================================

Other columns are kept as strings in :attr:`TimePoint.extra`. Within a patient, time points must
be 0, 1, 2, ... without gaps or duplicates and known days must strictly increase; every row of a
patient names the same plan (or none).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError, OutputExistsError, ParameterError
from ..io import write_image, write_labelmap
from ..plan import load_plan
from ..schema import BRAIN_SCHEMA, ClassSchema

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("case", "timepoint", "day", "image", "segmentation", "plan")
OPTIONAL_COLUMNS = ("anatomy", "source", "tumour_ml")
ANATOMY_VALUES = ("complete", "missing")


@dataclass
class TimePoint:
    """One scan of a patient; paths are absolute."""

    index: int
    day: float                      # days since baseline; NaN = unknown
    image: Path
    segmentation: Path
    plan: Path | None
    anatomy: str = "complete"
    source: str = ""
    tumour_ml: float = math.nan
    extra: dict = field(default_factory=dict)

    @property
    def day_known(self) -> bool:
        return not math.isnan(self.day)


@dataclass
class Patient:
    """A patient of a cohort: its time points in order and its plan (None if not recorded)."""

    case: str
    timepoints: list[TimePoint]
    plan: Path | None

    @property
    def days(self) -> list[float]:
        return [t.day for t in self.timepoints]

    def load_plan(self, schema: ClassSchema = BRAIN_SCHEMA):
        """The patient's :class:`~AnatomyDTLib.plan.TreatmentPlan` (no treatment if none recorded)."""
        return load_plan(self.plan, schema=schema) if self.plan is not None else load_plan(None)


def _float(text: str, what: str, where: str) -> float:
    text = (text or "").strip()
    if text == "" or text.lower() in ("nan", "na", "unknown"):
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: {what} {text!r} is not a number; write a number of days or leave it empty "
                         "(unknown).") from None
    if math.isinf(value):
        raise InputError(f"{where}: {what} must be finite, got {text!r}.")
    return value


def load_cohort(directory: str | os.PathLike, *, check_files: bool = True, check_plans: bool = True) -> list[Patient]:
    """Read and validate ``manifest.csv`` of a cohort directory.

    Args:
        check_files: require every image, segmentation and plan file to exist.
        check_plans: parse every plan with :func:`~AnatomyDTLib.plan.load_plan` (errors name the file).

    Returns:
        Patients in manifest order of first appearance, time points sorted by index.

    Raises:
        InputError: missing directory/manifest, missing columns, bad values, duplicate or gapped time
            points, non-increasing days, rows of one patient naming different plans, missing files.
        PlanError: a plan file is invalid (when ``check_plans``).
    """
    root = Path(directory)
    manifest = root / MANIFEST_NAME
    if not root.is_dir():
        raise InputError(f"Cohort directory '{root}' does not exist; give a folder written by "
                         "'anatomydt make-dataset brain' or 'anatomydt import-cohort'.")
    if not manifest.is_file():
        raise InputError(f"'{root}' has no {MANIFEST_NAME}; give a folder written by 'anatomydt make-dataset brain' "
                         "or 'anatomydt import-cohort', or write the manifest (see docs/brain_data.md).")
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in MANIFEST_COLUMNS if c not in columns]
        if missing:
            raise InputError(f"{manifest} lacks column(s) {missing}; a cohort manifest needs at least "
                             f"{list(MANIFEST_COLUMNS)} (see docs/brain_data.md).")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if not rows:
        raise InputError(f"{manifest} has no rows; a cohort needs at least one scan.")
    patients: dict[str, list[TimePoint]] = {}
    missing_files: list[str] = []
    for line, row in enumerate(rows, start=2):
        where = f"{manifest.name} line {line}"
        case = row["case"]
        if not case:
            raise InputError(f"{where}: the case is empty; give every row a patient identifier.")
        try:
            index = int(row["timepoint"])
        except ValueError:
            raise InputError(f"{where}: timepoint {row['timepoint']!r} is not an integer (0 = baseline).") from None
        if index < 0:
            raise InputError(f"{where}: timepoint must be >= 0, got {index}.")
        anatomy = row.get("anatomy", "") or "complete"
        if anatomy not in ANATOMY_VALUES:
            raise InputError(f"{where}: anatomy must be one of {list(ANATOMY_VALUES)}, got {anatomy!r}.")
        paths = {}
        for key in ("image", "segmentation", "plan"):
            value = row[key]
            if not value:
                if key != "plan":
                    raise InputError(f"{where}: the {key} path is empty; every scan needs a FLAIR image and a "
                                     "segmentation.")
                paths[key] = None
                continue
            path = (root / value) if not os.path.isabs(value) else Path(value)
            if check_files and not path.is_file():
                missing_files.append(f"{value} ({where}, {key})")
            paths[key] = path
        extra = {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS + OPTIONAL_COLUMNS}
        tp = TimePoint(index, _float(row["day"], "day", where), paths["image"], paths["segmentation"],
                       paths["plan"], anatomy, row.get("source", ""), _float(row.get("tumour_ml", ""), "tumour_ml",
                                                                            where), extra)
        patients.setdefault(case, []).append(tp)
    if missing_files:
        shown = "; ".join(missing_files[:5]) + (f"; and {len(missing_files) - 5} more" if len(missing_files) > 5 else "")
        raise InputError(f"{manifest} lists {len(missing_files)} file(s) that do not exist: {shown}. Paths are "
                         "relative to the manifest's folder; regenerate or re-import the cohort.")
    result = []
    for case, tps in patients.items():
        tps.sort(key=lambda t: t.index)
        indices = [t.index for t in tps]
        if indices != list(range(len(tps))):
            raise InputError(f"{manifest}: patient {case!r} has time points {indices}; they must be 0, 1, 2, ... "
                             "with no duplicates or gaps.")
        known = [(t.index, t.day) for t in tps if t.day_known]
        for (i0, d0), (i1, d1) in zip(known, known[1:]):
            if not d1 > d0:
                raise InputError(f"{manifest}: patient {case!r} time point {i1} is on day {d1:g}, not after time "
                                 f"point {i0} (day {d0:g}); days must strictly increase with the time point.")
        plans = {t.plan for t in tps if t.plan is not None}
        if len(plans) > 1:
            raise InputError(f"{manifest}: the rows of patient {case!r} name different plans "
                             f"({', '.join(sorted(str(p) for p in plans))}); a patient has one plan.")
        plan = plans.pop() if plans else None
        if plan is not None and check_plans:
            load_plan(plan, schema=BRAIN_SCHEMA)
        result.append(Patient(case, tps, plan))
    return result


def write_manifest(path: str | os.PathLike, rows: list[dict], extra_columns: tuple[str, ...] = ()) -> None:
    """Write a manifest (columns :data:`MANIFEST_COLUMNS` + :data:`OPTIONAL_COLUMNS` + ``extra_columns``)."""
    columns = list(MANIFEST_COLUMNS + OPTIONAL_COLUMNS + tuple(extra_columns))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c, "")) for c in columns})


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# Atomic cohort directories
# --------------------------------------------------------------------------------------------


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse an existing non-empty ``out_dir`` unless ``force`` (and anything that is not a directory)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"Output path {out_dir} exists and is not a directory; choose another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputExistsError(f"Output directory {out_dir} already exists and is not empty; pass --force to "
                                "replace it.")


class CohortWriter:
    """Write a cohort into a temporary sibling directory, then move it into place in one rename."""

    def __init__(self, out_dir: str | os.PathLike, force: bool):
        self.out_dir = Path(out_dir).absolute()
        self.force = force
        check_output_dir(self.out_dir, force)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))

    def __enter__(self) -> "CohortWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            check_output_dir(self.out_dir, self.force)
            old = None
            if self.out_dir.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
                os.replace(self.out_dir, old / "data")
            os.replace(self.tmp, self.out_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


# --------------------------------------------------------------------------------------------
# The phantom cohort
# --------------------------------------------------------------------------------------------


def make_brain_cohort(out_dir: str | os.PathLike, n: int, seed: int = 0, *, spacing: int = 2, force: bool = False,
                      progress: Callable[[int, int], None] | None = None, patterns: list[str] | None = None) -> Path:
    """Simulate ``n`` phantom patients (:mod:`.phantom`) and write them as a cohort in ``out_dir``.

    Per patient ``case_XXXX/``: ``tpK_flair.nii.gz`` (FLAIR-like, float32) and ``tpK_seg.nii.gz``
    (5-class uint8 labelmap) per time point K, ``plan.json`` (plan format v1; with
    ``resection_mask.nii.gz`` / ``dose_map.nii.gz`` (total Gy) when the plan has surgery / RT) and
    ``truth.json`` (the hidden biology and per-scan volumes). At the top: ``manifest.csv`` and
    ``cohort.json`` (generator settings). Case ``i`` depends only on ``(seed, i)``, not on ``n``.
    The directory appears in one rename when everything is written.

    Args:
        patterns: optional treatment pattern per case (cycled), overriding the random draw;
            used by tests and figures (keys of :data:`~.phantom.TREATMENT_PATTERNS`).

    Raises:
        ParameterError: bad ``n``/``seed``/``spacing``/pattern. OutputExistsError: non-empty ``out_dir``
        without ``force``. InputError: the atlas is missing.
    """
    from . import phantom

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ParameterError(f"The number of patients --n must be a positive integer, got {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"--seed must be an integer >= 0, got {seed!r}.")
    for p in patterns or []:
        if p not in phantom.TREATMENT_PATTERNS:
            raise ParameterError(f"Unknown treatment pattern {p!r}; choose from {sorted(phantom.TREATMENT_PATTERNS)}.")
    from .atlas import atlas_paths

    atlas_paths(int(spacing))  # a clear error before any work if the atlas is missing
    start = time.perf_counter()
    with CohortWriter(out_dir, force) as writer:
        rows = []
        for i in range(int(n)):
            pattern = patterns[i % len(patterns)] if patterns else None
            patient = phantom.simulate_patient(phantom.case_rng(seed, i), spacing=int(spacing), pattern=pattern)
            rows += _write_patient(writer.tmp, f"case_{i:04d}", patient)
            if progress is not None:
                progress(i + 1, int(n))
        write_manifest(writer.tmp / MANIFEST_NAME, rows)
        description = {
            "generator": "AnatomyDTLib.brain.phantom", "generator_version": phantom.PHANTOM_VERSION,
            "n": int(n), "seed": int(seed), "spacing_mm": int(spacing),
            "case_rng": "numpy.random.default_rng([seed, case_index, 5])",
            "class_names": list(BRAIN_SCHEMA.names), "treatment_patterns": phantom.TREATMENT_PATTERNS,
            "biology_ranges": phantom.BIOLOGY_RANGES, "visible_density": phantom.VISIBLE_DENSITY,
            "baseline_volume_ml": phantom.BASELINE_VOLUME_ML, "follow_up_days": phantom.FOLLOW_UP_DAYS,
            "manifest_columns": list(MANIFEST_COLUMNS + OPTIONAL_COLUMNS),
            "synthetic": "Every patient is simulated on the MNI ICBM 2009a atlas; see docs/brain_data.md.",
            "seconds": round(time.perf_counter() - start, 1),
        }
        (writer.tmp / "cohort.json").write_text(json.dumps(description, indent=2) + "\n")
    return writer.out_dir


def _write_patient(root: Path, case: str, patient) -> list[dict]:
    folder = root / case
    folder.mkdir()
    geometry = patient.geometry
    plan = dict(patient.plan)
    mask_schema = ClassSchema.generic(2)
    if "resection_mask" in patient.plan_arrays:
        write_labelmap(folder / "resection_mask.nii.gz", patient.plan_arrays["resection_mask"].astype(np.uint8),
                       geometry, mask_schema)
    elif "surgery" in plan:  # nothing was resectable: record the surgery by extent instead
        plan["surgery"] = [{"day": s["day"], "extent": 1.0} for s in plan["surgery"]]
    if "dose_map" in patient.plan_arrays:
        write_image(folder / "dose_map.nii.gz", np.round(patient.plan_arrays["dose_map"], 2), geometry)
    (folder / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    from .phantom import check_plan_dict

    check_plan_dict(plan, folder)
    (folder / "truth.json").write_text(json.dumps(patient.truth(), indent=2) + "\n")
    rows = []
    for k, scan in enumerate(patient.scans):
        image = f"{case}/tp{k}_flair.nii.gz"
        seg = f"{case}/tp{k}_seg.nii.gz"
        write_image(root / image, scan.flair, geometry)
        write_labelmap(root / seg, scan.labels, geometry, BRAIN_SCHEMA)
        rows.append({"case": case, "timepoint": k, "day": float(scan.day), "image": image, "segmentation": seg,
                     "plan": f"{case}/plan.json", "anatomy": "complete", "source": "phantom",
                     "tumour_ml": round(scan.tumour_ml, 3)})
    return rows
