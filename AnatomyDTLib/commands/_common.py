"""Pieces shared by several ``anatomydt`` sub-commands: outputs, class maps, progress, tables."""

from __future__ import annotations

import contextlib
import json
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
