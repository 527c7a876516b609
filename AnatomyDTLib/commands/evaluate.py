"""``anatomydt evaluate``: K-fold cross-validation of the learned model (train on K-1 folds, test on 1).

    anatomydt evaluate --data DIR --folds 5 --config CFG.json --out DIR [--only-folds 0,1] [--resume]

Writes OUT/summary.md and OUT/summary.csv (mean ± sd over folds of DSC, HD95 and clDice, overall
and per class, for the model and the identity baseline), OUT/per_case.csv and one training run
per fold in OUT/fold_k/. See docs/learning.md.
"""

from __future__ import annotations

from ..errors import ParameterError
from ..models.config import Config

NAME = "evaluate"
HELP = "Cross-validated evaluation (DSC, HD95, clDice overall and per class) written as markdown and CSV."


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="dataset directory written by 'anatomydt make-dataset'")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--config", required=True, help="training configuration JSON (configs/*.json)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--only-folds", help="comma-separated 0-based folds to run now (default: all)")
    parser.add_argument("--resume", action="store_true", help="reuse finished folds and resume unfinished ones")
    parser.add_argument("--force", action="store_true", help="overwrite an earlier evaluation in --out")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def run(args) -> int:
    from ..models.evaluation import cross_validate

    only = None
    if args.only_folds:
        try:
            only = [int(x) for x in args.only_folds.split(",") if x.strip()]
        except ValueError as exc:
            raise ParameterError(f"--only-folds must be comma-separated integers, got {args.only_folds!r}.") from exc
    result = cross_validate(args.data, Config.load(args.config), args.out, folds=args.folds, only_folds=only,
                            device=args.device, resume=args.resume, force=args.force)
    if result:
        print(result["summary_md"].read_text())
        print(f"wrote {result['summary_md']}, {result['summary_csv']}, {result['per_case_csv']}")
    return 0
