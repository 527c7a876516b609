"""``anatomydt train`` / ``anatomydt evaluate`` end to end on a tiny real dataset (seconds each).

Real files, real torch, real processes: the DDP test launches two processes with
``python -m torch.distributed.run`` (gloo on CPU) and compares their final weights.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from AnatomyDTLib.cli import main
from AnatomyDTLib.datasets import make_dataset
from AnatomyDTLib.models import load_checkpoint
from AnatomyDTLib.models.data import fold_assignment, load_cases
from AnatomyDTLib.models.training import CSV_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "ci_tiny.json"
NUMERIC = [c for c in CSV_COLUMNS if c != "seconds"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "voronoi"
    make_dataset("voronoi", n=8, size=64, seed=3, out_dir=out, options={"interval_days": (20.0, 40.0)})
    return out


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("ANATOMYDT_NO_PROGRESS", "1")


def rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def numbers(run: Path) -> list[list[str]]:
    return [[r[c] for c in NUMERIC] for r in rows(run)]


def train(data, out, *extra) -> int:
    return main(["train", "--data", str(data), "--config", str(TINY), "--out", str(out), "--device", "cpu", *extra])


def test_train_writes_metrics_and_checkpoints(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_data, run) == 0
    table = rows(run)
    assert list(table[0]) == list(CSV_COLUMNS)
    assert [int(r["epoch"]) for r in table] == [1, 2]
    assert all(float(r["train_loss"]) > 0 and float(r["val_loss"]) > 0 for r in table)
    assert 0 < float(table[-1]["val_dice"]) <= 1
    for name in ("config.json", "split.json", "last.pt", "best.pt", "done.json"):
        assert (run / name).is_file(), name
    done = json.loads((run / "done.json").read_text())
    assert done["epochs_run"] == 2 and done["world_size"] == 1
    model = load_checkpoint(run / "best.pt")
    assert model.class_names[:2] == ["background", "tumour"] and model.info["epoch"] == done["best_epoch"]
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 6 and len(split["val"]) == 2 and not set(split["train"]) & set(split["val"])


def test_same_seed_gives_identical_numbers_and_resume_continues_exactly(tiny_data, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert train(tiny_data, a) == 0
    assert train(tiny_data, b) == 0
    assert numbers(a) == numbers(b)
    wa = torch.load(a / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a run stopped after epoch 1 and resumed to epoch 2 equals the uninterrupted run: the lr schedule of
    # epoch 1 does not depend on the total, the batches of epoch e come from (seed, e), Adam's state is saved
    assert train(tiny_data, c, "--epochs", "1") == 0
    assert len(rows(c)) == 1
    assert main(["train", "--data", str(tiny_data), "--out", str(c), "--resume", "--epochs", "2", "--device", "cpu"]) == 0
    assert numbers(c) == numbers(a)
    wc = torch.load(c / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    assert json.loads((c / "done.json").read_text())["epochs_run"] == 2
    # a different seed gives different numbers (the comparison above can fail)
    cfg = json.loads(TINY.read_text())
    cfg["training"]["seed"] = 7
    other = tmp_path / "seed7.json"
    other.write_text(json.dumps(cfg))
    assert main(["train", "--data", str(tiny_data), "--config", str(other), "--out", str(tmp_path / "d"),
                 "--device", "cpu"]) == 0
    assert numbers(tmp_path / "d") != numbers(a)


def test_train_refuses_to_overwrite_and_checks_folds(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("precious")
    assert train(tiny_data, run) == 2
    assert "not empty" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "precious"
    assert train(tiny_data, tmp_path / "r2", "--fold", "5", "--folds", "5") == 2
    assert "--fold" in capsys.readouterr().err


def test_fold_training_never_sees_the_test_fold(tiny_data, tmp_path):
    run = tmp_path / "fold1"
    assert train(tiny_data, run, "--fold", "1", "--folds", "4", "--epochs", "1") == 0
    split = json.loads((run / "split.json").read_text())
    cases, _ = load_cases(tiny_data)
    which = fold_assignment(len(cases), 4, 0)
    expected_test = {c.name for c, f in zip(cases, which) if f == 1}
    assert set(split["test"]) == expected_test and len(expected_test) == 2
    assert not expected_test & (set(split["train"]) | set(split["val"]))
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(c.name for c in cases)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_end_with_identical_parameters(tiny_data, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "ANATOMYDT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "AnatomyDTLib", "train", "--data", str(tiny_data),
           "--config", str(TINY), "--out", str(run), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads((run / "done.json").read_text())
    assert done["world_size"] == 2 and done["epochs_run"] == 2
    r0 = torch.load(run / "ddp" / "rank0.pt", weights_only=True)
    r1 = torch.load(run / "ddp" / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # and the processes did train: the weights moved away from the initialisation
    from AnatomyDTLib.models.config import Config
    from AnatomyDTLib.models.training import build_model
    from AnatomyDTLib.models.data import load_cases as lc

    _, info = lc(tiny_data)
    init = build_model(Config.load(TINY), info).state_dict()
    assert any(not torch.equal(init[k], r0[k]) for k in init)
    assert len(rows(run)) == 2


def test_evaluate_writes_markdown_and_csv(tiny_data, tmp_path):
    out = tmp_path / "cv"
    assert main(["evaluate", "--data", str(tiny_data), "--folds", "2", "--config", str(TINY), "--out", str(out),
                 "--device", "cpu"]) == 0
    names = ["background", "tumour", "region_1", "region_2", "region_3"]
    with open(out / "summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["model", "scope", "metric", "mean", "sd", "fold_0", "fold_1"]
    scopes = {r["scope"] for r in table}
    assert scopes == {"overall", *names}
    assert {r["model"] for r in table} == {"anatomy-dt", "identity"}
    assert {r["metric"] for r in table} == {"dice", "hd95", "cldice"}
    overall = {(r["model"], r["metric"]): r for r in table if r["scope"] == "overall"}
    assert 0 < float(overall[("anatomy-dt", "dice")]["mean"]) <= 1
    assert float(overall[("anatomy-dt", "hd95")]["mean"]) >= 0
    with open(out / "per_case.csv", newline="") as fh:
        per_case = list(csv.DictReader(fh))
    assert len(per_case) == 2 * 8  # every case once as a test case, for the model and the identity baseline
    assert {"dice_tumour", "hd95_overall", "cldice_region_1", "interval_days"} <= set(per_case[0])
    md = (out / "summary.md").read_text()
    for text in ("| model | DSC (%) | HD95 (mm) | clDice (%) |", "| tumour |", "## Per fold", "anatomy-dt", "identity"):
        assert text in md
    assert (out / "fold_0" / "best.pt").is_file() and (out / "fold_1" / "test_cases.csv").is_file()
    # --resume reuses both finished folds (no retraining: best.pt untouched)
    stamp = (out / "fold_0" / "best.pt").stat().st_mtime_ns
    assert main(["evaluate", "--data", str(tiny_data), "--folds", "2", "--config", str(TINY), "--out", str(out),
                 "--device", "cpu", "--resume"]) == 0
    assert (out / "fold_0" / "best.pt").stat().st_mtime_ns == stamp
