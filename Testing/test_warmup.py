"""The kernel warm-up (AnatomyDTLib.warmup, ``anatomydt warmup``): it must compile every kernel a
forecast calls, with the argument types the forecast gives, so that the forecast compiles nothing;
its marker must follow what numba's cache depends on; the background start must run once and
leave the marker.

Each process check runs in a fresh interpreter: a process whose kernels are already compiled in
memory would show nothing. numba's on-disk cache is the one of this checkout (filled by earlier
tests or runs), so a warm-up mostly loads rather than compiles; with an empty cache it compiles
(≈ 40 s), which the assertions do not depend on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from AnatomyDTLib import cli, fused, warmup

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "Resources" / "SampleData"

needs_kernel = pytest.mark.skipif(not fused.fused_kernel_available(), reason="numba is not installed here")


@pytest.fixture()
def cache_folder(tmp_path, monkeypatch):
    """AnatomyDT's cache folder (markers, log) in a fresh temporary folder, for this test and its children."""
    folder = tmp_path / "anatomydt-cache"
    monkeypatch.setenv(warmup.CACHE_DIR_VARIABLE, str(folder))
    return folder


def _run_python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@needs_kernel
def test_after_the_warm_up_a_forecast_with_every_treatment_compiles_nothing(cache_folder):
    """In a fresh process: the warm-up gives every kernel function its machine code; then the sample
    case's pde-only prediction under the Stupp plan with delayed death and a resection, inside a
    brain mask, and a calibrated forecast (a growth-rate map) add no signature to any kernel
    function (they would compile one, for ≈ 40 s, if the warm-up had missed an argument type the
    product passes)."""
    result = _run_python(f"""
        import json
        import torch
        from AnatomyDTLib import warmup
        from AnatomyDTLib.calibration import CalibratedPDEModel
        from AnatomyDTLib.plan import load_plan
        from AnatomyDTLib.predict import predict
        from AnatomyDTLib.state import AnatomyState

        report = warmup.warm_up(force=True)
        functions = warmup.kernel_functions()
        after_warm_up = {{name: len(f.signatures) for name, f in functions.items()}}
        baseline = AnatomyState.from_file({str(SAMPLE / "sample_baseline.seg.nrrd")!r})
        plan = json.load(open({str(SAMPLE / "sample_plan_stupp.json")!r}))
        plan["radiotherapy"]["delayed_death"] = {{"delay_days": 10.0, "clearance_half_life_days": 14.0}}
        plan["surgery"] = [{{"day": 20.0, "extent": 0.6}}]
        mask = baseline.to_labels() != 0
        plan = load_plan(plan, schema=baseline.schema)
        predict(baseline, days=[25.0, 70.0], plan=plan, model="pde-only", mask=mask)
        # a calibrated forecast: a growth-rate map (1/day) instead of one rate
        alpha = torch.full(baseline.field.shape[1:], 0.04)
        alpha[baseline.field.shape[1] // 2:] = 0.06
        predict(baseline, days=[30.0], plan=plan, model=CalibratedPDEModel(growth_rate_map=alpha), mask=mask)
        after_forecast = {{name: len(f.signatures) for name, f in functions.items()}}
        print(json.dumps({{"compiled": report.compiled, "loaded": report.loaded, "after_warm_up": after_warm_up,
                          "after_forecast": after_forecast, "warm": warmup.is_warm()}}))
    """)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["warm"]
    every = sorted(out["after_warm_up"])
    assert sorted(out["compiled"]["float32"] + out["loaded"]["float32"]) == every
    assert all(count >= 1 for count in out["after_warm_up"].values()), out
    assert out["after_forecast"] == out["after_warm_up"], "the forecast compiled a signature the warm-up missed"


def test_the_marker_follows_the_kernel_source_and_the_dtype(cache_folder, tmp_path):
    """A changed kernel source, the same source with another modification time (numba recompiles
    then) or another dtype gives another marker; a marker that cannot be read counts as absent."""
    changed = tmp_path / "fused_kernels.py"
    changed.write_text(warmup.KERNEL_SOURCE.read_text() + "\n# changed\n")
    assert warmup.cache_key("float32") != warmup.cache_key("float32", changed)
    copy = tmp_path / "copy" / "fused_kernels.py"  # the same text, reinstalled: numba's stamp differs
    copy.parent.mkdir()
    copy.write_bytes(warmup.KERNEL_SOURCE.read_bytes())
    stamp = warmup.KERNEL_SOURCE.stat()
    os.utime(copy, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert warmup.cache_key("float32", copy) == warmup.cache_key("float32")
    os.utime(copy, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10 ** 9))
    assert warmup.cache_key("float32", copy) != warmup.cache_key("float32")
    assert warmup.cache_key("float32") != warmup.cache_key("float64")
    assert warmup.marker_path("float32").parent == cache_folder
    assert not warmup.is_warm()
    cache_folder.mkdir()
    warmup.marker_path("float32").write_text("{ half a marker")
    assert not warmup.is_warm()
    warmup.marker_path("float32").write_text("{}")
    assert warmup.is_warm() and not warmup.is_warm(("float32", "float64"))
    with pytest.raises(Exception, match="dtype must be one of float32, float64"):
        warmup.marker_path("float16")


@needs_kernel
def test_the_background_warm_up_runs_once_and_leaves_the_marker(cache_folder):
    """start_background_warm_up starts ``python -m AnatomyDTLib warmup``; a second call while it runs
    starts nothing; when it ends the marker is there, the running mark gone, the log holds its
    report, and a third call starts nothing either."""
    process = warmup.start_background_warm_up()
    assert process is not None
    assert warmup.start_background_warm_up() is None  # one at a time
    assert process.wait(timeout=600) == 0
    assert warmup.is_warm()
    assert not (cache_folder / warmup.RUNNING_NAME).exists()
    log = (cache_folder / warmup.LOG_NAME).read_text()
    assert "anatomydt warmup: float32:" in log
    assert warmup.start_background_warm_up() is None  # warm now


def test_a_stale_running_mark_does_not_block_the_next_warm_up(cache_folder):
    """A warm-up that died leaves its running mark behind; after RUNNING_EXPIRES_S it no longer counts."""
    if not fused.fused_kernel_available():
        pytest.skip("numba is not installed here")
    cache_folder.mkdir()
    mark = cache_folder / warmup.RUNNING_NAME
    mark.write_text("12345")
    assert warmup.start_background_warm_up() is None
    old = time.time() - warmup.RUNNING_EXPIRES_S - 60
    os.utime(mark, (old, old))
    process = warmup.start_background_warm_up()
    assert process is not None
    assert process.wait(timeout=600) == 0
    assert warmup.is_warm()


@needs_kernel
@pytest.mark.skipif(shutil.which("false") is None, reason="needs a program that exits with an error")
def test_a_background_warm_up_that_failed_is_not_started_again_for_a_day(cache_folder):
    """A background warm-up that ends without caching the kernel (here its interpreter exits at once
    with an error: no marker, its running mark left behind) is not started again: not while its
    running mark counts, nor once that has expired, until RETRY_AFTER_S after it started;
    failed_background_warm_up reports it meanwhile, with its log. Then it is started again, and
    once it has cached the kernel nothing is reported."""
    process = warmup.start_background_warm_up(python=shutil.which("false"))
    assert process is not None and process.wait(timeout=60) != 0
    assert not warmup.is_warm()
    assert warmup.start_background_warm_up() is None  # its running mark still counts
    assert warmup.failed_background_warm_up() is None  # it may still be running
    mark = cache_folder / warmup.RUNNING_NAME
    expired = time.time() - warmup.RUNNING_EXPIRES_S - 60
    os.utime(mark, (expired, expired))
    failed = warmup.failed_background_warm_up()
    assert failed is not None and failed["log"] == str(cache_folder / warmup.LOG_NAME)
    assert warmup.start_background_warm_up() is None  # the failure would only repeat
    attempt = warmup.attempt_path()
    day_ago = time.time() - warmup.RETRY_AFTER_S - 60
    os.utime(attempt, (day_ago, day_ago))
    assert warmup.failed_background_warm_up() is None
    process = warmup.start_background_warm_up()
    assert process is not None and process.wait(timeout=600) == 0
    assert warmup.is_warm() and warmup.failed_background_warm_up() is None


def test_the_command_reports_a_cached_kernel_and_a_switched_off_one(cache_folder, capsys, monkeypatch):
    """``anatomydt warmup`` with the marker present runs nothing and says so; with the kernel
    switched off it compiles nothing, writes no marker and still exits 0 (forecasts take the
    torch path)."""
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    assert cli.main(["warmup"]) == 0
    assert "nothing compiled: numba is not installed, or the fused kernel is switched off" in capsys.readouterr().out
    assert not cache_folder.exists() or not any(cache_folder.iterdir())
    monkeypatch.delenv(fused.ENV_SWITCH)
    cache_folder.mkdir(exist_ok=True)
    warmup.marker_path("float32").write_text("{}")
    if fused.fused_kernel_available():
        assert cli.main(["warmup"]) == 0
        assert "float32: already compiled and cached on this machine" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        cli.main(["warmup", "--dtype", "float16"])
    assert refused.value.code == 2


@needs_kernel
def test_waiting_for_the_background_warm_up_keeps_the_caller_alive_and_can_be_cancelled(cache_folder):
    """wait_for_background_warm_up returns True once the started warm-up has cached the kernel,
    calling keep_alive meanwhile; cancelled, it raises Cancelled and leaves the warm-up running to
    its end (the marker appears all the same); with no process it returns False at once."""
    from AnatomyDTLib.errors import Cancelled

    assert warmup.wait_for_background_warm_up(None) is False
    process = warmup.start_background_warm_up()
    assert process is not None
    with pytest.raises(Cancelled, match="the compile goes on in the background"):
        warmup.wait_for_background_warm_up(process, cancel=lambda: True)
    assert process.poll() is None  # not stopped
    calls = []
    assert warmup.wait_for_background_warm_up(process, keep_alive=lambda: calls.append(1), interval_s=0.05) is True
    assert calls and warmup.is_warm()


def _slicer_module_requirements() -> set[str]:
    """The import names the Slicer module installs besides torch (its PYTHON_REQUIREMENTS, read from
    AnatomyDT/AnatomyDT.py with ast: the module itself needs Slicer to import)."""
    import ast

    tree = ast.parse((REPO / "AnatomyDT" / "AnatomyDT.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PYTHON_REQUIREMENTS" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("no PYTHON_REQUIREMENTS in AnatomyDT.py")


@needs_kernel
def test_the_warm_up_needs_only_what_the_slicer_module_installs(cache_folder):
    """In Slicer the warm-up runs in PythonSlicer, where only torch and the module's
    PYTHON_REQUIREMENTS are sure to be installed: ``python -m AnatomyDTLib warmup`` must work with
    the library's other dependencies (tqdm, matplotlib, pynrrd, slicerio, torchdiffeq) absent."""
    absent = {"tqdm", "matplotlib", "nrrd", "slicerio", "torchdiffeq"} - _slicer_module_requirements()
    assert absent, "every optional dependency is a Slicer requirement now: nothing to check"
    result = _run_python(f"""
        import runpy, sys
        sys.modules.update(dict.fromkeys({sorted(absent)!r}))  # importing these now fails
        sys.argv = ["anatomydt", "warmup", "--force"]
        runpy.run_module("AnatomyDTLib", run_name="__main__")
    """)
    assert "anatomydt warmup: float32:" in result.stdout


@needs_kernel
def test_a_cache_folder_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """With ANATOMYDT_CACHE_DIR under a file (no folder can be made there), ``anatomydt warmup``
    exits 2 with a message naming the folder and the setting, not a traceback; the background start
    refuses with OSError, which the Slicer module logs."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(warmup.CACHE_DIR_VARIABLE, str(blocker / "cache"))
    assert cli.main(["warmup", "--force"]) == 2
    err = capsys.readouterr().err
    assert "its marker cannot be written in" in err and warmup.CACHE_DIR_VARIABLE in err and "Traceback" not in err
    with pytest.raises(OSError):
        warmup.start_background_warm_up()
