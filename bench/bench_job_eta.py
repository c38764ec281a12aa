"""The running job's ETA against the time the job then actually takes (SmolLM2-135M, the default job).

    python bench/bench_job_eta.py            # one thread; pin it with taskset for a quiet core

The default job (W4 g64, GPTQ rounding, evaluation on) on the bundled text, in this process. Every progress
event's `eta_s` is recorded with its time; printed for a few points (after blocks 1, 5, 15 and the last, and
after the evaluation's first FP block): the ETA, the seconds the job then ran to its end, and their ratio.
The ETA is the whole job's (awqforge/pipeline.py): the blocks left at their pace, then the plan's later stages
at the rate the blocks showed.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> int:
    from awqforge.pipeline import run_quantization
    from awqforge.smollm import ensure_smollm2_checkpoint
    from awqforge.spec import JobSpec

    common.set_threads(1)
    ckpt = ensure_smollm2_checkpoint()
    spec = JobSpec(model=str(ckpt), quant={"bits": 4, "group_size": 64}, calibration={"source": "bundled"})
    out = Path.home() / ".cache" / "awqforge-bench" / "job-eta"
    shutil.rmtree(out, ignore_errors=True)
    events = []
    run_quantization(spec, out, progress=lambda e: events.append((time.perf_counter(), e)))
    end = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    n_blocks = max((e.n_blocks or 0) for _, e in events)
    points = {1, 5, 15, n_blocks}
    print(f"{'at':<34} {'ETA s':>8} {'actual s':>9} {'ETA/actual':>11}")
    for t, e in events:
        first_fp = e.stage == "evaluate" and "FP pass, block 1/" in e.message
        if e.eta_s is None or not ((e.stage == "quantize" and e.block in points) or first_fp):
            continue
        actual = end - t
        print(f"{e.message:<34} {e.eta_s:>8.1f} {actual:>9.1f} {e.eta_s / actual:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
