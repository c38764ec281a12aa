"""The C++ CPU kernel against the pure-torch reference, every ISA path, and its build cache.

Tolerances (max abs error / max |reference|): fp32 activations 2e-4 (the SIMD tile paths round x
to int16 per group, step max|x|/32767; the scalar and panel paths stay within 2e-5); bf16/fp16
activations 1e-2 (the output is rounded to 8/11 bits, as the reference's is).
The first test session compiles the extension (~40 s, once per machine); later ones load it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from awqforge import packing
from awqforge.kernels import cpu
from awqforge.kernels.reference import reference_linear
from awqforge.quant import quantize_tensor

# (N, K, group_size): odd N, K a multiple of the group, per-channel (-1) with odd K/2
SHAPES = [(33, 64, 32), (96, 256, 64), (40, 384, 128), (17, 70, -1), (64, 128, -1)]
BATCHES = [1, 3, 17, 64]
TOL = {torch.float32: 2e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def available_isas() -> list[str]:
    best = cpu.ISAS[cpu.best_isa()]
    return [name for name, level in cpu.ISAS.items() if level <= best]


@pytest.fixture(scope="module")
def ext():
    return cpu.load_extension(allow_build=True)  # built by scripts/install.sh; compiled here otherwise


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()


@pytest.mark.parametrize("n,k,group_size", SHAPES)
def test_matches_reference(ext, n, k, group_size):
    torch.manual_seed(n * k)
    qt = quantize_tensor(torch.randn(n, k), 4, group_size)
    layout = packing.pack_cpu_w4(qt)
    g = k if group_size == -1 else group_size
    bias = torch.randn(n)
    for m in BATCHES:
        x32 = torch.randn(m, k)
        for dtype in (torch.float32, torch.bfloat16):
            x = x32.to(dtype)
            ref = reference_linear(x.float(), qt, bias)  # fp32 reference on the same inputs
            for isa in available_isas():
                for panel_min_m in (0, 1):  # register-tile path, decode-panel + sgemm path
                    y = cpu.w4_linear_cpu(
                        x, layout["qdata"], layout["params"], n, g, bias, isa=isa, panel_min_m=panel_min_m
                    )
                    assert y.dtype == dtype and y.shape == (m, n)
                    err = rel_err(y, ref)
                    assert err < TOL[dtype], (m, dtype, isa, panel_min_m, err)


def test_leading_dims_and_fp16(ext):
    qt = quantize_tensor(torch.randn(48, 128), 4, 32)
    layout = packing.pack_cpu_w4(qt)
    x = torch.randn(2, 5, 128).half()
    y = cpu.w4_linear_cpu(x, layout["qdata"], layout["params"], 48, 32)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float16
    assert rel_err(y, reference_linear(x.float(), qt)) < TOL[torch.float16]


def test_shape_errors_are_explained(ext):
    qt = quantize_tensor(torch.randn(32, 64), 4, 32)
    layout = packing.pack_cpu_w4(qt)
    with pytest.raises(RuntimeError, match="K="):
        cpu.w4_linear_cpu(torch.randn(1, 96), layout["qdata"], layout["params"], 32, 32)


def run_py(code: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )


def run_cli(args: list[str], env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return run_py(f"import sys; from awqforge.cli import main; sys.exit(main({args!r}))", env, timeout)


def test_build_is_cached(ext):
    """A second process loads the cached binary without compiling (a job never waits for a compiler)."""
    so = cpu.built_binary()
    assert so is not None and so.parent == cpu.build_dir()
    before = so.stat().st_mtime_ns
    code = "import time; from awqforge.kernels import cpu; t = time.time(); cpu.load_extension(); print(time.time() - t)"
    env = {**os.environ, "AWQFORGE_KERNELS_JIT": "0"}
    out = run_py(code, env)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 10  # a load, not a build (~1 min)
    assert so.stat().st_mtime_ns == before
    assert cpu.load_extension() is ext
    # `kernels build` on a built cache is a no-op that names the binary
    out = run_cli(["kernels", "build"], env)
    assert out.returncode == 0 and str(so) in out.stdout, out.stderr
    assert so.stat().st_mtime_ns == before


def test_cache_key_has_torch_version_and_source_hash(ext):
    d = cpu.build_dir()
    assert torch.__version__.replace("+", "_") in d.parent.name
    assert d.name.endswith(cpu.source_hash())
    assert d.parent.parent == cpu.cache_root()


def test_cache_lives_under_awqforge_home(monkeypatch, tmp_path):
    monkeypatch.delenv("AWQFORGE_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("AWQFORGE_HOME", str(tmp_path))
    assert cpu.cache_root() == tmp_path / "kernels"
    assert cpu.build_dir().is_relative_to(tmp_path / "kernels")


def test_not_built_uses_reference_with_warning_and_no_compile(tmp_path):
    """Empty cache, JIT not allowed: QuantLinear warns once and uses the reference; nothing is compiled."""
    env = {**os.environ, "AWQFORGE_EXTENSIONS_DIR": str(tmp_path / "ext"), "AWQFORGE_KERNELS_JIT": "0"}
    code = (
        "import warnings, torch, torch.nn as nn\n"
        "from awqforge.qlinear import QuantLinear\n"
        "layer = QuantLinear.from_linear(nn.Linear(64, 32), group_size=32)\n"
        "x = torch.randn(2, 64)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = layer(x); layer(x)\n"
        "msgs = [str(m.message) for m in w if 'kernel' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert torch.equal(y, layer.reference_forward(x))\n"
        "print(msgs[0])\n"
    )
    out = run_py(code, env)
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout and "awqforge kernels build" in out.stdout
    assert not list((tmp_path / "ext").rglob("*.o"))  # no compiler ran
    doctor = run_cli(["doctor"], env)
    assert doctor.returncode == 0, doctor.stderr
    assert "reference (pure torch, slow): the kernel is not built" in doctor.stdout


def test_no_compiler_is_explained(tmp_path):
    """CXX pointing nowhere: `kernels build` says so (exit 1, or 0 with --optional as install.sh runs it)."""
    env = {
        **os.environ,
        "AWQFORGE_EXTENSIONS_DIR": str(tmp_path / "ext"),
        "CXX": str(tmp_path / "no-such-c++"),
        "AWQFORGE_KERNELS_JIT": "0",
    }
    out = run_cli(["kernels", "build"], env)
    assert out.returncode == 1
    assert "no C++ compiler found" in out.stderr and "reference" in out.stderr
    out = run_cli(["kernels", "build", "--optional"], env)
    assert out.returncode == 0 and "warning: no C++ compiler found" in out.stderr
    doctor = run_cli(["doctor"], env)
    assert doctor.returncode == 0
    assert "install a C++ compiler, then run `awqforge kernels build`" in doctor.stdout
    assert "C++ compiler: none" in doctor.stdout
    # JIT allowed but no compiler: the process warns and runs the reference instead of failing
    env["AWQFORGE_KERNELS_JIT"] = "1"
    code = (
        "import warnings, torch, torch.nn as nn\n"
        "from awqforge.qlinear import QuantLinear\n"
        "layer = QuantLinear.from_linear(nn.Linear(64, 32), group_size=32)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    layer(torch.randn(1, 64))\n"
        "print([str(m.message) for m in w])\n"
    )
    out = run_py(code, env)
    assert out.returncode == 0, out.stderr
    assert "no C++ compiler found" in out.stdout


def test_doctor_names_the_cpu_path(ext):
    out = run_cli(["doctor"], dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert f"ISA: {cpu.best_isa()}" in out.stdout
    assert "path: C++ kernel" in out.stdout and "(built)" in out.stdout
    if not torch.cuda.is_available():
        assert "cuda: no CUDA device visible" in out.stdout
    capped = run_cli(["doctor"], {**os.environ, "AWQFORGE_CPU_ISA": "avx2"})
    if cpu.ISAS[cpu.best_isa()] >= cpu.ISAS["avx2"]:
        assert "ISA: avx2" in capped.stdout and "AVX2 integer tiles" in capped.stdout


def test_failed_build_says_why(tmp_path, monkeypatch):
    bad = tmp_path / "broken.cpp"
    bad.write_text("#error deliberately broken kernel source\n")
    monkeypatch.setattr(cpu, "_SOURCE", bad)
    monkeypatch.setattr(cpu, "_EXT_NAME", "awqforge_w4_cpu_broken_test")
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setenv("AWQFORGE_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.raises(cpu.KernelBuildError, match="failed") as info:
        cpu.load_extension(allow_build=True)
    assert str(tmp_path / "ext") in str(info.value)
    assert not cpu.is_available()  # the failure is remembered, not retried on every call
