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
     module is rerun: all candidates on the first `search_fraction` of the samples, then the best
     `search_topk` on the rest, so the pick is the full-data best unless the subsample ranks it below
     the top k. `search_fraction=1` gives the exhaustive search.
3. Fold the best scales into the previous op (norm incl. LayerNorm bias and Gemma's 1+w, linear rows
   incl. bias, or a `ScaledActivation`) and into the linears' input columns; routers that read the same
   input absorb them too (they stay unquantized).
4. Per linear, search the clipping ratio per group (not for q/k projections, as AutoAWQ): shrink the
   group's max/min by 1, 0.95, ..., minimise that group's output error, exact from the diagonal block
   of the (scaled) input Gram matrix over all calibration tokens. Quantize with the final qparams.

Statistics and losses are float32 whatever the block dtype.
"""

from __future__ import annotations

import inspect as pyinspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awqforge.arch import ArchAdapter, Mapping, ScaledActivation, get_adapter
from awqforge.quant import (
    QuantizedTensor,
    compute_qparams,
    dequantize,
    effective_group_size,
    quantize_with_qparams,
)


class NumericalError(RuntimeError):
    """A NaN or inf appeared: the job stops, naming the block and the layer."""


@dataclass
class BlockSettings:
    """How one block is quantized (built from a JobSpec by `from_spec`)."""

    method: str = "awq"  # "awq" | "rtn"
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    scale_search: str = "duo"  # "duo" | "activation" | "both"
    n_grid: int = 20
    clip_search: bool = True
    clip_grid: int = 20  # ratios 1 - i/clip_grid for i < max_shrink * clip_grid (AutoAWQ)
    max_shrink: float = 0.5
    skip_patterns: tuple[str, ...] = ()  # modules_to_not_convert
    chunk_tokens: int = 16384  # tokens per forward chunk (memory bound)
    search_fraction: float = 0.25  # samples scored for every grid point of a module loss
    search_topk: int = 3  # candidates rescored on the remaining samples
    min_tokens: int = 16  # an expert seeing fewer calibration tokens gets no data-driven search
    module_loss: bool = True  # False: score attention/MLP mappings on their linears' outputs (Gram)
    refine_steps: int = 2  # least-squares refits of each group's scale/zero after the clip search (0: off)
    rounding: str = "nearest"  # "nearest" | "gptq": codes rounded with error feedback (same format)
    gptq_damp: float = 0.01  # fraction of the mean Gram diagonal added to it before inverting

    @classmethod
    def from_spec(cls, spec) -> BlockSettings:
        return cls(
            method=getattr(spec.method, "value", spec.method),
            bits=spec.quant.bits,
            group_size=spec.quant.group_size,
            zero_point=spec.quant.zero_point,
            scale_search=getattr(spec.scale_search, "value", spec.scale_search),
            n_grid=spec.n_grid,
            clip_search=spec.clip_search,
            rounding=getattr(spec.rounding, "value", spec.rounding),
            skip_patterns=tuple(spec.quant.modules_to_not_convert),
        )


@dataclass
class LayerMetric:
    """Output MSE of one linear (on its FP calibration inputs) under plain RTN and under our method."""

    name: str
    block: int
    mse_rtn: float
    mse_quant: float
    scale_ratio: float | None  # grid exponent a of the mapping that scaled this linear's input
    clip_ratio: float | None  # mean chosen clip ratio over the groups (None: no clip search)


@dataclass
class BlockResult:
    outputs: torch.Tensor  # FP block output [n, seq, hidden] = the next block's input
    quantized: dict[str, QuantizedTensor]  # by name relative to the block
    layers: list[LayerMetric]
    scales: dict[str, dict]  # by mapping name: prev, linears, mode, ratio, scales, loss, loss_identity
    skipped: list[str] = field(default_factory=list)  # "mapping: reason"


# ---- capture ----------------------------------------------------------------------------------

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def capture_block_inputs(
    model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, run_layers: bool = True
) -> list[tuple[torch.Tensor | None, dict[str, Any]]]:
    """Every decoder block's FP inputs [n, seq, hidden] and the kwargs the model passes it.

    kwargs are captured from a batch-of-one call, so masks and position embeddings broadcast over any
    chunk of samples; they are per block (Gemma2/3 sliding-window layers get their own mask and rope).
    With run_layers=False the blocks are bypassed: only block 0's inputs are real (others None), but
    every block's kwargs are captured for the price of the embeddings (streaming pipelines).
    """
    adapter = get_adapter(model.config)
    layers = adapter.get_layers(model)
    n_layers = len(layers)
    inputs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    kwargs: list[dict | None] = [None] * n_layers
    originals = list(layers)

    def make_hook(i: int, target: nn.Module):
        sig = pyinspect.signature(target.forward)

        def hook(_mod, args, kw):
            hidden, rest = _split_call(sig, args, kw)
            inputs[i].append(hidden.detach())
            if kwargs[i] is None:
                kwargs[i] = _sanitize_kwargs(rest)

        return hook

    handles = []
    try:
        for i, layer in enumerate(originals):
            if not run_layers:
                layers[i] = _Passthrough(layer)
            handles.append(layers[i].register_forward_pre_hook(make_hook(i, layer), with_kwargs=True))
        device = next(model.parameters()).device
        # the base model (no lm_head): logits over the vocabulary are not needed here
        base = getattr(model, "base_model", model)
        batches = [input_ids[:1]] + [
            input_ids[j : j + batch_size] for j in range(1, len(input_ids), batch_size)
        ]
        with torch.no_grad():
            for ids in batches:
                if len(ids):
                    base(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    out = []
    for i in range(n_layers):
        x = torch.cat(inputs[i]) if (run_layers or i == 0) and inputs[i] else None
        out.append((x, kwargs[i] or {}))
    return out


class _Passthrough(nn.Module):
    """Stands in for a decoder layer and returns its input unchanged (kwargs capture only)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def _split_call(sig: pyinspect.Signature, args: tuple, kw: dict) -> tuple[torch.Tensor, dict]:
    """(hidden_states, every other argument by name) of a decoder layer call."""
    bound = sig.bind_partial(*args, **kw)
    rest: dict[str, Any] = {}
    hidden = None
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is pyinspect.Parameter.VAR_KEYWORD:
            rest.update(value)
        elif kind is pyinspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("decoder layer called with extra positional arguments")
        elif hidden is None:
            hidden = value
        else:
            rest[name] = value
    if hidden is None:
        hidden = rest.pop("hidden_states")
    return hidden, rest


def _sanitize_kwargs(kw: dict) -> dict:
    out = {}
    for k, v in kw.items():
        if k in _CACHE_KWARGS:
            out[k] = None
        elif k == "use_cache":
            out[k] = False
        else:
            out[k] = _detach(v)
    return out


def _detach(v):
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_detach(x) for x in v)
    if isinstance(v, list):
        return [_detach(x) for x in v]
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    return v


# ---- folding ----------------------------------------------------------------------------------


@torch.no_grad()
def fold_scales(block: nn.Module, mapping: Mapping, scales: torch.Tensor) -> None:
    """Divide the prev op's output channels by `scales` and multiply the readers' input columns.

    Leaves the block's FP function unchanged (up to rounding in the weight dtype).
    """
    s = scales.detach().float()
    prev = mapping.prev
    if isinstance(prev, nn.Linear):
        rows = mapping.prev_rows or slice(None)
        w = prev.weight
        w[rows] = (w[rows].float() / s[:, None]).to(w.dtype)
        if prev.bias is not None:
            prev.bias[rows] = (prev.bias[rows].float() / s).to(prev.bias.dtype)
    elif isinstance(prev, ScaledActivation):
        prev.scales.mul_(s.to(prev.scales.device, prev.scales.dtype))
    elif not any(True for _ in prev.parameters()):
        # an activation that is not positively homogeneous (GELU): act(x) / s as a module
        new = ScaledActivation(prev, s.to(_device_of(mapping.linears[0])))
        parent_name, _, attr = mapping.prev_name.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, attr, new)
        mapping.prev = new
    else:
        w = prev.weight
        if mapping.norm_plus_one:
            # Gemma: y = x_hat * (1 + w); (1 + w') = (1 + w) / s
            w.copy_(((1.0 + w.float()) / s - 1.0).to(w.dtype))
        else:
            w.copy_((w.float() / s).to(w.dtype))
        b = getattr(prev, "bias", None)
        if b is not None:
            b.copy_((b.float() / s).to(b.dtype))
    for lin in [*mapping.linears, *mapping.absorb]:
        lin.weight.copy_((lin.weight.float() * s[None, :].to(lin.weight.device)).to(lin.weight.dtype))


def _device_of(mod: nn.Module) -> torch.device:
    return next(mod.parameters()).device


# ---- quantization helpers (float32, vectorised) -----------------------------------------------


def _qparams_from_range(w_min, w_max, bits: int, zero_point: bool):
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


def _fake_quant(w: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> torch.Tensor:
    """RTN quantize-dequantize along the last dim in groups; any leading dims; float32."""
    in_f = w.shape[-1]
    g = effective_group_size(in_f, group_size)
    wg = w.reshape(-1, g)
    scales, zeros = _qparams_from_range(
        wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True), bits, zero_point
    )
    q = (torch.round(wg / scales) + zeros).clamp_(0, 2**bits - 1)
    return ((q - zeros) * scales).reshape(w.shape)


def _search_clip(
    w: torch.Tensor, gram: torch.Tensor, s: BlockSettings
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-group clip ratio minimising the group's output error: (scales, zeros, mean ratio)."""
    out_f, in_f = w.shape
    g = effective_group_size(in_f, s.group_size)
    ng = in_f // g
    blocks = _group_blocks(gram, in_f, g)  # [ng, g, g]
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
            sc, z = _qparams_from_range(w_min[sl] * r, w_max[sl] * r, s.bits, s.zero_point)
            dq = ((torch.round(part / sc[..., None]) + z[..., None]).clamp_(0, max_int) - z[..., None]) * sc[
                ..., None
            ]
            d = (dq - part).transpose(0, 1)  # [ng, rows, g]
            err = (torch.bmm(d, blocks) * d).sum(-1).transpose(0, 1)  # [rows, ng]
            better = err < best_err[sl]
            best_err[sl] = torch.where(better, err, best_err[sl])
            best_r[sl] = torch.where(better, torch.full_like(err, r), best_r[sl])
    scales, zeros = _qparams_from_range(w_min * best_r, w_max * best_r, s.bits, s.zero_point)
    return scales, zeros, float(best_r.mean())


def _group_blocks(gram: torch.Tensor, in_f: int, g: int) -> torch.Tensor:
    """The diagonal [g, g] blocks of an input Gram matrix, one per group: [ng, g, g]."""
    ng = in_f // g
    return gram.reshape(ng, g, ng, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _refine_qparams(
    w: torch.Tensor, gram: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, s: BlockSettings
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least-squares refinement of each group's scale (and integer zero) for its output error.

    With the codes q fixed, the dequantized group is a*q + b; the (a, b) minimising
    (w - a q - b)^T G_g (w - a q - b) (G_g: the group's diagonal block of the input Gram matrix)
    solves a 2x2 system. Then s = a, z = round(-b / a) (clamped), the codes are re-rounded, and the
    group keeps the new parameters only if its error went down. Symmetric groups keep z and only
    refit s. Returns (scales, zeros, fraction of groups changed).
    """
    out_f, in_f = w.shape
    g = effective_group_size(in_f, s.group_size)
    ng = in_f // g
    blocks = _group_blocks(gram, in_f, g)
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


def _gptq_codes(
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


def _is_qk(name: str) -> bool:
    """q/k projections get no clip search: their error goes through q k^T, not a linear output."""
    last = name.rsplit(".", 1)[-1]
    return last in ("q_proj", "k_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "query", "key")


# ---- the block algorithm ----------------------------------------------------------------------


class _Stats:
    """What the FP pass collects: Gram matrices per distinct linear input, mapping statistics, calls."""

    def __init__(self, keep_below: int = 0):
        self.key: dict[str, str] = {}  # linear name -> name of the linear whose input Gram it shares
        self.gram: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.abs_sum: dict[int, torch.Tensor] = {}
        self.abs_count: dict[int, int] = {}
        self.calls: dict[str, list[tuple[tuple, dict]]] = {}  # inspected module -> per-chunk (args, kwargs)
        self.fp_out: dict[str, list[torch.Tensor]] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {}  # the inputs themselves, where kept (see keep_below)
        self.keep_below = keep_below  # keep a linear's inputs when the block sees fewer tokens than its width
        self._resolved: dict[str, _Inputs] = {}  # per shared input, built once after the FP pass
        self._seen: list[tuple[torch.Tensor, str]] = []

    def new_chunk(self):
        self._seen = []

    def gram_of(self, name: str) -> tuple[torch.Tensor | None, int]:
        key = self.key.get(name)
        if key is None or self.count.get(key, 0) == 0:
            return None, 0
        return self.gram[key] / self.count[key], self.count[key]

    def inputs_of(self, name: str) -> _Inputs | None:
        """What the losses of one linear need: its Gram matrix, and its inputs when they were kept."""
        key = self.key.get(name)
        if key in self._resolved:
            return self._resolved[key]
        gram, count = self.gram_of(name)
        if gram is None:
            return None
        x = self.inputs.get(key)
        self._resolved[key] = _Inputs(gram, torch.cat(x) if x else None, count)
        return self._resolved[key]


class _Inputs:
    """A linear's calibration inputs X [n, in] as the losses see them: the Gram matrix X^T X / n, and
    X itself when n < in. The output error of a weight error D is then computed as ||X D^T||^2 / n
    (cost n*in*out) instead of sum(D G * D) (cost in^2*out): at a 14336-wide input and a few hundred
    calibration tokens, 50x fewer operations."""

    def __init__(self, gram: torch.Tensor, x: torch.Tensor | None, count: int):
        self.gram, self.x, self.count = gram, x, count

    def scaled(self, inv: torch.Tensor) -> _Inputs:
        """The inputs divided per channel by folded AWQ scales (inv = 1 / s)."""
        inv = inv.to(self.gram.device)
        x = self.x * inv if self.x is not None else None
        return _Inputs(self.gram * inv[:, None] * inv[None, :], x, self.count)

    def row_errors(self, delta: torch.Tensor) -> torch.Tensor:
        """Per output row, the squared output error per token of weight error delta [..., out, in]."""
        if self.x is not None:
            return (delta @ self.x.T).pow(2).sum(-1) / self.count
        return ((delta @ self.gram) * delta).sum(-1)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _main_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _chunks(n: int, seq: int, s: BlockSettings) -> tuple[list[slice], list[slice]]:
    """Sample chunks of at most chunk_tokens tokens: (coarse set, rest) for the two-stage search."""
    per = max(1, s.chunk_tokens // max(1, seq))
    n_coarse = n if (s.search_fraction >= 1 or n < 4) else max(1, math.ceil(n * s.search_fraction))
    coarse = [slice(i, min(i + per, n_coarse)) for i in range(0, n_coarse, per)]
    rest = [slice(i, min(i + per, n)) for i in range(n_coarse, n, per)]
    return coarse, rest


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
) -> BlockResult:
    """Quantize one decoder block in place (see the module docstring); returns its FP output and codes."""
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
    linears = adapter.quantizable_linears(block, s.skip_patterns)
    for name, lin in linears.items():
        if lin.in_features % effective_group_size(lin.in_features, s.group_size):
            raise ValueError(
                f"{where}: group size {s.group_size} does not divide {name}'s input width {lin.in_features}"
            )
    all_maps = adapter.mappings(block) if s.method == "awq" else []
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

    device = _device_of(block)
    dtype = next(block.parameters()).dtype
    n, seq = inputs.shape[0], inputs.shape[1]
    coarse, rest = _chunks(n, seq, s)
    kwargs_dev = _to_device(layer_kwargs, device)

    # 1. FP pass: block outputs, input Grams, mapping statistics, inspected-module calls
    stats = _Stats(keep_below=n * seq)  # n * seq: the tokens this block sees
    handles = _install_hooks(linears, maps, stats, s)
    outputs = []
    try:
        for sl in coarse + rest:
            stats.new_chunk()
            x = inputs[sl].to(device=device, dtype=dtype)
            outputs.append(_main_output(block(x, **kwargs_dev)).to(inputs.device))
    finally:
        for h in handles:
            h.remove()
        stats.new_chunk()
    outputs = torch.cat(outputs)
    if not torch.isfinite(outputs).all():
        raise NumericalError(
            f"{where}: the FP block output has NaN/inf values (check the inputs and weights)"
        )

    # plain RTN error of every linear, before anything changes
    orig = {name: lin.weight.detach().float().clone() for name, lin in linears.items()}
    mse_rtn = {}
    for name, w in orig.items():
        inp = stats.inputs_of(name)
        if inp is not None and not torch.isfinite(inp.gram).all():
            raise NumericalError(f"{where}, layer {name}: the calibration inputs have NaN/inf values")
        mse_rtn[name] = _mse(_fake_quant(w, s.bits, s.group_size, s.zero_point) - w, inp, None)

    # 2-3. scale search and folding, mapping by mapping
    in_scale: dict[str, torch.Tensor] = {}
    out_scale: dict[str, tuple[slice, torch.Tensor]] = {}
    ratio_of: dict[str, float] = {}
    scales_info: dict[str, dict] = {}
    names_of = {id(m): n for n, m in linears.items()}
    for idx, m in enumerate(maps):
        cnt = stats.abs_count.get(idx, 0)
        if cnt < s.min_tokens:
            skipped.append(
                f"{m.name}: only {cnt} calibration tokens reach it (fewer than min_tokens={s.min_tokens})"
            )
            continue
        x_mean = stats.abs_sum[idx] / cnt
        qlins = [(names_of[id(lin)], lin) for lin in m.linears if id(lin) in quantized_ids]
        w_mean = _w_mean([orig[n] for n, _ in qlins], s.group_size).to(x_mean.device)
        cands = _candidates(x_mean, w_mean, s)
        if m.linear_loss or not s.module_loss:
            losses = _gram_losses(cands, qlins, orig, stats, s)
            best = int(torch.argmin(losses))
        else:
            losses, best = _module_losses(cands, qlins, m, stats, s, len(coarse), where)
        if not math.isfinite(float(losses[best])):
            raise NumericalError(f"{where}, mapping {m.name}: every scale candidate gives a NaN/inf loss")
        mode, ratio, best_s = cands[best]
        if not torch.isfinite(best_s).all():
            raise NumericalError(f"{where}, mapping {m.name}: non-finite scales")
        fold_scales(block, m, best_s)
        for n_, _ in qlins:
            in_scale[n_] = in_scale.get(n_, torch.ones_like(best_s)) * best_s
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
            "mode": mode,
            "ratio": ratio,
            "scales": best_s.detach().cpu(),
            "loss": float(losses[best]),
            "loss_identity": float(losses[identity])
            if identity is not None and torch.isfinite(losses[identity])
            else None,
        }

    # 4. clip search and quantization
    quantized: dict[str, QuantizedTensor] = {}
    metrics: list[LayerMetric] = []
    for name, lin in linears.items():
        w = lin.weight.detach().float()
        inp = stats.inputs_of(name)
        s_in = in_scale.get(name)
        if inp is not None and s_in is not None:
            inp = inp.scaled(1.0 / s_in)
        gram, cnt = (inp.gram, inp.count) if inp is not None else (None, 0)
        clip_ratio = None
        if (
            s.method == "awq"
            and s.clip_search
            and gram is not None
            and cnt >= s.min_tokens
            and not _is_qk(name)
        ):
            scales, zeros, clip_ratio = _search_clip(w, gram, s)
            if s.refine_steps:
                scales, zeros, _ = _refine_qparams(w, gram, scales, zeros, s)
        else:
            scales, zeros = compute_qparams(w, s.bits, s.group_size, s.zero_point)
        if s.method == "awq" and s.rounding == "gptq" and gram is not None and cnt >= s.min_tokens:
            q = _gptq_codes(w, gram, scales, zeros, s).to(torch.uint8)
        else:
            q = quantize_with_qparams(w, scales, zeros, s.bits, s.group_size)
        qt = QuantizedTensor(q, scales, zeros.to(torch.uint8), s.bits, s.group_size)
        dq = dequantize(q, scales, zeros, s.group_size)
        if not torch.isfinite(dq).all():
            raise NumericalError(f"{where}, layer {name}: quantized weight has NaN/inf values")
        row_scale = None
        if name in out_scale:
            rows, sc = out_scale[name]
            row_scale = torch.ones(w.shape[0], device=w.device)
            row_scale[rows] = sc.to(w.device)
        mse_q = _mse(dq - w, inp, row_scale)
        lin.weight.copy_(dq.to(lin.weight.dtype))
        quantized[name] = qt
        metrics.append(LayerMetric(name, block_index, mse_rtn[name], mse_q, ratio_of.get(name), clip_ratio))
    return BlockResult(
        outputs=outputs, quantized=quantized, layers=metrics, scales=scales_info, skipped=skipped
    )


def _to_device(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to_device(x, device) for x in v)
    if isinstance(v, list):
        return [_to_device(x, device) for x in v]
    if isinstance(v, dict):
        return {k: _to_device(x, device) for k, x in v.items()}
    return v


def _install_hooks(linears, maps, stats: _Stats, s: BlockSettings) -> list:
    handles = []

    def linear_hook(name: str) -> Callable:
        def hook(_mod, args):
            x = args[0]
            for t, key in stats._seen:
                if t is x:
                    stats.key.setdefault(name, key)
                    return
            stats._seen.append((x, name))
            key = stats.key.setdefault(name, name)
            if key != name:  # shared in an earlier chunk; this chunk saw it first here
                stats._seen[-1] = (x, key)
            x2 = x.reshape(-1, x.shape[-1]).float()
            if x2.shape[0] == 0:
                return
            if key not in stats.gram:
                stats.gram[key] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
                stats.count[key] = 0
            stats.gram[key].addmm_(x2.T, x2)
            stats.count[key] += x2.shape[0]
            if stats.keep_below > 0 and stats.keep_below < x2.shape[1]:
                stats.inputs.setdefault(key, []).append(x2)

        return hook

    for name, lin in linears.items():
        handles.append(lin.register_forward_pre_hook(linear_hook(name)))

    by_module: dict[int, list[int]] = {}
    modules: dict[int, tuple[str, nn.Module]] = {}
    for idx, m in enumerate(maps):
        target = m.inspect if m.inspect is not None else m.linears[0]
        by_module.setdefault(id(target), []).append(idx)
        modules[id(target)] = (m.inspect_name or m.linear_names[0], target)
    module_loss = {id(m.inspect) for m in maps if not m.linear_loss and s.module_loss}

    for mid, (mname, target) in modules.items():
        idxs = by_module[mid]
        record = mid in module_loss

        def pre(_mod, args, kwargs, idxs=idxs, mname=mname, record=record):
            x = _first_tensor(args, kwargs)
            flat = x.reshape(-1, x.shape[-1]).float()
            a = flat.abs().sum(0)
            for i in idxs:
                stats.abs_sum[i] = stats.abs_sum[i] + a if i in stats.abs_sum else a
                stats.abs_count[i] = stats.abs_count.get(i, 0) + flat.shape[0]
            if record:
                stats.calls.setdefault(mname, []).append((_detach(args), _detach(kwargs)))

        handles.append(target.register_forward_pre_hook(pre, with_kwargs=True))
        if record:

            def post(_mod, _args, out, mname=mname):
                stats.fp_out.setdefault(mname, []).append(_main_output(out).detach())

            handles.append(target.register_forward_hook(post))
    return handles


def _mse(delta: torch.Tensor, inp: _Inputs | None, row_scale: torch.Tensor | None) -> float:
    """Output MSE per token and output of a weight error, from the layer's calibration inputs."""
    if inp is None:
        return 0.0
    per_row = inp.row_errors(delta)
    if row_scale is not None:
        per_row = per_row * row_scale.pow(2)
    return float(per_row.mean())


def _w_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |W| normalised by each group's max (AutoAWQ / llm-compressor)."""
    total, rows = None, 0
    for w in weights:
        g = effective_group_size(w.shape[1], group_size)
        wg = w.abs().reshape(-1, g)
        wg = wg / (wg.amax(dim=1, keepdim=True) + 1e-6)
        part = wg.reshape(w.shape).sum(0)
        total = part if total is None else total + part
        rows += w.shape[0]
    return total / rows


def _candidates(
    x_mean: torch.Tensor, w_mean: torch.Tensor, s: BlockSettings
) -> list[tuple[str, float, torch.Tensor]]:
    modes = {"duo": ["duo"], "activation": ["activation"], "both": ["activation", "duo"]}[s.scale_search]
    out = []
    for mode in modes:
        for i in range(s.n_grid):
            a = i / s.n_grid
            if mode == "duo":
                sc = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)
            else:
                sc = x_mean.pow(a)
            sc = sc.clamp(min=1e-4)
            sc = sc / (sc.max() * sc.min()).sqrt()
            sc = torch.where(torch.isfinite(sc), sc, torch.ones_like(sc))
            out.append((mode, a, sc))
    if "activation" not in modes:
        out.append(("identity", 0.0, torch.ones_like(x_mean)))
    return out


def _gram_losses(cands, qlins, orig, stats: _Stats, s: BlockSettings) -> torch.Tensor:
    """Exact output MSE of every candidate on the linears' own outputs, from their input Grams."""
    losses = torch.zeros(len(cands), device=cands[0][2].device)
    scales = torch.stack([c[2] for c in cands])  # [C, in]
    for name, _lin in qlins:
        inp = stats.inputs_of(name)
        if inp is None:
            continue
        w = orig[name].to(inp.gram.device)
        step = max(1, (1 << 25) // max(1, w.numel()))
        for c0 in range(0, len(cands), step):
            sc = scales[c0 : c0 + step, None, :].to(w.device)
            delta = _fake_quant(w[None] * sc, s.bits, s.group_size, s.zero_point) / sc - w[None]
            losses[c0 : c0 + step] += inp.row_errors(delta).sum(-1).to(losses.device) / w.shape[0]
    return losses


def _module_losses(cands, qlins, m: Mapping, stats: _Stats, s: BlockSettings, n_coarse: int, where: str):
    """Output MSE of the inspected module per candidate: all on the coarse chunks, top-k on the rest."""
    name = m.inspect_name
    calls, fp = stats.calls.get(name, []), stats.fp_out.get(name, [])
    saved = [(lin, lin.weight.detach().clone()) for _, lin in qlins]

    def score(ci: int, chunk_ids) -> float:
        sc = cands[ci][2]
        for (_n, lin), (_, w0) in zip(qlins, saved, strict=True):
            w = w0.float()
            scd = sc.to(w.device)[None, :]
            lin.weight.copy_(
                (_fake_quant(w * scd, s.bits, s.group_size, s.zero_point) / scd).to(lin.weight.dtype)
            )
        total, count = 0.0, 0
        for k in chunk_ids:
            args, kwargs = calls[k]
            out = _main_output(m.inspect(*args, **kwargs)).float()
            ref = fp[k].float()
            total += float((out - ref).pow(2).sum())
            count += ref.numel()
        return total / max(1, count)

    losses = torch.full((len(cands),), math.inf)
    try:
        coarse_ids = list(range(min(n_coarse, len(calls))))
        rest_ids = list(range(len(coarse_ids), len(calls)))
        for ci in range(len(cands)):
            losses[ci] = score(ci, coarse_ids)
        finite = torch.isfinite(losses)
        if not finite.any():
            raise NumericalError(f"{where}, mapping {m.name}: every scale candidate gives a NaN/inf loss")
        if rest_ids:
            n_c = sum(fp[k].numel() for k in coarse_ids)
            n_r = sum(fp[k].numel() for k in rest_ids)
            order = torch.argsort(torch.where(finite, losses, torch.full_like(losses, math.inf)))
            top = order[: max(1, s.search_topk)].tolist()
            full = torch.full_like(losses, math.inf)
            for ci in top:
                full[ci] = (losses[ci] * n_c + score(ci, rest_ids) * n_r) / (n_c + n_r)
            losses = full
    finally:
        for lin, w0 in saved:
            lin.weight.copy_(w0)
    best = int(torch.argmin(losses))
    return losses, best
