"""``anatomydt train``: train the learned Anatomy-DT model (Growth CNN + α field + learnable D, χ).

    anatomydt train --data DIR --config CFG.json --out RUN/ [--fold k --folds 5] [--resume] [--device auto]

Data parallel on N processes (gloo on CPU, NCCL on CUDA)::

    torchrun --nproc_per_node N -m AnatomyDTLib train --data DIR --config CFG.json --out RUN/

See docs/learning.md for the configuration keys and the files written to RUN/.
"""

from __future__ import annotations

from ..models.config import Config

NAME = "train"
HELP = "Train the learned model on a paired dataset (per-epoch metrics CSV, checkpoints, --resume, DDP via torchrun)."


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="dataset directory written by 'anatomydt make-dataset'")
    parser.add_argument("--config", help="training configuration JSON (configs/*.json); optional with --resume")
    parser.add_argument("--out", required=True, help="run directory for metrics.csv, last.pt, best.pt, ...")
    parser.add_argument("--fold", type=int, help="hold out this fold (0-based) and train on the others; needs --folds")
    parser.add_argument("--folds", type=int, help="number of cross-validation folds")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--force", action="store_true", help="replace an earlier run's files in --out")
    parser.add_argument("--epochs", type=int, help="override training.epochs (e.g. to extend a resumed run)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): CUDA when present, else CPU")


def run(args) -> int:
    from ..models.training import train

    if (args.fold is None) != (args.folds is None):
        from ..errors import ParameterError

        raise ParameterError("--fold and --folds go together (e.g. --fold 0 --folds 5).")
    config = Config.load(args.config) if args.config else None
    result = train(args.data, config, args.out, fold=args.fold, folds=args.folds, resume=args.resume,
                   force=args.force, device=args.device, epochs=args.epochs)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best epoch {result.best_epoch} (monitored value {result.best_score:.4f}); {result.epochs_run} epochs in "
              f"{result.train_seconds:.0f} s; model: {result.best_checkpoint}")
    return 0
