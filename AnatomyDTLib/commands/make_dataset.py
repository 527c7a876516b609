"""``anatomydt make-dataset``: write a synthetic benchmark cohort (Voronoi / Vessel, paper appendix A).

    anatomydt make-dataset {voronoi,vessel} --n N --size S --seed X --out DIR [--ndim 3] [--force]

The brain phantom cohort (``brain``) is added by the brain-data module when present.
"""

from __future__ import annotations

from ..datasets import KINDS, make_dataset
from ._common import add_force_argument, progress_bar_count

NAME = "make-dataset"
HELP = "Generate a synthetic longitudinal dataset (NIfTI label maps + manifest.csv); see docs/datasets.md."


def add_arguments(parser) -> None:
    parser.add_argument("kind", choices=sorted(KINDS), help="which generator")
    parser.add_argument("--n", type=int, required=True, help="number of cases")
    parser.add_argument("--size", type=int, default=128, help="grid size in voxels per axis (64-256, default 128)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; case i is the same for any --n")
    parser.add_argument("--ndim", type=int, choices=(2, 3), default=2, help="2D (default) or 3D cases")
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force)")
    add_force_argument(parser)


def run(args) -> int:
    with progress_bar_count(args.n, "cases") as progress:
        out = make_dataset(args.kind, args.n, args.size, args.seed, args.out, ndim=args.ndim, force=args.force,
                           progress=progress)
    print(f"wrote {args.n} {args.kind} cases ({args.ndim}D, {args.size} px) to {out} (manifest.csv, dataset.json)")
    return 0
