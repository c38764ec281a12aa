"""Task recovery with lm-evaluation-harness on SmolLM2-135M-Instruct: W4 g64 and W3 g64, AWQ and RTN.

Each configuration is one `run_quantization` job with eval.tasks = the two bundled local tasks (awqforge_mc:
multiple choice, awqforge_cloze: next word; 560 examples each, built from awqforge/data/eval_en.txt, no
download), scored by the real lm_eval.simple_evaluate on the FP and the quantized model. The FP scores are
computed by the first job and reused by the others (the FP score cache, as the service does across jobs).
Printed per job and task: FP, quantized ± stderr, recovery; and the time task evaluation adds to the job as a
share of the job's wall time (the first job pays for the FP scores too).

    python bench/bench_tasks.py                 # every example (slow on a loaded CPU)
    python bench/bench_tasks.py --limit 100     # the first 100 examples of each task
    python bench/bench_tasks.py --api --limit 60   # the same jobs through the HTTP API, then a gated one

--api starts `awqforge serve` on its embedded defaults (SQLite, a filesystem broker, one worker child) in a
fresh AWQFORGE_HOME, submits each configuration with POST /v1/jobs, reads GET /v1/jobs/{id}/metrics (the FP
scores of the first job come from the service's cache for the others), and ends with the first configuration
again under `--gate`, which it is expected to fail: the job ends failed at stage "gate" with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
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
    ap.add_argument("--api", action="store_true", help="through the HTTP API of an embedded `awqforge serve`")
    ap.add_argument(
        "--gate",
        default='{"min_avg_recovery": 0.95, "max_perplexity_increase": 0.1}',
        help="with --api: eval.gate of the last, gated job (JSON)",
    )
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
    if args.api:
        return _via_api(args, ckpt, tasks)
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


def _via_api(args, ckpt: Path, tasks: list[dict]) -> int:
    import httpx

    from awqforge.calibration import BUNDLED_CALIBRATION_TEXT

    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-tasks-api-") as home,
        _embedded(Path(home), [ckpt.parent, Path(BUNDLED_CALIBRATION_TEXT).parent], args.threads) as (
            url,
            key,
        ),
    ):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        configs = [(b, m, None) for b in args.bits for m in args.methods]
        configs.append((*configs[0][:2], json.loads(args.gate)))  # the first one again, gated
        for bits, method, gate in configs:
            body = {
                "model": str(ckpt),
                "method": method,
                "bits": bits,
                "group_size": args.group_size,
                "calibration": {
                    "source": f"file:{BUNDLED_CALIBRATION_TEXT}",
                    "n_samples": args.n_samples,
                    "seq_len": args.seq_len,
                },
                "formats": ["awq"] if bits == 4 else ["compressed-tensors"],
                "eval": {"seq_len": 1024, "max_seqs": args.eval_max_seqs, "tasks": tasks, "prompts": []}
                | ({"gate": gate} if gate else {}),
                "device": "cpu",
            }
            r = client.post("/v1/jobs", json=body)
            if r.status_code != 202:
                print(f"submit refused: {r.status_code} {r.text}", file=sys.stderr)
                return 1
            job_id = r.json()["id"]
            while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
                time.sleep(2)
            m = client.get(f"/v1/jobs/{job_id}/metrics").json()
            # what task evaluation cost this job: the quantized runs, and the FP runs it did not take from the cache
            tasks_s = sum(
                (t["quantized_s"] or 0) + (0 if t["fp_cached"] else t["fp_s"] or 0) for t in m["tasks"]
            )
            row = {
                "bits": bits,
                "method": method,
                "group_size": args.group_size,
                "limit": args.limit,
                "gate": gate,
                "job_id": job_id,
                "status": job["status"],
                "stage": job["stage"],
                "error": job["error"],
                "job_total_s": m["total_s"],
                "tasks_s": round(tasks_s, 1),
                "tasks_share": round(tasks_s / m["total_s"], 3) if m["total_s"] else None,
                "fp_perplexity": m["fp_perplexity"],
                "quant_perplexity": m["quant_perplexity"],
                "tasks": m["tasks"],
            }
            rows.append(row)
            Path(args.out).write_text(json.dumps({"model": str(ckpt), "api": url, "rows": rows}, indent=2))
            print(
                f"\nAPI job {job_id} W{bits} g{args.group_size} {method.upper()}"
                + (f" gate {json.dumps(gate)}" if gate else "")
                + f": {job['status']} (stage {job['stage']}), job {m['total_s'] or 0:.0f} s, task evaluation "
                f"{tasks_s:.0f} s" + (f" ({100 * row['tasks_share']:.0f}%)" if row["tasks_share"] else ""),
                flush=True,
            )
            if job["error"]:
                print(f"  error: {job['error']}", flush=True)
            for t in m["tasks"]:
                print(
                    f"  {t['task']:<16} {t['metric']} FP {_f(t['fp'])} quantized {_f(t['quantized'])} ± "
                    f"{_f(t['stderr'])} recovery {_f(t['recovery'], '.3f')}"
                    + (" (FP cached)" if t["fp_cached"] else ""),
                    flush=True,
                )
    print(f"results: {args.out}")
    ok = [r["status"] for r in rows[:-1]] == ["succeeded"] * (len(rows) - 1)
    return 0 if ok and (rows[-1]["status"], rows[-1]["stage"]) == ("failed", "gate") else 1


@contextlib.contextmanager
def _embedded(home: Path, roots: list[Path], threads: int):
    """`awqforge serve` on its embedded defaults (no DATABASE_URL / REDIS_URL) in `home`: (url, API key)."""
    import socket

    import httpx

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "BROKER_URL")}
    env.update(
        AWQFORGE_HOME=str(home),
        ALLOWED_LOCAL_ROOTS=os.pathsep.join(str(r) for r in roots),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    run = [sys.executable, "-m", "awqforge"]
    key = subprocess.run(
        [*run, "keys", "create", "--tenant", "bench"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = home / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*run, "serve", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "awqforge serve did not start:\n" + log.read_text(errors="replace")[-3000:]
                )
            time.sleep(1)
        print(f"embedded service on {url} (AWQFORGE_HOME {home})", flush=True)
        yield url, key
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _f(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


if __name__ == "__main__":
    raise SystemExit(main())
