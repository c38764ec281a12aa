"""GPTQ error-feedback rounding of the codes for fixed group scales and zeros."""

from __future__ import annotations

import torch

from awqforge.awq.settings import BlockSettings
from awqforge.quant import effective_group_size, quantize_with_qparams


def gptq_codes(
    w: torch.Tensor, gram: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, s: BlockSettings
) -> torch.Tensor:
    """Codes for fixed group scales/zeros, rounded with error feedback (OBQ/GPTQ, static groups).

    Columns are quantized in order; each one's rounding error, weighted by the inverse of the
    damped input Gram matrix, is pushed onto the columns not yet quantized, so that the layer's
    output error x (W - Q)^T, not the weight error, is what the rounding minimises. Scales and
    zeros are not changed (they come from the clip search), so the artifact format is the same.
    """
    out_f, in_f = w.shape
    g = effective_group_size(in_f, s.group_size)
    max_int = 2**s.bits - 1
    h = gram.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(s.gptq_damp * float(torch.diagonal(h).mean()))
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # not positive definite even after damping: plain rounding
        return quantize_with_qparams(w, scales, zeros, s.bits, s.group_size).float()
    hinv = hinv.float()
    wk = w.clone()
    wk[:, dead] = 0.0
    q_all = torch.empty_like(wk)
    col_s = scales.repeat_interleave(g, dim=1)  # [out, in]
    col_z = zeros.repeat_interleave(g, dim=1)
    block = 128
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = wk[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            sc, z = col_s[:, i1 + i], col_z[:, i1 + i]
            q = (torch.round(col / sc) + z).clamp_(0, max_int)
            q_all[:, i1 + i] = q
            e = (col - (q - z) * sc) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        wk[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all
