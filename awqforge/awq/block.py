"""AWQ on one decoder block: scale search, folding, clip search, quantization.

One generic algorithm over the mappings an `ArchAdapter` resolves (see awqforge.arch):

1. Run the FP block once over the captured inputs, in chunks. Its output is the next block's input
   (as in AWQ, every block sees FP inputs). Hooks collect, per distinct linear input, the Gram matrix
   X^T X (float32) and, per mapping, the mean |x| per channel and the inspected module's FP calls.
2. Per mapping, search the scale exponent a on a grid of `n_grid` points: duo scaling
   s = x_mean^a / w_mean^(1-a) (AutoAWQ), activation scaling s = x_mean^a, or both grids
   (llm-compressor), plus s = 1. The loss is the MSE of the inspected module's output with the
   mapping's linears set to Q(W*s)/s against its FP output.
   - When the inspected module is the linear itself (v->o, up->down, OPT fc1/fc2, ...), the loss is
     exact from the Gram matrix: ||X dW^T||^2 = sum((dW G) * dW), vectorised over all candidates,
     without running anything on the tokens (the same number llm-compressor gets by rerunning the layer).
   - When it is a module (attention with its kwargs, the MLP, the whole MoE block with its router), the
     module is rerun: all candidates on the first `search_fraction` of the samples, then, on the rest,
     every candidate the coarse samples cannot tell from the coarse best: a paired test on the
     candidates' per-sample errors against the best's (`rescore_z` standard errors, at most `rescore_max`
     of them; with `rescore_z=0`, the best `search_topk` instead). A clear coarse best is kept without rerunning the rest; a close
     call is decided on all samples. `search_fraction=1` gives the exhaustive search.
     With `search_screen` = k > 0, every candidate is first screened exactly and cheaply on the mapping's
     linears' own outputs, sum over the linears of n tr(dW G dW^T) with their shared input Gram G (no
     forward), and only the k best (the screen's best always among them) go through the module rerun
     above; the others are not candidates any more. k = 0, or k >= the number of candidates, is the
     full module search.
3. Fold the best scales into the previous op (norm incl. LayerNorm bias and Gemma's 1+w, linear rows
   incl. bias, or a `ScaledActivation`) and into the linears' input columns; routers that read the same
   input absorb them too (they stay unquantized).
4. Per linear, search the clipping ratio per group (not for q/k projections, as AutoAWQ): shrink the
   group's max/min by 1, 0.95, ..., minimise that group's output error, exact from the diagonal block
   of the (scaled) input Gram matrix over all calibration tokens. Quantize with the final qparams.

Statistics and losses are float32 whatever the block dtype.

Padding (`per_sample` calibration rows, right-padded): `token_mask` [n, seq] marks the real tokens. The block
runs on the padded rows (a real token never attends to a later position, so its activations are exact), but
every statistic and loss above is taken over the real tokens only: the Gram matrices and kept inputs (hence the
clip search, the refit, GPTQ and the reported MSEs), the per-channel mean |x|, the module-output losses and the
top-k reweighting; MoE experts are not run on padding positions. Without a mask nothing changes.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from awqforge.arch import ArchAdapter, UnfusedExperts
from awqforge.awq.capture import for_rows
from awqforge.awq.folding import device_of, fold_scales
from awqforge.awq.gptq import gptq_codes, gptq_factor
from awqforge.awq.qparams import refine_qparams, search_clip
from awqforge.awq.search import (
    Stats,
    candidates,
    chunks,
    gram_losses,
    install_hooks,
    main_output,
    module_losses,
    prescreen,
    row_slices,
    rtn_mse,
    screen_losses,
    shortlist,
    to_device,
    w_mean,
)
from awqforge.awq.settings import BlockResult, BlockSettings, LayerMetric, NumericalError
from awqforge.quant import (
    QuantizedTensor,
    compute_qparams,
    dequantize,
    effective_group_size,
    quantize_with_qparams,
)
from awqforge.structure import is_qk


@torch.no_grad()
def fp_pass(
    block: nn.Module,
    inputs: torch.Tensor,
    kwargs: dict[str, Any],
    slices: list[slice],
    linears: dict[str, nn.Linear],
    maps: list,
    s: BlockSettings,
    stats: Stats,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the FP block over `inputs`, chunk by chunk, with the statistics hooks: fills `stats` (it may
    already hold other samples' statistics: they add up) and returns the block output [n, seq, hidden].
    token_mask (bool [n, seq]): only its real tokens enter the statistics, and MoE experts skip the rest."""
    device = device_of(block)
    dtype = next(block.parameters()).dtype
    experts = (
        [mod for mod in block.modules() if isinstance(mod, UnfusedExperts)] if token_mask is not None else []
    )
    handles = install_hooks(linears, maps, stats, s)
    outputs = []
    try:
        for sl in slices:
            mask = None if token_mask is None else token_mask[sl].reshape(-1).to(device)
            stats.new_chunk(mask)
            for mod in experts:
                mod.token_keep = mask
            x = inputs[sl].to(device=device, dtype=dtype)
            rows = slice(sl.start, sl.start + x.shape[0])  # per-sample kwargs for these rows (awq.capture)
            outputs.append(main_output(block(x, **for_rows(kwargs, rows))).to(inputs.device))
    finally:
        for h in handles:
            h.remove()
        for mod in experts:
            mod.token_keep = None
        stats.new_chunk()
    return torch.cat(outputs)


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    inputs: torch.Tensor,
    layer_kwargs: dict[str, Any],
    *,
    settings: BlockSettings,
    adapter: ArchAdapter,
    block_index: int = 0,
    block_prefix: str = "",
    token_mask: torch.Tensor | None = None,
) -> BlockResult:
    """Quantize one decoder block in place (see the module docstring); returns its FP output and codes.

    token_mask: bool [n, seq], True on real tokens, for right-padded rows (`CapturedInputs.token_mask`)."""
    s = settings
    if s.method not in ("awq", "rtn"):
        raise ValueError(f"method must be 'awq' or 'rtn', got {s.method!r}")
    if s.rounding not in ("nearest", "gptq"):
        raise ValueError(f"rounding must be 'nearest' or 'gptq', got {s.rounding!r}")
    if s.scale_search not in ("duo", "activation", "both"):
        raise ValueError(f"scale_search must be duo, activation or both, got {s.scale_search!r}")
    where = f"block {block_index}" + (f" ({block_prefix})" if block_prefix else "")
    block.eval()
    adapter.prepare_block(block)
    linears = adapter.quantizable_linears(block, s.skip_patterns, block_prefix)
    for name, lin in linears.items():
        if lin.in_features % effective_group_size(lin.in_features, s.group_size):
            raise ValueError(
                f"{where}: group size {s.group_size} does not divide {name}'s input width {lin.in_features}"
            )
    all_maps = adapter.mappings(block) if s.method == "awq" else []
    if not s.activation_scales:
        for m in all_maps:
            if m.skip_reason is None and m.scales_an_activation:
                m.skip_reason = "the activation's scales have no place in a compressed-tensors artifact"
    if not s.gqa_fold:
        for m in all_maps:
            if m.gqa is not None and m.skip_reason is None:
                m.skip_reason = "grouped-query attention and gqa_fold=False"
    skipped = [f"{m.name}: {m.skip_reason}" for m in all_maps if m.skip_reason]
    maps = [m for m in all_maps if m.skip_reason is None]
    quantized_ids = {id(m) for m in linears.values()}
    maps_q = []
    for m in maps:
        if any(id(lin) in quantized_ids for lin in m.linears):
            maps_q.append(m)
        else:
            skipped.append(f"{m.name}: none of its linears is quantized")
    maps = maps_q
    # linears no mapping scales are labelled: they get plain rounding (with the clip search)
    if s.method == "awq":
        scaled = {id(lin) for m in maps for lin in m.linears}
        skipped += [
            f"{name}: no AWQ mapping applies (plain rounding)"
            for name, lin in linears.items()
            if id(lin) not in scaled
        ]

    n, seq = inputs.shape[0], inputs.shape[1]
    coarse, rest = chunks(n, seq, s)
    kwargs_dev = to_device(layer_kwargs, device_of(block))
    if token_mask is not None:
        token_mask = token_mask.to(torch.bool)
        if tuple(token_mask.shape) != (n, seq):
            raise ValueError(f"{where}: token mask shape {tuple(token_mask.shape)} != inputs' {(n, seq)}")
        if bool(token_mask.all()):
            token_mask = None

    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    # 1. FP pass: block outputs, input Grams, mapping statistics, inspected-module calls
    n_real = n * seq if token_mask is None else int(token_mask.sum())
    stats = Stats(keep_below=n_real if s.keep_inputs else 0)  # the tokens this block's statistics see
    outputs = fp_pass(block, inputs, kwargs_dev, coarse + rest, linears, maps, s, stats, token_mask)
    if not torch.isfinite(outputs).all():
        raise NumericalError(
            f"{where}: the FP block output has NaN/inf values (check the inputs and weights)"
        )

    lap("fp_pass")
    # plain RTN error of every linear, before anything changes. `orig` holds the weights before any folding:
    # the tensors themselves, copied only when a fold is about to change one that a later mapping still reads.
    orig = {name: lin.weight.detach() for name, lin in linears.items()}
    mse_rtn = {}
    for name, w in orig.items():
        inp = stats.inputs_of(name)
        if inp is not None and not inp.finite():
            raise NumericalError(f"{where}, layer {name}: the calibration inputs have NaN/inf values")
        mse_rtn[name] = rtn_mse(w, inp, s)

    lap("rtn_error")
    # 2-3. scale search and folding, mapping by mapping
    in_scale: dict[str, torch.Tensor] = {}
    out_scale: dict[str, tuple[slice, torch.Tensor]] = {}
    ratio_of: dict[str, float] = {}
    scales_info: dict[str, dict] = {}
    names_of = {id(m): n for n, m in linears.items()}
    read_from = {}  # linear name -> index of the last mapping whose search reads its original weight
    for idx, m in enumerate(maps):
        for lin in m.linears:
            if id(lin) in quantized_ids:
                read_from[names_of[id(lin)]] = idx
    for idx, m in enumerate(maps):
        cnt = stats.abs_count.get(idx, 0)
        if cnt < s.min_tokens:
            skipped.append(
                f"{m.name}: only {cnt} calibration tokens reach it (fewer than min_tokens={s.min_tokens})"
            )
            continue
        # GQA: the statistics of o_proj's input channels reduced over the query heads of each KV head, so
        # that the candidates are over v's channels; `cands` repeats them over the heads for the losses
        x_mean = m.to_prev(stats.abs_sum[idx] / cnt)
        qlins = [(names_of[id(lin)], lin) for lin in m.linears if id(lin) in quantized_ids]
        w_avg = m.to_prev(w_mean([orig[n] for n, _ in qlins], s.group_size).to(x_mean.device))
        prev_cands = candidates(x_mean, w_avg, s)
        cands = prev_cands if m.gqa is None else [(c[0], c[1], m.to_linear(c[2])) for c in prev_cands]
        only, screen = None, None  # the screen's short list (module-scored mappings, search_screen > 0)
        scored = "linears" if m.linear_loss or not s.module_loss else "module"
        if scored == "linears":
            keep = prescreen(cands, qlins, orig, stats, s, s.prescreen)
            losses = gram_losses(cands, qlins, orig, stats, s, only=keep)
            best = int(torch.argmin(losses))
            lap("scale_search_linear")
        else:
            if 0 < s.search_screen < len(cands) and not s.screen_exact and s.prescreen:
                # the short list straight from the diagonal prescreen (and s = 1), no exact Gram losses
                only = prescreen(cands, qlins, orig, stats, s, s.search_screen)
                lap("scale_screen")
            elif 0 < s.search_screen < len(cands):
                keep = (
                    prescreen(cands, qlins, orig, stats, s, max(s.prescreen, s.search_screen))
                    if s.prescreen
                    else None
                )
                screen = screen_losses(cands, qlins, orig, stats, s, only=keep)
                only = shortlist(screen, s.search_screen)
                lap("scale_screen")
            losses, best = module_losses(cands, qlins, m, stats, s, len(coarse), where, only)
            lap("scale_search_module")
        if not math.isfinite(float(losses[best])):
            raise NumericalError(f"{where}, mapping {m.name}: every scale candidate gives a NaN/inf loss")
        mode, ratio, best_s = prev_cands[best]  # over prev's channels (KV channels under GQA)
        if not torch.isfinite(best_s).all():
            raise NumericalError(f"{where}, mapping {m.name}: non-finite scales")
        for mod in [m.prev, *m.linears, *m.absorb]:  # the modules the fold changes in place
            n_ = names_of.get(id(mod))
            if (
                n_ is not None
                and read_from.get(n_, -1) > idx
                and orig[n_].data_ptr() == mod.weight.data_ptr()
            ):
                orig[n_] = orig[n_].clone()
        fold_scales(block, m, best_s)
        for n_, _ in qlins:
            in_scale[n_] = in_scale.get(n_, 1.0) * m.to_linear(best_s)
            ratio_of[n_] = ratio
        prev_name = m.prev_name
        if isinstance(m.prev, nn.Linear) and prev_name in linears:
            rows = m.prev_rows or slice(None)
            out_scale[prev_name] = (rows, best_s)
        identity = next(
            (i for i, c in enumerate(cands) if c[0] in ("identity",) or (c[0] == "activation" and c[1] == 0)),
            None,
        )
        scales_info[m.name] = {
            "prev": prev_name,
            "linears": list(m.linear_names),
            "gqa": None if m.gqa is None else [m.gqa.kv_heads, m.gqa.n_rep, m.gqa.head_dim],
            "mode": mode,
            "ratio": ratio,
            "scales": best_s.detach().cpu(),
            "loss": float(losses[best]),
            # the screen's short list (candidate indices, best first) and every candidate's screen loss
            "shortlist": only,
            # candidates with a loss over every sample (the module search's rescored ones; 1: the coarse best
            # was clearly best)
            "finalists": int(torch.isfinite(losses).sum()),
            "scored": scored,  # "module": the inspected module rerun; "linears": exact from their inputs
            "screen_loss": screen.tolist() if screen is not None else None,
            "loss_identity": float(losses[identity])
            if identity is not None and torch.isfinite(losses[identity])
            else None,
        }

    del orig
    lap("fold")
    # 4. clip search and quantization
    quantized: dict[str, QuantizedTensor] = {}
    metrics: list[LayerMetric] = []
    # GPTQ's inverse factor depends on the input only: linears that read the same one with the same folded
    # scale (q/k/v, gate/up: adjacent in the block's order) share it; one kept at a time (its size is in^2)
    factor_of: tuple | None = None  # (input key, folded scale or None, InverseFactor)
    for name, lin in linears.items():
        w = lin.weight.detach().float()
        inp = stats.inputs_of(name)
        s_in = in_scale.get(name)
        if inp is not None and s_in is not None:
            inp = inp.scaled(1.0 / s_in)
        cnt = inp.count if inp is not None else 0
        g = effective_group_size(w.shape[1], s.group_size)
        clip_ratio = None
        if (
            s.method == "awq"
            and s.clip_search
            and inp is not None
            and cnt >= s.min_tokens
            and not is_qk(name)
        ):
            lap("quantize")
            scales, zeros, clip_ratio = search_clip(w, inp.blocks(g), s)
            lap("clip_search")
            if s.refine_steps:
                scales, zeros, _ = refine_qparams(w, inp.blocks(g), scales, zeros, s)
                lap("refit")
        else:
            scales, zeros = compute_qparams(w, s.bits, s.group_size, s.zero_point)
        gptq = s.method == "awq" and s.rounding == "gptq" and inp is not None and cnt >= s.min_tokens
        if gptq and cnt < s.gptq_tokens_per_input * w.shape[1]:
            # too few tokens to pin down the input Gram matrix: error feedback would fit the calibration
            # tokens (the rounding error pushed into directions they do not span) and miss others
            gptq = False
            skipped.append(
                f"{name}: rounded to nearest, not GPTQ: {cnt} calibration tokens, fewer than "
                f"{s.gptq_tokens_per_input:g} per input channel ({w.shape[1]})"
            )
        if gptq:
            lap("quantize")
            key = stats.key.get(name)
            if not (
                factor_of is not None
                and factor_of[0] == key
                and (factor_of[1] is None) == (s_in is None)
                and (s_in is None or torch.equal(factor_of[1], s_in))
            ):
                factor_of = None  # free the previous factor before the next is computed
                factor_of = (key, s_in, gptq_factor(inp.full_gram(), s.gptq_damp))
            q = gptq_codes(w, None, scales, zeros, s, factor=factor_of[2]).to(torch.uint8)
            lap("gptq_rounding")
        else:
            q = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
            for sl in row_slices(*w.shape):
                q[sl] = quantize_with_qparams(w[sl], scales[sl], zeros[sl], s.bits, s.group_size)
        qt = QuantizedTensor(q, scales, zeros.to(torch.uint8), s.bits, s.group_size)
        # dequantized rows: their output error, then into the block's weight (w may be that very tensor)
        per_row = torch.zeros(w.shape[0], device=w.device)
        for sl in row_slices(*w.shape):
            dq = dequantize(q[sl], scales[sl], zeros[sl], s.group_size)
            if not torch.isfinite(dq).all():
                raise NumericalError(f"{where}, layer {name}: quantized weight has NaN/inf values")
            if inp is not None:
                per_row[sl] = inp.row_errors(dq - w[sl]).to(w.device)
            lin.weight[sl] = dq.to(lin.weight.dtype)
        del dq
        if name in out_scale:
            rows, sc = out_scale[name]
            row_scale = torch.ones(w.shape[0], device=w.device)
            row_scale[rows] = sc.to(w.device)
            per_row = per_row * row_scale.pow(2)
        mse_q = float(per_row.mean()) if inp is not None else 0.0
        quantized[name] = qt
        metrics.append(LayerMetric(name, block_index, mse_rtn[name], mse_q, ratio_of.get(name), clip_ratio))
    lap("quantize")
    return BlockResult(
        outputs=outputs,
        quantized=quantized,
        layers=metrics,
        scales=scales_info,
        skipped=skipped,
        timings=timings,
    )
