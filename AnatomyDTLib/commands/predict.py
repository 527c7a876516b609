"""``anatomydt predict``: forecast a patient's anatomy at future days under a treatment plan.

    anatomydt predict --seg baseline.seg.nrrd [--image flair.nii.gz] --days 30 60 90
                      [--plan PLAN.json | plan flags] [--model default|pde-only|WEIGHTS.pt]
                      [--device auto|cpu|cuda] [--seed N] --out DIR [--force]

Writes, into DIR, per day a .seg.nrrd, a labelmap and a tumour-probability map on the input's
grid, plus volumes.csv, overlay_montage.png, volumes.png and run.json (see
:mod:`AnatomyDTLib.outputs` and docs/predict.md). Everything that can be checked is checked
before the model runs; nothing is written if an input is wrong.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import time
from pathlib import Path

from ..errors import InputError
from ..io import read_image
from ..outputs import check_output_folder, write_prediction_outputs
from ..plan import plan_summary
from ..predict import _resolve_device, predict
from ..schema import DEFAULT_SCHEMA
from ._common import (add_class_map_argument, add_force_argument, add_plan_arguments, format_volume_table,
                      parse_class_map, plan_array_loader, plan_from_arguments, progress_bar, read_baseline,
                      seed_everything)

NAME = "predict"
HELP = "Predict future anatomy from a baseline segmentation under a treatment plan (files, volumes, figures)."
DESCRIPTION = (
    "Predict how the anatomy (tumour, white matter, grey matter, lateral ventricles) will look at the given days "
    "after the baseline scan under a treatment plan. Writes per day a .seg.nrrd, a labelmap and a tumour "
    "probability map on the input's grid, plus volumes.csv, overlay_montage.png, volumes.png and run.json into "
    "--out. See docs/predict.md."
)
DEFAULT_MODEL = "default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seg", required=True, metavar="SEG",
                        help="baseline segmentation: .seg.nrrd (segments mapped to classes by name or terminology) "
                             "or a labelmap .nii.gz/.nrrd (value = class index, or use --classes)")
    parser.add_argument("--image", metavar="FLAIR",
                        help="baseline FLAIR on the same voxel grid as --seg (used for the figures)")
    add_class_map_argument(parser)
    parser.add_argument("--days", required=True, type=float, nargs="+", action="extend", metavar="D",
                        help="days after the baseline scan to predict; several give a trajectory (e.g. 30 60 90)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'default' (the bundled learned model, Resources/Models/MODEL_CARD.md), 'pde-only' "
                             "(mechanistic model, literature parameters) or a weights file from 'anatomydt train' "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the model runs (default: %(default)s = CUDA if available, else CPU)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random generators (torch, numpy) for any stochastic part (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    add_force_argument(parser)
    add_plan_arguments(parser)


def run(args) -> int:
    started = time.perf_counter()
    started_utc = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    schema = DEFAULT_SCHEMA
    seed_everything(args.seed)
    days = sorted(set(args.days))
    if days[0] <= 0:
        raise InputError(f"--days must be days after the baseline scan (> 0), got {' '.join(f'{d:g}' for d in args.days)}.")
    out = Path(args.out)
    inputs = [args.seg, args.image, args.plan, args.resection, args.rt_dose_map]
    if args.model not in ("default", "pde-only"):
        inputs.append(args.model)
    check_output_folder(out, days, force=args.force, inputs=inputs)

    # Inputs, all checked before the model runs.
    baseline = read_baseline(args.seg, schema, parse_class_map(args.classes))
    shape = baseline.spatial_shape
    image = None
    if args.image:
        image, image_geometry = read_image(args.image)
        baseline.geometry.check_matches(image_geometry, f"--image {args.image} vs --seg {args.seg}", shape=shape,
                                        other_shape=image.shape)
    plan = plan_from_arguments(args, schema)
    loaded_plan = plan.with_loaded_arrays(plan_array_loader(baseline.geometry, shape), grid_shape=shape)
    print(f"baseline: {args.seg}, {baseline.geometry.ndim}D grid {'x'.join(str(n) for n in reversed(shape))} voxels, "
          f"spacing {'x'.join(f'{s:g}' for s in baseline.geometry.spacing)} mm")
    print(f"plan: {plan_summary(plan)}")
    notes = plan.events_after_horizon(days[-1])
    for note in notes:
        print(f"note: {note}")

    horizon = days[-1]
    with progress_bar(horizon, "predicting") as bar:
        prediction = predict(baseline, days=days, plan=loaded_plan, model=args.model, device=args.device,
                             progress=lambda fraction: bar(fraction * horizon, horizon))
    print(f"model: {prediction.model_name} {prediction.model_version}")

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the output folder {str(out)!r}: {exc.strerror or exc}.") from exc
    run_info = {
        "anatomydt_run": "predict",
        "started_utc": started_utc,
        "inputs": {"segmentation": _file_record(args.seg), "image": _file_record(args.image),
                   "plan_file": _file_record(args.plan), "class_map": parse_class_map(args.classes)},
        "plan": plan.to_dict(),
        "plan_summary": plan_summary(plan),
        "plan_notes": notes,
        "model": {"requested": args.model},
        "device": {"requested": args.device, "used": str(_resolve_device(args.device))},
        "seed": args.seed,
        "arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    write_prediction_outputs(prediction, out, image=image, force=args.force, run_info=run_info, started=started,
                             title=Path(args.seg).name)
    rows = [("baseline" if d == 0 else f"day {d:g}", v) for d, v in prediction.volumes_ml()]
    print(format_volume_table(rows, schema))
    print(f"outputs in {out.resolve()} ({time.perf_counter() - started:.1f} s)")
    return 0


def _file_record(path) -> dict | None:
    """Absolute path, size and SHA-256 of an input file (for run.json), or None."""
    if not path:
        return None
    p = Path(path).resolve()
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": digest.hexdigest()}
