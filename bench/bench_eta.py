"""The plan's time estimate against the measured job, per stage, with the machine's own rate.

    python bench/bench_eta.py                                   # SmolLM2-135M, Gemma-3-270M- and MoE-shaped blocks
    python bench/bench_eta.py --models smollm2 --threads 2

For each model: the plan (awqforge.plan) at the device kind's default rate and at the rate measured here by
timing one block (awqforge.timing.measure_rate, what `awqforge plan --measure` does), then the job itself
(run_quantization with the default settings: W4 g64 written in the default formats, evaluation on), in this
process, on --threads threads. Printed per stage: the estimate at the measured rate, the measured seconds and
their ratio (issue 21's target: within 1.5x), and the default-rate estimate beside it. The measuring itself is
timed too: it is what a job would spend on it. Calibration: the job default (128 samples of 512 tokens) of the
bundled text (the default source, pileval, is read from the Hub), which holds fewer (32 with SmolLM2's tokenizer): the job uses what there is, and the plan counts
the rows the job will use, as `awqforge plan` does (awqforge.timing.settings_as_run), not the 128 asked for;
likewise the evaluation windows of the built-in text (fewer than the default 16 of 2048 tokens).
Models: the converted SmolLM2-135M-Instruct checkpoint (all 30
blocks) and random-init checkpoints of bench_speed.py's shapes (`gemma3-640`: Gemma-3-270M's block, 4 blocks;
`qwen3_moe-768`: 16 experts, 2 blocks, written as symmetric compressed-tensors: the AWQ format alone is refused
for MoE models), with SmolLM2's tokenizer and vocabulary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed  # noqa: E402
import common  # noqa: E402

MODELS = {
    "smollm2": None,
    "gemma3-640": ("gemma3_text", 4),
    "qwen3_moe-768": ("qwen3_moe", 2),
}
MOE = {"qwen3_moe-768"}  # written as compressed-tensors, symmetric: what transformers loads for MoE


def checkpoint(name: str, work: Path) -> Path:
    if MODELS[name] is None:
        from awqforge.smollm import ensure_smollm2_checkpoint

        return ensure_smollm2_checkpoint()
    family, layers = MODELS[name]
    return bench_speed.random_checkpoint(family, name, layers, work / f"{family}-{name}-{layers}l")


def one(name: str, work: Path) -> dict:
    from transformers import AutoTokenizer

    from awqforge.pipeline import run_quantization
    from awqforge.plan import plan, read_config
    from awqforge.spec import JobSpec
    from awqforge.timing import measure_forward_rate, measure_rate, settings_as_run

    ckpt = checkpoint(name, work)
    # the job defaults otherwise; the bundled text, since pileval (the default source) needs the Hub
    quant, extra = {"bits": 4, "group_size": 64}, {}
    if name in MOE:  # the AWQ format alone is refused for MoE models (arch.check_format_support)
        quant["zero_point"], extra["formats"] = False, ["compressed-tensors"]
    spec = JobSpec(model=str(ckpt), quant=quant, calibration={"source": "bundled"}, **extra)
    config = read_config(ckpt)
    # what `awqforge plan` counts: the calibration rows and evaluation windows the job will use
    settings, _ = settings_as_run(spec, AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=False))
    default = plan(config, settings, device="cpu")
    t0 = time.perf_counter()
    rate, block_s = measure_rate(config, settings, "cpu")
    measure_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fwd_rate, _ = measure_forward_rate(config, settings, "cpu")
    measure_s += time.perf_counter() - t0
    measured_plan = plan(config, settings, device="cpu", flops_rate=rate, forward_rate=fwd_rate)
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    with common.Timer() as t:
        result = run_quantization(spec, out)
    shutil.rmtree(out, ignore_errors=True)
    stages = {k: v for k, v in result.metrics["wall_time_s"].items() if isinstance(v, (int, float))}
    return {
        "model": name,
        "rate_gflops": rate / 1e9,
        "forward_gflops": fwd_rate / 1e9,
        "block_s": block_s,
        "measure_s": measure_s,
        "estimate": measured_plan.est_seconds_by_stage,
        "estimate_default": default.est_seconds_by_stage,
        "measured": stages,
        "wall_s": t.s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "awqforge-bench" / "eta")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    common.set_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        r = one(name, args.work_dir)
        rows.append(r)
        print(
            f"\n== {name}: one block timed in {r['block_s']:.1f} s ({r['rate_gflops']:.1f} GFLOP/s by the plan's "
            f"count; forward {r['forward_gflops']:.1f} GFLOP/s; measuring took {r['measure_s']:.1f} s), job {r['wall_s']:.1f} s, {args.threads} thread(s)"
        )
        print(
            f"{'stage':<12} {'estimate s':>11} {'measured s':>11} {'est/meas':>9} {'default-rate est s':>19}"
        )
        for stage, est in r["estimate"].items():
            meas = r["measured"].get(stage)
            ratio = f"{est / meas:>9.2f}" if meas else f"{'-':>9}"
            meas_s = f"{meas:>11.1f}" if meas is not None else f"{'-':>11}"
            print(f"{stage:<12} {est:>11.1f} {meas_s} {ratio} {r['estimate_default'][stage]:>19.1f}")
        total_est = sum(r["estimate"].values())
        total_meas = sum(r["measured"].get(s, 0.0) for s in r["estimate"])
        print(f"{'total':<12} {total_est:>11.1f} {total_meas:>11.1f} {total_est / total_meas:>9.2f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
