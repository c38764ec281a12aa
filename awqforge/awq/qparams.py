"""Group qparams, fake quantization, the per-group clip search and the least-squares refit (float32, vectorised)."""

from __future__ import annotations

import math

import torch

from awqforge.awq.settings import BlockSettings
from awqforge.quant import effective_group_size


def qparams_from_range(w_min, w_max, bits: int, zero_point: bool):
    """Scales and zeros from a group's (possibly shrunk) range, exactly as quant.compute_qparams."""
    if zero_point:
        max_int = 2**bits - 1
        scales = (w_max - w_min).clamp(min=1e-5) / max_int
        zeros = (-torch.round(w_min / scales)).clamp(0, max_int)
    else:
        max_int = 2 ** (bits - 1) - 1
        scales = torch.maximum(w_max.abs(), w_min.abs()).clamp(min=1e-5) / max_int
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    return scales, zeros


def fake_quant(w: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> torch.Tensor:
    """RTN quantize-dequantize along the last dim in groups; any leading dims; float32."""
    in_f = w.shape[-1]
    g = effective_group_size(in_f, group_size)
    wg = w.reshape(-1, g)
    scales, zeros = qparams_from_range(wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True), bits, zero_point)
    q = (torch.round(wg / scales) + zeros).clamp_(0, 2**bits - 1)
    return ((q - zeros) * scales).reshape(w.shape)


def search_clip(
    w: torch.Tensor, gram: torch.Tensor, s: BlockSettings
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-group clip ratio minimising the group's output error: (scales, zeros, mean ratio).

    gram: the input Gram matrix [in, in], or just its diagonal group blocks [n_groups, g, g]."""
    out_f, in_f = w.shape
    g = effective_group_size(in_f, s.group_size)
    ng = in_f // g
    blocks = group_blocks(gram, in_f, g)  # [ng, g, g]
    ratios = [1.0 - i / s.clip_grid for i in range(max(1, int(s.max_shrink * s.clip_grid)))]
    max_int = 2**s.bits - 1
    wg = w.reshape(out_f, ng, g)
    w_max, w_min = wg.amax(-1), wg.amin(-1)
    best_err = torch.full((out_f, ng), math.inf, device=w.device)
    best_r = torch.ones((out_f, ng), device=w.device)
    rows = max(1, (1 << 22) // in_f)  # bounds the [ng, rows, g] temporaries
    for r0 in range(0, out_f, rows):
        sl = slice(r0, r0 + rows)
        part = wg[sl]
        for r in ratios:
            sc, z = qparams_from_range(w_min[sl] * r, w_max[sl] * r, s.bits, s.zero_point)
            dq = ((torch.round(part / sc[..., None]) + z[..., None]).clamp_(0, max_int) - z[..., None]) * sc[
                ..., None
            ]
            d = (dq - part).transpose(0, 1)  # [ng, rows, g]
            err = (torch.bmm(d, blocks) * d).sum(-1).transpose(0, 1)  # [rows, ng]
            better = err < best_err[sl]
            best_err[sl] = torch.where(better, err, best_err[sl])
            best_r[sl] = torch.where(better, torch.full_like(err, r), best_r[sl])
    scales, zeros = qparams_from_range(w_min * best_r, w_max * best_r, s.bits, s.zero_point)
    return scales, zeros, float(best_r.mean())


def group_blocks(gram: torch.Tensor, in_f: int, g: int) -> torch.Tensor:
    """The diagonal [g, g] blocks of an input Gram matrix, one per group: [ng, g, g] (given as is)."""
    ng = in_f // g
    if gram.dim() == 3:
        return gram
    return gram.reshape(ng, g, ng, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def refine_qparams(
    w: torch.Tensor, gram: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, s: BlockSettings
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least-squares refinement of each group's scale (and integer zero) for its output error.

    With the codes q fixed, the dequantized group is a*q + b; the (a, b) minimising
    (w - a q - b)^T G_g (w - a q - b) (G_g: the group's diagonal block of the input Gram matrix)
    solves a 2x2 system. Then s = a, z = round(-b / a) (clamped), the codes are re-rounded, and the
    group keeps the new parameters only if its error went down. Symmetric groups keep z and only
    refit s. gram: the input Gram matrix or its group blocks (as search_clip). Returns (scales, zeros, fraction of groups changed).
    """
    out_f, in_f = w.shape
    g = effective_group_size(in_f, s.group_size)
    ng = in_f // g
    blocks = group_blocks(gram, in_f, g)
    max_int = 2**s.bits - 1
    wg = w.reshape(out_f, ng, g)
    scales, zeros = scales.clone(), zeros.clone()
    changed = torch.zeros((out_f, ng), dtype=torch.bool, device=w.device)
    ones = torch.ones(g, device=w.device)
    g1 = blocks @ ones  # [ng, g]: G 1
    one_g_one = g1.sum(-1)  # [ng]: 1^T G 1
    rows = max(1, (1 << 21) // in_f)

    def group_err(part, sc, z):
        q = (torch.round(part / sc[..., None]) + z[..., None]).clamp_(0, max_int)
        d = (q - z[..., None]) * sc[..., None] - part  # [rows, ng, g]
        return torch.einsum("rng,ngh,rnh->rn", d, blocks, d), q

    for r0 in range(0, out_f, rows):
        sl = slice(r0, r0 + rows)
        part = wg[sl]
        sc, z = scales[sl], zeros[sl]
        err, q = group_err(part, sc, z)
        for _ in range(s.refine_steps):
            gq = torch.einsum("rng,ngh->rnh", q, blocks)  # G q
            qgq = (q * gq).sum(-1)
            qgw = (part * gq).sum(-1)
            if s.zero_point:
                qg1 = (q * g1).sum(-1)  # q^T G 1
                wg1 = (part * g1).sum(-1)
                det = qgq * one_g_one - qg1 * qg1
                a = (qgw * one_g_one - qg1 * wg1) / det
                b = (qgq * wg1 - qg1 * qgw) / det
                ok = (
                    torch.isfinite(a) & torch.isfinite(b) & (a > 1e-8) & (det.abs() > 1e-12 * qgq * one_g_one)
                )
                a = torch.where(ok, a, sc)
                new_z = torch.where(ok, (-b / a).round().clamp(0, max_int), z)
            else:
                qz = q - z[..., None]
                gqz = torch.einsum("rng,ngh->rnh", qz, blocks)
                a = (part * gqz).sum(-1) / (qz * gqz).sum(-1)
                ok = torch.isfinite(a) & (a > 1e-8)
                a = torch.where(ok, a, sc)
                new_z = z
            new_err, new_q = group_err(part, a, new_z)
            better = new_err < err
            sc = torch.where(better, a, sc)
            z = torch.where(better, new_z, z)
            err = torch.where(better, new_err, err)
            q = torch.where(better[..., None], new_q, q)
            changed[sl] |= better
        scales[sl], zeros[sl] = sc, z
    return scales, zeros, float(changed.float().mean())
