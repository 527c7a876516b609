"""Pieces shared by several ``anatomydt`` sub-commands: outputs, class maps, progress, tables."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

from ..errors import InputError, OutputExistsError
from ..io import Geometry, read_image_on_grid
from ..schema import ClassSchema


def add_force_argument(parser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")


def add_class_map_argument(parser) -> None:
    parser.add_argument(
        "--classes",
        help="map input labels or segment names to classes, as JSON or 'key=class,...', e.g. "
             "'1=tumour,2=tumour,4=tumour' (BraTS) or 'Edema=tumour,WM=white_matter'")


def parse_class_map(text: str | None) -> dict | None:
    """Parse ``--classes``: a JSON object or comma-separated ``key=class`` pairs (digit keys become ints)."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"--classes is not valid JSON: {exc.msg}.") from exc
    else:
        raw = {}
        for item in text.split(","):
            if "=" not in item:
                raise InputError(f"--classes entry {item!r} is not of the form key=class.")
            key, value = item.split("=", 1)
            raw[key.strip()] = value.strip()
    return {int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in raw.items()}


def parse_days(values) -> list[float]:
    """Days of a ``--days`` option given as '30,60,90', '30 60 90' or a mix; sorted, duplicates removed."""
    days = []
    for value in values:
        for item in str(value).replace(";", ",").split(","):
            if not item.strip():
                continue
            try:
                d = float(item)
            except ValueError:
                raise InputError(f"--days: {item.strip()!r} is not a number of days; give e.g. --days 30,60,90.") from None
            if not math.isfinite(d):
                raise InputError(f"--days: {item.strip()!r} is not a finite number of days.")
            days.append(d)
    if not days:
        raise InputError("--days is empty; give the days to forecast, e.g. --days 30,60,90.")
    return sorted(set(days))


def resolve_output_paths(template: str, days: list[float]) -> list[Path]:
    """One output path per day; several days need a ``{day}`` placeholder in the template."""
    if len(days) > 1 and "{day}" not in template:
        raise InputError("Several --days were given: put {day} in --out (e.g. pred_day{day}.seg.nrrd) to get one file per day.")
    return [Path(template.replace("{day}", f"{d:g}")) for d in days]


def check_outputs_free(outputs, force: bool, inputs=()) -> None:
    """Refuse before any work if an output exists (without --force) or would overwrite an input."""
    resolved_inputs = {Path(p).resolve() for p in inputs if p}
    for out in outputs:
        if Path(out).resolve() in resolved_inputs:
            raise InputError(f"Output {str(out)!r} is one of the inputs; choose another output name (inputs are never modified).")
        if Path(out).exists() and not force:
            raise OutputExistsError(f"Output {str(out)!r} already exists; pass --force to overwrite it.")


def plan_array_loader(geometry: Geometry, shape: tuple[int, ...]):
    """Loader for plan files: resection masks by nearest neighbour, dose maps linearly, onto the anatomy grid."""
    def load(path: str, kind: str):
        interpolation = "nearest" if kind == "resection_mask" else "linear"
        array = read_image_on_grid(path, geometry, shape, interpolation=interpolation)
        return array > 0.5 if kind == "resection_mask" else array
    return load


@contextlib.contextmanager
def progress_bar(total_days: float, description: str = "simulating"):
    """A tqdm bar in days (to stderr) yielding a solver progress callback."""
    from tqdm import tqdm

    bar = tqdm(total=round(total_days, 3), unit="day", desc=description, file=sys.stderr,
               disable=os.environ.get("ANATOMYDT_NO_PROGRESS") == "1", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} days [{elapsed}<{remaining}]")

    def progress(day: float, horizon: float) -> None:
        bar.update(round(day, 3) - bar.n)

    try:
        yield progress
    finally:
        bar.close()


def format_volume_table(rows: list[tuple[str, dict]], schema: ClassSchema) -> str:
    """Class volumes (mL) as an aligned text table, one row per time point, background omitted."""
    classes = [n for n in schema.names if n != schema.background]
    header = ["time point"] + [f"{c} (mL)" for c in classes]
    body = [[label] + [f"{vol.get(c, 0.0):.2f}" for c in classes] for label, vol in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    return "\n".join(lines)


@contextlib.contextmanager
def progress_bar_count(total: int, unit: str):
    """A tqdm bar over ``total`` items yielding a ``progress(done, total)`` callback."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, file=sys.stderr, disable=os.environ.get("ANATOMYDT_NO_PROGRESS") == "1")

    def progress(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# Baseline segmentation: names, terminology, label values
# --------------------------------------------------------------------------------------------

# Terminology code meanings that mean "tumour" beyond the schema's own names and synonyms
# (tumour sub-regions of BraTS-style segmentations are merged into the one tumour class).
_TUMOUR_MEANINGS = ("neoplasm", "mass", "tumor", "tumour", "glioma", "glioblastoma", "brain tumor", "brain tumour",
                    "edema", "oedema", "necrosis", "enhancing tumor", "enhancing tumour", "non-enhancing tumor",
                    "non-enhancing tumour", "lesion")


def read_baseline(path, schema, class_map=None):
    """Read ``--seg`` as a one-hot :class:`~AnatomyDTLib.state.AnatomyState`.

    Classes come from, in this order: the explicit ``class_map`` (segment name or label value ->
    class); the segment name (schema names and synonyms, by :func:`AnatomyDTLib.io.read_labelmap`,
    plus tumour sub-region names such as "Edema" or "Necrosis", which become tumour); for a
    .seg.nrrd segment whose name matches no class, its terminology (type, type modifier and
    anatomic region code meanings, e.g. "Neoplasm", "Lateral ventricle"); for a labelmap image,
    the label value (class index). If nothing matches, the reader's message (which names the
    segment or value and suggests ``--classes``) is raised.
    """
    from ..state import AnatomyState

    try:
        return AnatomyState.from_file(path, schema=schema, class_map=class_map)
    except InputError:
        inferred = inferred_segment_classes(path, schema, class_map)
        if not inferred:
            raise
    return AnatomyState.from_file(path, schema=schema, class_map={**inferred, **(class_map or {})})


def inferred_segment_classes(path, schema, class_map=None) -> dict:
    """``{segment name: class}`` for .seg.nrrd segments the reader cannot map by the schema's names alone.

    Such a segment is mapped by a tumour sub-region name ("Edema", "Necrosis", "Enhancing tumor"
    -> tumour), else by its terminology's code meanings. Segments named after a class or listed
    in ``class_map`` are left out (their mapping is already known). Returns ``{}`` for files
    without segments, or when nothing could be inferred.
    """
    name = str(path).lower()
    if not (name.endswith(".nrrd") or name.endswith(".nhdr")):
        return {}
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path), skip_voxels=True)
    except Exception:  # not a segmentation file (or unreadable): the reader reports the real problem
        return {}
    explicit = {str(k).strip().lower() for k in (class_map or {})}
    found = {}
    for segment in segmentation.get("segments", []) or []:
        seg_name = str(segment.get("name", segment.get("id", "")))
        if {seg_name.strip().lower(), str(segment.get("id", "")).strip().lower()} & explicit:
            continue
        try:
            schema.index(seg_name)
            continue  # the reader maps it by name
        except InputError:
            pass
        texts = [seg_name] + _terminology_meanings(segment.get("terminology"))
        cls = next((c for c in (_class_of_text(t, schema) for t in texts) if c is not None), None)
        if cls is not None:
            found[seg_name] = cls
    return found


def _terminology_meanings(terminology) -> list[str]:
    """Code meanings of a slicerio terminology dict, most specific first."""
    if not isinstance(terminology, dict):
        return []

    def meaning(key: str) -> str:
        code = terminology.get(key) or []
        return str(code[2]).strip() if len(code) >= 3 else ""

    kind, modifier = meaning("type"), meaning("typeModifier")
    region, region_modifier = meaning("anatomicRegion"), meaning("anatomicRegionModifier")
    candidates = [f"{modifier} {kind}" if modifier and kind else "", kind,
                  f"{region_modifier} {region}" if region_modifier and region else "", region]
    return [c for c in candidates if c]


def _class_of_text(text: str, schema) -> str | None:
    """The class a segment name or code meaning denotes (schema names, synonyms, tumour words), or None."""
    key = " ".join(str(text).replace("_", " ").replace("-", " ").lower().split())
    if not key:
        return None
    for candidate in (key, key.replace(" ", "_"), str(text).strip().lower()):
        try:
            return schema.names[schema.index(candidate)]
        except InputError:
            pass
    tumour_words = {" ".join(w.replace("-", " ").split()) for w in _TUMOUR_MEANINGS}
    if key in tumour_words:
        return schema.tumour
    return None


# --------------------------------------------------------------------------------------------
# Treatment plan from --plan or from common flags
# --------------------------------------------------------------------------------------------

# Flag -> plan key (docs/plan.md); used to build the plan dict and to point plan errors at flags.
PLAN_FLAGS = {
    "surgery_day": ("--surgery-day", "surgery[0].day"),
    "resection": ("--resection", "surgery[0].resection_mask"),
    "extent": ("--extent", "surgery[0].extent"),
    "rt_start": ("--rt-start", "radiotherapy.start_day"),
    "rt_dose": ("--rt-dose", "radiotherapy.total_dose_gy"),
    "rt_fractions": ("--rt-fractions", "radiotherapy.fractions"),
    "rt_per_week": ("--rt-per-week", "radiotherapy.fractions_per_week"),
    "rt_dose_map": ("--rt-dose-map", "radiotherapy.dose_map"),
    "chemo_start": ("--chemo-start", "chemotherapy[0].start_day"),
    "chemo_cycles": ("--chemo-cycles", "chemotherapy[0].cycles"),
    "chemo_days_on": ("--chemo-days-on", "chemotherapy[0].days_on"),
    "chemo_cycle_days": ("--chemo-cycle-days", "chemotherapy[0].cycle_length_days"),
    "chemo_kill_rate": ("--chemo-kill-rate", "chemotherapy[0].kill_rate_per_day"),
}
CHEMO_DEFAULTS = {"agent": "temozolomide", "kill_rate_per_day": 0.02, "days_on": 5, "cycle_length_days": 28}
"""Chemotherapy defaults of the flags: temozolomide 5 days every 28 days at 0.02/day (as stupp_plan)."""


def add_plan_arguments(parser) -> None:
    """``--plan PLAN.json`` or the common plan flags (surgery, radiotherapy, chemotherapy)."""
    group = parser.add_argument_group(
        "treatment plan", "either --plan PLAN.json (docs/plan.md) or the flags below; days count from the baseline "
                          "scan (day 0). Without either: no treatment (natural history).")
    group.add_argument("--plan", metavar="PLAN.json", help="treatment plan file (docs/plan.md)")
    group.add_argument("--surgery-day", type=float, metavar="D", help="day of the resection")
    group.add_argument("--resection", metavar="MASK", help="resection cavity mask file (any grid; resampled by position)")
    group.add_argument("--extent", type=float, metavar="F",
                       help="fraction (0-1] of the tumour removed from the core outward, instead of --resection")
    group.add_argument("--rt-start", type=float, metavar="D", help="day of the first radiotherapy fraction")
    group.add_argument("--rt-dose", type=float, metavar="GY", help="total prescribed radiotherapy dose in Gy (e.g. 60)")
    group.add_argument("--rt-fractions", type=int, metavar="N", help="number of fractions (e.g. 30)")
    group.add_argument("--rt-per-week", type=int, metavar="N", help="fractions per week, on consecutive days (default 5)")
    group.add_argument("--rt-dose-map", metavar="FILE",
                       help="TOTAL planned dose per voxel in Gy (e.g. a SlicerRT export; resampled by position)")
    group.add_argument("--chemo-start", type=float, metavar="D", help="first day of chemotherapy cycle 1")
    group.add_argument("--chemo-cycles", type=int, metavar="N", help="number of chemotherapy cycles")
    group.add_argument("--chemo-days-on", type=float, metavar="D",
                       help=f"exposure days at the start of each cycle (default {CHEMO_DEFAULTS['days_on']})")
    group.add_argument("--chemo-cycle-days", type=float, metavar="D",
                       help=f"days from one cycle's start to the next (default {CHEMO_DEFAULTS['cycle_length_days']})")
    group.add_argument("--chemo-kill-rate", type=float, metavar="RATE",
                       help=f"tumour kill rate while exposed, 1/day (default {CHEMO_DEFAULTS['kill_rate_per_day']}, "
                            "temozolomide)")


def plan_flags_given(args) -> list[str]:
    """The plan flags (not --plan) given on the command line."""
    return [flag for dest, (flag, _) in PLAN_FLAGS.items() if getattr(args, dest, None) is not None]


def plan_dict_from_flags(args) -> dict | None:
    """The plan dict (format version 1) the plan flags describe, or None if none was given.

    Only what was given goes into the dict (plus the chemotherapy defaults), so that
    :func:`AnatomyDTLib.plan.load_plan` reports what is missing or wrong.
    """
    if not plan_flags_given(args):
        return None
    plan: dict = {"version": 1}
    if any(getattr(args, k) is not None for k in ("surgery_day", "resection", "extent")):
        surgery = {}
        for dest, key in (("surgery_day", "day"), ("resection", "resection_mask"), ("extent", "extent")):
            if getattr(args, dest) is not None:
                surgery[key] = getattr(args, dest)
        plan["surgery"] = [surgery]
    if any(getattr(args, k) is not None for k in ("rt_start", "rt_dose", "rt_fractions", "rt_per_week", "rt_dose_map")):
        rt = {}
        for dest, key in (("rt_start", "start_day"), ("rt_fractions", "fractions"), ("rt_dose", "total_dose_gy"),
                          ("rt_per_week", "fractions_per_week"), ("rt_dose_map", "dose_map")):
            if getattr(args, dest) is not None:
                rt[key] = getattr(args, dest)
        plan["radiotherapy"] = rt
    chemo_dests = ("chemo_start", "chemo_cycles", "chemo_days_on", "chemo_cycle_days", "chemo_kill_rate")
    if any(getattr(args, k) is not None for k in chemo_dests):
        chemo = dict(CHEMO_DEFAULTS)
        for dest, key in zip(chemo_dests, ("start_day", "cycles", "days_on", "cycle_length_days", "kill_rate_per_day")):
            if getattr(args, dest) is not None:
                chemo[key] = getattr(args, dest)
        plan["chemotherapy"] = [chemo]
    return plan


def plan_from_arguments(args, schema):
    """The validated :class:`~AnatomyDTLib.plan.TreatmentPlan` of ``--plan`` or the plan flags (files not loaded).

    Raises:
        InputError: ``--plan`` and plan flags together.
        PlanError: the plan module's message; for a plan built from flags, followed by the flags
            that set each key it mentions.
    """
    from ..errors import PlanError
    from ..plan import load_plan

    flags = plan_flags_given(args)
    if args.plan and flags:
        raise InputError(f"Give the treatment either as --plan {args.plan} or with the plan flags "
                         f"({', '.join(flags)}), not both.")
    if args.plan:
        return load_plan(args.plan, schema=schema)
    plan_dict = plan_dict_from_flags(args)
    if plan_dict is None:
        return load_plan(None, schema=schema)
    try:
        plan = load_plan(plan_dict, schema=schema, base_dir=os.getcwd())
    except PlanError as exc:
        text = str(exc)
        named = [f"{key} is {flag}" for flag, key in PLAN_FLAGS.values() if _mentions(text, key)]
        hint = ("\n(the plan was built from the command-line flags: " + "; ".join(named) + ")") if named else \
            "\n(the plan was built from the command-line flags; see docs/predict.md)"
        error = PlanError(text.replace("Invalid treatment plan", "Invalid treatment plan from the flags", 1) + hint)
        error.problems = list(getattr(exc, "problems", []))
        raise error from None
    return _with_source(plan, "command-line flags")


def _mentions(text: str, key: str) -> bool:
    """Whether a plan error message is about ``key`` (e.g. radiotherapy.total_dose_gy): its section and its leaf name."""
    import re

    section, leaf = re.split(r"[.\[]", key)[0], key.rsplit(".", 1)[-1]
    return section in text and re.search(rf"\b{re.escape(leaf)}\b", text) is not None


def _with_source(plan, source: str):
    from dataclasses import replace

    return replace(plan, source=source)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random generators (any stochastic part of a model)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
