"""benchmarks/calibration_ceiling.py on a hand-built cohort whose answers are known.

One patient, three scans on a 2 mm grid: a big cube lesion (scan 0), the same cube (scan 1), and
at scan 2 a small cube that is the deepest part of the scan-0/1 lesion. So the "no change" Dice
is low (a hard case), every voxel of the target lies inside the last lesion (confined ceiling 1),
and keeping the deepest voxels of the last lesion with the true volume reproduces the target
exactly (Dice 1). A second patient whose lesion is stable is not a hard case and must be left out.
The Dice values are checked against a count done here, not through AnatomyDTLib.metrics.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from AnatomyDTLib.io import Geometry, write_image, write_labelmap
from AnatomyDTLib.schema import BRAIN_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
TUMOUR, WHITE = BRAIN_SCHEMA.tumour_index, BRAIN_SCHEMA.index("white_matter")


def _load_script():
    spec = importlib.util.spec_from_file_location("calibration_ceiling", ROOT / "benchmarks" / "calibration_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _labels(shape, lesion: tuple[slice, ...] | None) -> np.ndarray:
    labels = np.full(shape, WHITE, dtype=np.uint8)
    if lesion is not None:
        labels[lesion] = TUMOUR
    return labels


def _cohort(root: Path) -> Path:
    shape, geometry = (24, 24, 24), Geometry(spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    big, core = (slice(4, 20),) * 3, (slice(10, 14),) * 3
    stable = (slice(7, 15),) * 3
    patients = {"case_shrinks": [big, big, core], "case_stable": [stable, stable, stable]}
    rows = []
    rng = np.random.default_rng(0)
    for case, lesions in patients.items():
        (root / case).mkdir(parents=True)
        for k, lesion in enumerate(lesions):
            labels = _labels(shape, lesion)
            write_labelmap(root / case / f"tp{k}_seg.nii.gz", labels, geometry, BRAIN_SCHEMA)
            flair = np.where(labels == TUMOUR, 1.0, 0.55) + 0.01 * rng.standard_normal(shape)
            write_image(root / case / f"tp{k}_flair.nii.gz", flair.astype(np.float32), geometry)
            rows.append({"case": case, "timepoint": k, "day": 30 * k, "image": f"{case}/tp{k}_flair.nii.gz",
                         "segmentation": f"{case}/tp{k}_seg.nii.gz", "plan": ""})
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_ceilings_on_a_lesion_that_shrinks_to_its_core(tmp_path):
    script = _load_script()
    cohort = _cohort(tmp_path / "cohort")
    out = tmp_path / "ceiling"
    assert script.main(["--cohort", str(cohort), "--out", str(out)]) == 0
    with open(out / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == ["case_shrinks"]     # the stable lesion is not a hard case
    row = rows[0]
    big = _labels((24, 24, 24), (slice(4, 20),) * 3) == TUMOUR
    core = _labels((24, 24, 24), (slice(10, 14),) * 3) == TUMOUR
    assert float(row["no_change_dice"]) == pytest.approx(_dice(big, core), abs=1e-4)
    assert float(row["target_inside_last"]) == 1.0
    assert float(row["confined_ceiling_dice"]) == pytest.approx(1.0)
    # the target is the deepest 64 voxels of the last lesion: ranking by depth finds it exactly
    assert float(row["last_depth_dice"]) == pytest.approx(1.0)
    assert float(row["first_depth_dice"]) == pytest.approx(1.0)
    assert float(row["in_sample_logistic_dice"]) == pytest.approx(1.0)
    assert row["low_dose_dice"] == "nan"                     # no plan, no dose map
    summary = (out / "summary.md").read_text()
    assert "1 cases" in summary and "Command:" in summary


def test_keep_top_takes_the_highest_and_breaks_ties_by_order():
    script = _load_script()
    chosen = script.keep_top(np.array([0.5, 2.0, 0.5, 1.0, 0.5]), 3)
    assert chosen.tolist() == [True, True, False, True, False]


def test_existing_output_is_refused_without_force(tmp_path):
    script = _load_script()
    cohort = _cohort(tmp_path / "cohort")
    out = tmp_path / "ceiling"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--force"):
        script.main(["--cohort", str(cohort), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "mine"
