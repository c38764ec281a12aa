"""No slow path by surprise: the CLI and a worker build the CPU kernel before any work, a job never compiles,
and without a working compiler `doctor`, the job's report and its model card say the reference path ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
from awqforge.kernels import cpu

REPO = Path(__file__).resolve().parents[1]


def _fake_compiler(tmp_path: Path) -> Path:
    """A C++ compiler that exists but fails (a broken toolchain): the build is tried, announced, and fails fast."""
    cxx = tmp_path / "bin" / "c++"
    cxx.parent.mkdir(parents=True, exist_ok=True)
    cxx.write_text("#!/bin/sh\necho 'fake compiler: broken toolchain' >&2\nexit 1\n")
    cxx.chmod(0o755)
    return cxx


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "AWQFORGE_EXTENSIONS_DIR": str(tmp_path / "ext"), "PYTHONPATH": str(REPO)}
    env.pop("AWQFORGE_KERNELS_JIT", None)
    env.update(extra)
    return env


def _quantize(ckpt: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = [
        "quantize", str(ckpt), "--out", str(out), "--group-size", "64", "--calib",
        f"file:{BUNDLED_CALIBRATION_TEXT}", "--n-samples", "4", "--seq-len", "32", "--n-grid", "4",
        "--device", "cpu", "--eval-seq-len", "32", "--eval-max-seqs", "1", "--format", "awq",
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "awqforge", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_cli_tries_the_build_first_and_a_failed_build_is_in_the_report_and_card(tiny_checkpoint, tmp_path):
    """Empty cache, a compiler that fails: `quantize` announces the build with one line before any work,
    warns, runs the job on the reference path, and the report and model card say so."""
    env = _env(tmp_path, CXX=str(_fake_compiler(tmp_path)))
    proc = _quantize(tiny_checkpoint("llama"), tmp_path / "out", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    announce = [
        i for i, ln in enumerate(lines) if ln.startswith("awqforge: building the AWQForge CPU kernel")
    ]
    assert len(announce) == 1 and announce[0] == 0, lines[:5]  # one line, before anything else
    assert "warning" in lines[1] and "reference" in lines[1]
    report = json.loads((tmp_path / "out" / "awq" / "quant_report.json").read_text())
    note = report["environment"]["cpu_kernel"]
    assert note.startswith("reference (pure torch, slow)") and "failed" in note
    card = (tmp_path / "out" / "awq" / "README.md").read_text()
    assert "reference (pure torch, slow)" in card
    assert not list((tmp_path / "ext").rglob("*.so"))


def test_without_a_compiler_the_reference_runs_and_doctor_says_so(tiny_checkpoint, tmp_path):
    env = _env(tmp_path, CXX=str(tmp_path / "no-such-c++"))
    proc = _quantize(tiny_checkpoint("llama"), tmp_path / "out", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "awqforge: building the AWQForge CPU kernel" not in proc.stderr  # nothing to build with
    assert "no C++ compiler found" in proc.stderr
    report = json.loads((tmp_path / "out" / "awq" / "quant_report.json").read_text())
    assert "no C++ compiler found" in report["environment"]["cpu_kernel"]
    doctor = subprocess.run(
        [sys.executable, "-m", "awqforge", "doctor"], capture_output=True, text=True, env=env, timeout=120
    )
    assert "reference (pure torch, slow)" in doctor.stdout and "C++ compiler: none" in doctor.stdout


def test_with_the_kernel_built_the_cli_says_nothing_and_the_report_names_it(tiny_checkpoint, tmp_path):
    cpu.load_extension(allow_build=True)  # the machine's cache (built at install, or here once)
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWQFORGE_KERNELS_JIT": "0"}
    proc = _quantize(tiny_checkpoint("llama"), tmp_path / "out", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "awqforge: building" not in proc.stderr and "reference" not in proc.stderr
    report = json.loads((tmp_path / "out" / "awq" / "quant_report.json").read_text())
    assert report["environment"]["cpu_kernel"].startswith("C++ kernel")
    assert "cpu_kernel" not in (tmp_path / "out" / "awq" / "README.md").read_text()


def _run_startup(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = (
        "import logging, os, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
        "from celery import signals\n"
        "from worker import tasks, startup\n"
        "assert any(r() is startup.prepare_cpu_kernel for _, r in signals.worker_init.receivers)\n"
        "signals.worker_init.send(sender=None)\n"  # what celery sends before the worker consumes
        "print('JIT=' + os.environ['AWQFORGE_KERNELS_JIT'])\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
        "print('triton blocked' if sys.modules.get('triton', 0) is None else 'triton importable')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.parametrize("broken", ["fails", "missing"])
def test_worker_start_up_tries_the_build_then_jobs_never_compile(tmp_path, broken):
    cxx = _fake_compiler(tmp_path) if broken == "fails" else tmp_path / "no-such-c++"
    out = _run_startup(_env(tmp_path, CXX=str(cxx), AWQFORGE_KERNELS_JIT="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "before taking jobs" in out.stdout
    assert ("failed" if broken == "fails" else "no C++ compiler found") in out.stdout
    assert "JIT=0" in out.stdout  # the pool child that runs jobs inherits it: load only, never compile
    assert "no torch" in out.stdout  # the worker's main process stays torch-free (fork before CUDA)


def test_worker_start_up_with_the_kernel_built(tmp_path):
    cpu.load_extension(allow_build=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)  # conftest's, for the Triton kernel tests; a worker has none
    out = _run_startup(env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CPU kernel ready" in out.stdout and "JIT=0" in out.stdout
    # no GPU here: the worker (and the pool children it forks) never imports triton, whose exit prints
    # `nanobind: leaked ...` lines
    assert "triton blocked" in out.stdout or _has_gpu()


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def test_a_job_process_never_compiles(tmp_path):
    """JIT=0 (a worker's job): an empty cache means the reference path, with no compiler started."""
    env = _env(tmp_path, CXX=str(_fake_compiler(tmp_path)), AWQFORGE_KERNELS_JIT="0")
    code = (
        "import torch, torch.nn as nn\n"
        "from awqforge.qlinear import QuantLinear, cpu_reference_reason\n"
        "layer = QuantLinear.from_linear(nn.Linear(64, 32), group_size=32)\n"
        "layer(torch.randn(1, 64))\n"
        "print(cpu_reference_reason())\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout
    assert not (tmp_path / "ext").exists() or not list((tmp_path / "ext").rglob("*"))
