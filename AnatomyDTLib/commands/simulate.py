"""``anatomydt simulate``: evolve a segmentation with the mechanistic PDE and write the result.

    anatomydt simulate --seg baseline.seg.nrrd --days 90 [--params P.json] [--plan PLAN.json] --out day90.seg.nrrd

Several ``--days`` give a trajectory; then ``--out`` must contain ``{day}``, e.g. ``pred_{day}.nii.gz``.
The output keeps the input's geometry exactly. Nothing is computed if an output exists and
``--force`` was not given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import InputError
from ..parameters import PDEParameters
from ..plan import load_plan, plan_summary
from ..schema import DEFAULT_SCHEMA
from ..state import AnatomyState
from ..solver import simulate
from ._common import (add_class_map_argument, add_force_argument, check_outputs_free, format_volume_table,
                      parse_class_map, plan_array_loader, progress_bar, resolve_output_paths)

NAME = "simulate"
HELP = "Evolve a segmentation forward in time with the cross-diffusion PDE (no learned model)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seg", required=True, help="baseline segmentation: .seg.nrrd, or a labelmap .nii.gz/.nrrd")
    parser.add_argument("--days", required=True, type=float, nargs="+",
                        help="horizon in days from the baseline scan; several values give a trajectory")
    parser.add_argument("--params", help="PDE parameters JSON (see AnatomyDTLib.parameters); default: brain literature values")
    parser.add_argument("--plan", help="treatment plan JSON (see docs/plan.md); default: no treatment")
    parser.add_argument("--out", required=True,
                        help="output .seg.nrrd/.nii.gz/.nrrd; with several --days include {day} in the name")
    parser.add_argument("--soften-mm", type=float, default=0.0,
                        help="smooth the one-hot baseline over this many mm before simulating (default 0)")
    add_class_map_argument(parser)
    add_force_argument(parser)


def run(args) -> int:
    schema = DEFAULT_SCHEMA
    days = sorted(args.days)
    outputs = resolve_output_paths(args.out, days)
    check_outputs_free(outputs, args.force, inputs=[args.seg, args.plan, args.params])
    state = AnatomyState.from_file(args.seg, schema=schema, class_map=parse_class_map(args.classes),
                                   soften_mm=args.soften_mm)
    if int((state.to_labels() == schema.tumour_index).sum()) == 0 and not args.plan:
        print("note: the baseline has no tumour voxels; only tissue diffusion will act.")
    params = PDEParameters.load(args.params, schema)
    plan = load_plan(args.plan, schema=schema)
    shape = tuple(state.field.shape[1:])
    plan = plan.with_loaded_arrays(plan_array_loader(state.geometry, shape), grid_shape=shape)
    for note in plan.events_after_horizon(days[-1]):
        print(f"note: {note}")
    print(f"plan: {plan_summary(plan)}")
    kwargs = params.simulate_kwargs(state.field.to(torch.float64), schema)
    with progress_bar(days[-1]) as progress:
        trajectory = simulate(state.field.to(torch.float64), spacing=state.geometry.spacing_array_order, days=days,
                              plan=plan, schema=schema, return_trajectory=True, progress=progress, **kwargs)
    rows = [("baseline", state.class_volumes_ml())]
    for day, field, out in zip(days, trajectory, outputs):
        predicted = AnatomyState(field.to(torch.float32), state.geometry, schema)
        predicted.save(out, force=args.force,
                       extra_segment_tags={"DICOM.SegmentAlgorithmType": "AUTOMATIC",
                                           "DICOM.SegmentAlgorithmName": "AnatomyDT PDE"})
        rows.append((f"day {day:g}", predicted.class_volumes_ml()))
        print(f"wrote {out}")
    print(format_volume_table(rows, schema))
    return 0
