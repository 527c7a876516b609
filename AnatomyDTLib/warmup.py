"""Compile the fused solver kernel ahead of the first forecast that needs it.

numba compiles the fused kernel (:mod:`AnatomyDTLib.fused_kernels`) the first time a process
steps a ``pde-only`` or calibration forecast, and caches the machine code on disk; every later
process loads it in well under a second. The compile itself takes 35–50 s on a 2-core machine,
and in Slicer it would land inside the user's first forecast, with the progress bar standing
still. This module moves it out of the way:

* :func:`warm_up` runs a small forecast of a phantom through the product's own solver call (that
  of the ``pde-only`` model, with surgery, radiotherapy with delayed death and chemotherapy), so
  every kernel a forecast calls is compiled, with the argument types a forecast gives it, and
  cached. Then it leaves a marker file saying so.
* :func:`start_background_warm_up` starts ``python -m AnatomyDTLib warmup`` as a separate, low
  priority process unless the marker says the cache is warm. The Slicer module calls it when its
  panel is first shown, so the compile runs while the user loads images and enters the plan.
  One that ended without caching the kernel is not started again for a day
  (:func:`failed_background_warm_up`), so that a failure does not repeat in every session.
* ``anatomydt warmup`` does the same from the command line (e.g. after installing on a server).

The marker (:func:`marker_path`) is keyed by everything that makes numba compile again: the
kernel's source, the numba and Python versions, the machine. It lives in the per-user cache
folder (``ANATOMYDT_CACHE_DIR``, else ``$XDG_CACHE_HOME/anatomydt``, ``~/.cache/anatomydt`` or
``%LOCALAPPDATA%\\anatomydt``). Without the marker nothing is lost: the first forecast compiles, as
before.

Importing this module imports neither torch nor numba (the Slicer panel calls
:func:`start_background_warm_up` before the user has agreed to install them).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CACHE_DIR_VARIABLE = "ANATOMYDT_CACHE_DIR"
KERNEL_SOURCE = Path(__file__).with_name("fused_kernels.py")
DTYPES = ("float32", "float64")
DEFAULT_DTYPES = ("float32",)  # predictions and calibrations run in float32; `anatomydt simulate` in float64
LOG_NAME = "warmup.log"
RUNNING_NAME = "warmup.running"  # present while a background warm-up runs (its command removes it)
RUNNING_EXPIRES_S = 900.0  # a mark older than this is from a warm-up that died: start another
RETRY_AFTER_S = 24 * 3600.0  # a background warm-up that ended without its marker is not started again sooner


def cache_dir() -> Path:
    """The per-user folder of AnatomyDT's own cache files (the warm-up marker and its log)."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    if configured:
        return Path(configured)
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "anatomydt"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "anatomydt"


def _numba_version() -> str | None:
    try:
        return importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_key(dtype: str, kernel_source: Path = KERNEL_SOURCE) -> str:
    """What the numba cache of the kernel for ``dtype`` depends on, hashed: the kernel's source
    text and its file's modification time and size, the numba and Python versions, the machine
    (name, architecture) and the dtype. numba stamps its cache with the source (numba 0.68: its
    content hash; older versions: its modification time and size); the key takes both, so it
    changes whenever numba's cache goes stale, and at worst once more than needed (a reinstalled
    file: the warm-up then merely loads the cache, in seconds)."""
    stat = os.stat(kernel_source)
    parts = {"kernel_sha256": hashlib.sha256(Path(kernel_source).read_bytes()).hexdigest(),
             "kernel_stamp": [stat.st_mtime, stat.st_size],
             "numba": _numba_version(), "python": platform.python_version(), "machine": platform.machine(),
             "node": platform.node(), "dtype": dtype}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def marker_path(dtype: str, kernel_source: Path = KERNEL_SOURCE) -> Path:
    """The file whose presence says the kernel for ``dtype`` is compiled and cached on this machine."""
    _check_dtype(dtype)
    return cache_dir() / f"kernel-{dtype}-{cache_key(dtype, kernel_source)}.json"


def is_warm(dtypes=DEFAULT_DTYPES) -> bool:
    """Whether a warm-up (by any process) compiled and cached the kernel for every dtype of ``dtypes``
    with this kernel source, numba, Python and machine. A marker that cannot be read counts as absent."""
    for dtype in dtypes:
        try:
            json.loads(marker_path(dtype).read_text())
        except (OSError, ValueError):
            return False
    return True


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        from .errors import ParameterError

        raise ParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")


@dataclass
class WarmUpReport:
    """What :func:`warm_up` did, per dtype: ``seconds`` it took, and for each kernel function the
    forecast called, whether numba ``compiled`` it in this process or ``loaded`` it from its cache."""
    dtypes: tuple = ()
    seconds: dict = field(default_factory=dict)
    compiled: dict = field(default_factory=dict)
    loaded: dict = field(default_factory=dict)
    skipped: str | None = None  # why nothing was compiled (numba missing, the kernel switched off)
    marked: tuple = ()  # dtypes not run because their marker says they are cached already

    def summary(self) -> str:
        if self.skipped:
            return f"nothing compiled: {self.skipped}"
        lines = []
        for dtype in self.dtypes:
            if dtype in self.marked:
                lines.append(f"{dtype}: already compiled and cached on this machine (--force to run anyway)")
                continue
            compiled, loaded = self.compiled[dtype], self.loaded[dtype]
            what = (f"compiled and cached {len(compiled)} kernel functions" if compiled
                    else "already in numba's cache, nothing to compile")
            lines.append(f"{dtype}: {what} ({self.seconds[dtype]:.1f} s)")
        return "; ".join(lines)


def _phantom_forecast(dtype: str) -> None:
    """A ``pde-only`` forecast of a small phantom (48 × 56 × 48 voxels of 3 mm) over 6 days in
    ``dtype`` — with a resection, three radiotherapy fractions with delayed death and a
    chemotherapy window — through the solver call of :class:`AnatomyDTLib.predict.PDEOnlyModel`
    (float32: predictions and calibrations) and of ``anatomydt simulate`` (float64): every kernel
    they call, with the argument types they give it."""
    import torch

    from .io import LabelVolume
    from .phantom import ellipsoid_brain
    from .plan import load_plan
    from .predict import PDEOnlyModel
    from .solver import simulate
    from .state import AnatomyState

    model = PDEOnlyModel()
    labels, _flair, geometry = ellipsoid_brain()
    state = AnatomyState.from_labelmap(LabelVolume(labels, geometry, model.schema, "warm-up phantom"))
    plan = load_plan({"version": 1, "surgery": [{"day": 3.0, "extent": 0.5}],
                      "radiotherapy": {"fraction_days": [1.0, 2.0, 4.0], "dose_per_fraction_gy": 2.0,
                                       "delayed_death": {"delay_days": 2.0, "clearance_half_life_days": 3.0}},
                      "chemotherapy": [{"agent": "temozolomide", "kill_rate_per_day": 0.02,
                                        "windows": [[1.0, 5.0]]}]}, schema=model.schema)
    work = state.field.to(getattr(torch, dtype))
    kwargs = model.parameters.simulate_kwargs(work, model.schema)
    with torch.no_grad():
        simulate(work, spacing=geometry.spacing_array_order, days=[2.0, 6.0], plan=plan, schema=model.schema,
                 return_trajectory=True, **kwargs)


def kernel_functions() -> dict:
    """{name: numba dispatcher} of the kernel functions a forecast calls from Python."""
    from . import fused

    kernels = fused._kernels()
    return {name: getattr(kernels, name) for name in ("_fused_step", "_floor_and_bound", "_rows_to_compute",
                                                      "_summarise_extents")}


def warm_up(dtypes=DEFAULT_DTYPES, *, force: bool = False) -> WarmUpReport:
    """Compile (or load from numba's cache) the fused kernel for each of ``dtypes`` by running
    :func:`_phantom_forecast`, then write the marker that :func:`is_warm` reads. ``force``: run
    even when the marker is there. Returns what was compiled and loaded, and how long it took."""
    for dtype in dtypes:
        _check_dtype(dtype)
    from . import fused

    report = WarmUpReport(dtypes=tuple(dtypes))
    if not fused.fused_kernel_available():
        report.skipped = ("numba is not installed, or the fused kernel is switched off (ANATOMYDT_FUSED=0): "
                          "forecasts take the torch path, which needs no compiling")
        return report
    for dtype in dtypes:
        if not force and is_warm((dtype,)):
            report.marked += (dtype,)
            continue
        functions = kernel_functions()
        before = {name: _cache_counts(f) for name, f in functions.items()}
        start = time.perf_counter()
        _phantom_forecast(dtype)
        report.seconds[dtype] = time.perf_counter() - start
        report.compiled[dtype], report.loaded[dtype] = [], []
        for name, f in functions.items():
            hits, misses = (after - was for after, was in zip(_cache_counts(f), before[name]))
            if misses:
                report.compiled[dtype].append(name)
            elif hits:
                report.loaded[dtype].append(name)
        if not _has_signature(functions["_fused_step"], dtype):
            raise RuntimeError(f"the warm-up forecast did not run the fused kernel in {dtype}; nothing was cached")
        _write_marker(dtype, report)
    return report


def _cache_counts(dispatcher) -> tuple[int, int]:
    """(numba cache hits, cache misses) of a dispatcher so far: a miss is a compile."""
    stats = dispatcher.stats
    return sum(stats.cache_hits.values()), sum(stats.cache_misses.values())


def _has_signature(dispatcher, dtype: str) -> bool:
    """Whether the dispatcher holds machine code for a first argument (the state) of ``dtype``."""
    return any(getattr(signature[0], "dtype", None) is not None and signature[0].dtype.name == dtype
               for signature in dispatcher.signatures)


def _write_marker(dtype: str, report: WarmUpReport) -> None:
    """The marker of ``dtype``, written atomically (a reader never sees half of it). A folder that
    cannot be written is the user's setting to fix: a clear error; the compiled kernel stays cached."""
    path = marker_path(dtype)
    text = json.dumps({"dtype": dtype, "seconds": round(report.seconds[dtype], 2), "compiled": report.compiled[dtype],
                       "loaded": report.loaded[dtype], "numba": _numba_version(),
                       "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1)
    _write_atomically(path, text, what="the kernel is compiled and cached, but its marker")


def _write_atomically(path: Path, text: str, *, what: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so that a reader never
    sees half of it; a folder that cannot be written gives an AnatomyDTError naming it and
    ``ANATOMYDT_CACHE_DIR`` (``what``: what could not be written, for the message)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    except OSError as exc:
        from .errors import AnatomyDTError

        raise AnatomyDTError(f"{what} cannot be written in {path.parent} ({exc.strerror or exc}); set "
                             f"{CACHE_DIR_VARIABLE} to a folder you can write to") from exc
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def attempt_path(dtypes=DEFAULT_DTYPES) -> Path:
    """The record of the last background warm-up started for ``dtypes`` with this kernel source,
    numba, Python and machine (the markers' keys)."""
    key = hashlib.sha256(" ".join(cache_key(d) for d in sorted(dtypes)).encode()).hexdigest()[:20]
    return cache_dir() / f"warmup-attempt-{key}.json"


def failed_background_warm_up(dtypes=DEFAULT_DTYPES) -> dict | None:
    """The last background warm-up for ``dtypes`` if it ended without caching the kernel less than
    :data:`RETRY_AFTER_S` ago: {"started": local time, "retry_after": local time, "log": path};
    else None. Ended means its running mark is gone or expired; without its marker it failed,
    whatever the way (an error, a crash, a kill), and its log says why."""
    if is_warm(dtypes):
        return None
    try:
        started = attempt_path(dtypes).stat().st_mtime
    except OSError:
        return None
    now = time.time()
    if now - started >= RETRY_AFTER_S or _running_mark_age(now) < RUNNING_EXPIRES_S:
        return None
    return {"started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
            "retry_after": time.strftime("%Y-%m-%d %H:%M", time.localtime(started + RETRY_AFTER_S)),
            "log": str(cache_dir() / LOG_NAME)}


def _running_mark_age(now: float) -> float:
    """Seconds since a background warm-up put its running mark (infinite when there is none)."""
    try:
        return now - (cache_dir() / RUNNING_NAME).stat().st_mtime
    except OSError:
        return float("inf")


def start_background_warm_up(python: str | None = None, dtypes=DEFAULT_DTYPES) -> subprocess.Popen | None:
    """Start ``python -m AnatomyDTLib warmup`` in its own low-priority process, unless the kernel is
    already warm or cannot be compiled here (numba or torch not installed), another warm-up is
    running, or the last one ended without caching the kernel less than :data:`RETRY_AFTER_S` ago
    (:func:`failed_background_warm_up`: a failure would repeat in every Slicer session, costing
    each a minute of CPU; ``anatomydt warmup`` run by hand always runs and shows the error).
    Returns the process, or None when none was started. Its output goes to ``warmup.log`` in
    :func:`cache_dir`.

    ``python``: the interpreter to run (in Slicer, ``PythonSlicer``); default: this one. The
    process finds this copy of AnatomyDTLib through PYTHONPATH. It competes for the cores only
    at low priority; a forecast started meanwhile can wait for it (:func:`wait_for_background_warm_up`,
    as the Slicer module does), or it compiles for itself, as without a warm-up."""
    if is_warm(dtypes) or any(importlib.util.find_spec(name) is None for name in ("numba", "torch")):
        return None
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # one warm-up at a time (a second Slicer, a reloaded module); a stale mark expires
    if _running_mark_age(time.time()) < RUNNING_EXPIRES_S or failed_background_warm_up(dtypes) is not None:
        return None
    (folder / RUNNING_NAME).write_text(str(os.getpid()))
    _write_atomically(attempt_path(dtypes), json.dumps({"dtypes": list(dtypes), "python": python or sys.executable,
                                                        "started": time.strftime("%Y-%m-%dT%H:%M:%S")}),
                      what="the record of this warm-up")
    library_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([library_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    command = [python or sys.executable, "-m", "AnatomyDTLib", "warmup", "--background", "--dtype", *dtypes]
    with open(folder / LOG_NAME, "a") as log:
        log.write(f"\n{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
        log.flush()
        if sys.platform == "win32":  # no console window; below-normal priority (os.nice does not exist there)
            detached = {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.BELOW_NORMAL_PRIORITY_CLASS}
        else:  # its own session: closing Slicer's terminal does not stop it
            detached = {"start_new_session": True}
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=str(folder), **detached)


def wait_for_background_warm_up(process: subprocess.Popen | None, *, keep_alive=None, cancel=None,
                                interval_s: float = 0.1) -> bool:
    """Wait for a warm-up started by :func:`start_background_warm_up` to end, calling ``keep_alive()``
    every ``interval_s`` seconds (in Slicer: keep the panel responsive) and stopping with
    :class:`~AnatomyDTLib.errors.Cancelled` when ``cancel()`` returns True (the warm-up itself goes
    on: its cache serves the next forecast). Returns True when the kernel is cached now; False when
    there was nothing to wait for or the warm-up failed (the forecast then compiles for itself).

    Why wait: a forecast started during the warm-up would compile the same kernel a second time,
    in the user's process, with the progress bar standing still; waiting costs only what is left
    of the warm-up, and the forecast then loads the kernel in well under a second."""
    if process is None:
        return False
    while process.poll() is None:
        if cancel is not None and cancel():
            from .errors import Cancelled

            raise Cancelled("cancelled while the solver kernel was being compiled (the compile goes on in the "
                            "background)")
        if keep_alive is not None:
            keep_alive()
        time.sleep(interval_s)
    return process.returncode == 0 and is_warm()
