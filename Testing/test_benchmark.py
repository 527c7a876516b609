"""``anatomydt benchmark`` end to end on a tiny dataset, the table writer and the sensitivity helpers.

The full ``--quick`` mode (all six methods, three ablations, eight sweeps) takes a few minutes on
the 2-core machine, too long for a test. The end-to-end test therefore runs ``--quick`` with a
method subset that still covers both kinds of run — the shared baseline trainer (U-Net,
Fisher–KPP) and a learned-model ``cross_validate`` run (Cross-diffusion) — on 6 cases in 2 folds,
with Table 1 and the figure; the Table 2 configurations, the table writer and the sensitivity
helpers are tested separately on the files it wrote. Real files, real training, no mocks.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from AnatomyDTLib.baselines import LABELS
from AnatomyDTLib.baselines.benchmark import RUN_SWITCHES, config_dir, derived_config
from AnatomyDTLib.baselines.sensitivity import (inference_sweeps, overridden, resample_case, scaled_repulsion,
                                                sweep_values)
from AnatomyDTLib.baselines.tables import ABLATIONS, PAPER_TABLE1, method_summary, write_table1, write_table2
from AnatomyDTLib.cli import main
from AnatomyDTLib.datasets import make_dataset
from AnatomyDTLib.metrics import dice
from AnatomyDTLib.models import load_checkpoint
from AnatomyDTLib.models.config import Config
from AnatomyDTLib.models.data import fold_assignment, load_cases
from AnatomyDTLib.models.evaluation import predict_case

METHODS = "unet,fisher-kpp,cross-diffusion"


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("ANATOMYDT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = root / "voronoi"
    make_dataset("voronoi", n=6, size=64, seed=11, out_dir=data, options={"interval_days": (20.0, 50.0)})
    out = root / "out"
    code = main(["benchmark", "--data", str(data), "--folds", "2", "--out", str(out), "--quick", "--methods", METHODS,
                 "--parts", "table1,figure", "--epochs", "1"])
    return data, out, code


def read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_quick_benchmark_writes_table1_figure_and_results(bench):
    data, out, code = bench
    assert code == 0
    table = {r["method"]: r for r in read(out / "table1.csv")}
    assert list(table) == ["unet", "fisher-kpp", "cross-diffusion", "identity"]
    for r in table.values():
        assert 0 <= float(r["dsc_mean"]) <= 100 and float(r["hd95_mean"]) >= 0
        assert int(r["test_cases"]) == 6 and int(r["folds"]) == 2
    assert float(table["unet"]["paper_dsc"]) == PAPER_TABLE1["voronoi"]["unet"][0]
    per_case = read(out / "per_case.csv")
    assert sorted({r["model"] for r in per_case}) == ["cross-diffusion", "fisher-kpp", "identity", "unet"]
    md = (out / "results.md").read_text()
    assert "Table 1" in md and LABELS["fisher-kpp"] in md and "qualitative.png" in md
    assert (out / "qualitative.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k in (0, 1):
        assert (out / "baselines" / "unet" / f"fold_{k}" / "model.pt").is_file()
        assert (out / "runs" / "cross-diffusion" / f"fold_{k}" / "best.pt").is_file()


def test_folds_are_those_of_anatomydt_evaluate_and_identity_matches_an_independent_score(bench):
    data, out, _ = bench
    cases, info = load_cases(data)
    fold_of = dict(zip([c.name for c in cases], fold_assignment(len(cases), 2, 0)))
    per_case = read(out / "per_case.csv")
    for r in per_case:
        assert int(r["fold"]) == fold_of[r["case"]]
    # identity: follow-up = baseline, Dice per foreground class from metrics.dice, fold means, mean ± sd
    fold_means = []
    for k in (0, 1):
        scores = [np.mean([dice(c.labels_t0 == j, c.labels_t1 == j) for j in range(1, len(info.class_names))])
                  for c in cases if fold_of[c.name] == k]
        fold_means.append(np.mean(scores))
    row = {r["method"]: r for r in read(out / "table1.csv")}["identity"]
    assert math.isclose(float(row["dsc_mean"]), 100 * np.mean(fold_means), rel_tol=1e-5)
    assert math.isclose(float(row["dsc_sd"]), 100 * np.std(fold_means, ddof=1), rel_tol=1e-4)


def test_a_non_empty_output_is_refused_and_resume_reuses_the_folds(bench, capsys):
    data, out, _ = bench
    before = (out / "table1.csv").read_text()
    stamp = (out / "baselines" / "unet" / "fold_0" / "model.pt").stat().st_mtime
    code = main(["benchmark", "--data", str(data), "--folds", "2", "--out", str(out), "--quick", "--methods", METHODS,
                 "--parts", "table1"])
    assert code == 2 and "--resume" in capsys.readouterr().err
    code = main(["benchmark", "--data", str(data), "--folds", "2", "--out", str(out), "--quick", "--methods", METHODS,
                 "--parts", "table1", "--resume"])
    assert code == 0
    assert (out / "baselines" / "unet" / "fold_0" / "model.pt").stat().st_mtime == stamp  # nothing retrained
    assert (out / "table1.csv").read_text() == before


def test_unknown_method_is_a_clear_error(tmp_path, capsys):
    code = main(["benchmark", "--data", "voronoi", "--out", str(tmp_path / "o"), "--methods", "unet,gan"])
    assert code == 2 and "gan" in capsys.readouterr().err


def test_learned_run_switches_match_the_table2_rows():
    base = Config.load(config_dir() / "voronoi.json")
    for name, (spatial, growth, topo, *_paper) in ABLATIONS.items():
        cfg = derived_config(base, RUN_SWITCHES[name])
        assert cfg.model["spatial_alpha"] is spatial and cfg.model["growth_cnn"] is growth
        assert (cfg.loss["lambda_topo"] > 0) is topo
    plain = derived_config(base, RUN_SWITCHES["cross-diffusion"])
    assert not plain.model["growth_cnn"] and not plain.model["spatial_alpha"] and plain.model["cross_diffusion"]
    assert base.model["growth_cnn"]  # the base configuration is not modified


def test_table_writer_summarises_like_evaluate_and_marks_the_best(tmp_path):
    names = ["background", "tumour", "region_1"]
    rows = []
    values = {"a": [[0.9, 0.8], [0.7, 0.6]], "b": [[0.5, 0.5], [0.5, 0.5]]}  # method -> fold -> per-case tumour Dice
    for m, folds in values.items():
        for k, cases in enumerate(folds):
            for i, v in enumerate(cases):
                rows.append({"fold": k, "case": f"c{k}{i}", "model": m, "dice_background": 1.0, "dice_tumour": v,
                             "dice_region_1": 1.0, "dice_overall": (v + 1.0) / 2, "hd95_background": 0.0,
                             "hd95_tumour": 10 * (1 - v), "hd95_region_1": 0.0, "hd95_overall": 5 * (1 - v),
                             "cldice_background": 1.0, "cldice_tumour": v, "cldice_region_1": 1.0,
                             "cldice_overall": (v + 1.0) / 2})
    summary = method_summary(rows, names, 0, ["a", "b"])
    fold_means = [np.mean([(v + 1) / 2 for v in c]) for c in values["a"]]
    assert math.isclose(summary["a"]["dsc_mean"], 100 * np.mean(fold_means))
    assert math.isclose(summary["a"]["dsc_sd"], 100 * np.std(fold_means, ddof=1))
    assert math.isclose(summary["a"]["tumour_dsc_mean"], 100 * np.mean([0.85, 0.65]))
    md_path, csv_path = write_table1(tmp_path, summary, "vessel", {"a": 12.0}, ["a", "b"])
    md = md_path.read_text()
    assert "**87.50 ± 7.07**" in md and "| 75.00 ± 0.00 |" in md  # the best DSC (a's) in bold, b's not
    assert "**1.25 ± 0.71**" in md and "| 2.50 ± 0.00 |" in md  # the lowest HD95 is a's too
    out = read(csv_path)
    assert [r["method"] for r in out] == ["a", "b"] and out[0]["seconds"] == "12"
    summary2 = {"ablation-no-growth": summary["a"], "anatomy-dt": summary["b"]}
    md2 = write_table2(tmp_path, summary2)[0].read_text()
    assert md2.count("\n") == 4 and "| ✓ | ✗ | ✗ |" in md2 and "| ✓ | ✓ | ✓ |" in md2


def test_resampled_case_keeps_the_physical_extent():
    labels = np.zeros((64, 64), dtype=np.int64)
    labels[10:30, 20:40] = 1
    from AnatomyDTLib.models.data import Case

    case = Case("c", labels, labels.copy(), 30.0, {"treated": 0.0, "dose_gy": 0.0}, (1.0, 1.0))
    big = resample_case(case, 128)
    assert big.labels_t0.shape == (128, 128) and big.spacing == (0.5, 0.5)
    assert (big.labels_t0 == 1).sum() == 4 * (labels == 1).sum()  # same area in mm²
    small = resample_case(case, 32)
    assert small.spacing == (2.0, 2.0) and (small.labels_t0 == 1).sum() == (labels == 1).sum() // 4


def test_sensitivity_overrides_change_the_forecast_and_are_restored(bench):
    data, out, _ = bench
    run = out / "runs" / "cross-diffusion" / "fold_0"
    forecaster = load_checkpoint(run / "best.pt", device="cpu")
    cfg = Config.load(run / "config.json")
    cases, info = load_cases(data)
    case = cases[0]
    reference = predict_case(forecaster, case, info, cfg)
    cfg_before = dict(forecaster.model.cfg)
    repulsion = forecaster.model.repulsion().detach().clone()
    with scaled_repulsion(forecaster, 0.0):
        assert float(forecaster.model.repulsion().detach().max()) < 1e-5
    with overridden(forecaster, dt_days=1.0, jacobi_iters=1):
        assert forecaster.model.cfg["dt_days"] == 1.0
    assert forecaster.model.cfg == cfg_before
    assert torch.allclose(forecaster.model.repulsion(), repulsion)
    assert np.array_equal(predict_case(forecaster, case, info, cfg), reference)
    values = {k: v[:1] for k, v in sweep_values(True, 64, float(cfg.model["dt_days"])).items()}
    rows = inference_sweeps(run / "best.pt", cases[:1], info, cfg, values, skip=("resolution",), log=lambda *_: None)
    assert [r["sweep"] for r in rows] == ["dt", "jacobi", "omega", "chi", "kappa"]
    assert all(r["kind"] == "inference" and r["cases"] == 1 and 0 <= r["dice_mean"] <= 100 for r in rows)
