"""Kernel first use: from a fresh `pip install` to the first quantized forward, each step timed.

    python bench/bench_first_use.py                 # a new virtualenv under --work-dir, removed after
    python bench/bench_first_use.py --keep          # keep it (a second run then times a warm cache)

What a new user does, in a new virtualenv (no system site-packages) with an empty kernel cache
(AWQFORGE_EXTENSIONS_DIR points into the work folder): (1) `pip install torch==2.13.0` (the CPU build on this
machine's disk), (2) `pip install .` of this checkout (its dependencies from the package index), (3)
`awqforge kernels build` (what scripts/install.sh and the Dockerfile run), (4) a new process that imports
QuantLinear and runs its first forward at M = 1 on 11008x4096 (a Llama-7B MLP projection), then nine more: the
first call against the steady state. Then the same first forward in a process whose cache was left empty (no
build at install): QuantLinear runs the pure-torch reference path and warns, which is what the build at install
avoids. Pip's steps depend on the network and the disk, the build on the compiler and the cores: the figures
are this machine's, once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FIRST_FORWARD = r"""
import json, time
t0 = time.perf_counter()
import torch
from awqforge.qlinear import QuantLinear
torch.set_num_threads(1)
lin = torch.nn.Linear(4096, 11008, bias=False)
q = QuantLinear.from_linear(lin, bits=4, group_size=128, zero_point=True)
t_import = time.perf_counter() - t0
x = torch.randn(1, 4096)
t1 = time.perf_counter(); q(x); first = time.perf_counter() - t1
times = []
for _ in range(9):
    t = time.perf_counter(); q(x); times.append(time.perf_counter() - t)
from awqforge.kernels import cpu
print(json.dumps({"setup_s": t_import, "first_s": first, "steady_s": min(times),
                  "kernel": cpu.built_binary() is not None}))
"""


def timed(cmd: list[str], env: dict, cwd: Path | None = None) -> tuple[float, str]:
    """(seconds, stdout) of a command that must succeed."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return dt, r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/awqforge-first-use"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.work_dir
    venv, cache, empty = work / "venv", work / "kernels", work / "kernels-empty"
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(AWQFORGE_EXTENSIONS_DIR=str(cache), OMP_NUM_THREADS="1")
    py = venv / "bin" / "python"
    steps: dict[str, float] = {}
    if not py.exists():
        steps["venv"] = timed([sys.executable, "-m", "venv", str(venv)], env)[0]
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        steps["pip install torch==2.13.0"] = timed([*pip, "torch==2.13.0"], env)[0]
        steps["pip install . (awqforge, its dependencies)"] = timed([*pip, "."], env, cwd=REPO)[0]
    awqforge = str(venv / "bin" / "awqforge")
    steps["awqforge kernels build"], out = timed([awqforge, "kernels", "build"], env, cwd=work)
    dt, out = timed([str(py), "-c", FIRST_FORWARD], env, cwd=work)
    first = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(empty, ignore_errors=True)
    _, out_ref = timed(
        [str(py), "-c", FIRST_FORWARD], {**env, "AWQFORGE_EXTENSIONS_DIR": str(empty)}, cwd=work
    )
    ref = json.loads(out_ref.strip().splitlines()[-1])
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((x.split(":", 1)[1].strip() for x in lscpu.splitlines() if x.startswith("Model name")), "?")
    print(f"CPU: {model}, {os.cpu_count()} logical CPUs; one thread for the forwards")
    print(f"{'step':<48} {'seconds':>9}")
    for name, s in steps.items():
        print(f"{name:<48} {s:>9.1f}")
    print(f"{'first forward process (import, pack, 10 calls)':<48} {dt:>9.1f}")
    print(
        f"\nfirst QuantLinear forward at M=1 (11008x4096): {first['first_s'] * 1e3:.1f} ms, then "
        f"{first['steady_s'] * 1e3:.2f} ms (kernel loaded from the cache: {first['kernel']}); "
        f"layer setup {first['setup_s']:.1f} s"
    )
    print(
        f"without the build at install (empty cache): first {ref['first_s'] * 1e3:.1f} ms, then "
        f"{ref['steady_s'] * 1e3:.2f} ms, kernel: {ref['kernel']} "
        f"({ref['steady_s'] / first['steady_s']:.0f}x the kernel's steady time)"
    )
    total = sum(steps.values()) + dt
    print(f"fresh install to the first quantized forward: {total:.0f} s in all")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
