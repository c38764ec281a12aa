"""Task recovery with lm-evaluation-harness on SmolLM2-135M-Instruct: W4 g64 and W3 g64, AWQ and RTN.

Each configuration is one `run_quantization` job with eval.tasks = the two bundled local tasks (awqforge_mc:
multiple choice, awqforge_cloze: next word; 560 examples each, built from awqforge/data/eval_en.txt, no
download), scored by the real lm_eval.simple_evaluate on the FP and the quantized model. The FP scores are
computed by the first job and reused by the others (the FP score cache, as the service does across jobs).
Printed per job and task: FP, quantized ± stderr, recovery; and the time task evaluation adds to the job as a
share of the job's wall time (the first job pays for the FP scores too).

    python bench/bench_tasks.py                 # every example (slow on a loaded CPU)
    python bench/bench_tasks.py --limit 100     # the first 100 examples of each task
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF checkpoint folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--methods", nargs="+", default=["rtn", "awq"], choices=["awq", "rtn"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--limit", type=int, help="examples per task (default: all 560)")
    ap.add_argument("--n-samples", type=int, default=32, help="AWQ calibration sequences")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    ap.add_argument("--eval-max-seqs", type=int, default=4, help="perplexity windows of 1024 tokens")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--out", default="bench/results_tasks.json")
    args = ap.parse_args(argv)

    import torch

    from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
    from awqforge.pipeline import run_quantization
    from awqforge.spec import JobSpec
    from awqforge.tasks_eval import FPScoreCache, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        ckpt = Path(args.model)
    else:
        from awqforge.smollm import ensure_smollm2_checkpoint

        ckpt = ensure_smollm2_checkpoint()
    tasks = [{"name": "awqforge_mc", "limit": args.limit}, {"name": "awqforge_cloze", "limit": args.limit}]
    cache = FPScoreCache()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as work:
        for bits in args.bits:
            for method in args.methods:
                spec = JobSpec(
                    model=str(ckpt),
                    method=method,
                    quant={"bits": bits, "group_size": args.group_size},
                    calibration={
                        "source": f"file:{BUNDLED_CALIBRATION_TEXT}",
                        "n_samples": args.n_samples,
                        "seq_len": args.seq_len,
                    },
                    formats=["awq"] if bits == 4 else ["compressed-tensors"],
                    eval={"seq_len": 1024, "max_seqs": args.eval_max_seqs, "tasks": tasks, "prompts": []},
                    device="cpu",
                )
                t0 = time.perf_counter()
                result = run_quantization(
                    spec, Path(work) / f"w{bits}-{method}", fp_task_cache=cache, overwrite=True
                )
                wall = time.perf_counter() - t0
                ev = json.loads(result.report_path.read_text())["evaluation"]
                cost = ev["tasks_cost"]
                row = {
                    "bits": bits,
                    "method": method,
                    "group_size": args.group_size,
                    "limit": args.limit,
                    "job_wall_s": round(wall, 1),
                    "tasks_wall_s": cost["wall_s"],
                    "tasks_fp_s": cost["fp_s"],
                    "tasks_share": round(cost["wall_s"] / wall, 3),
                    "fp_cached": ev["fp_cache_used"],
                    "fp_perplexity": result.metrics.get("fp_perplexity"),
                    "quant_perplexity": result.metrics.get("quant_perplexity"),
                    "tasks": ev["tasks"],
                }
                rows.append(row)
                Path(args.out).write_text(json.dumps({"model": str(ckpt), "rows": rows}, indent=2))
                print(
                    f"\nW{bits} g{args.group_size} {method.upper()}: job {wall:.0f} s, task evaluation "
                    f"{cost['wall_s']:.0f} s ({100 * row['tasks_share']:.0f}% of the job"
                    + (", FP scores from the cache" if ev["fp_cache_used"] else ", FP scores computed")
                    + f"), perplexity FP {row['fp_perplexity']:.3f} -> {row['quant_perplexity']:.3f}",
                    flush=True,
                )
                print(format_table(ev["tasks"]), flush=True)
    Path(args.out).write_text(json.dumps({"model": str(ckpt), "rows": rows}, indent=2))
    print(f"\n{'config':<14} {'task':<16} {'FP':>8} {'quantized':>18} {'recovery':>9} {'eval share':>11}")
    for r in rows:
        for t in r["tasks"]:
            q = f"{_f(t['quantized'])} ± {_f(t['stderr'])}"
            print(
                f"W{r['bits']} {r['method'].upper():<11} {t['task']:<16} {_f(t['fp']):>8} {q:>18} "
                f"{_f(t['recovery'], '.3f'):>9} {100 * r['tasks_share']:>10.0f}%"
            )
    print(f"results: {args.out}")
    return 0


def _f(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


if __name__ == "__main__":
    raise SystemExit(main())
