"""GPTQ error-feedback rounding of the codes for fixed group scales and zeros."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from awqforge.awq.settings import BlockSettings
from awqforge.quant import effective_group_size, quantize_with_qparams


@dataclass
class InverseFactor:
    """The upper Cholesky factor of the damped inverse input Gram matrix, and the dead input channels (never
    seen by a calibration token). It depends on the inputs only: linears that read the same input (q/k/v,
    gate/up) share one (`gptq_factor` once, `gptq_codes` for each)."""

    hinv: torch.Tensor | None  # [in, in] fp32, upper; None: not positive definite even after damping
    dead: torch.Tensor  # [in] bool


def gptq_factor(gram: torch.Tensor, damp: float) -> InverseFactor:
    h = gram.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:
        return InverseFactor(None, dead)
    return InverseFactor(hinv.float(), dead)


def gptq_codes(
    w: torch.Tensor,
    gram: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    s: BlockSettings,
    factor: InverseFactor | None = None,
) -> torch.Tensor:
    """Codes for fixed group scales/zeros, rounded with error feedback (OBQ/GPTQ, static groups).

    Columns are quantized in order; each one's rounding error, weighted by the inverse of the
    damped input Gram matrix, is pushed onto the columns not yet quantized, so that the layer's
    output error x (W - Q)^T, not the weight error, is what the rounding minimises. Scales and
    zeros are not changed (they come from the clip search), so the artifact format is the same.
    `factor`: `gptq_factor(gram, s.gptq_damp)` computed once for the linears sharing this input.
    """
    out_f, in_f = w.shape
    g = effective_group_size(in_f, s.group_size)
    max_int = 2**s.bits - 1
    if factor is None:
        factor = gptq_factor(gram, s.gptq_damp)
    if factor.hinv is None:  # not positive definite even after damping: plain rounding
        return quantize_with_qparams(w, scales, zeros, s.bits, s.group_size).float()
    hinv = factor.hinv.to(w.device)
    # Transposed, so that each input channel's weights (one per output row) are one contiguous row: the
    # column loop below reads and updates rows, and the rank-1 feedback is one BLAS call (addr_).
    wt = w.T.float().contiguous()
    wt[factor.dead.to(w.device)] = 0.0
    qt = torch.empty_like(wt)
    st = scales.T.float().contiguous()  # [groups, out]
    zt = zeros.T.float().contiguous()
    block = 128
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = wt[i1:i2]
        err1 = torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        inv_d = (1.0 / torch.diagonal(h1)).tolist()
        for i in range(i2 - i1):
            sc, z = st[(i1 + i) // g], zt[(i1 + i) // g]
            col = w1[i]
            q = torch.round(col / sc).add_(z).clamp_(0, max_int)
            qt[i1 + i] = q
            e = err1[i]
            torch.sub(col, (q - z).mul_(sc), out=e)
            e.mul_(inv_d[i])
            if i + 1 < i2 - i1:
                w1[i + 1 :].addr_(h1[i, i + 1 :], e, alpha=-1.0)
        if i2 < in_f:
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1.0)
    return qt.T.contiguous()
