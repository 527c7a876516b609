"""``anatomydt benchmark``: the paper's Table 1, Table 2, §3.3 sensitivity sweeps and Figure 4.

Everything runs on the folds of ``anatomydt evaluate`` (same ``fold_seed``, same validation split,
same scoring), so every number of one output directory is comparable with every other:

* **Table 1** — the baselines U-Net, ConvLSTM, NeuralODE, Fisher–KPP (:mod:`.trainer`) and
  Cross-diffusion (the learned model with ``growth_cnn: false, spatial_alpha: false``, trained by
  :func:`AnatomyDTLib.models.cross_validate`), and the full Anatomy-DT model (``cross_validate``
  with the dataset's configuration, or an earlier ``anatomydt evaluate`` directory given with
  ``anatomydt_results``), plus the identity forecast (follow-up = baseline) for reference.
* **Table 2** — the ablations of the spatial α field, the Growth CNN and the topology loss
  (``model.spatial_alpha``, ``model.growth_cnn``, ``loss.lambda_topo``), each a ``cross_validate``.
* **Sensitivity** — :mod:`.sensitivity` on the fold-0 Anatomy-DT checkpoint.
* **Figure** — :mod:`.figure`, fold-0 test cases.

Output directory::

    benchmark.json, benchmark.log     options, timings, versions; the log
    data/                             the generated dataset (``voronoi``/``vessel``)
    baselines/<method>/fold_k/        U-Net, ConvLSTM, NeuralODE, Fisher-KPP runs (see .trainer)
    runs/<name>/                      cross_validate outputs (anatomy-dt, cross-diffusion, ablation-*)
    per_case.csv                      every method's per-case rows (the columns of anatomydt evaluate)
    table1.md/.csv, table2.md/.csv    the tables
    sensitivity/                      sensitivity.csv, sensitivity*.png, retrain runs
    qualitative.png                   the figure
    results.md                        all of it in one page

Modes: the default is the paper's setting (200 cases of 128 px, seed 0, the configurations
``configs/voronoi.json`` / ``configs/vessel.json``, 10 epochs for every learned method);
``quick`` is a smoke run for CI (20 cases of 64 px, ``configs/ci_tiny.json``, 2 epochs,
shortened sweeps).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputExistsError, ParameterError
from . import METHODS
from .tables import ABLATIONS

PARTS = ("table1", "table2", "sensitivity", "figure")

#: Configuration changes of every learned-model run relative to the dataset's configuration.
RUN_SWITCHES = {
    "anatomy-dt": {},
    "cross-diffusion": {"model": {"growth_cnn": False, "spatial_alpha": False}, "loss": {"lambda_topo": 0.0}},
    "ablation-no-spatial": {"model": {"spatial_alpha": False}, "loss": {"lambda_topo": 0.0}},
    "ablation-no-growth": {"model": {"growth_cnn": False}, "loss": {"lambda_topo": 0.0}},
    "ablation-no-growth-topo": {"model": {"growth_cnn": False}},
}

MODES = {
    "full": {"n": 200, "size": 128, "seed": 0, "epochs": 10, "hidden": 16, "sweep_cases": 12, "sweep_epochs": 3,
             "sweep_train_cases": 48},
    "quick": {"n": 20, "size": 64, "seed": 0, "epochs": 2, "hidden": 8, "sweep_cases": 3, "sweep_epochs": 1,
              "sweep_train_cases": 8},
}


@dataclass
class BenchmarkOptions:
    """What ``anatomydt benchmark`` was asked to do (None = the mode's default)."""

    data: str
    out: str
    folds: int = 5
    quick: bool = False
    methods: list = field(default_factory=lambda: list(METHODS))
    parts: list = field(default_factory=lambda: list(PARTS))
    resume: bool = False
    force: bool = False
    anatomydt_results: str | None = None
    config: str | None = None
    n: int | None = None
    size: int | None = None
    seed: int | None = None
    epochs: int | None = None
    sweep_cases: int | None = None
    device: str = "cpu"
    threads: int = 1
    sweeps: list | None = None  # sensitivity sweeps to run (None: all)

    def mode(self) -> dict:
        m = dict(MODES["quick" if self.quick else "full"])
        for key in ("n", "size", "seed", "epochs", "sweep_cases"):
            if getattr(self, key) is not None:
                m[key] = getattr(self, key)
        return m


def config_dir() -> Path:
    """The repository's configs/ directory (next to the AnatomyDTLib package)."""
    return Path(__file__).resolve().parent.parent.parent / "configs"


def derived_config(base, switches: dict):
    """A copy of ``base`` (models.Config) with the sections' keys of ``switches`` replaced."""
    from ..models.config import Config

    d = base.to_dict()
    for section, values in switches.items():
        d[section].update(values)
    return Config.from_dict(d, source="benchmark")


class _Log:
    """print() and append to OUT/benchmark.log."""

    def __init__(self, path: Path, echo=print):
        self.path = path
        self.echo = echo

    def __call__(self, *parts) -> None:
        text = " ".join(str(p) for p in parts)
        self.echo(text)
        with open(self.path, "a") as fh:
            fh.write(text + "\n")


def _check_options(opts: BenchmarkOptions) -> None:
    bad = [m for m in opts.methods if m not in METHODS]
    if bad or not opts.methods:
        raise ParameterError(f"--methods {bad or opts.methods} not known; choose from {', '.join(METHODS)}.")
    bad = [p for p in opts.parts if p not in PARTS]
    if bad or not opts.parts:
        raise ParameterError(f"--parts {bad or opts.parts} not known; choose from {', '.join(PARTS)}.")
    if not (isinstance(opts.folds, int) and opts.folds >= 2):
        raise ParameterError(f"--folds must be an integer >= 2, got {opts.folds!r}.")
    from .sensitivity import SWEEPS

    bad = [w for w in (opts.sweeps or []) if w not in SWEEPS]
    if bad:
        raise ParameterError(f"--sweeps {bad} not known; choose from {', '.join(SWEEPS)}.")
    if opts.resume and opts.force:
        raise ParameterError("Give --resume (reuse finished work) or --force (start over), not both.")


def _prepare_out(opts: BenchmarkOptions) -> Path:
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not (opts.resume or opts.force):
        raise OutputExistsError(f"Output directory {out} is not empty; pass --resume to reuse finished work or "
                                "--force to redo it.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _dataset(opts: BenchmarkOptions, out: Path, log) -> tuple[Path, str]:
    """The data directory (generated into OUT/data for voronoi/vessel) and its kind."""
    from ..datasets import KINDS, make_dataset

    if opts.data in KINDS:
        mode = opts.mode()
        target = out / "data"
        if opts.resume and (target / "dataset.json").is_file():
            log(f"reusing the dataset in {target}")
        else:
            log(f"generating {mode['n']} {opts.data} cases of {mode['size']} px (seed {mode['seed']}) into {target}")
            make_dataset(opts.data, n=mode["n"], size=mode["size"], seed=mode["seed"], out_dir=target, force=True)
        return target, opts.data
    path = Path(opts.data)
    if not (path / "dataset.json").is_file():
        raise InputError(f"--data {opts.data!r} is neither 'voronoi', 'vessel' nor a directory written by "
                         "'anatomydt make-dataset' (no dataset.json).")
    kind = str(json.loads((path / "dataset.json").read_text()).get("kind", "unknown"))
    return path, kind


def _base_config(opts: BenchmarkOptions, kind: str):
    from ..models.config import Config

    if opts.config:
        return Config.load(opts.config), str(opts.config)
    name = "ci_tiny.json" if opts.quick else f"{kind}.json"
    path = config_dir() / name
    if not path.is_file():
        raise InputError(f"No configuration {path} for a {kind!r} dataset; pass --config CFG.json.")
    return Config.load(path), str(path)


def _learned_seconds(run: Path, folds: int) -> float:
    """Training + test seconds of a cross_validate directory (from its files, so also for resumed runs)."""
    from ..models.evaluation import read_rows

    total = 0.0
    for k in range(folds):
        done, test = run / f"fold_{k}" / "done.json", run / f"fold_{k}" / "test_cases.csv"
        if done.is_file():
            total += float(json.loads(done.read_text()).get("train_seconds", 0.0))
        if test.is_file():
            total += sum(float(r["seconds"] or 0) for r in read_rows(test) if r["model"] == "anatomy-dt")
    return total


def _epochs_run(run: Path, folds: int) -> str:
    """Epochs run per fold, from the folds' done.json: "10" or a range "6–10" (early stopping)."""
    runs = []
    for k in range(folds):
        done = run / f"fold_{k}" / "done.json"
        if done.is_file():
            runs.append(int(json.loads(done.read_text()).get("epochs_run", 0)))
    if not runs:
        return ""
    return str(min(runs)) if min(runs) == max(runs) else f"{min(runs)}–{max(runs)}"


def _baseline_seconds(run: Path, folds: int) -> float:
    total = 0.0
    for k in range(folds):
        done = run / f"fold_{k}" / "done.json"
        if done.is_file():
            facts = json.loads(done.read_text())
            total += float(facts.get("train_seconds", 0.0)) + float(facts.get("test_seconds", 0.0))
    return total


class Benchmark:
    """One ``anatomydt benchmark`` run (see the module docstring)."""

    def __init__(self, opts: BenchmarkOptions, echo=print):
        _check_options(opts)
        self.opts = opts
        self.out = _prepare_out(opts)
        self.log = _Log(self.out / "benchmark.log", echo)
        self.mode = opts.mode()
        self.timings: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.epochs: dict[str, str] = {}
        self.rows: dict[str, list[dict]] = {}
        self.data_dir, self.kind = _dataset(opts, self.out, self.log)
        self.config, self.config_path = _base_config(opts, self.kind)
        self.config.training["threads"] = int(opts.threads)
        from ..models.data import fold_assignment, load_cases

        self.cases, self.info = load_cases(self.data_dir)
        self.config.check_classes(len(self.info.class_names))
        self.assignment = fold_assignment(len(self.cases), opts.folds, int(self.config.data["fold_seed"]))

    # ------------------------------------------------------------------------------------------
    # runs
    # ------------------------------------------------------------------------------------------
    def baseline_settings(self):
        from .trainer import BaselineSettings

        t, m = self.config.training, self.config.model
        return BaselineSettings(epochs=int(self.mode["epochs"]), crop=int(t["crop"]), seed=int(t["seed"]),
                                dt_days=float(m["dt_days"]), hidden=int(self.mode["hidden"]), threads=self.opts.threads)

    def learned_run(self, name: str, only_folds=None) -> list[dict]:
        """Per-case rows of a learned-model configuration (``RUN_SWITCHES[name]``) on the folds."""
        from ..models import cross_validate

        run = self.out / "runs" / name
        cfg = derived_config(self.config, RUN_SWITCHES[name])
        resume = self.opts.resume or (only_folds is not None and run.is_dir())
        switches = json.dumps(RUN_SWITCHES[name]) if RUN_SWITCHES[name] else "the configuration as given"
        self.log(f"{name}: cross-validating the learned model ({switches}) in {run}")
        result = cross_validate(self.data_dir, cfg, run, folds=self.opts.folds, only_folds=only_folds,
                                device=self.opts.device, resume=resume, force=self.opts.force and not resume,
                                progress=False, log=self.log)
        rows = [dict(r, model=name) for r in result["rows"] if r["model"] == "anatomy-dt"]
        self.seconds[name] = _learned_seconds(run, self.opts.folds)
        self.epochs[name] = _epochs_run(run, self.opts.folds)
        return rows

    def anatomydt_rows(self) -> list[dict]:
        """Full-model rows: from ``--anatomydt-results`` when given (folds checked), else a new run."""
        if "anatomy-dt" in self.rows:
            return self.rows["anatomy-dt"]
        if self.opts.anatomydt_results:
            rows = self._reused_rows(Path(self.opts.anatomydt_results))
        else:
            rows = self.learned_run("anatomy-dt")
        self.rows["anatomy-dt"] = rows
        return rows

    def _reused_rows(self, results: Path) -> list[dict]:
        from ..models.evaluation import read_rows

        per_case, folds_file = results / "per_case.csv", results / "folds.json"
        if not per_case.is_file() or not folds_file.is_file():
            raise InputError(f"--anatomydt-results {results} has no per_case.csv/folds.json; give the --out directory "
                             "of a finished 'anatomydt evaluate' run.")
        stored = json.loads(folds_file.read_text())
        ours = {c.name: int(f) for c, f in zip(self.cases, self.assignment)}
        if int(stored.get("folds", -1)) != self.opts.folds or stored.get("assignment") != ours:
            raise InputError(f"The folds of {results} differ from this benchmark's ({self.opts.folds} folds of "
                             f"{self.data_dir}, fold_seed {self.config.data['fold_seed']}); evaluate on the same data.")
        rows = [r for r in read_rows(per_case) if r["model"] == "anatomy-dt"]
        done = sorted({int(r["fold"]) for r in rows})
        if done != list(range(self.opts.folds)):
            self.log(f"note: {results} has scored folds {done} only")
        self.seconds["anatomy-dt"] = _learned_seconds(results, self.opts.folds)
        self.epochs["anatomy-dt"] = _epochs_run(results, self.opts.folds)
        self.log(f"anatomy-dt: reusing {len(rows)} scored test cases from {results}")
        return rows

    def anatomydt_dir(self) -> Path:
        return Path(self.opts.anatomydt_results) if self.opts.anatomydt_results else self.out / "runs" / "anatomy-dt"

    def method_rows(self, method: str) -> list[dict]:
        if method in self.rows:
            return self.rows[method]
        if method == "anatomy-dt":
            return self.anatomydt_rows()
        if method in RUN_SWITCHES:
            rows = self.learned_run(method)
        else:
            from .trainer import cross_validate_baseline

            run = self.out / "baselines" / method
            rows = cross_validate_baseline(method, self.data_dir, run, self.config, self.baseline_settings(),
                                           folds=self.opts.folds, resume=self.opts.resume, force=self.opts.force,
                                           log=self.log)
            self.seconds[method] = _baseline_seconds(run, self.opts.folds)
            self.epochs[method] = _epochs_run(run, self.opts.folds)
        self.rows[method] = rows
        return rows

    def identity_rows(self) -> list[dict]:
        from .trainer import score_cases

        rows = []
        for k in range(self.opts.folds):
            test = [c for c, f in zip(self.cases, self.assignment) if f == k]
            rows += score_cases("identity", k, test, [c.labels_t0 for c in test], self.info, [0.0] * len(test))
        return rows

    # ------------------------------------------------------------------------------------------
    # parts
    # ------------------------------------------------------------------------------------------
    def table1(self) -> None:
        from ..models.evaluation import per_case_columns, write_rows
        from .tables import method_summary, write_table1

        rows = []
        for m in self.opts.methods:
            tic = time.perf_counter()
            rows += self.method_rows(m)
            self.timings[f"table1:{m}"] = time.perf_counter() - tic
        rows += self.identity_rows()
        order = [m for m in METHODS if m in self.opts.methods] + ["identity"]
        write_rows(self.out / "per_case.csv", rows, per_case_columns(self.info.class_names))
        summary = method_summary(rows, self.info.class_names, self.info.background_index, order,
                                 self.info.class_names[self.info.tumour_index])
        write_table1(self.out, summary, self.kind, self.seconds, order, self.epochs)
        self.log((self.out / "table1.md").read_text())

    def table2(self) -> None:
        from .tables import method_summary, write_table2

        rows = []
        for name in ABLATIONS:
            tic = time.perf_counter()
            rows += self.method_rows(name)
            self.timings[f"table2:{name}"] = time.perf_counter() - tic
        summary = method_summary(rows, self.info.class_names, self.info.background_index, list(ABLATIONS),
                                 self.info.class_names[self.info.tumour_index])
        write_table2(self.out, summary, self.seconds, self.epochs)
        self.log((self.out / "table2.md").read_text())

    def _fold0_checkpoint(self) -> Path:
        run = self.anatomydt_dir()
        checkpoint = run / "fold_0" / "best.pt"
        if not checkpoint.is_file():
            if self.opts.anatomydt_results:
                raise InputError(f"{checkpoint} not found; the sensitivity sweeps need the fold-0 checkpoint.")
            self.learned_run("anatomy-dt", only_folds=[0])
        return checkpoint

    def sensitivity(self) -> None:
        from ..models.config import Config
        from . import sensitivity as sens

        checkpoint = self._fold0_checkpoint()
        cfg = Config.load(checkpoint.parent / "config.json")
        test = [c for c, f in zip(self.cases, self.assignment) if f == 0][:int(self.mode["sweep_cases"])]
        out = self.out / "sensitivity"
        out.mkdir(exist_ok=True)
        csv_path = out / "sensitivity.csv"
        old = sens.read_csv(csv_path) if (self.opts.resume and csv_path.is_file()) else []
        done = {r["sweep"] for r in old}
        skip = done | (set(sens.SWEEPS) - set(self.opts.sweeps or sens.SWEEPS))
        values = sens.sweep_values(self.opts.quick, self.cases[0].labels_t0.shape[0], float(cfg.model["dt_days"]))
        self.log(f"sensitivity: {len(test)} fold-0 test cases, checkpoint {checkpoint}")
        rows = list(old)
        rows += sens.inference_sweeps(checkpoint, test, self.info, cfg, values, skip=skip, log=self.log)
        sens.write_csv(csv_path, rows)
        rows += sens.retrain_sweeps(self.data_dir, test, self.info, cfg, values, out / "runs", folds=self.opts.folds,
                                    epochs=int(self.mode["sweep_epochs"]),
                                    max_train_cases=int(self.mode["sweep_train_cases"]), resume=self.opts.resume,
                                    skip=skip, log=self.log)
        order = list(sens.SWEEPS)
        rows.sort(key=lambda r: (order.index(r["sweep"]), float(r["value"])))
        sens.write_csv(csv_path, rows)
        sens.plot(rows, out)

    def figure(self) -> None:
        from ..models import load_checkpoint
        from ..models.config import Config
        from ..models.evaluation import read_rows, predict_case
        from .figure import pick_cases, qualitative_figure

        test = [c for c, f in zip(self.cases, self.assignment) if f == 0]
        chosen = pick_cases(test, 3)
        predictions, dice = {}, {}
        for m in self.opts.methods:
            if m in RUN_SWITCHES:
                run = self.anatomydt_dir() if m == "anatomy-dt" else self.out / "runs" / m
                checkpoint = run / "fold_0" / "best.pt"
                if not checkpoint.is_file():
                    continue
                forecaster = load_checkpoint(checkpoint, device="cpu")
                cfg = Config.load(run / "fold_0" / "config.json")
                predictions[m] = {c.name: predict_case(forecaster, c, self.info, cfg) for c in chosen}
                scored = run / "fold_0" / "test_cases.csv"
            else:
                npz = self.out / "baselines" / m / "fold_0" / "predictions.npz"
                if not npz.is_file():
                    continue
                with np.load(npz) as data:
                    predictions[m] = {c.name: data[c.name] for c in chosen}
                scored = self.out / "baselines" / m / "fold_0" / "test_cases.csv"
            model_name = "anatomy-dt" if m in RUN_SWITCHES else m
            dice[m] = {r["case"]: float(r["dice_overall"]) for r in read_rows(scored) if r["model"] == model_name}
        if not predictions:
            self.log("figure: no fold-0 forecasts to show")
            return
        qualitative_figure(self.out / "qualitative.png", chosen, predictions, dice, self.info.background_index,
                           len(self.info.class_names))
        self.log(f"wrote {self.out / 'qualitative.png'}")

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        import torch

        started = time.time()
        if self.opts.threads > 0:
            torch.set_num_threads(int(self.opts.threads))
        self._write_facts(started, finished=False)
        for part in PARTS:
            if part in self.opts.parts:
                tic = time.perf_counter()
                getattr(self, part)()
                self.timings[part] = time.perf_counter() - tic
                self._write_facts(started, finished=False)
        write_results_page(self.out, self)
        self._write_facts(started, finished=True)
        self.log(f"wrote {self.out / 'results.md'} ({time.time() - started:.0f} s)")
        return {"out": self.out, "results": self.out / "results.md"}

    def _write_facts(self, started: float, finished: bool) -> None:
        import torch

        from .. import __version__

        facts = {"options": asdict(self.opts), "mode": self.mode, "data": str(self.data_dir), "kind": self.kind,
                 "cases": len(self.cases), "config": self.config_path, "baseline_settings": asdict(self.baseline_settings()),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                 "wall_seconds": time.time() - started, "finished": finished, "part_seconds": self.timings,
                 "method_seconds": self.seconds, "anatomydt_version": __version__, "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                 "python": platform.python_version()}
        tmp = self.out / ".benchmark.json.tmp"
        tmp.write_text(json.dumps(facts, indent=1, default=str) + "\n")
        tmp.replace(self.out / "benchmark.json")


def write_results_page(out: Path, bench: Benchmark) -> Path:
    """OUT/results.md: the tables, the sensitivity table and plots, the figure and how they were made."""
    import torch

    o = bench.opts
    lines = ["# Benchmark results", "",
             f"- data: `{bench.data_dir}` ({bench.kind}, {len(bench.cases)} cases, "
             f"{'x'.join(str(n) for n in bench.cases[0].labels_t0.shape)} px), {o.folds} folds "
             f"(fold_seed {bench.config.data['fold_seed']})",
             f"- learned-model configuration: `{bench.config_path}`; baselines: "
             f"{json.dumps(asdict(bench.baseline_settings()))}",
             f"- mode: {'quick' if o.quick else 'full'}; machine: {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
             "- DSC and clDice in %, HD95 in mm (= px at 1 mm); overall = mean over the foreground classes; "
             "mean ± sd over the fold means", ""]
    for name, title in (("table1.md", "Table 1: methods"), ("table2.md", "Table 2: ablations")):
        if (out / name).is_file():
            lines += [f"## {title}", "", (out / name).read_text(), ""]
    csv_path = out / "sensitivity" / "sensitivity.csv"
    if csv_path.is_file():
        from .sensitivity import read_csv

        lines += ["## Sensitivity (fold 0)", "", "![sensitivity](sensitivity/sensitivity.png)", "",
                  "| sweep | kind | value | DSC (%) | HD95 (mm) | tumour DSC (%) | cases | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in read_csv(csv_path):
            sd = "" if math.isnan(r["dice_sd"]) else f" ± {r['dice_sd']:.2f}"
            hsd = "" if math.isnan(r["hd95_sd"]) else f" ± {r['hd95_sd']:.2f}"
            lines.append(f"| {r['sweep']} | {r['kind']} | {r['value']:g} | {r['dice_mean']:.2f}{sd} | "
                         f"{r['hd95_mean']:.2f}{hsd} | {r['tumour_dice_mean']:.2f} | {int(r['cases'])} | {r['note']} |")
        lines.append("")
    if (out / "qualitative.png").is_file():
        lines += ["## Qualitative (fold 0)", "", "![qualitative](qualitative.png)", ""]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path
