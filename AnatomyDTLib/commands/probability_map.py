"""``anatomydt probability-map``: tumour growth-probability map guided by the burden forecast.

    anatomydt probability-map --segmentation SEG --volumes V.csv [--plan PLAN.json] --day D
                              [--members 20] [--bootstrap 1000] [--seed 0] [--params P.json]
                              [--classes MAP] --out FILE.nii.gz [--force]

Fits the tumour-burden model (docs/burden.md) to the measured volumes, takes ``--members`` stratified
draws of its bootstrap forecast on day D, steers the PDE's growth rate so that each member's tumour
has that volume (:mod:`AnatomyDTLib.guided`), and writes, on the segmentation's grid, the fraction
of members in which each voxel is tumour (float32 in [0, 1]). Everything is checked before the PDE
runs; nothing is written if an input is wrong.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from ..burden import bootstrap_burden, fit_burden, read_volumes_csv, schedule_from_plan
from ..errors import InputError, ParameterError
from ..guided import DEFAULT_MEMBERS, GuidedForecastWarning, guided_ensemble
from ..io import write_image
from ..parameters import PDEParameters
from ..plan import load_plan, plan_summary
from ..schema import DEFAULT_SCHEMA
from ._common import (add_class_map_argument, add_force_argument, check_outputs_free, parse_class_map,
                      plan_array_loader, progress_bar_count, read_baseline)

NAME = "probability-map"
HELP = "Tumour growth-probability map on a day: PDE forecasts steered to bootstrap burden forecasts."
DESCRIPTION = (
    "Fit the tumour-burden model to measured volumes, draw --members volumes from its bootstrap forecast on --day, "
    "steer the PDE's tumour growth rate to reach each volume, and write the fraction of members in which each voxel "
    "is tumour (float32, 0-1) on the segmentation's grid. See docs/burden.md."
)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--segmentation", "--seg", dest="segmentation", required=True, metavar="SEG",
                        help="baseline segmentation (.seg.nrrd or labelmap), as for 'anatomydt predict'")
    add_class_map_argument(parser)
    parser.add_argument("--volumes", required=True, metavar="V.csv",
                        help="measured tumour volumes: columns day, volume_ml (header optional)")
    parser.add_argument("--plan", metavar="PLAN.json", help="treatment plan (docs/plan.md); default: no treatment")
    parser.add_argument("--day", required=True, type=float, metavar="D", help="forecast day (days after the baseline)")
    parser.add_argument("--members", type=int, default=DEFAULT_MEMBERS, metavar="N",
                        help="guided PDE forecasts (volumes drawn from the bootstrap; default %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                        help="burden bootstrap members the N volumes are drawn from (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the burden bootstrap (default %(default)s)")
    parser.add_argument("--params", metavar="P.json",
                        help="PDE parameters JSON (AnatomyDTLib.parameters); default: brain literature values")
    parser.add_argument("--out", required=True, metavar="FILE.nii.gz",
                        help="output probability map (.nii.gz, .nii, .nrrd or .mha)")
    add_force_argument(parser)


def run(args) -> int:
    started = time.perf_counter()
    schema = DEFAULT_SCHEMA
    out = Path(args.out)
    name = out.name.lower()
    if name.endswith(".seg.nrrd") or not name.endswith(IMAGE_SUFFIXES):
        raise InputError(f"--out {args.out}: the probability map is a float image; use .nii.gz, .nii, .nrrd or .mha.")
    if not (args.day > 0):
        raise InputError(f"--day must be a day after the baseline scan (> 0), got {args.day:g}.")
    if args.members < 1:
        raise ParameterError(f"--members must be >= 1, got {args.members}.")
    check_outputs_free([out], args.force, inputs=[args.segmentation, args.volumes, args.plan, args.params])

    days, volumes = read_volumes_csv(args.volumes)
    plan = load_plan(args.plan, schema=schema)
    params = PDEParameters.load(args.params, schema)
    fit = fit_burden(days, volumes, schedule_from_plan(plan))
    boot = bootstrap_burden(fit, args.bootstrap, seed=args.seed)
    baseline = read_baseline(args.segmentation, schema, parse_class_map(args.classes))
    shape = baseline.spatial_shape
    loaded = plan.with_loaded_arrays(plan_array_loader(baseline.geometry, shape), grid_shape=shape)

    print(f"plan: {plan_summary(plan)}")
    print("fitted burden model:")
    print(fit.summary())
    seg_ml = baseline.class_volumes_ml()[schema.tumour]
    v0 = float(fit.parameters.v0_ml)
    print(f"baseline segmentation: tumour {seg_ml:.2f} mL (burden fit at day 0: {v0:.2f} mL)")
    if seg_ml > 0 and abs(seg_ml - v0) > 0.1 * max(seg_ml, v0):
        print("note: the segmentation's tumour volume and the fitted day-0 volume differ by more than 10 %; the "
              "targets are the burden forecast's volumes as given (check that the volume table measures the same "
              "tumour region as the segmentation).")
    with warnings.catch_warnings(record=True) as caught, progress_bar_count(args.members, "member") as progress:
        warnings.simplefilter("always", GuidedForecastWarning)
        ensemble = guided_ensemble(baseline.field, baseline.geometry.spacing_array_order, args.day, boot,
                                   plan=loaded, model=params, members=args.members, schema=schema, progress=progress)
    for w in caught:
        if issubclass(w.category, GuidedForecastWarning):
            print(f"note: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    write_image(out, ensemble.probability, baseline.geometry, force=args.force)
    print(f"day {args.day:g}: {ensemble.summary()}")
    p = ensemble.probability
    voxel_ml = baseline.geometry.voxel_volume_ml
    print(f"probability map: {float((p >= 0.5).sum() * voxel_ml):.2f} mL with p >= 0.5, "
          f"{float((p > 0).sum() * voxel_ml):.2f} mL with p > 0, {float((p >= 0.95).sum() * voxel_ml):.2f} mL with "
          "p >= 0.95")
    print(f"wrote {out} ({time.perf_counter() - started:.1f} s)")
    return 0
