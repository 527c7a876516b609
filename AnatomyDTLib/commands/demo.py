"""``anatomydt demo``: the README's main job — predict a sample case under two treatment plans.

Runs the prediction on the bundled sample case (``Resources/SampleData``) when it is present,
otherwise on a procedural ellipsoid phantom, under (1) no treatment and (2) the Stupp protocol
(60 Gy in 30 × 2 Gy + temozolomide), writes every output into one folder and prints the
class-volume table.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import OutputExistsError
from ..io import atomic_output, write_image, write_labelmap
from ..plan import DelayedDeath, no_treatment_plan, plan_summary, stupp_plan
from ..predict import predict
from ..schema import BRAIN_SCHEMA
from ..state import AnatomyState, labels_to_field
from ._common import add_force_argument, format_volume_table

NAME = "demo"
HELP = "Predict the bundled sample case under no treatment and under Stupp (60 Gy/30 fx + TMZ)."

DEMO_DAYS = (30.0, 60.0, 90.0)


def demo_stupp_plan():
    """Stupp from day 14 with delayed death: lethally hit cells stay visible 14 days, then clear with a
    45-day half-life (seed 002's dying compartment), as imaged tumour shrinks gradually after RT."""
    plan = stupp_plan(rt_start_day=14.0)
    delayed = DelayedDeath(delay_days=14.0, clearance_rate_per_day=math.log(2) / 45.0)
    return replace(plan, radiotherapy=replace(plan.radiotherapy, delayed_death=delayed))


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="anatomydt_demo", help="output folder (default: ./anatomydt_demo)")
    parser.add_argument("--model", default="pde-only", help="'pde-only' (default), 'default' or a weights file")
    add_force_argument(parser)


def _baseline() -> tuple[AnatomyState, "object", str]:
    """The sample case if bundled, else the ellipsoid phantom: (state, flair array or None, description)."""
    try:
        from ..brain.sample_data import sample_case  # bundled with the brain-data resources

        paths = sample_case()
        state = AnatomyState.from_file(paths["segmentation"], schema=BRAIN_SCHEMA)
        return state, None, f"bundled sample case {paths['segmentation']}"
    except (ImportError, FileNotFoundError, KeyError):
        from ..phantom import ellipsoid_brain

        labels, flair, geometry = ellipsoid_brain()
        field = labels_to_field(labels, BRAIN_SCHEMA.num_classes)
        return AnatomyState(field, geometry, BRAIN_SCHEMA), flair, "procedural ellipsoid phantom (3 mm voxels)"


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise OutputExistsError(f"Output folder {str(out)!r} is not empty; pass --force to overwrite its files.")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    baseline, flair, description = _baseline()
    print(f"baseline: {description}, grid {tuple(baseline.field.shape[1:])}, "
          f"spacing {baseline.geometry.spacing} mm")
    baseline.save(out / "baseline.seg.nrrd", force=True)
    if flair is not None:
        write_image(out / "flair.nii.gz", flair, baseline.geometry, force=True)
    plans = {"no_treatment": no_treatment_plan(), "stupp": demo_stupp_plan()}
    volume_rows = []
    for plan_name, plan in plans.items():
        print(f"\n[{plan_name}] {plan_summary(plan)}")
        prediction = predict(baseline, days=list(DEMO_DAYS), plan=plan, model=args.model)
        for i, day in enumerate(prediction.days):
            state = prediction.state(i)
            state.save(out / f"{plan_name}_day{day:g}.seg.nrrd", force=True, extra_segment_tags=prediction.segment_tags())
            write_image(out / f"{plan_name}_day{day:g}_tumour_probability.nii.gz", prediction.tumour_probability(i),
                        baseline.geometry, force=True)
        rows = [(f"day {d:g}", v) for d, v in prediction.volumes_ml()]
        print(format_volume_table(rows, BRAIN_SCHEMA))
        volume_rows += [(plan_name, d, v) for d, v in prediction.volumes_ml()]
    _write_volumes_csv(out / "volumes.csv", volume_rows)
    tumour = {name: [v["tumour"] for p, _, v in volume_rows if p == name] for name in plans}
    print(f"\ntumour volume day 0 -> {DEMO_DAYS[-1]:g}: no treatment {tumour['no_treatment'][0]:.1f} -> "
          f"{tumour['no_treatment'][-1]:.1f} mL; Stupp {tumour['stupp'][0]:.1f} -> {tumour['stupp'][-1]:.1f} mL")
    print(f"outputs in {out.resolve()} ({time.perf_counter() - start:.1f} s)")
    return 0


def _write_volumes_csv(path: Path, rows) -> None:
    classes = [n for n in BRAIN_SCHEMA.names if n != BRAIN_SCHEMA.background]
    with atomic_output(path, force=True) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["plan", "day"] + [f"{c}_ml" for c in classes])
            for plan, day, volumes in rows:
                writer.writerow([plan, f"{day:g}"] + [f"{volumes.get(c, 0.0):.3f}" for c in classes])
