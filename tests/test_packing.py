"""Round trips of every layout in awqforge.packing, checked against the ecosystem's own code."""

from __future__ import annotations

import pytest
import torch

from awqforge import packing
from awqforge.quant import QuantizedTensor, quantize_tensor

# (out, in, group_size): odd shapes included; out multiple of 8 where AWQ needs it
SHAPES = [(8, 32, 32), (24, 96, 32), (40, 128, -1), (16, 64, 64), (72, 384, 128), (8, 8, -1), (136, 256, 128)]
ODD_SHAPES = [(3, 5, -1), (7, 33, -1), (13, 96, 32), (1, 1, -1), (33, 70, 35)]


def random_qt(out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + out_f * 1000 + in_f + bits)
    n_groups = in_f // (in_f if group_size == -1 else group_size)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=gen, dtype=torch.uint8)
    if symmetric:
        z = torch.full((out_f, n_groups), 2 ** (bits - 1), dtype=torch.uint8)
    else:
        z = torch.randint(0, 2**bits, (out_f, n_groups), generator=gen, dtype=torch.uint8)
    s = torch.rand(out_f, n_groups, generator=gen) * 0.1 + 1e-3
    return QuantizedTensor(q, s, z, bits, group_size)


def assert_same_qt(a: QuantizedTensor, b: QuantizedTensor, scale_atol: float = 0.0) -> None:
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.zeros, b.zeros)
    torch.testing.assert_close(
        a.scales.float(), b.scales.float(), atol=scale_atol, rtol=1e-3 if scale_atol else 0
    )
    assert (a.bits, a.group_size) == (b.bits, b.group_size)


# ---------------------------------------------------------------- AWQ gemm


def autoawq_pack(intweight_t: torch.Tensor) -> torch.Tensor:
    """AutoAWQ WQLinear_GEMM.pack's loop, written out: intweight_t int [rows, cols]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = intweight_t.shape
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for col in range(cols // 8):
        for i in range(8):
            packed[:, col] |= intweight_t[:, col * 8 + order_map[i]].to(torch.int64) << (i * 4)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def vllm_unpack(packed: torch.Tensor) -> torch.Tensor:
    """vLLM awq_triton's unpack: shifts in nibble order, then AWQ_REVERSE_ORDER along columns."""
    reverse = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    shifts = reverse * 4  # column c of each eight reads nibble reverse[c]
    v = packed.to(torch.int64).unsqueeze(-1) >> shifts
    return (v & 0xF).reshape(packed.shape[0], -1)


@pytest.mark.parametrize("out_f,in_f,group_size", SHAPES)
def test_awq_gemm_matches_autoawq_and_round_trips(out_f, in_f, group_size):
    qt = random_qt(out_f, in_f, 4, group_size)
    t = packing.pack_awq_gemm(qt)
    n_groups = qt.scales.shape[1]
    assert t["qweight"].shape == (in_f, out_f // 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (n_groups, out_f // 8) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (n_groups, out_f) and t["scales"].dtype == torch.float16
    assert torch.equal(t["qweight"], autoawq_pack(qt.qweight.t()))
    assert torch.equal(t["qzeros"], autoawq_pack(qt.zeros.t()))
    assert torch.equal(vllm_unpack(t["qweight"]), qt.qweight.t().long())
    back = packing.unpack_awq_gemm(t["qweight"], t["qzeros"], t["scales"], group_size)
    assert_same_qt(back, qt, scale_atol=1e-5)


def test_awq_gemm_refuses_other_widths():
    with pytest.raises(ValueError, match="4-bit"):
        packing.pack_awq_gemm(random_qt(8, 32, 3, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        packing.pack_awq_gemm(random_qt(12, 32, 4, 32))


# ---------------------------------------------------------------- compressed-tensors


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("out_f,in_f,group_size", SHAPES + ODD_SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_compressed_tensors_round_trip(bits, out_f, in_f, group_size, symmetric):
    qt = random_qt(out_f, in_f, bits, group_size, symmetric)
    t = packing.pack_compressed_tensors(qt, symmetric)
    assert t["weight_packed"].shape == (out_f, -(-in_f * bits // 32))
    assert t["weight_packed"].dtype == torch.int32
    assert t["weight_shape"].tolist() == [out_f, in_f]
    if symmetric:
        assert "weight_zero_point" not in t
    else:
        assert t["weight_zero_point"].shape == (-(-out_f * bits // 32), qt.scales.shape[1])
    back = packing.unpack_compressed_tensors(t, bits, group_size, symmetric)
    assert_same_qt(back, qt)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("out_f,in_f,group_size", SHAPES + ODD_SHAPES)
def test_compressed_tensors_matches_the_package(bits, out_f, in_f, group_size):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    qt = random_qt(out_f, in_f, bits, group_size)
    t = packing.pack_compressed_tensors(qt, symmetric=False)
    mid = 2 ** (bits - 1)
    signed_q = (qt.qweight.to(torch.int16) - mid).to(torch.int8)
    signed_z = (qt.zeros.to(torch.int16) - mid).to(torch.int8)
    assert torch.equal(t["weight_packed"], helpers.pack_to_int32(signed_q, bits))
    assert torch.equal(t["weight_zero_point"], helpers.pack_to_int32(signed_z, bits, packed_dim=0))
    unpacked = helpers.unpack_from_int32(t["weight_packed"], bits, torch.Size([out_f, in_f]))
    assert torch.equal(unpacked, signed_q)
    zp = helpers.unpack_from_int32(t["weight_zero_point"], bits, qt.zeros.shape, packed_dim=0)
    assert torch.equal(zp, signed_z)


def test_compressed_tensors_decompressor_dequantizes_like_us():
    """The package's own compressor turns our tensors into the weight we dequantize."""
    pq = pytest.importorskip("compressed_tensors.compressors.pack_quantized")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(48, 256)
    for symmetric in (False, True):
        qt = quantize_tensor(w, 4, 64, zero_point=not symmetric)
        t = packing.pack_compressed_tensors(qt, symmetric)
        args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, group_size=64, strategy="group")
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        out = pq.PackedQuantizationCompressor.decompress(dict(t), scheme)
        torch.testing.assert_close(out["weight"].float(), qt.dequantize(), atol=1e-6, rtol=1e-5)


def test_symmetric_needs_midpoint_zeros():
    with pytest.raises(ValueError, match="symmetric"):
        packing.pack_compressed_tensors(random_qt(8, 32, 4, 32), symmetric=True)


# ---------------------------------------------------------------- CPU kernel layout


@pytest.mark.parametrize(
    "out_f,in_f,group_size", [(32, 64, 32), (40, 128, -1), (13, 96, 32), (72, 384, 128), (9, 70, -1)]
)
def test_cpu_layout_decodes_to_the_codes(out_f, in_f, group_size):
    qt = random_qt(out_f, in_f, 4, group_size)
    t = packing.pack_cpu_w4(qt)
    qdata, params = t["qdata"], t["params"]
    n_blocks, k8 = -(-out_f // 32), -(-in_f // 8) * 8
    assert qdata.dtype == torch.int32 and qdata.shape == (n_blocks, k8 // 8, 32)
    assert params.shape == (n_blocks, qt.scales.shape[1], 2, 32)
    words = qdata.to(torch.int64) & 0xFFFFFFFF
    # code k = 8c + 2i sits at bits 4i, k = 8c + 2i + 1 at bits 16 + 4i
    shifts = torch.tensor([0, 16, 4, 20, 8, 24, 12, 28])
    codes = (words.unsqueeze(-1) >> shifts) & 0xF  # [NB, K8/8, 32, 8]
    q = codes.permute(0, 2, 1, 3).reshape(n_blocks * 32, k8)
    assert torch.equal(q[:out_f, :in_f].to(torch.uint8), qt.qweight)
    assert not q[out_f:].any() and not q[:, in_f:].any()  # padding holds zero codes
    s16 = params[:, :, 0].permute(0, 2, 1).reshape(n_blocks * 32, -1)
    off = params[:, :, 1].permute(0, 2, 1).reshape(n_blocks * 32, -1)
    s, z = qt.scales.float(), qt.zeros.float()
    torch.testing.assert_close(s16[:out_f], 16 * s)
    torch.testing.assert_close(off[:out_f], -(z + 16) * s)
    assert not s16[out_f:].any() and not off[out_f:].any()
    # W = (1 + q/16) * s' + o' reproduces the dequantized weight
    w = (1 + q[:out_f, :in_f].float() / 16) * s16[:out_f].repeat_interleave(
        in_f // qt.scales.shape[1], dim=1
    ) + off[:out_f].repeat_interleave(in_f // qt.scales.shape[1], dim=1)
    torch.testing.assert_close(w, qt.dequantize(), atol=1e-5, rtol=1e-5)
