"""Where the fused kernel's machine code spends its time, function by function and loop by loop:
a measurement, not a test.

    python benchmarks/perf_profile.py                  # brain case step 60, 20 s of samples
    python benchmarks/perf_profile.py --case dense --step 2 --seconds 30
    python benchmarks/perf_profile.py --loops 12       # more loops per function

``perf_stages.py`` says what a stage costs by switching it off; this script says where the
instructions that run are, which is how a loop that LLVM left scalar shows up (the growth loop did,
until the kernels were compiled with numba's ``numpy`` error model).

How: a child process captures one kernel call (``perf_stages.capture_step``), compiles the kernel
into a fresh numba cache folder (≈ 40 s; code loaded from numba's cache cannot be inspected), writes
the machine code of every kernel function to a scratch folder, and then calls the kernel on the
same state in a loop. Linux ``perf record`` (software clock, 4 kHz) samples the child's
instruction pointers meanwhile; each sample is credited to the kernel function whose code holds
it and, inside the function, to the innermost loop (a backward jump in ``objdump``'s
disassembly). Printed per function: its share of all samples; per loop: its share, its length in
instructions and its widest vector registers (``zmm`` 16 float32 lanes, ``ymm`` 8, ``xmm/scalar``
one lane: a loop that should vectorise and did not).

Needs Linux ``perf`` (Debian: ``apt-get install linux-perf``) with permission to sample the
child (root, or ``kernel.perf_event_paranoid`` ≤ 1), and ``objdump`` (binutils). Reads function
addresses through numba's JIT engine (private API of numba 0.68; may change with numba).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_FUNCTION_LABEL = re.compile(r"^([A-Za-z_.$][\w.$]*):", re.M)
_INSTRUCTION = re.compile(r"\s+([0-9a-f]+):\s+(?:[0-9a-f]{2} )+\s*(.*)")
_JUMP = re.compile(r"j\w+\s+0x([0-9a-f]+)")


# ------------------------------------------------------------------------------------------------
# child: run the kernel, publish where its code is
# ------------------------------------------------------------------------------------------------

def _mapped_regions() -> list[tuple[int, int]]:
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(v, 16) for v in line.split()[0].split("-"))
            regions.append((low, high))
    return regions


def _dump_kernel_code(kernel, folder: Path) -> None:
    """Write each kernel function's machine code to ``folder`` and a table ``functions.txt`` of
    (address, size, file, name); a function's size is the distance to the next symbol."""
    library = kernel.overloads[kernel.signatures[0]].library
    engine = library._codegen._engine  # numba's JIT engine (private API)
    addresses = {}
    for name in set(_FUNCTION_LABEL.findall(library.get_asm_str())):
        try:
            address = engine.get_function_address(name)
        except Exception:  # a label that is not a function
            address = 0
        if address:
            addresses[name] = address
    ordered = sorted(addresses.items(), key=lambda item: item[1])
    regions = _mapped_regions()
    with open(folder / "functions.txt", "w") as table:
        for i, (name, address) in enumerate(ordered):
            if "fused_kernels" not in name:
                continue
            end = ordered[i + 1][1] if i + 1 < len(ordered) else address + 0x10000
            end = min([end] + [high for low, high in regions if low <= address < high])
            path = folder / f"code_{address:x}.bin"
            path.write_bytes(ctypes.string_at(address, end - address))
            short = re.sub(r"B\d+v\d+B.*$", "", name).replace("_ZN12AnatomyDTLib13fused_kernels", "")
            table.write(f"{address:x} {end - address:x} {path} {re.sub(r'^[0-9]+', '', short)}\n")


def child(folder: Path, case: str, step: int, seconds: float) -> None:
    import perf_stages

    arguments = perf_stages.capture_step(step, case)
    from AnatomyDTLib import fused

    kernel = fused._kernels()._fused_step
    call = dict(arguments, p=arguments["p"].copy())
    perf_stages.call_kernel(kernel, call)  # compiled by now; the state just evolves step after step on the same box
    _dump_kernel_code(kernel, folder)
    (folder / "ready").write_text(str(os.getpid()))
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        perf_stages.call_kernel(kernel, call)
        calls += 1
    (folder / "calls").write_text(f"{calls} {time.perf_counter() - start}")


# ------------------------------------------------------------------------------------------------
# parent: sample the child, credit the samples to functions and loops
# ------------------------------------------------------------------------------------------------

def _disassemble(address: int, path: str) -> list[tuple[int, str]]:
    text = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64", f"--adjust-vma={address:#x}", path],
                          capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in map(_INSTRUCTION.match, text.splitlines()) if m]


def _loops(instructions: list[tuple[int, str]], start: int) -> list[tuple[int, int]]:
    """(first, last) addresses of every loop: a jump back to an earlier address of the function."""
    found = []
    for address, text in instructions:
        jump = _JUMP.match(text)
        if jump and start <= int(jump.group(1), 16) < address:
            found.append((int(jump.group(1), 16), address))
    return found


def _vector_width(body: list[str]) -> str:
    if any("zmm" in text for text in body):
        return "zmm"
    if any("ymm" in text for text in body):
        return "ymm"
    return "xmm/scalar"


def report(folder: Path, samples: collections.Counter, loops_per_function: int) -> None:
    total = sum(samples.values())
    rows = []
    for line in (folder / "functions.txt").read_text().splitlines():
        address, size, path, name = line.split()
        address, size = int(address, 16), int(size, 16)
        inside = {ip: n for ip, n in samples.items() if address <= ip < address + size}
        if inside:
            rows.append((sum(inside.values()), name, address, path, inside))
    kernel_share = sum(row[0] for row in rows)
    print(f"{total} samples, {100 * kernel_share / total:.1f} % in the kernel's functions "
          f"(the rest: numba's thread pool and runtime, the OS)")
    versions = collections.Counter()
    for count, name, address, path, inside in sorted(rows, reverse=True):
        versions[name] += 1  # a function called with two argument types is compiled twice
        if versions[name] > 1:
            name = f"{name} (compiled version {versions[name]})"
        if count < 0.005 * total:
            continue
        instructions = _disassemble(address, path)
        loops = _loops(instructions, address)
        per_loop = collections.Counter()
        for ip, n in inside.items():
            containing = [loop for loop in loops if loop[0] <= ip <= loop[1] + 8]  # +8: a sample lands after the jump
            per_loop[min(containing, key=lambda loop: loop[1] - loop[0]) if containing else None] += n
        print(f"{100 * count / total:5.1f} %  {name}")
        for loop, n in per_loop.most_common(loops_per_function):
            if loop is None:
                print(f"    {100 * n / total:5.2f} %  outside loops")
                continue
            body = [text for ip, text in instructions if loop[0] <= ip <= loop[1]]
            print(f"    {100 * n / total:5.2f} %  loop at +{loop[0] - address:#07x}, {len(body):4d} instructions, "
                  f"{_vector_width(body)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("brain", "dense"), default="brain")
    parser.add_argument("--step", type=int, default=60, help="which solver step's kernel call to replay (default 60)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to sample (default 20 s)")
    parser.add_argument("--loops", type=int, default=6, help="loops printed per function (default 6)")
    parser.add_argument("--child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.case, args.step, args.seconds + 5.0)
        return
    for tool, package in (("perf", "linux-perf"), ("objdump", "binutils")):
        if shutil.which(tool) is None:
            raise SystemExit(f"`{tool}` is not installed; this profile needs it (Debian: apt-get install {package})")
    import perf_common as pc

    folder = Path(tempfile.mkdtemp(prefix="anatomydt_profile_"))
    environment = dict(os.environ, NUMBA_CACHE_DIR=str(folder / "numba_cache"))
    process = subprocess.Popen([sys.executable, __file__, "--child", str(folder), "--case", args.case,
                                "--step", str(args.step), "--seconds", str(args.seconds)], env=environment)
    while not (folder / "ready").exists():
        if process.poll() is not None:
            raise SystemExit(f"the profiled process ended early (exit code {process.returncode})")
        time.sleep(0.5)
    data = folder / "perf.data"
    recorded = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-p", str(process.pid),
                               "-o", str(data), "--", "sleep", str(args.seconds)], capture_output=True, text=True)
    process.wait()
    if recorded.returncode != 0 or not data.exists():
        raise SystemExit(f"perf record failed: {recorded.stderr.strip()} (sampling another process needs root or "
                         "kernel.perf_event_paranoid <= 1)")
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip"], capture_output=True, text=True, check=True)
    samples = collections.Counter(int(line, 16) for line in script.stdout.split())
    calls, seconds = (folder / "calls").read_text().split()
    print(f"machine: {pc.machine_text()}; {pc.load_text()}")
    print(f"{args.case} case, kernel call of step {args.step} replayed {calls} times in {float(seconds):.1f} s "
          f"({1e3 * float(seconds) / int(calls):.2f} ms per call, two slabs)")
    report(folder, samples, args.loops)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
