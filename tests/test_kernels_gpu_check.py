"""scripts/gpu-check.sh and the pure-Python parts of scripts/gpu_check.py, on a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


def test_junit_counts_of_a_real_pytest_run(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_skipped(): pass\n"
    )
    _, counts = gpu_check.run_pytest(["test_sample.py"], tmp_path, timeout=60)
    assert counts == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1}


def row(shape, m, speedup):
    return {"shape": shape, "m": m, "speedup": speedup}


def test_targets_and_summary():
    rows = [row("11008x4096", 1, 3.2), row("11008x4096", 16, 1.5), row("11008x4096", 256, 0.9)]
    targets = gpu_check.check_targets(rows)
    assert [(t["m"], t["target"], t["met"]) for t in targets] == [(1, 3.0, True), (16, 2.0, False)]
    tests = {"tests": 10, "failures": 0, "errors": 0, "skipped": 1}
    summary = gpu_check.summarize({"gpu": "x"}, tests, rows, None, {}, 12.34)
    assert summary["ok"] and not summary["targets_met"] and summary["seconds"] == 12.3
    failed = gpu_check.summarize({}, {**tests, "failures": 1}, rows, None, {}, 1.0)
    assert not failed["ok"]
    assert not gpu_check.summarize({}, tests, rows, None, {"quantize": "boom"}, 1.0)["ok"]
    json.dumps(summary)  # the summary is plain JSON


def test_quantize_summary_reads_the_named_report(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"metrics": {"ppl_fp": 10.0, "ppl_quant": 10.5}}))
    out = f"artifact (awq): {tmp_path}/awq\nreport: {report}\n  ppl ...\n"
    assert gpu_check.quantize_summary(out) == {
        "report": str(report),
        "metrics": {"ppl_fp": 10.0, "ppl_quant": 10.5},
    }
    assert "error" in gpu_check.quantize_summary("no report here")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_a_gpu_the_script_says_so(tmp_path):
    bindir = tmp_path / "bin"  # a PATH with python and bash but no nvidia-smi
    bindir.mkdir()
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin", "PYTHON": sys.executable}
    if any((Path(d) / "nvidia-smi").exists() for d in ("/usr/bin", "/bin")):
        pytest.skip("nvidia-smi is installed here")
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(tmp_path / "s.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2 and "nvidia-smi not found" in out.stderr
    assert not (tmp_path / "s.json").exists()
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(tmp_path / "s.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "no CUDA device" in out.stderr
