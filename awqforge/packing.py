"""Every bit layout AWQForge reads or writes, translated from/to `QuantizedTensor`.

Our convention (awqforge.quant): codes q [out, in] unsigned in [0, 2**bits-1], zeros z [out, G]
unsigned, scales s [out, G], W ~ (q - z) * s.

Layouts:
- AWQ "gemm" (AutoAWQ WQLinear_GEMM, vLLM awq / awq_triton): 4-bit only, *transposed* (rows are
  input channels). qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out].
  Eight consecutive output channels share one int32; nibble i (bits 4i..4i+3) holds channel
  AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i] of the eight. Zeros are the unsigned z.
- compressed-tensors "pack-quantized" (compressed_tensors.compressors.pack_quantized): the signed
  value v = q - 2**(bits-1) is stored offset back to unsigned, i.e. exactly our q, densely packed:
  element i of a row occupies bits [i*bits, (i+1)*bits) of the row's bit stream, little-endian
  across int32 words, so 3-bit values straddle words. weight_packed int32 [out, ceil(in*bits/32)],
  weight_zero_point (asymmetric only) the unsigned zero (= signed zero + 2**(bits-1)) packed the
  same way along dim 0: int32 [ceil(out*bits/32), G]. weight_scale [out, G], weight_shape [2].
- CPU kernel layout (awqforge/kernels/csrc/w4_cpu.cpp): see `pack_cpu_w4`.
"""

from __future__ import annotations

import math

import torch

from awqforge.quant import QuantizedTensor, effective_group_size

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds channel AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # channel c sits in nibble AWQ_REVERSE_ORDER[c]

CPU_BLOCK_N = 32  # output channels per block in the CPU kernel layout

_U32 = 0xFFFFFFFF


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit words -> int32 with the same bits (two's complement)."""
    words = words & _U32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _from_int32(words: torch.Tensor) -> torch.Tensor:
    """int32 -> int64 holding the unsigned 32-bit word."""
    return words.to(torch.int64) & _U32


def _check_codes(qt: QuantizedTensor) -> None:
    if qt.qweight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(qt.qweight.shape)}")
    in_f = qt.qweight.shape[1]
    g = effective_group_size(in_f, qt.group_size)
    if in_f % g:
        raise ValueError(f"group size {g} does not divide input width {in_f}")
    if qt.scales.shape != (qt.qweight.shape[0], in_f // g) or qt.zeros.shape != qt.scales.shape:
        raise ValueError(
            f"scales {tuple(qt.scales.shape)} / zeros {tuple(qt.zeros.shape)} do not match weight "
            f"{tuple(qt.qweight.shape)} with group size {qt.group_size}"
        )


# --------------------------------------------------------------------------------------------
# Dense little-endian bit packing along the last dim (compressed-tensors' pack_to_int32 order)
# --------------------------------------------------------------------------------------------


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, C] -> int32 [R, ceil(C*bits/32)]: element i at bit i*bits of the row."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    rows, cols = codes.shape
    n_words = math.ceil(cols * bits / 32)
    if 32 % bits == 0:  # no value straddles a word: one shift per slot
        per = 32 // bits
        v = torch.zeros(rows, n_words * per, dtype=torch.int32, device=codes.device)
        v[:, :cols] = codes.to(torch.int32) & ((1 << bits) - 1)
        v = v.view(rows, n_words, per)
        packed = torch.zeros(rows, n_words, dtype=torch.int32, device=codes.device)
        for slot in range(per):
            packed |= v[:, :, slot] << (slot * bits)  # wraps into the sign bit: the wanted pattern
        return packed
    n_blocks = math.ceil(cols / 32)  # 32 elements fill exactly `bits` words
    v = torch.zeros(rows, n_blocks * 32, dtype=torch.int64, device=codes.device)
    v[:, :cols] = codes.to(torch.int64) & ((1 << bits) - 1)
    v = v.view(rows, n_blocks, 32)
    words = torch.zeros(rows, n_blocks, bits, dtype=torch.int64, device=codes.device)
    for e in range(32):
        word, off = divmod(e * bits, 32)
        words[:, :, word] |= (v[:, :, e] << off) & _U32
        if off + bits > 32:  # spills into the next word
            words[:, :, word + 1] |= v[:, :, e] >> (32 - off)
    return _to_int32(words.view(rows, n_blocks * bits)[:, :n_words])


def unpack_dense(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_dense`: int32 [R, W] -> uint8 codes [R, cols]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    rows, n_words = packed.shape
    if n_words != math.ceil(cols * bits / 32):
        raise ValueError(f"{n_words} words cannot hold {cols} values of {bits} bits")
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        vals = (packed.unsqueeze(-1) >> shifts) & mask  # arithmetic shift, masked: sign bits drop
        return vals.view(rows, -1)[:, :cols].to(torch.uint8)
    n_blocks = math.ceil(cols / 32)
    words = torch.zeros(rows, n_blocks * bits + 1, dtype=torch.int64, device=packed.device)
    words[:, :n_words] = _from_int32(packed)
    out = torch.empty(rows, n_blocks, 32, dtype=torch.int64, device=packed.device)
    base = torch.arange(n_blocks, device=packed.device) * bits
    for e in range(32):
        word, off = divmod(e * bits, 32)
        val = words[:, base + word] >> off
        if off + bits > 32:
            val = val | (words[:, base + word + 1] << (32 - off))
        out[:, :, e] = val & mask
    return out.view(rows, n_blocks * 32)[:, :cols].to(torch.uint8)


# --------------------------------------------------------------------------------------------
# AWQ gemm
# --------------------------------------------------------------------------------------------


def _pack_awq_cols(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [R, C] (C % 8 == 0) -> int32 [R, C/8] in AWQ's interleaved nibble order."""
    rows, cols = codes.shape
    v = codes.to(torch.int32).view(rows, cols // 8, 8)
    packed = torch.zeros(rows, cols // 8, dtype=torch.int32, device=codes.device)
    for nibble, channel in enumerate(AWQ_ORDER):
        # int32 shifts wrap into the sign bit for the top nibble, which is the bit pattern we want
        packed |= (v[:, :, channel] & 0xF) << (4 * nibble)
    return packed


def _unpack_awq_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> uint8 [R, C]."""
    rows, n_words = packed.shape
    # channel c of each eight sits in nibble AWQ_REVERSE_ORDER[c]
    shifts = torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int32, device=packed.device) * 4
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift, masked: sign bits drop
    return nibbles.reshape(rows, n_words * 8).to(torch.uint8)


def pack_awq_gemm(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """QuantizedTensor -> AutoAWQ/vLLM "gemm" tensors {qweight, qzeros, scales}."""
    _check_codes(qt)
    if qt.bits != 4:
        raise ValueError(f"the AWQ gemm layout is 4-bit only, got bits={qt.bits}")
    out_f = qt.qweight.shape[0]
    if out_f % 8:
        raise ValueError(f"the AWQ gemm layout needs out_features divisible by 8, got {out_f}")
    return {
        "qweight": _pack_awq_cols(qt.qweight.t().contiguous()),
        "qzeros": _pack_awq_cols(qt.zeros.t().contiguous()),
        "scales": qt.scales.t().to(torch.float16).contiguous(),
    }


def unpack_awq_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> QuantizedTensor:
    """AWQ gemm tensors -> QuantizedTensor (scales keep their dtype, transposed to [out, G])."""
    in_f = qweight.shape[0]
    g = effective_group_size(in_f, group_size)
    n_groups = in_f // g
    if qzeros.shape != (n_groups, qweight.shape[1]) or scales.shape != (n_groups, qweight.shape[1] * 8):
        raise ValueError(
            f"AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}, group size {group_size}"
        )
    q = _unpack_awq_cols(qweight).t().contiguous()
    z = _unpack_awq_cols(qzeros).t().contiguous()
    return QuantizedTensor(q, scales.t().contiguous(), z, 4, group_size)


# --------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized
# --------------------------------------------------------------------------------------------


def pack_compressed_tensors(
    qt: QuantizedTensor, symmetric: bool, *, scale_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """QuantizedTensor -> compressed-tensors pack-quantized tensors.

    `scale_dtype` (default: the QuantizedTensor's scale dtype) is usually the model's dtype.
    Symmetric requires z == 2**(bits-1) everywhere and omits weight_zero_point.
    """
    _check_codes(qt)
    out_f, in_f = qt.qweight.shape
    mid = 2 ** (qt.bits - 1)
    if symmetric and not bool((qt.zeros == mid).all()):
        raise ValueError(f"symmetric packing needs every zero equal to {mid} (bits={qt.bits})")
    tensors = {
        "weight_packed": pack_dense(qt.qweight, qt.bits),
        "weight_scale": qt.scales.to(scale_dtype or qt.scales.dtype).contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not symmetric:
        tensors["weight_zero_point"] = pack_dense(qt.zeros.t().contiguous(), qt.bits).t().contiguous()
    return tensors


def unpack_compressed_tensors(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool
) -> QuantizedTensor:
    """compressed-tensors pack-quantized tensors -> QuantizedTensor."""
    out_f, in_f = (int(v) for v in tensors["weight_shape"].tolist())
    scales = tensors["weight_scale"]
    n_groups = in_f // effective_group_size(in_f, group_size)
    if scales.shape != (out_f, n_groups):
        raise ValueError(f"weight_scale {tuple(scales.shape)} does not match [{out_f}, {n_groups}]")
    q = unpack_dense(tensors["weight_packed"], bits, in_f)
    if symmetric:
        z = torch.full((out_f, n_groups), 2 ** (bits - 1), dtype=torch.uint8, device=q.device)
    else:
        zp = tensors["weight_zero_point"]
        z = unpack_dense(zp.t().contiguous(), bits, out_f).t().contiguous()
    return QuantizedTensor(q, scales, z, bits, group_size)


# --------------------------------------------------------------------------------------------
# CPU kernel layout
# --------------------------------------------------------------------------------------------


def pack_cpu_w4(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """QuantizedTensor (4-bit) -> the layout of the C++ kernel.

    - qdata int32 [Np/32, K8/8, 32]: Np = out rounded up to 32, K8 = in rounded up to 8 (only a
      per-channel layer can have in % 8 != 0; its padded codes are 0 and the kernel pads x with
      zeros). Block b covers output channels 32b..32b+31; word [b, c, j] holds the eight codes
      q[32b+j, 8c..8c+7]: q[., 8c+2i] in bits 4i..4i+3 and q[., 8c+2i+1] in bits 16+4i..19+4i
      (i = 0..3). One k-octet of 16 channels is one 64-byte load, and one shift puts the codes of a
      k-pair at the same place in both 16-bit halves: the kernel turns them into the bf16 pair
      (1 + q/16, 1 + q'/16) with one bitwise op (or into fp32 1 + q/16 the same way).
    - params float32 [Np/32, G, 2, 32]: per block and group, s' = 16*s and o' = -(z + 16)*s, so
      that W = q*s - z*s = (1 + q/16)*s' + o'. Padded channels have s' = o' = 0.
    """
    _check_codes(qt)
    if qt.bits != 4:
        raise ValueError(f"the CPU kernel layout is 4-bit only, got bits={qt.bits}")
    out_f, in_f = qt.qweight.shape
    g = effective_group_size(in_f, qt.group_size)
    n_groups = in_f // g
    if g % 8 and n_groups > 1:
        raise ValueError(f"the CPU kernel needs a group size that is a multiple of 8, got {g}")
    k_pad = -in_f % 8
    n_pad = -out_f % CPU_BLOCK_N
    q = qt.qweight.to(torch.int32) & 0xF
    s = qt.scales.float()
    s16 = 16.0 * s
    off = -(qt.zeros.float() + 16.0) * s
    if n_pad or k_pad:
        q = torch.nn.functional.pad(q, (0, k_pad, 0, n_pad))
        s16 = torch.nn.functional.pad(s16, (0, 0, 0, n_pad))
        off = torch.nn.functional.pad(off, (0, 0, 0, n_pad))
    n_p, k8 = out_f + n_pad, in_f + k_pad
    n_blocks = n_p // CPU_BLOCK_N
    octets = q.view(n_p, k8 // 8, 8)
    shifts = torch.tensor([0, 16, 4, 20, 8, 24, 12, 28], dtype=torch.int64)
    words = _to_int32((octets.to(torch.int64) << shifts).sum(-1))  # disjoint bits: the sum is an OR
    qdata = words.view(n_blocks, CPU_BLOCK_N, k8 // 8).transpose(1, 2).contiguous()
    params = torch.stack([s16, off], dim=-1)  # [Np, G, 2]
    params = params.view(n_blocks, CPU_BLOCK_N, n_groups, 2).permute(0, 2, 3, 1).contiguous()
    return {"qdata": qdata, "params": params}


def unpack_cpu_w4(
    qdata: torch.Tensor,
    params: torch.Tensor,
    shape: tuple[int, int],
    group_size: int,
    scale_dtype: torch.dtype,
) -> QuantizedTensor:
    """The inverse of `pack_cpu_w4` for a weight of `shape` (out, in) whose scales were `scale_dtype`.

    s = s'/16 exactly; z = -o'/s - 16 up to an ulp of fp32, so it is rounded back to the integer.
    """
    out_f, in_f = shape
    n_blocks, k8_8, _ = qdata.shape
    words = _from_int32(qdata.transpose(1, 2).reshape(n_blocks * CPU_BLOCK_N, k8_8))
    shifts = torch.tensor([0, 16, 4, 20, 8, 24, 12, 28], dtype=torch.int64)
    q = ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(n_blocks * CPU_BLOCK_N, k8_8 * 8)
    p = params.permute(0, 3, 1, 2).reshape(n_blocks * CPU_BLOCK_N, params.shape[1], 2)[:out_f]
    s = p[..., 0] / 16.0
    z = torch.round(-p[..., 1] / s.masked_fill(s == 0, 1.0) - 16.0).clamp(0, 15)
    return QuantizedTensor(
        q[:out_f, :in_f].to(torch.uint8).contiguous(),
        s.to(scale_dtype).contiguous(),
        z.to(torch.uint8).contiguous(),
        4,
        group_size,
    )
