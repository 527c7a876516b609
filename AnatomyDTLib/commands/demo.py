"""``anatomydt demo``: the README's main job — predict a sample case under two treatment plans.

Runs the prediction on the bundled sample case (``Resources/SampleData``) when it is present,
otherwise on a procedural ellipsoid phantom, under (1) no treatment and (2) the Stupp protocol
(60 Gy in 30 × 2 Gy + temozolomide), and prints the class-volume table of each. Layout of the
output folder::

    baseline.seg.nrrd          the baseline segmentation (flair.nii.gz too for the phantom)
    volumes.csv                both plans' volumes (mL) per day, with a ``plan`` column
    no_treatment/, stupp/      each the files of ``anatomydt predict`` (AnatomyDTLib.outputs):
                               prediction_day{d}.seg.nrrd, prediction_day{d}_labels.nii.gz,
                               tumour_probability_day{d}.nii.gz, volumes.csv, overlay_montage.png,
                               volumes.png, run.json
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import replace
from pathlib import Path

from ..errors import InputError, OutputExistsError
from ..io import read_image, write_image
from ..outputs import write_prediction_outputs, write_volumes_csv
from ..plan import DelayedDeath, no_treatment_plan, plan_summary, stupp_plan
from ..predict import predict
from ..schema import BRAIN_SCHEMA
from ..state import AnatomyState, labels_to_field
from ._common import add_force_argument, format_volume_table, progress_bar, seed_everything

NAME = "demo"
HELP = "Predict the bundled sample case under no treatment and under Stupp (60 Gy/30 fx + TMZ)."

DEMO_DAYS = (30.0, 60.0, 90.0)
DEMO_SEED = 0


def demo_stupp_plan():
    """Stupp from day 14 with delayed death: lethally hit cells stay visible 14 days, then clear with a
    45-day half-life (seed 002's dying compartment), as imaged tumour shrinks gradually after RT."""
    plan = stupp_plan(rt_start_day=14.0)
    delayed = DelayedDeath(delay_days=14.0, clearance_rate_per_day=math.log(2) / 45.0)
    return replace(plan, radiotherapy=replace(plan.radiotherapy, delayed_death=delayed))


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="anatomydt_demo", help="output folder (default: ./anatomydt_demo)")
    parser.add_argument("--model", default="default",
                        help="'default' (the bundled learned model, Resources/Models/MODEL_CARD.md), 'pde-only' "
                             "(literature parameters) or a weights file")
    add_force_argument(parser)


def _baseline() -> tuple[AnatomyState, "object", str, dict]:
    """The sample case if bundled, else the ellipsoid phantom: (state, FLAIR array or None, description, input paths)."""
    try:
        from ..brain.sample_data import sample_case  # bundled with the brain-data resources

        paths = sample_case()
        state = AnatomyState.from_file(paths["segmentation"], schema=BRAIN_SCHEMA)
        flair = _sample_flair(paths["flair"], state)
        return state, flair, f"bundled sample case {paths['segmentation']}", \
            {"segmentation": str(paths["segmentation"]), "image": str(paths["flair"]) if flair is not None else None,
             "phantom": False}
    except (ImportError, FileNotFoundError, KeyError):
        from ..phantom import ellipsoid_brain

        labels, flair, geometry = ellipsoid_brain()
        field = labels_to_field(labels, BRAIN_SCHEMA.num_classes)
        return AnatomyState(field, geometry, BRAIN_SCHEMA), flair, "procedural ellipsoid phantom (3 mm voxels)", \
            {"segmentation": "procedural ellipsoid phantom", "image": "procedural ellipsoid phantom", "phantom": True}


def _sample_flair(path, state: AnatomyState):
    """The sample FLAIR if it is on the segmentation's grid (it is, as bundled), else None."""
    try:
        image, geometry = read_image(path)
        state.geometry.check_matches(geometry, "sample FLAIR vs sample segmentation", shape=state.spatial_shape,
                                     other_shape=image.shape)
    except InputError:
        return None
    return image


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise OutputExistsError(f"Output folder {str(out)!r} is not empty; pass --force to overwrite its files.")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seed_everything(DEMO_SEED)
    baseline, flair, description, inputs = _baseline()
    print(f"baseline: {description}, grid {tuple(baseline.field.shape[1:])}, "
          f"spacing {baseline.geometry.spacing} mm")
    baseline.save(out / "baseline.seg.nrrd", force=True)
    if inputs["phantom"]:
        write_image(out / "flair.nii.gz", flair, baseline.geometry, force=True)
    plans = {"no_treatment": no_treatment_plan(), "stupp": demo_stupp_plan()}
    volume_rows = []
    horizon = DEMO_DAYS[-1]
    for plan_name, plan in plans.items():
        print(f"\n[{plan_name}] {plan_summary(plan)}")
        plan_started = time.perf_counter()
        started_utc = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with progress_bar(horizon, plan_name) as bar:
            prediction = predict(baseline, days=list(DEMO_DAYS), plan=plan, model=args.model,
                                 progress=lambda fraction: bar(fraction * horizon, horizon))
        run_info = {
            "anatomydt_run": f"demo ({plan_name})",
            "started_utc": started_utc,
            "inputs": inputs,
            "plan": plan.to_dict(),
            "plan_summary": plan_summary(plan),
            "plan_notes": plan.events_after_horizon(horizon),
            "model": {"requested": args.model},
            "device": {"requested": "cpu", "used": "cpu"},
            "seed": DEMO_SEED,
        }
        write_prediction_outputs(prediction, out / plan_name, image=flair, force=True, run_info=run_info,
                                 started=plan_started, title=f"demo {plan_name}")
        rows = [(f"day {d:g}", v) for d, v in prediction.volumes_ml()]
        print(format_volume_table(rows, BRAIN_SCHEMA))
        volume_rows += [(plan_name, d, v) for d, v in prediction.volumes_ml()]
    write_volumes_csv(out / "volumes.csv", volume_rows, BRAIN_SCHEMA, force=True, key_column="plan")
    tumour = {name: [v["tumour"] for p, _, v in volume_rows if p == name] for name in plans}
    print(f"\ntumour volume day 0 -> {DEMO_DAYS[-1]:g}: no treatment {tumour['no_treatment'][0]:.1f} -> "
          f"{tumour['no_treatment'][-1]:.1f} mL; Stupp {tumour['stupp'][0]:.1f} -> {tumour['stupp'][-1]:.1f} mL")
    print(f"outputs in {out.resolve()} ({time.perf_counter() - start:.1f} s)")
    return 0
