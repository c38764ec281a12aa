"""The steps of scripts/gpu-check.sh, and the JSON summary they add up to.

    python scripts/gpu_check.py OUT.json [--skip-tests] [--skip-quantize]

Steps (each bounded by a timeout so the whole run stays under 8 minutes on one GPU):
1. the CUDA tests: pytest on the kernel and QuantLinear tests (they run on the GPU when one is there);
2. the kernel benchmark against torch's fp16 matmul, M = 1, 16, 256 on 11008x4096 and 4096x11008;
3. `awqforge quantize` of SmolLM2-135M on --device cuda with evaluation (perplexity before/after).
A failed step is recorded in the summary (and makes the exit status 1); the others still run.
Targets checked: ours >= 3x fp16 at M = 1 and >= 2x at M = 16 (each shape).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = ["tests/test_kernels_triton.py", "tests/test_kernels_triton_aot.py", "tests/test_qlinear.py"]
TARGETS = {1: 3.0, 16: 2.0}  # M -> speed-up over fp16 matmul the kernel should reach


def junit_counts(xml_text: str) -> dict[str, int]:
    """Totals of a pytest --junitxml report."""
    root = ET.fromstring(xml_text)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def run_pytest(paths: list[str], cwd: Path, timeout: int) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run pytest on `paths`; its process and the totals of its junit report (None if it wrote none)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *paths]
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return proc, junit_counts(xml.read_text()) if xml.is_file() else None


def check_targets(rows: list[dict]) -> list[dict]:
    """One entry per (shape, M) with a target: the measured speed-up and whether it is met."""
    out = []
    for r in rows:
        target = TARGETS.get(r["m"])
        if target is not None:
            out.append(
                {
                    "shape": r["shape"],
                    "m": r["m"],
                    "speedup": r["speedup"],
                    "target": target,
                    "met": r["speedup"] >= target,
                }
            )
    return out


def quantize_summary(stdout: str) -> dict:
    """The report JSON `awqforge quantize` names on its `report: PATH` line (metrics only)."""
    match = re.search(r"^report: (.+)$", stdout, re.M)
    if not match:
        return {"error": "no 'report:' line in the quantize output"}
    report = json.loads(Path(match.group(1).strip()).read_text())
    return {"report": match.group(1).strip(), "metrics": report.get("metrics", report)}


def summarize(
    env: dict,
    tests: dict | None,
    bench: list[dict] | None,
    quantize: dict | None,
    errors: dict[str, str],
    seconds: float,
) -> dict:
    targets = check_targets(bench or [])
    ok = not errors and bool(tests) and tests.get("failures", 1) == 0 and tests.get("errors", 1) == 0
    return {
        "environment": env,
        "tests": tests,
        "kernel_benchmark": bench,
        "targets": targets,
        "targets_met": bool(targets) and all(t["met"] for t in targets),
        "quantize": quantize,
        "errors": errors,
        "ok": ok,
        "seconds": round(seconds, 1),
    }


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="where the JSON summary goes")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-quantize", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device", file=sys.stderr)
        return 2
    start = time.time()
    env = {
        "gpu": torch.cuda.get_device_name(0),
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    errors: dict[str, str] = {}
    tests = bench = quantize = None
    if not args.skip_tests:
        try:
            proc, tests = run_pytest(CUDA_TESTS, ROOT, timeout=180)
            if proc.returncode != 0:
                errors["tests"] = proc.stdout[-3000:]
        except subprocess.TimeoutExpired:
            errors["tests"] = "timed out after 180 s"
    try:
        sys.path.insert(0, str(ROOT / "bench"))
        import bench_kernels

        bench = bench_kernels.bench_gpu(bench_kernels.SHAPES, [1, 16, 256], rounds=3)
    except Exception as exc:  # recorded in the summary: the other steps still report
        errors["kernel_benchmark"] = f"{type(exc).__name__}: {exc}"
    if not args.skip_quantize:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                model = _run([sys.executable, "-m", "awqforge", "smollm"], timeout=120).stdout.strip()
                proc = _run(
                    [
                        sys.executable,
                        "-m",
                        "awqforge",
                        "quantize",
                        model,
                        "--out",
                        tmp,
                        "--device",
                        "cuda",
                        "--n-samples",
                        "64",
                        "--seq-len",
                        "512",
                        "--eval-max-seqs",
                        "16",
                    ],
                    timeout=240,
                )
                if proc.returncode == 0:
                    quantize = quantize_summary(proc.stdout)
                else:
                    errors["quantize"] = proc.stderr[-3000:]
            except subprocess.TimeoutExpired:
                errors["quantize"] = "timed out"
    summary = summarize(env, tests, bench, quantize, errors, time.time() - start)
    if args.skip_tests:
        summary["ok"] = not errors
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(
        json.dumps(
            {k: summary[k] for k in ("environment", "targets", "targets_met", "ok", "seconds")}, indent=2
        )
    )
    print(f"summary: {args.out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
