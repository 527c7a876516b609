"""``anatomydt benchmark``: regenerate the paper's Tables 1–2, the §3.3 sensitivity sweeps and Figure 4.

    anatomydt benchmark --data {voronoi,vessel,DIR} --folds 5 --out DIR [--quick] [--methods ...]
                        [--parts ...] [--anatomydt-results DIR] [--resume] [--force]

``voronoi``/``vessel`` generate the dataset into OUT/data (200 cases of 128 px, seed 0; --quick:
20 cases of 64 px); a DIR is a dataset written by ``anatomydt make-dataset``. Every method is
trained and scored on the folds of ``anatomydt evaluate``. Results: OUT/results.md, table1.md/.csv,
table2.md/.csv, sensitivity/, qualitative.png. See docs/results.md.
"""

from __future__ import annotations

from ..errors import ParameterError

NAME = "benchmark"
HELP = "Baselines vs Anatomy-DT (Table 1), ablations (Table 2), sensitivity sweeps and a qualitative figure."


def _csv_list(text: str | None, what: str) -> list[str] | None:
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ParameterError(f"--{what} is empty; give a comma-separated list.")
    return items


def add_arguments(parser) -> None:
    from ..baselines import METHODS
    from ..baselines.benchmark import PARTS

    parser.add_argument("--data", required=True,
                        help="'voronoi' or 'vessel' (generate the dataset into OUT/data) or a dataset directory")
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default 5)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20 cases of 64 px, configs/ci_tiny.json, 2 epochs, short sweeps (minutes)")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default all)")
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default all)")
    parser.add_argument("--anatomydt-results", metavar="DIR",
                        help="reuse a finished 'anatomydt evaluate --out DIR' for the full model (same data and folds)")
    parser.add_argument("--config", help="learned-model configuration (default configs/<kind>.json; --quick: ci_tiny)")
    parser.add_argument("--n", type=int, help="cases to generate (default 200; --quick 20)")
    parser.add_argument("--size", type=int, help="image size in px of the generated cases (default 128; --quick 64)")
    parser.add_argument("--seed", type=int, help="dataset seed (default 0)")
    parser.add_argument("--epochs", type=int, help="epochs of the U-Net, ConvLSTM, NeuralODE and Fisher-KPP fits "
                                                   "(default 10; --quick 2)")
    parser.add_argument("--sweeps", help="comma-separated sensitivity sweeps to run (default all: "
                                         "dt,jacobi,omega,resolution,chi,kappa,lambda_tv,k_max)")
    parser.add_argument("--sweep-cases", type=int, help="fold-0 test cases scored per sensitivity point "
                                                        "(default 12; --quick 3)")
    parser.add_argument("--resume", action="store_true", help="reuse finished folds, runs and sweeps in --out")
    parser.add_argument("--force", action="store_true", help="redo everything in a non-empty --out")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="device of the learned-model runs (default cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of every run (default 1: fastest on a shared 2-core CPU; 0 = torch's "
                             "default)")


def run(args) -> int:
    from ..baselines import METHODS
    from ..baselines.benchmark import PARTS, Benchmark, BenchmarkOptions

    if args.threads < 0:
        raise ParameterError(f"--threads must be >= 0, got {args.threads}.")
    for key in ("n", "size", "epochs", "sweep_cases"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ParameterError(f"--{key.replace('_', '-')} must be >= 1, got {value}.")
    opts = BenchmarkOptions(data=args.data, out=args.out, folds=args.folds, quick=args.quick,
                            methods=_csv_list(args.methods, "methods") or list(METHODS),
                            parts=_csv_list(args.parts, "parts") or list(PARTS), resume=args.resume, force=args.force,
                            anatomydt_results=args.anatomydt_results, config=args.config, n=args.n, size=args.size,
                            seed=args.seed, epochs=args.epochs, sweep_cases=args.sweep_cases, device=args.device,
                            threads=args.threads, sweeps=_csv_list(args.sweeps, "sweeps"))
    result = Benchmark(opts).run()
    print(f"wrote {result['results']}")
    return 0
