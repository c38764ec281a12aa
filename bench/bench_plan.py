"""The memory plan (awqforge/plan.py) against the measured peak of the quantize stage, on CPU.

    python bench/bench_plan.py                       # Llama-7B and Llama-70B block shapes, 2 blocks each
    python bench/bench_plan.py --shapes 7b --n-samples 16 --seq-len 128

Checkpoints are random-init bf16 safetensors with the real block shapes (2 decoder layers), written one
layer per shard (bench_memory.write_checkpoint). Each run is one run_quantization in a child process with
the same settings the plan is given (evaluation off: the plan's quantize peak is what is compared). The
child samples its own RSS every few milliseconds; the measured figure is the peak RSS during the quantize
stage minus the RSS at the start of the job (torch and the libraries already imported), with glibc told
to map every large block on its own (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS. A shape
whose plan does not fit the RAM available now is printed with its plan and marked "not measured".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_memory  # noqa: E402
import common  # noqa: E402

GIB = 1024**3
# hidden, intermediate, heads, kv heads (Llama-2-7B; Llama-2/3-70B)
SHAPES = {"7b": (4096, 11008, 32, 32), "70b": (8192, 28672, 64, 8)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec_json: str, out_dir: str) -> int:
    """Inside the measured process: run the job, sample RSS, report the quantize stage's peak growth."""
    from awqforge.pipeline import run_quantization
    from awqforge.spec import JobSpec

    spec = JobSpec.model_validate_json(spec_json)
    state = {"stage": None, "peak": 0, "stop": False}
    base = _rss()

    def sample() -> None:
        while not state["stop"]:
            if state["stage"] == "quantize":
                state["peak"] = max(state["peak"], _rss())
            time.sleep(0.002)

    def progress(ev) -> None:
        if ev.stage != state["stage"]:
            print(
                f"{time.strftime('%H:%M:%S')} {ev.stage} rss {_rss() / GIB:.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
        state["stage"] = ev.stage

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with common.Timer() as t:
        result = run_quantization(spec, out_dir, progress=progress)
    state["stop"] = True
    sampler.join()
    common.emit_json(
        {
            "base_rss_bytes": base,
            "quantize_peak_growth_bytes": state["peak"] - base,
            "quantize_s": result.metrics["wall_time_s"].get("quantize"),
            "wall_s": t.s,
        }
    )
    return 0


def spec_for(ckpt: Path, args):
    from awqforge.spec import JobSpec

    return JobSpec(
        model=str(ckpt),
        quant={"bits": 4, "group_size": 128},
        calibration={"source": f"file:{args.calib}", "n_samples": args.n_samples, "seq_len": args.seq_len},
        formats=["awq"],
        eval={"enabled": False},
        device="cpu",
        n_grid=args.n_grid,
        rounding=args.rounding,
    )


def measure(spec, out_dir: Path, log_path: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": "1048576"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec.model_dump_json(), str(out_dir)]
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed (exit {proc.returncode}); see {log_path}")
    return common.parse_emitted(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"))
    p.add_argument("--shapes", nargs="+", default=["7b", "70b"], choices=sorted(SHAPES))
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-grid", type=int, default=4)
    p.add_argument("--rounding", default="nearest", choices=["nearest", "gptq"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "awqforge-bench" / "plan")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)

    from awqforge.plan import JobSettings, describe, plan

    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.calib = args.work_dir / "calib.txt"
    args.calib.write_text(common.read_texts(common.CALIB_FILES))
    tok_dir = bench_memory._tokenizer_dir()
    rows = []
    for name in args.shapes:
        hidden, inter, heads, kv = SHAPES[name]
        cfg = bench_memory.llama_config(hidden, inter, 2, heads, kv, 49152)
        spec = spec_for(Path("/dev/null"), args)
        pl = plan(cfg, JobSettings.from_spec(spec), device="cpu")
        print(
            f"== Llama-{name} block shapes, 2 blocks, {args.n_samples} x {args.seq_len} tokens ==", flush=True
        )
        print(describe(pl), flush=True)
        row = {"shape": name, "plan_bytes": pl.quantize_peak_bytes, "transient": pl.transient}
        free = bench_memory.free_ram_bytes()
        if pl.quantize_peak_bytes + 2 * GIB > free:
            print(
                f"not measured: the plan needs {pl.quantize_peak_bytes / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
            )
            row["measured_bytes"] = None
            rows.append(row)
            continue
        ckpt = bench_memory.write_checkpoint(args.work_dir / f"llama-{name}-2l", cfg, tok_dir)
        spec = spec_for(ckpt, args)
        out = args.work_dir / f"out-{name}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        r = measure(spec, out, args.work_dir / f"{name}.log", args.threads)
        shutil.rmtree(out, ignore_errors=True)
        row.update(measured_bytes=r["quantize_peak_growth_bytes"], quantize_s=r["quantize_s"])
        row["ratio"] = row["plan_bytes"] / row["measured_bytes"]
        row["est_quantize_s"] = pl.est_seconds_by_stage["quantize"]
        print(
            f"plan {row['plan_bytes'] / GIB:.2f} GiB, measured {row['measured_bytes'] / GIB:.2f} GiB, "
            f"plan/measured {row['ratio']:.2f}; quantize {row['quantize_s']:.0f} s "
            f"(estimate {row['est_quantize_s']:.0f} s)",
            flush=True,
        )
        rows.append(row)
    print("\nshape  plan GiB  measured GiB  plan/measured  quantize s  estimate s")
    for r in rows:
        if r["measured_bytes"] is None:
            print(f"{r['shape']:>5} {r['plan_bytes'] / GIB:>9.2f}  not measured")
            continue
        print(
            f"{r['shape']:>5} {r['plan_bytes'] / GIB:>9.2f} {r['measured_bytes'] / GIB:>13.2f} "
            f"{r['ratio']:>14.2f} {r['quantize_s']:>11.0f} {r['est_quantize_s']:>11.0f}"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
