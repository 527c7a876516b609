"""``anatomydt make-dataset``: write a synthetic cohort.

    anatomydt make-dataset {voronoi,vessel} --n N --size S --seed X --out DIR [--ndim 3] [--force]
    anatomydt make-dataset brain --n N --seed X --out DIR [--spacing 2] [--force]

``voronoi``/``vessel`` are the 2D/3D benchmark generators of the paper's appendix A
(docs/datasets.md). ``brain`` simulates longitudinal phantom patients on the MNI152 atlas
(FLAIR-like images, 5-class labelmaps, treatment plans, manifest.csv; docs/brain_data.md).
"""

from __future__ import annotations

from ..datasets import KINDS, make_dataset
from ._common import add_force_argument, progress_bar_count

NAME = "make-dataset"
HELP = "Generate a synthetic longitudinal dataset (NIfTI images/label maps + manifest.csv); see docs/datasets.md."
BRAIN_KIND = "brain"


def add_arguments(parser) -> None:
    parser.add_argument("kind", choices=sorted(KINDS) + [BRAIN_KIND], help="which generator")
    parser.add_argument("--n", type=int, required=True, help="number of cases (patients for 'brain')")
    parser.add_argument("--size", type=int, default=128, help="grid size in voxels per axis (64-256, default 128; "
                                                              "not used by 'brain')")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; case i is the same for any --n")
    parser.add_argument("--ndim", type=int, choices=(2, 3), default=2, help="2D (default) or 3D cases (not 'brain')")
    parser.add_argument("--spacing", type=int, default=2,
                        help="'brain' only: atlas voxel size in mm (2 is bundled; others need 'anatomydt build-atlas')")
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force)")
    add_force_argument(parser)


def run(args) -> int:
    if args.kind == BRAIN_KIND:
        from ..brain.cohort import make_brain_cohort

        with progress_bar_count(args.n, "patients") as progress:
            out = make_brain_cohort(args.out, args.n, args.seed, spacing=args.spacing, force=args.force,
                                    progress=progress)
        print(f"wrote {args.n} phantom patients ({args.spacing} mm MNI152 grid) to {out} (manifest.csv, cohort.json)")
        return 0
    with progress_bar_count(args.n, "cases") as progress:
        out = make_dataset(args.kind, args.n, args.size, args.seed, args.out, ndim=args.ndim, force=args.force,
                           progress=progress)
    print(f"wrote {args.n} {args.kind} cases ({args.ndim}D, {args.size} px) to {out} (manifest.csv, dataset.json)")
    return 0
