"""The Triton W4A16 kernel against the reference; on CPU tensors under TRITON_INTERPRET=1.

Tolerances (max abs error / max |fp32 reference|): fp16 3e-3, bf16 2e-2: the kernel rounds the
dequantized weight to the activation dtype before tl.dot and rounds the output.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton loads and when @triton.jit runs
    if "awqforge.kernels.triton_w4a16" in sys.modules:
        importlib.reload(sys.modules["awqforge.kernels.triton_w4a16"])
pytest.importorskip("triton")

from awqforge import packing  # noqa: E402
from awqforge.kernels import triton_w4a16  # noqa: E402
from awqforge.kernels.reference import reference_linear  # noqa: E402
from awqforge.quant import quantize_tensor  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(64, 128, 32), (40, 256, -1), (72, 384, 128), (24, 192, 64)]  # N multiple of 8 (AWQ)
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def awq_case(n, k, group_size, seed=0):
    torch.manual_seed(seed + n + k)
    qt = quantize_tensor(torch.randn(n, k), 4, group_size)
    t = {key: v.to(DEVICE) for key, v in packing.pack_awq_gemm(qt).items()}
    # the reference sees the fp16-rounded scales the kernel reads
    qt16 = packing.unpack_awq_gemm(*(t[key].cpu() for key in ("qweight", "qzeros", "scales")), group_size)
    return t, qt16


def rel_err(y, ref):
    return ((y.float().cpu() - ref.float()).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("n,k,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference(n, k, group_size, dtype):
    t, qt = awq_case(n, k, group_size)
    bias = torch.randn(n)
    for m in (1, 3, 8, 40):  # gemv, gemv, decode, mid launch configurations
        x = torch.randn(m, k).to(dtype)
        ref = reference_linear(x.float(), qt, bias)
        y = triton_w4a16.w4a16_linear(
            x.to(DEVICE), t["qweight"], t["qzeros"], t["scales"], group_size, bias.to(DEVICE)
        )
        assert y.dtype == dtype and y.shape == (m, n)
        assert rel_err(y, ref) < TOL[dtype], (m, rel_err(y, ref))


def test_every_launch_configuration_is_exercised():
    ms = {1: "gemv", 4: "gemv", 5: "decode", 16: "decode", 17: "mid", 127: "mid", 128: "prefill"}
    assert {m: triton_w4a16.pick_config(m).name for m in ms} == ms


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_launch(dtype):
    t, qt = awq_case(136, 128, 64, seed=2)  # N not a multiple of BLOCK_N
    x = torch.randn(130, 128).to(dtype)
    y = triton_w4a16.w4a16_linear(x.to(DEVICE), t["qweight"], t["qzeros"], t["scales"], 64)
    assert rel_err(y, reference_linear(x.float(), qt)) < TOL[dtype]


def test_device_mismatch_is_refused():
    t, _ = awq_case(16, 64, 32)
    other = "meta"
    with pytest.raises(ValueError, match="one device"):
        triton_w4a16.w4a16_linear(
            torch.randn(1, 64, device=other).half(), t["qweight"], t["qzeros"], t["scales"], 32
        )


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k(split_k):
    t, qt = awq_case(48, 512, 64, seed=1)
    x = torch.randn(2, 4, 512).half()
    y = triton_w4a16.w4a16_linear(x.to(DEVICE), t["qweight"], t["qzeros"], t["scales"], 64, split_k=split_k)
    assert y.shape == (2, 4, 48)
    assert rel_err(y, reference_linear(x.float(), qt)) < TOL[torch.float16]


def test_rejects_bad_inputs():
    t, _ = awq_case(16, 64, 32)
    with pytest.raises(TypeError):
        triton_w4a16.w4a16_linear(
            torch.randn(1, 64, device=DEVICE), t["qweight"], t["qzeros"], t["scales"], 32
        )
    with pytest.raises(ValueError, match="group size"):
        triton_w4a16.w4a16_linear(
            torch.randn(1, 64, device=DEVICE).half(), t["qweight"], t["qzeros"], t["scales"], 16
        )
