"""Training cost of the learned model on CPU (issue 9, target 5): throughput and memory, a measurement.

    python benchmarks/perf_training.py                 # all settings, 5 timed steps each
    python benchmarks/perf_training.py --steps 5 --threads 2
    python benchmarks/perf_training.py --solver-checkpoint --settings brain@2mm crop96mm@2mm --steps 2

The default brain model configuration (``configs/brain.json``: 4 mm model grid, CNN channels 8,
dilations 1-2-4, Δt = 5 days, Jacobi sweeps 'auto') is trained on the bundled sample case (MNI
atlas anatomy + phantom tumour, 2 mm). One training step = one rollout to days 30, 60 and 90 under
the sample Stupp plan (18 solver steps with gradients), the configuration's loss (soft Dice +
clDice of white matter + overlap, + TV of α) against the day-90 target, backward, gradient
clipping and an Adam step — what ``anatomydt train`` does per case (batch size 1). The target is
the baseline itself: the cost does not depend on the labels.

Settings, each in a fresh subprocess (peak RSS = one training process):

* ``crop96mm@4mm``: the training setting of configs/brain.json — a 48-voxel crop at 2 mm (96 mm)
  around the tumour, pooled to the 4 mm model grid (24³ voxels);
* ``brain@4mm``: the whole 2 mm sample brain pooled to 4 mm (49×58×47), a brain-size crop;
* ``crop96mm@2mm``: the 96 mm crop at 2 mm (48³), no pooling — memory of one step at 2 mm;
* ``brain@2mm``: the whole 2 mm brain (95×117×99) — memory of one step at 2 mm on a whole brain.
  **Not run by default**: one step with gradients keeps every solver stage of the 18-step rollout,
  ≈ 12 GB at 4 mm on the whole brain and about 8× that at 2 mm, more than a 24 GiB machine has
  (ask for it with ``--settings brain@2mm`` on a large machine). Training therefore uses crops.

``--solver-checkpoint`` sets the configuration's ``model.solver_checkpoint``: each solver step is
recomputed in the backward pass instead of keeping its stages (about half the memory of a 2 mm
crop for a quarter more time). Even so a whole-brain 2 mm step did not fit in 24 GiB; with
``MALLOC_MMAP_THRESHOLD_=65536`` in the environment as well it took 7.55 GB, 3× slower
(docs/performance.md §5).

Printed: median seconds per training step over the timed steps (after one warm-up step), cases/s,
peak RSS, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_common as pc  # noqa: E402

SETTINGS = {"crop96mm@4mm": (48, 2), "brain@4mm": (0, 2), "crop96mm@2mm": (48, 1), "brain@2mm": (0, 1)}
DAYS = [30.0, 60.0, 90.0]


def _case(crop: int, pool: int):
    """(p0 (1, K, *S), body mask (1, *S), spacing) of the sample case, cropped around the tumour and pooled."""
    import torch

    from AnatomyDTLib.models.data import pool_field
    from AnatomyDTLib.state import AnatomyState

    state = AnatomyState.from_file(pc.SAMPLE_DIR / "sample_baseline.seg.nrrd")
    p = state.field
    spacing = state.geometry.spacing_array_order
    if crop:
        centre = torch.nonzero(p[1] > 0.5).double().mean(0).round().long().tolist()
        slices = []
        for c, n in zip(centre, p.shape[1:]):
            lo = max(0, min(n - crop, c - crop // 2))
            slices.append(slice(lo, lo + crop))
        p = p[(slice(None),) + tuple(slices)]
    p = pool_field(p.contiguous(), pool)
    spacing = tuple(h * pool for h in spacing)
    mask = (p[0] < 0.5)[None]  # body: not background
    return p[None].contiguous(), mask, spacing


def child(setting: str, steps: int, solver_checkpoint: bool = False) -> dict:
    import torch

    from AnatomyDTLib.models.config import Config
    from AnatomyDTLib.models.conditioning import Conditioning
    from AnatomyDTLib.models.growth import AnatomyDTModel, total_variation
    from AnatomyDTLib.models.training import objective_from_config
    from AnatomyDTLib.plan import load_plan
    from AnatomyDTLib.schema import BRAIN_SCHEMA

    crop, pool = SETTINGS[setting]
    cfg = Config.load(pc.REPO / "configs" / "brain.json")
    cfg.model["solver_checkpoint"] = bool(solver_checkpoint)
    torch.manual_seed(0)
    model = AnatomyDTModel(cfg.model, 5, 3, tumour_index=1, sink_index=0)
    objective = objective_from_config(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg.training["lr"]))
    p0, mask, spacing = _case(crop, pool)
    plan = load_plan(str(pc.SAMPLE_DIR / "sample_plan_stupp.json"), schema=BRAIN_SCHEMA)
    conditioning = Conditioning.from_plans([plan])
    target = p0.clone()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        traj, aux = model(p0, spacing=spacing, days=DAYS, conditioning=conditioning, mask=mask, plan=plan,
                          schema=BRAIN_SCHEMA)
        loss, _ = objective(traj[-1], target)
        loss = loss + cfg.loss["lambda_tv"] * total_variation(aux["alpha"] / float(cfg.model["k_max_per_day"]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.training["grad_clip"]))
        optimizer.step()
        if i > 0:
            times.append(time.perf_counter() - t0)
    pc.print_peak_rss_line()
    return {"setting": setting, "shape": list(p0.shape[2:]), "spacing_mm": list(spacing), "step_s": statistics.median(times),
            "step_min_s": min(times), "step_max_s": max(times), "steps": steps, "loss": float(loss.detach()),
            "jacobi_iters": model.jacobi_iters(spacing), "threads": torch.get_num_threads(),
            "solver_checkpoint": bool(solver_checkpoint)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                        default=[name for name in SETTINGS if name != "brain@2mm"],
                        help="default: all but brain@2mm (≈ 100 GB, see above)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per setting (median; default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--solver-checkpoint", action="store_true",
                        help="recompute each solver step in the backward pass (model.solver_checkpoint)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("ANATOMYDT_PERF_THREADS", "2")))
        print(json.dumps(child(args.child, args.steps, args.solver_checkpoint)))
        return
    print(f"machine: {pc.machine_text()}; {pc.load_text()}"
          + ("; solver steps recomputed in the backward pass (--solver-checkpoint)" if args.solver_checkpoint else ""))
    print(f"{'setting':14} {'grid':>13} {'s/step':>8} {'[min–max]':>15} {'cases/s':>8} {'peak RSS':>9}  load")
    results = []
    for setting in args.settings:
        load = pc.machine_load()
        r = pc.run_measured([sys.executable, __file__, "--child", setting, "--steps", str(args.steps)]
                            + (["--solver-checkpoint"] if args.solver_checkpoint else []),
                            env={"OMP_NUM_THREADS": str(args.threads), "ANATOMYDT_PERF_THREADS": str(args.threads)})
        if r["returncode"] != 0:
            print(f"{setting:14} failed: {r['stderr'].strip().splitlines()[-1:]}")
            continue
        res = pc.last_json_line(r["stdout"])
        res.update(peak_rss_gb=r["peak_rss_bytes"] / 1e9, load=load)
        results.append(res)
        grid = "×".join(str(n) for n in res["shape"])
        print(f"{setting:14} {grid:>13} {res['step_s']:8.2f} [{res['step_min_s']:6.2f}–{res['step_max_s']:6.2f}] "
              f"{1.0 / res['step_s']:8.3f} {res['peak_rss_gb']:7.2f} GB  {load:.2f}", flush=True)
    print(pc.load_text())
    if args.json:
        pc.write_json(args.json, {"machine": pc.machine_text(), "results": results})


if __name__ == "__main__":
    main()
