"""The files of one prediction run, as written by ``anatomydt predict`` (and per plan by ``anatomydt demo``).

Into one folder, for each predicted day ``d`` (``d`` written as ``30`` or ``7.5``):

* ``prediction_day{d}.seg.nrrd`` — 3D Slicer segmentation, one segment per class present (name,
  colour) tagged with :meth:`~AnatomyDTLib.predict.Prediction.segment_tags` (DICOM
  AUTOMATIC algorithm type, algorithm name with model and version);
* ``prediction_day{d}_labels.nii.gz`` — the same labels as a plain labelmap (value = class index);
* ``tumour_probability_day{d}.nii.gz`` — tumour probability in [0, 1], float32;

and once per run:

* ``volumes.csv`` — class volumes in mL per day, day 0 = baseline;
* ``overlay_montage.png`` — baseline and predicted contours in three planes (:mod:`.figures`);
* ``volumes.png`` — volume over time per class;
* ``run.json`` — inputs, plan, model, days, seed, software versions, wall time; written last, so
  its presence means the run completed.

All images keep the baseline's grid (spacing, origin, direction). Every file is written
atomically (temporary file, then rename) and an existing file is only replaced with ``force``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io as _io
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import __version__
from .errors import InputError, OutputExistsError
from .figures import overlay_montage, png_bytes, volume_chart
from .io import atomic_output, write_image, write_labelmap
from .schema import ClassSchema

PER_DAY_FILES = ("prediction_day{day}.seg.nrrd", "prediction_day{day}_labels.nii.gz", "tumour_probability_day{day}.nii.gz")
"""Files written for each predicted day; ``{day}`` is :func:`day_tag` of the day."""
RUN_FILES = ("volumes.csv", "overlay_montage.png", "volumes.png", "run.json")
"""Files written once per run."""

__all__ = ["PER_DAY_FILES", "RUN_FILES", "day_tag", "output_paths", "check_output_folder",
           "write_prediction_outputs", "write_volumes_csv", "write_json", "write_png", "software_versions"]


def day_tag(day: float) -> str:
    """How a day appears in file names: ``30`` for 30.0, ``7.5`` for 7.5."""
    return f"{float(day):g}"


def output_paths(out_dir: str | Path, days: Sequence[float]) -> list[Path]:
    """Every file a run predicting ``days`` writes into ``out_dir``."""
    out = Path(out_dir)
    paths = [out / name.format(day=day_tag(d)) for d in days for name in PER_DAY_FILES]
    return paths + [out / name for name in RUN_FILES]


def _earlier_outputs(out_dir: Path) -> list[Path]:
    """Files in ``out_dir`` that look like outputs of a prediction run (any day)."""
    if not out_dir.is_dir():
        return []
    patterns = [name.format(day="*") for name in PER_DAY_FILES] + list(RUN_FILES)
    found = {p for pattern in patterns for p in out_dir.glob(pattern) if p.is_file()}
    return sorted(found)


def check_output_folder(out_dir: str | Path, days: Sequence[float], *, force: bool, inputs: Iterable = ()) -> list[Path]:
    """Refuse, before any work, an output folder that would clobber something.

    Refuses: ``out_dir`` being an existing file; an output path equal to an input (even with
    ``force``: inputs are never modified); without ``force``, a folder that already holds outputs
    of a prediction run (of any days, so runs are never mixed silently).

    Returns:
        The paths that will be written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a folder for the prediction outputs.")
    paths = output_paths(out, days)
    resolved_inputs = {Path(p).resolve() for p in inputs if p}
    for path in paths:
        if path.resolve() in resolved_inputs:
            raise InputError(f"Output {str(path)!r} is one of the inputs; choose another --out folder "
                             "(inputs are never modified).")
    earlier = _earlier_outputs(out)
    if earlier and not force:
        shown = ", ".join(p.name for p in earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        raise OutputExistsError(f"Output folder {str(out)!r} already holds prediction outputs ({shown}); "
                                "pass --force to overwrite them or choose another --out folder.")
    return paths


def software_versions() -> dict[str, str]:
    """Versions of AnatomyDT, Python and the numerical libraries (for run.json)."""
    versions = {"anatomydt": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for module in ("torch", "numpy", "SimpleITK", "slicerio"):
        mod = sys.modules.get(module)
        if mod is None:
            try:
                mod = __import__(module)
            except ImportError:
                continue
        versions[module] = str(getattr(mod, "__version__", "unknown"))
    return versions


def write_json(path: str | Path, data: Any, *, force: bool = False) -> Path:
    """Write ``data`` as indented JSON, atomically (paths and other objects become strings)."""
    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    with atomic_output(path, force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return "<array>"
    return str(value)


def write_png(path: str | Path, rgb: np.ndarray, *, force: bool = False) -> Path:
    """Write an (H, W, 3) uint8 RGB image as PNG, atomically."""
    data = png_bytes(rgb)
    with atomic_output(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_volumes_csv(path: str | Path, rows: Sequence[tuple], schema: ClassSchema, *, force: bool = False,
                      key_column: str | None = None) -> Path:
    """Class volumes (mL, 3 decimals) per time point, background omitted, atomically.

    Args:
        rows: ``(day, {class: mL})`` tuples, or ``(key, day, {class: mL})`` with ``key_column``.
        key_column: name of a leading column (e.g. ``"plan"`` in the demo's combined table).

    Columns: ``[key_column,] day, <class>_ml, ...``.
    """
    classes = [n for n in schema.names if n != schema.background]
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(([key_column] if key_column else []) + ["day"] + [f"{c}_ml" for c in classes])
    for row in rows:
        key, (day, volumes) = (row[0], row[1:]) if key_column else (None, row)
        writer.writerow(([key] if key_column else []) + [day_tag(day)]
                        + [f"{float(volumes.get(c, 0.0)):.3f}" for c in classes])
    with atomic_output(path, force) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return Path(path)


def write_prediction_outputs(prediction, out_dir: str | Path, *, image: np.ndarray | None = None,
                             force: bool = False, run_info: Mapping[str, Any] | None = None,
                             started: float | None = None, title: str = "") -> dict[str, Any]:
    """Write every file of a prediction run (see the module docstring) into ``out_dir``.

    Args:
        prediction: a :class:`~AnatomyDTLib.predict.Prediction`.
        out_dir: the folder (created if missing). Call :func:`check_output_folder` first.
        image: optional FLAIR on the prediction grid (array order), shown in the montage.
        force: replace existing files.
        run_info: what the caller knows about the run (inputs, plan, seed, device, arguments);
            stored in run.json together with the model, days, outputs, volumes, grid, software
            versions and wall time.
        started: ``time.perf_counter()`` at the start of the run, for the wall time.
        title: figure title prefix (default: the model name and version).

    Returns:
        The run.json content (as written).
    """
    out = Path(out_dir)
    schema = prediction.schema
    geometry = prediction.geometry
    written: list[Path] = []
    tags = prediction.segment_tags()
    predicted_labels = []
    for i, day in enumerate(prediction.days):
        labels = prediction.labels(i)
        predicted_labels.append((day, labels))
        seg, labelmap, probability = (out / name.format(day=day_tag(day)) for name in PER_DAY_FILES)
        written.append(write_labelmap(seg, labels, geometry, schema, force=force, extra_segment_tags=tags))
        written.append(write_labelmap(labelmap, labels, geometry, schema, force=force))
        written.append(write_image(probability, prediction.tumour_probability(i), geometry, force=force))
    volume_rows = prediction.volumes_ml()
    written.append(write_volumes_csv(out / "volumes.csv", volume_rows, schema, force=force))
    model_label = f"{prediction.model_name} {prediction.model_version}"
    heading = f"{title} - {model_label}" if title else f"AnatomyDT {model_label}"
    montage = overlay_montage(prediction.baseline.to_labels(), predicted_labels, geometry, schema, image=image,
                              title=heading)
    written.append(write_png(out / "overlay_montage.png", montage, force=force))
    chart = volume_chart(volume_rows, schema, title=f"Volumes - {heading}")
    written.append(write_png(out / "volumes.png", chart, force=force))
    shape = tuple(int(n) for n in prediction.baseline.spatial_shape)
    record: dict[str, Any] = {
        "anatomydt_run": "predict",
        **dict(run_info or {}),
        "model": {**dict((run_info or {}).get("model", {})), "name": prediction.model_name,
                  "version": prediction.model_version},
        "days": [float(d) for d in prediction.days],
        "classes": list(schema.names),
        "grid": {"shape_array_order": list(shape), "spacing_mm": list(geometry.spacing),
                 "origin_mm_lps": list(geometry.origin), "direction": list(geometry.direction)},
        "volumes_ml": [{"day": float(d), **{k: round(float(v), 4) for k, v in vols.items()}} for d, vols in volume_rows],
        "outputs": [p.name for p in written] + ["run.json"],
        "software": software_versions(),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if started is not None:
        record["wall_time_s"] = round(time.perf_counter() - started, 3)
    write_json(out / "run.json", record, force=force)
    return record
