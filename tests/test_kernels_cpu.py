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
    return cpu.load_extension()


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


def test_build_is_cached(ext):
    """A second process loads the cached .so: nothing is recompiled."""
    so = next(cpu.build_dir().glob("*.so"))
    before = so.stat().st_mtime_ns
    code = "from awqforge.kernels import cpu; cpu.load_extension(); print(cpu.build_dir())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cpu.build_dir())
    assert so.stat().st_mtime_ns == before
    assert cpu.load_extension() is ext


def test_failed_build_says_why(tmp_path, monkeypatch):
    bad = tmp_path / "broken.cpp"
    bad.write_text("#error deliberately broken kernel source\n")
    monkeypatch.setattr(cpu, "_SOURCE", bad)
    monkeypatch.setattr(cpu, "_EXT_NAME", "awqforge_w4_cpu_broken_test")
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setenv("AWQFORGE_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.raises(cpu.KernelBuildError, match="failed") as info:
        cpu.load_extension()
    assert str(tmp_path / "ext") in str(info.value)
    assert not cpu.is_available()  # the failure is remembered, not retried on every call
