"""Pure-torch reference for every kernel: dequantize, then an fp32 matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from awqforge.quant import QuantizedTensor


def reference_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x . dequant(qt)^T (+ bias), computed in fp32, returned in x.dtype."""
    w = qt.dequantize(torch.float32).to(x.device)
    b = None if bias is None else bias.to(device=x.device, dtype=torch.float32)
    return F.linear(x.float(), w, b).to(x.dtype)
