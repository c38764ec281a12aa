"""The FP pass's statistics (input Gram matrices, activation means, inspected calls) and the scale search."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from awqforge import limits
from awqforge.arch import Mapping, UnfusedExperts
from awqforge.awq.capture import PerSample
from awqforge.awq.qparams import fake_quant
from awqforge.awq.settings import BlockSettings, NumericalError
from awqforge.quant import effective_group_size


def detach(v):
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(detach(x) for x in v)
    if isinstance(v, list):
        return [detach(x) for x in v]
    if isinstance(v, dict):
        return {k: detach(x) for k, x in v.items()}
    return v


# Elements per batch of the weight-sized temporaries (fake-quantized candidates, errors, dequantized rows):
# weights are processed in row chunks of about this many elements, so that a 28672-wide linear does not
# make several full-size float32 copies of itself at once.
CHUNK_ELEMS = limits.CHUNK_ELEMS


def row_slices(out_f: int, in_f: int, batch: int = 1) -> list[slice]:
    """Row chunks of an [out_f, in_f] weight (times `batch` candidates) of about CHUNK_ELEMS elements."""
    rows = max(1, CHUNK_ELEMS // max(1, batch * in_f))
    return [slice(r, min(r + rows, out_f)) for r in range(0, out_f, rows)]


def _gram_blocks(n: int) -> list[tuple[int, int]]:
    step = -(-n // limits.gram_blocks(n))
    return [(i0, min(i0 + step, n)) for i0 in range(0, n, step)]


def accumulate_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += x^T x. For a wide input only the block rows' diagonal and right-hand blocks are computed
    (limits.gram_blocks; 9/16 of the multiply-adds with 8 blocks: a Gram matrix is symmetric); `mirror_gram` fills the rest once
    the pass is over. The blocks computed are the same sums as the full product's, so nothing changes."""
    n = x.shape[1]
    if limits.gram_blocks(n) == 1:
        gram.addmm_(x.T, x)
        return
    for i0, i1 in _gram_blocks(n):
        gram[i0:i1, i0:].addmm_(x[:, i0:i1].T, x[:, i0:])


def mirror_gram(gram: torch.Tensor) -> torch.Tensor:
    """The blocks below the diagonal blocks, from those above (after `accumulate_gram`); in place."""
    n = gram.shape[0]
    if limits.gram_blocks(n) > 1:
        for i0, i1 in _gram_blocks(n):
            gram[i1:, i0:i1] = gram[i0:i1, i1:].T
    return gram


def gram_form(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per row of delta [..., out, in], the quadratic form d G d^T of a symmetric G.

    For a wide input only the diagonal and right-hand column blocks of G are multiplied
    (limits.form_blocks; 9/16 of the multiply-adds with 8 blocks): d G d^T = sum_b (d_b G_bb d_b^T +
    2 d_b G_b,>b d_>b^T), the same terms as the full product's, summed in another order."""
    n = gram.shape[-1]
    k = limits.form_blocks(n)
    if k == 1:
        return ((delta @ gram) * delta).sum(-1)
    step = -(-n // k)
    total = None
    for i0 in range(0, n, step):
        i1 = min(i0 + step, n)
        part = delta[..., i0:i1] @ gram[i0:i1, i0:]  # [..., out, n - i0]
        term = (part[..., : i1 - i0] * delta[..., i0:i1]).sum(-1)
        if i1 < n:
            term = term + 2 * (part[..., i1 - i0 :] * delta[..., i1:]).sum(-1)
        total = term if total is None else total + term
    return total


class Stats:
    """What the FP pass collects: per distinct linear input its Gram matrix (or, when the block sees fewer
    tokens than the input is wide, the inputs themselves), mapping statistics, inspected calls."""

    def __init__(self, keep_below: int = 0):
        self.key: dict[str, str] = {}  # linear name -> name of the linear whose input it shares
        self.gram: dict[str, torch.Tensor] = {}  # accumulated X^T X (inputs not kept)
        self.count: dict[str, int] = {}
        self.abs_sum: dict[int, torch.Tensor] = {}
        self.abs_count: dict[int, int] = {}
        self.calls: dict[str, list[tuple[tuple, dict]]] = {}  # inspected module -> per-chunk (args, kwargs)
        self.fp_out: dict[str, list[torch.Tensor]] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {}  # the inputs themselves, where kept (see keep_below)
        self.keep_below = (
            keep_below  # keep a linear's inputs (no Gram) when the block sees fewer tokens than its width
        )
        self._resolved: dict[str, Inputs] = {}  # per shared input, built once after the FP pass
        self._seen: list[tuple[torch.Tensor, str]] = []
        self.mask: torch.Tensor | None = None  # the current chunk's real-token mask, flat [rows * seq] (bool)
        self.call_masks: dict[str, list[torch.Tensor | None]] = {}  # per inspected module, per recorded call

    def new_chunk(self, mask: torch.Tensor | None = None):
        """Start a chunk of samples; `mask` (flat, bool) marks its real tokens (None: all are real)."""
        self._seen = []
        self.mask = mask

    def real_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """The rows of a [tokens, features] input that are real tokens of the current chunk.

        A tensor with one row per position of the chunk is masked; any other row count (an expert's gathered
        tokens, already without the padding: see `UnfusedExperts.token_keep`) is returned as it is."""
        if self.mask is None or flat.shape[0] != self.mask.numel():
            return flat
        return flat[self.mask.to(flat.device)]

    def keeps(self, width: int) -> bool:
        return 0 < self.keep_below < width

    def inputs_of(self, name: str) -> Inputs | None:
        """What the losses of one linear need: its inputs when kept, else its Gram matrix X^T X / n."""
        key = self.key.get(name)
        if key is None:
            return None
        if key in self._resolved:
            return self._resolved[key]
        count = self.count.get(key, 0)
        if count == 0:
            return None
        parts = self.inputs.pop(key, None)
        if parts:
            x = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
            del parts
            self._resolved[key] = Inputs(None, x, count)
        else:
            gram = mirror_gram(self.gram.pop(key))
            gram /= count  # in place: the accumulated matrix is not needed any more
            self._resolved[key] = Inputs(gram, None, count)
        return self._resolved[key]


class Inputs:
    """A linear's calibration inputs X [n, in] as the losses see them: X itself when n < in, else the Gram
    matrix G = X^T X / n, optionally with the input channels divided by folded AWQ scales (inv = 1 / s).

    The output error of a weight error D is ||X D^T||^2 / n (cost n*in*out) from the inputs, or
    sum(D G * D) (cost in^2*out) from the Gram matrix: at a 28672-wide input and a few thousand calibration
    tokens, X is 14x smaller than G and the loss 14x cheaper. The group blocks of G that the clip search
    needs come from X directly; the whole G only for GPTQ rounding (`full_gram`)."""

    def __init__(
        self, gram: torch.Tensor | None, x: torch.Tensor | None, count: int, inv: torch.Tensor | None = None
    ):
        self.gram, self.x, self.count, self.inv = gram, x, count, inv
        self._blocks: dict[int, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return (self.x if self.x is not None else self.gram).device

    @property
    def width(self) -> int:
        return (self.x if self.x is not None else self.gram).shape[-1]

    def finite(self) -> bool:
        return bool(torch.isfinite(self.x if self.x is not None else self.gram).all())

    def scaled(self, inv: torch.Tensor) -> Inputs:
        """The inputs divided per channel by folded AWQ scales (inv = 1 / s)."""
        inv = inv.to(self.device)
        if self.x is not None:
            return Inputs(None, self.x * inv, self.count)
        return Inputs(self.gram, None, self.count, inv if self.inv is None else self.inv * inv)

    def row_errors(self, delta: torch.Tensor) -> torch.Tensor:
        """Per output row, the squared output error per token of weight error delta [..., out, in]."""
        if self.x is not None:
            return (delta @ self.x.T).pow(2).sum(-1) / self.count
        if self.inv is not None:
            delta = delta * self.inv
        return gram_form(delta, self.gram)

    def diag(self) -> torch.Tensor:
        """The diagonal of G: each input channel's mean square."""
        if self.x is not None:
            return self.x.pow(2).sum(0) / self.count
        d = torch.diagonal(self.gram)
        return d if self.inv is None else d * self.inv.pow(2)

    def blocks(self, g: int) -> torch.Tensor:
        """The diagonal [g, g] blocks of G, one per input group: [n_groups, g, g]."""
        if g not in self._blocks:
            ng = self.width // g
            if self.x is not None:
                xg = self.x.reshape(-1, ng, g).transpose(0, 1)  # [ng, n, g]
                b = torch.bmm(xg.transpose(1, 2), xg) / self.count
            else:
                b = self.gram.reshape(ng, g, ng, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
                if self.inv is not None:
                    ig = self.inv.reshape(ng, g)
                    b = b * ig[:, :, None] * ig[:, None, :]
            self._blocks[g] = b
        return self._blocks[g]

    def full_gram(self) -> torch.Tensor:
        """G as one [in, in] matrix (a new tensor when it is computed from X or scaled)."""
        if self.x is not None:
            return (self.x.T @ self.x) / self.count
        if self.inv is None:
            return self.gram
        return self.gram * self.inv[:, None] * self.inv[None, :]


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def main_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def chunks(n: int, seq: int, s: BlockSettings) -> tuple[list[slice], list[slice]]:
    """Sample chunks of at most chunk_tokens tokens: (coarse set, rest) for the two-stage search."""
    per = max(1, s.chunk_tokens // max(1, seq))
    # at least 4 coarse samples: the paired test needs them (contenders)
    n_coarse = n if (s.search_fraction >= 1 or n < 4) else max(4, math.ceil(n * s.search_fraction))
    coarse = [slice(i, min(i + per, n_coarse)) for i in range(0, n_coarse, per)]
    # the rest in chunks no larger than the coarse set: the rescoring race drops candidates between them
    step = min(per, n_coarse)
    rest = [slice(i, min(i + step, n)) for i in range(n_coarse, n, step)]
    return coarse, rest


def to_device(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, PerSample):
        return dataclasses.replace(v, tensor=v.tensor.to(device))
    if isinstance(v, tuple):
        return tuple(to_device(x, device) for x in v)
    if isinstance(v, list):
        return [to_device(x, device) for x in v]
    if isinstance(v, dict):
        return {k: to_device(x, device) for k, x in v.items()}
    return v


def install_hooks(linears, maps, stats: Stats, s: BlockSettings) -> list:
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
            x2 = stats.real_rows(x.reshape(-1, x.shape[-1])).float()
            if x2.shape[0] == 0:
                return
            stats.count[key] = stats.count.get(key, 0) + x2.shape[0]
            if stats.keeps(x2.shape[1]):
                stats.inputs.setdefault(key, []).append(x2)
                return
            if key not in stats.gram:
                stats.gram[key] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
            accumulate_gram(stats.gram[key], x2)

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
            x = first_tensor(args, kwargs)
            flat = stats.real_rows(x.reshape(-1, x.shape[-1])).float()
            a = flat.abs().sum(0)
            for i in idxs:
                stats.abs_sum[i] = stats.abs_sum[i] + a if i in stats.abs_sum else a
                stats.abs_count[i] = stats.abs_count.get(i, 0) + flat.shape[0]
            if record:
                stats.calls.setdefault(mname, []).append((detach(args), detach(kwargs)))
                stats.call_masks.setdefault(mname, []).append(stats.mask)

        handles.append(target.register_forward_pre_hook(pre, with_kwargs=True))
        if record:

            def post(_mod, _args, out, mname=mname):
                stats.fp_out.setdefault(mname, []).append(main_output(out).detach())

            handles.append(target.register_forward_hook(post))
    return handles


def mse(delta: torch.Tensor, inp: Inputs | None, row_scale: torch.Tensor | None) -> float:
    """Output MSE per token and output of a weight error, from the layer's calibration inputs."""
    if inp is None:
        return 0.0
    per_row = inp.row_errors(delta)
    if row_scale is not None:
        per_row = per_row * row_scale.pow(2)
    return float(per_row.mean())


def rtn_mse(w: torch.Tensor, inp: Inputs | None, s: BlockSettings) -> float:
    """Output MSE of plain round-to-nearest of weight w (any dtype), computed in row chunks."""
    if inp is None:
        return 0.0
    per_row = torch.empty(w.shape[0], device=inp.device)
    for sl in row_slices(*w.shape):
        part = w[sl].float().to(inp.device)
        per_row[sl] = inp.row_errors(fake_quant(part, s.bits, s.group_size, s.zero_point) - part)
    return float(per_row.mean())


def w_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |W| normalised by each group's max (AutoAWQ / llm-compressor)."""
    total, rows = None, 0
    for w in weights:
        g = effective_group_size(w.shape[1], group_size)
        for sl in row_slices(*w.shape):
            wg = w[sl].float().abs().reshape(-1, g)
            wg = wg / (wg.amax(dim=1, keepdim=True) + 1e-6)
            part = wg.reshape(-1, w.shape[1]).sum(0)
            total = part if total is None else total + part
        rows += w.shape[0]
    return total / rows


def candidates(
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


def scaled_fake_quant(w: torch.Tensor, sc: torch.Tensor, s: BlockSettings) -> torch.Tensor:
    """Q(W * s) / s for candidate scales sc [..., 1, in] (float32)."""
    return fake_quant(w * sc, s.bits, s.group_size, s.zero_point) / sc


def gram_losses(
    cands,
    qlins,
    orig,
    stats: Stats,
    s: BlockSettings,
    *,
    per_token_sum: bool = False,
    only: list[int] | None = None,
    diagonal: bool = False,
) -> torch.Tensor:
    """Exact output MSE of every candidate (or those in `only`; the others inf) on the linears' own outputs,
    from their inputs (or Grams); with `per_token_sum`, the squared errors summed over outputs and tokens
    instead (float64, the screen's score). `diagonal`: the Gram matrix's diagonal only, sum(D^2 diag(G)), the
    prescreen's approximation (it drops the input channels' correlations; in^2 fewer multiply-adds).

    Batches of candidates x weight rows of about CHUNK_ELEMS elements: the per-row errors are gathered and
    summed per candidate, as over the whole weight at once."""
    idx = list(range(len(cands))) if only is None else list(only)
    if per_token_sum:
        sums = torch.zeros(len(idx), dtype=torch.float64)
    else:
        sums = torch.zeros(len(idx), device=cands[0][2].device)
    scales = torch.stack([cands[i][2] for i in idx])  # [C, in]
    for name, _lin in qlins:
        inp = stats.inputs_of(name)
        if inp is None:
            continue
        diag = inp.diag() if diagonal else None
        w = orig[name]  # the compute dtype; float32 row by row below
        out_f, in_f = w.shape
        step = max(1, CHUNK_ELEMS // max(1, w.numel()))
        for c0 in range(0, len(idx), step):
            sc = scales[c0 : c0 + step, None, :].to(inp.device)
            errs = torch.empty(sc.shape[0], out_f, device=inp.device)
            for sl in row_slices(out_f, in_f, sc.shape[0]):
                part = w[sl].float().to(inp.device)[None]
                delta = scaled_fake_quant(part, sc, s) - part
                errs[:, sl] = (delta.pow(2) * diag).sum(-1) if diagonal else inp.row_errors(delta)
            if per_token_sum:
                sums[c0 : c0 + step] += errs.sum(-1).double().cpu() * inp.count
            else:
                sums[c0 : c0 + step] += errs.sum(-1).to(sums.device) / out_f
    if only is None:
        return sums
    losses = torch.full((len(cands),), math.inf, dtype=sums.dtype, device=sums.device)
    losses[idx] = sums
    return losses


def prescreen(cands, qlins, orig, stats: Stats, s: BlockSettings, keep: int) -> list[int] | None:
    """The `keep` candidates of lowest diagonal-Gram loss (grid order on ties), plus s = 1 (no scale: the
    search's pick is never worse than leaving the channels alone), or None (every candidate) when the
    prescreen is off or would keep them all."""
    if keep <= 0 or keep >= len(cands):
        return None
    approx = gram_losses(cands, qlins, orig, stats, s, diagonal=True)
    kept = shortlist(approx, keep)
    kept += [i for i, c in enumerate(cands) if c[0] == "identity" and i not in kept]
    return kept


def squared_error(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """Sum of squared differences and the number of terms, over the real tokens only when `mask` (flat, one
    entry per position of the chunk) is given and the output has one row per position."""
    if mask is None or ref.shape[:-1].numel() != mask.numel():
        return float((out - ref).pow(2).sum()), ref.numel()
    keep = mask.to(ref.device)
    d = (out.reshape(mask.numel(), -1)[keep] - ref.reshape(mask.numel(), -1)[keep]).pow(2)
    return float(d.sum()), d.numel()


def screen_losses(
    cands, qlins, orig, stats: Stats, s: BlockSettings, only: list[int] | None = None
) -> torch.Tensor:
    """The screen of a module-scored mapping: per candidate, the exact squared error of the mapping's linears'
    own outputs summed over its linears, outputs and calibration tokens, sum_l n_l tr(dW_l G_l dW_l^T) with
    dW = Q(W*s)/s - W (a linear seeing more tokens, as a busy MoE expert, weighs more). No module forward."""
    return gram_losses(cands, qlins, orig, stats, s, per_token_sum=True, only=only)


def row_errors(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> list[float]:
    """Each sample row's mean squared error over its real tokens (rows with none left out)."""
    if out.dim() < 3:  # tokens flattened (no sample rows to tell apart)
        return []
    d = (out - ref).pow(2).reshape(out.shape[0], -1, out.shape[-1]).sum(-1)  # [rows, tokens]
    if mask is None or mask.shape != d.shape:
        return (d.mean(1) / out.shape[-1]).tolist()
    keep = mask.to(d.device)
    n = keep.sum(1)
    per = (d * keep).sum(1) / (n.clamp(min=1) * out.shape[-1])
    return [float(v) for v, c in zip(per, n, strict=True) if int(c) > 0]


def contenders(per_row: dict[int, list[float]], ranked: list[int], z: float) -> list[int] | None:
    """The candidates the rest of the samples must decide between: the coarse best (ranked[0]) and every
    candidate not clearly worse than it on the coarse samples, by a paired test on their per-sample errors
    (mean difference above z standard errors: the same samples, so the sample-to-sample spread cancels).
    None when the coarse samples are too few to test (fewer than 4 rows)."""
    best = ranked[0]
    keep = [best]
    b = torch.tensor(per_row[best], dtype=torch.float64)
    if b.numel() < 4:
        return None
    for ci in ranked[1:]:
        d = torch.tensor(per_row[ci], dtype=torch.float64) - b
        se = float(d.std()) / math.sqrt(d.numel())
        if not float(d.mean()) > z * se:
            keep.append(ci)
    return keep


def shortlist(screen: torch.Tensor, k: int) -> list[int]:
    """The k candidates of lowest screen loss, best first (NaN/inf last; ties in grid order)."""
    key = torch.where(torch.isfinite(screen), screen, torch.full_like(screen, math.inf))
    order = sorted(range(len(key)), key=lambda i: (float(key[i]), i))
    return order[: max(1, k)]


def module_losses(
    cands,
    qlins,
    m: Mapping,
    stats: Stats,
    s: BlockSettings,
    n_coarse: int,
    where: str,
    only: list[int] | None = None,
):
    """Output MSE of the inspected module per candidate: all (or those in `only`, the screen's short list) on
    the coarse chunks, the top `search_topk` of those on the rest; candidates not scored keep an inf loss."""
    name = m.inspect_name
    calls, fp = stats.calls.get(name, []), stats.fp_out.get(name, [])
    masks = stats.call_masks.get(name) or [None] * len(calls)
    # experts skip the padding in the reruns as in the FP pass (their outputs there are not scored)
    experts = (
        [mod for mod in m.inspect.modules() if isinstance(mod, UnfusedExperts)]
        if any(mk is not None for mk in masks)
        else []
    )
    # The candidates' weights go into buffers swapped in for the linears' own (restored after), filled in row
    # chunks: no copy of the current weights and no full-size temporaries.
    saved = [(lin, lin._parameters["weight"]) for _, lin in qlins]
    bufs = [torch.empty_like(p) for _, p in saved]

    # the race's contenders keep their fake-quantized weights between chunks when all of them fit the budget
    cache: dict[int, list[torch.Tensor]] = {}
    weight_bytes = sum(p.numel() * p.element_size() for _, p in saved)

    def install(ci: int, keep: bool = False) -> None:
        """The linears read candidate ci's fake-quantized weights: kept ones, or filled into the buffers."""
        if ci in cache:
            for (lin, _), w in zip(saved, cache[ci], strict=True):
                lin._parameters["weight"] = nn.Parameter(w, requires_grad=False)
            return
        sc = cands[ci][2]
        for (lin, w0), buf in zip(saved, bufs, strict=True):
            scd = sc.to(w0.device)[None, :]
            for sl in row_slices(*w0.shape):
                buf[sl] = scaled_fake_quant(w0[sl].float(), scd, s)
            lin._parameters["weight"] = nn.Parameter(buf, requires_grad=False)
        if keep:
            cache[ci] = [buf.clone() for buf in bufs]

    def score(ci: int, chunk_ids, per_sample: bool = False, keep: bool = False) -> tuple[float, list[float]]:
        """(mean squared error over the chunks' real terms, each sample row's own mean error if per_sample:
        the paired test reads them on the coarse chunks only)."""
        install(ci, keep)
        total, count, rows = 0.0, 0, []
        for k in chunk_ids:
            args, kwargs = calls[k]
            for mod in experts:
                mod.token_keep = masks[k]
            out = main_output(m.inspect(*args, **kwargs)).float()
            err, n = squared_error(out, fp[k].float(), masks[k])
            total += err
            count += n
            if per_sample:
                rows += row_errors(out, fp[k].float(), masks[k])
        return total / max(1, count), rows

    def terms(k: int) -> int:  # the squared-error terms of recorded call k (its real tokens)
        if masks[k] is None or fp[k].shape[:-1].numel() != masks[k].numel():
            return fp[k].numel()
        return int(masks[k].sum()) * (fp[k].numel() // masks[k].numel())

    losses = torch.full((len(cands),), math.inf)
    try:
        coarse_ids = list(range(min(n_coarse, len(calls))))
        rest_ids = list(range(len(coarse_ids), len(calls)))
        per_row: dict[int, list[float]] = {}
        for ci in range(len(cands)) if only is None else only:
            losses[ci], per_row[ci] = score(ci, coarse_ids, per_sample=s.rescore_z > 0)
        finite = torch.isfinite(losses)
        if not finite.any():
            raise NumericalError(f"{where}, mapping {m.name}: every scale candidate gives a NaN/inf loss")
        if rest_ids:
            n_c = sum(terms(k) for k in coarse_ids)
            n_r = sum(terms(k) for k in rest_ids)
            order = torch.argsort(torch.where(finite, losses, torch.full_like(losses, math.inf)))
            top = [ci for ci in order[: max(1, s.search_topk)].tolist() if finite[ci]]
            if s.rescore_z > 0:
                top = contenders(per_row, [ci for ci in order.tolist() if finite[ci]], s.rescore_z) or top
                top = top[: s.rescore_max] if s.rescore_max > 0 else top
            full = torch.full_like(losses, math.inf)
            if len(top) == 1:  # the coarse best is clearly best: the rest cannot change the pick
                full[top[0]] = losses[top[0]]
            elif not (s.race and s.rescore_z > 0):
                for ci in top:
                    full[ci] = (losses[ci] * n_c + score(ci, rest_ids)[0] * n_r) / (n_c + n_r)
            else:
                # A race over the rest, chunk by chunk: after each chunk the same paired test, on every sample
                # scored so far, drops the candidates now clearly worse than the best so far; the rest of the
                # samples go to the survivors only, and one survivor is the pick.
                sums = {ci: float(losses[ci]) * n_c for ci in top}
                n_done = n_c
                keep = len(rest_ids) > 1 and len(top) * weight_bytes <= limits.RACE_CACHE_BYTES
                for j, k in enumerate(rest_ids):
                    for ci in top:
                        loss_k, rows = score(ci, [k], per_sample=True, keep=keep)
                        sums[ci] += loss_k * terms(k)
                        per_row[ci] += rows
                    n_done += terms(k)
                    if j + 1 < len(rest_ids):
                        ranked = sorted(top, key=lambda ci: sums[ci])
                        top = contenders(per_row, ranked, s.rescore_z) or ranked
                        if len(top) == 1:
                            break
                for ci in top:  # one survivor: its mean over the samples scored before it was alone
                    full[ci] = sums[ci] / n_done
            losses = full
    finally:
        cache.clear()
        for lin, w0 in saved:
            lin._parameters["weight"] = w0
        for mod in experts:
            mod.token_keep = None
    best = int(torch.argmin(losses))
    return losses, best
