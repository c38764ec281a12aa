"""Worker start-up: the CPU kernel is ready before the worker takes a job, and a job never compiles.

`worker_init` fires in the worker's main process before it starts consuming: the kernel is built into the
cache there unless it is already (checked from the installed torch's package metadata:
awqforge.kernels.cache), by `awqforge kernels build --optional` in a subprocess, so this process never
imports torch (the pool child must fork before CUDA is initialised), with one log line before it compiles. Then
AWQFORGE_KERNELS_JIT=0 is set for the jobs (inherited by the pool child): a job only loads the built binary.
Without a compiler the build says why and the worker starts anyway; its jobs run the reference path, and
`awqforge doctor`, each job's report (environment.cpu_kernel) and model card say so.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

from celery import signals

log = logging.getLogger("awqforge.worker")
BUILD_TIMEOUT_S = 1800


def build_cpu_kernel() -> tuple[bool, str]:
    """Build (or find) the CPU kernel in the cache; (ready, what the build said). Never raises."""
    cmd = [sys.executable, "-m", "awqforge", "kernels", "build", "--optional"]
    env = {**os.environ, "AWQFORGE_KERNELS_JIT": "1"}
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"awqforge kernels build did not finish: {exc}"
    said = "\n".join(s for s in (out.stderr.strip(), out.stdout.strip()) if s)
    return out.returncode == 0 and "CPU kernel ready" in out.stdout, said


@signals.worker_init.connect
def prepare_cpu_kernel(**_kw: Any) -> None:
    from awqforge.cli import skip_triton_without_cuda
    from awqforge.kernels.cache import installed_binary  # torch-free: the cache key from package metadata

    # Without a GPU no job runs Triton, and triton (imported by torch._dynamo only to probe for it) prints
    # `nanobind: leaked ...` lines at exit: the pool children forked from here inherit the block.
    skip_triton_without_cuda()

    if os.environ.get("AWQFORGE_KERNELS", "1") != "0":
        binary = installed_binary()
        if binary is not None:
            log.info("worker start-up: CPU kernel ready: %s", binary)
        else:
            log.info("worker start-up: building the CPU kernel into the cache before taking jobs")
            ready, said = build_cpu_kernel()
            (log.info if ready else log.warning)("worker start-up: %s", said)
    os.environ["AWQFORGE_KERNELS_JIT"] = "0"  # the jobs (the pool child inherits it) never compile
