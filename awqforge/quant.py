"""Group-wise integer quantization primitives.

One convention everywhere in AWQForge: a weight W [out, in] is split along `in` into groups of
`group_size` (-1: one group per output row). Each group has a float scale s and an integer zero z,
integer codes q are unsigned in [0, 2**bits - 1], and  W ~ (q - z) * s.
Symmetric quantization is the special case z = 2**(bits-1) for every group.
Formats (AWQ gemm, compressed-tensors) and kernels translate from this convention in
`awqforge.packing`; nothing else invents its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


@dataclass
class QuantizedTensor:
    """Integer codes and their group parameters for one linear weight [out, in]."""

    qweight: torch.Tensor  # uint8 [out, in], values in [0, 2**bits-1]
    scales: torch.Tensor  # float [out, n_groups]
    zeros: torch.Tensor  # uint8 [out, n_groups]
    bits: int
    group_size: int  # as configured: -1 means one group per row

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.group_size).to(dtype)


def compute_qparams(
    w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [out, n_groups] (float32) for weight w [out, in], from each group's range."""
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    if in_f % g:
        raise ValueError(f"group size {g} does not divide input width {in_f}")
    wg = w.float().reshape(out_f, in_f // g, g)
    if zero_point:
        max_int = 2**bits - 1
        w_max = wg.amax(dim=-1)
        w_min = wg.amin(dim=-1)
        scales = (w_max - w_min).clamp(min=1e-5) / max_int
        zeros = (-torch.round(w_min / scales)).clamp(0, max_int)
    else:
        max_int = 2 ** (bits - 1) - 1
        scales = wg.abs().amax(dim=-1).clamp(min=1e-5) / max_int
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    return scales, zeros


def quantize_with_qparams(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Integer codes (uint8 [out, in]) of w under the given group scales and zeros."""
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    wg = w.float().reshape(out_f, in_f // g, g)
    q = torch.round(wg / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)
    return q.clamp_(0, 2**bits - 1).reshape(out_f, in_f).to(torch.uint8)


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """W ~ (q - z) * s, float32 [out, in]."""
    out_f, in_f = qweight.shape
    g = effective_group_size(in_f, group_size)
    qg = qweight.float().reshape(out_f, in_f // g, g)
    w = (qg - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(out_f, in_f)


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True) -> QuantizedTensor:
    """Round-to-nearest quantization of one weight."""
    scales, zeros = compute_qparams(w, bits, group_size, zero_point)
    q = quantize_with_qparams(w, scales, zeros, bits, group_size)
    return QuantizedTensor(q, scales, zeros.to(torch.uint8), bits, group_size)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """Quantize then dequantize (same dtype as w): what the model computes after quantization."""
    scales, zeros = compute_qparams(w, bits, group_size, zero_point)
    q = quantize_with_qparams(w, scales, zeros, bits, group_size)
    return dequantize(q, scales, zeros, group_size).to(w.dtype)
