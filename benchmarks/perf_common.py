"""Shared helpers of the performance benchmarks (``benchmarks/perf_*.py``); not a benchmark itself.

* :func:`brain_case` makes a 1 mm test case of any grid size by resampling the bundled synthetic
  sample case (``Resources/SampleData``, MNI atlas at 2 mm + phantom tumour) in physical space.
  It is written to a scratch folder (default ``/tmp/anatomydt_perf``), never into the repository.
* :func:`copy_bandwidth_gb_s` measures the machine's memory-copy bandwidth (torch, large buffer).
* :func:`machine_load` reads the 1-minute load average: the benchmark machine is shared with a
  training run, so every figure is printed with the load it was measured under.
* :func:`run_measured` runs a command in a subprocess and returns its wall time and peak RSS
  (``resource.getrusage(RUSAGE_CHILDREN)`` after it exits, i.e. the child's ``ru_maxrss``).

Units: seconds, bytes, GB = 1e9 bytes, GiB = 2**30 bytes.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRATCH = Path(os.environ.get("ANATOMYDT_PERF_DIR", "/tmp/anatomydt_perf"))
SAMPLE_DIR = REPO / "Resources" / "SampleData"


# ------------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------------

def machine_load() -> float:
    """The 1-minute load average (runnable processes); on this 2-core machine 2.0 means both cores busy."""
    return os.getloadavg()[0]


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def machine_text() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}")


def copy_bandwidth_gb_s(megabytes: int = 512, repeats: int = 7) -> float:
    """Memory-copy bandwidth (GB/s, reads + writes counted) of ``dst.copy_(src)`` on a large float32
    buffer, the median of ``repeats``; both buffers are touched first so no page faults are timed."""
    import torch

    n = megabytes * 1024 * 1024 // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9


def record_step_boxes(structure: dict | None = None) -> list[int]:
    """Make every no-grad solver step append the voxel count of the box it changed to the returned list.

    If ``structure`` is given, the first step also fills it with what the step computes per voxel
    (channels, rows and columns of χ, diffused classes, Jacobi sweeps, growth on, fused kernel on),
    the input of a flop count. Measurement only, for a benchmark's own child process: it wraps
    ``AnatomyDTLib.inference.InferenceStepper.step`` for the rest of that process.
    """
    import torch

    from AnatomyDTLib import inference

    boxes: list[int] = []
    original = inference.InferenceStepper.step

    def recording_step(self, p, t, dt, chemo, clearable):
        out = original(self, p, t, dt, chemo, clearable)
        boxes.append(int(torch.Size([s.stop - s.start for s in self.window]).numel()))
        if structure is not None and not structure:
            structure.update(channels=self.shape[1], rows=len(self.cross_rows or []),
                             cols=len(getattr(self, "cross_cols", []) or []), diffused=len(self.diffused),
                             sweeps=self.pr.jacobi_iters, growth=bool((self.pr.growth_rate != 0).any()),
                             fused=bool(self.fused.applies(dt)))
        return out

    inference.InferenceStepper.step = recording_step
    return boxes


def arithmetic_peak_gflops(threads: int) -> tuple[float, str] | None:
    """The arithmetic roof: the cores' theoretical float32 peak as the fused kernel's machine code
    can use it, GFLOP/s = threads × clock × flops per cycle. Flops per cycle: 2 FMA ports × 8 lanes
    × 2 flops = 32 with AVX2 + FMA, else 8 (SSE). Also 32 on the two AVX-512 machines measured:
    on the Intel Xeon LLVM emits 256-bit vectors by default (it prefers them on those cores); on
    the AMD EPYC (Zen 4) it emits 512-bit ones (``perf_profile.py`` shows zmm loops), which Zen 4
    executes as two 256-bit halves on its two 256-bit FMA pipes: the same 32 flop/cycle.
    The clock is the nominal one of /proc/cpuinfo (turbo and throttling ignored).
    Returns (GFLOP/s, how it was derived), or None when the clock cannot be read (not Linux).

    A theoretical peak is used because a measured one needs a hand-tuned register-blocked loop to
    be trustworthy (a plain multiply-add loop is bound by its loads and stores)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.lower().startswith("cpu mhz")]
    flags = next((line.split(":")[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    if not mhz:
        return None
    per_cycle = 32 if ("avx2" in flags and "fma" in flags) else 8
    ghz = statistics.median(mhz) / 1000.0
    return threads * ghz * per_cycle, f"{threads} cores × {ghz:.2f} GHz × {per_cycle} flop/cycle (float32)"


def median(values):
    return statistics.median(values)


def spread(values) -> str:
    """'median [min–max]' of a list of seconds."""
    return f"{statistics.median(values):.3f} s [{min(values):.3f}–{max(values):.3f}]"


# ------------------------------------------------------------------------------------------------
# test cases
# ------------------------------------------------------------------------------------------------

def brain_case(shape_xyz=(240, 240, 155), spacing_mm: float | tuple = 1.0, out_dir: Path | None = None) -> dict:
    """A test case on a ``shape_xyz`` grid (ITK order x, y, z) with ``spacing_mm`` voxels, centred on the
    sample case's brain: ``{"seg", "flair", "plan", "dir"}`` paths. Cached: made once per grid.

    The sample segmentation (2 mm) is resampled with nearest-neighbour interpolation and the FLAIR
    linearly, in physical space (same direction, grid centred on the sample grid's centre).
    240×240×155 at 1 mm covers 240×240×155 mm, like BraTS/SRI24; the sample brain is 198×234×190
    mm, so a few slices at the top and bottom of the head fall outside (no tumour there).
    """
    import SimpleITK as sitk

    spacing = (float(spacing_mm),) * 3 if not isinstance(spacing_mm, (tuple, list)) else tuple(map(float, spacing_mm))
    name = "case_" + "x".join(str(n) for n in shape_xyz) + "_" + "x".join(f"{s:g}" for s in spacing)
    directory = Path(out_dir) if out_dir is not None else SCRATCH / name
    paths = {"seg": directory / "baseline.seg.nrrd", "flair": directory / "flair.nii.gz",
             "plan": directory / "plan_stupp.json", "dir": directory}
    if all(p.is_file() for k, p in paths.items() if k != "dir"):
        return paths
    from AnatomyDTLib.io import Geometry, read_labelmap, write_image, write_labelmap

    directory.mkdir(parents=True, exist_ok=True)
    source = read_labelmap(SAMPLE_DIR / "sample_baseline.seg.nrrd")
    src_img = sitk.GetImageFromArray(source.labels)
    src_img = source.geometry.apply_to_sitk(src_img)
    flair = sitk.ReadImage(str(SAMPLE_DIR / "sample_flair.nii.gz"), sitk.sitkFloat32)
    ref = sitk.Image([int(n) for n in shape_xyz], sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetDirection(src_img.GetDirection())
    src_centre = src_img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in src_img.GetSize()])
    ref.SetOrigin((0.0, 0.0, 0.0))
    ref_centre = ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in shape_xyz])
    ref.SetOrigin(tuple(s - r for s, r in zip(src_centre, ref_centre)))
    labels = sitk.Resample(src_img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    image = sitk.Resample(flair, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    geometry = Geometry.from_sitk(labels)
    write_labelmap(paths["seg"], sitk.GetArrayFromImage(labels), geometry, force=True)
    write_image(paths["flair"], sitk.GetArrayFromImage(image), geometry, force=True)
    shutil.copyfile(SAMPLE_DIR / "sample_plan_stupp.json", paths["plan"])
    return paths


def brain_field(shape_xyz=(240, 240, 155), spacing_mm=1.0):
    """(p0 (K, z, y, x) float32 one-hot, spacing in array order) of :func:`brain_case`."""
    from AnatomyDTLib.state import AnatomyState

    case = brain_case(shape_xyz, spacing_mm)
    state = AnatomyState.from_file(case["seg"])
    return state.field, state.geometry.spacing_array_order


# ------------------------------------------------------------------------------------------------
# subprocess measurement
# ------------------------------------------------------------------------------------------------

def run_measured(cmd: list[str], *, env: dict | None = None) -> dict:
    """Run ``cmd`` under GNU ``/usr/bin/time -v`` when present; return wall seconds, peak RSS in bytes
    ("Maximum resident set size" of the command), return code, stdout and stderr, and the 1-minute
    load average before the run. Without /usr/bin/time the child prints its own peak RSS
    (:func:`print_peak_rss_line`)."""
    load = machine_load()
    timer = "/usr/bin/time" if Path("/usr/bin/time").exists() else None
    full = ([timer, "-v"] if timer else []) + list(cmd)
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    peak = None
    for line in proc.stderr.splitlines() + proc.stdout.splitlines():
        if "Maximum resident set size" in line:
            peak = int(line.split(":")[1]) * 1024
        elif line.startswith("PEAK_RSS_BYTES=") and peak is None:
            peak = int(line.split("=", 1)[1])
    return {"wall_s": wall, "peak_rss_bytes": peak, "returncode": proc.returncode, "stdout": proc.stdout,
            "stderr": proc.stderr, "load_before": load}


def print_peak_rss_line() -> None:
    """Print this process's peak RSS (bytes) in the format :func:`run_measured` reads."""
    print(f"PEAK_RSS_BYTES={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)


def last_json_line(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object (the result a child process printed)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise RuntimeError("no JSON result in the child's output:\n" + text[-2000:])


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def python() -> str:
    return sys.executable
