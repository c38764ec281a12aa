"""Every decoder layer's inputs: block 0's hidden states and each layer's own kwargs (masks, rotary tables).

The one capture path, used by the streamed pipeline (`StreamingModel.capture`) and on any in-memory model:
every decoder layer is replaced by a recorder, so nothing past the embeddings runs.

The kwargs are recorded on one sample, which holds for any batch when they broadcast (a [1, ...] mask, rotary
tables). Kwargs with one entry per sample are found by recording them once more on two samples and comparing:
a tensor whose first dimension doubles is per sample (`PerSample`). When its two samples' entries are equal
(Bloom's ALiBi, [batch * heads, 1, seq], a mask built at the batch size) the one sample's entries are repeated to
the rows being run; when they differ (Gemma 4's per-layer input, DeepSeek-V4's `input_ids` for hash routing) it
is recorded for every calibration row and sliced. `for_rows` gives a layer's kwargs for a slice of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from awqforge.errors import AWQForgeError

# Cache plumbing the layers are called with; capture runs without a cache, and each block is re-run many times.
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache", "use_cache", "cache_position")


@dataclass
class CapturedInputs:
    """Block 0's input hidden states and each decoder layer's own kwargs (masks, rotary tables...).

    `token_mask` [n_samples, seq_len] (bool, True on real tokens) travels with the inputs when the calibration
    rows are right-padded (`per_sample` packing); `quantize_block` leaves the padding positions out of every
    statistic and loss. None when every position is a real token (`concat`)."""

    inputs: torch.Tensor | None = None
    layer_kwargs: list[dict[str, Any]] | None = None
    token_mask: torch.Tensor | None = None


@dataclass
class PerSample:
    """A layer kwarg with `fold` entries per sample along dim 0 (1, or the heads folded into the batch: Bloom's
    ALiBi [batch * heads, 1, seq]). `every_row`: the tensor holds every calibration row and is sliced; else it
    holds one sample's entries, which hold for every row, and is repeated to the rows run."""

    tensor: torch.Tensor
    fold: int
    every_row: bool

    def rows(self, rows: slice) -> torch.Tensor:
        start, stop = rows.start or 0, rows.stop
        if self.every_row:
            return self.tensor[start * self.fold : stop * self.fold]
        n = stop - start
        if self.fold == 1:
            return self.tensor.expand(n, *self.tensor.shape[1:])
        return self.tensor.repeat(n, *([1] * (self.tensor.dim() - 1)))


def for_rows(kwargs: Any, rows: slice) -> Any:
    """A layer's recorded kwargs for calibration rows `rows` (a slice with a stop): `PerSample` entries resolved."""
    if isinstance(kwargs, PerSample):
        return kwargs.rows(rows)
    if isinstance(kwargs, dict):
        return {k: for_rows(v, rows) for k, v in kwargs.items()}
    if isinstance(kwargs, (tuple, list)) and any(_has_per_sample(v) for v in kwargs):
        return type(kwargs)(for_rows(v, rows) for v in kwargs)
    return kwargs


def _has_per_sample(v: Any) -> bool:
    if isinstance(v, PerSample):
        return True
    if isinstance(v, dict):
        return any(_has_per_sample(x) for x in v.values())
    if isinstance(v, (tuple, list)):
        return any(_has_per_sample(x) for x in v)
    return False


def _tuple_length(body: list, value: Any) -> int | None:
    """The length of a returned tuple: a tuple display, or a local name built from tuples (`x = (a, b)`,
    `x += (c,)`, an if/else adding to it on either branch); None when it is not a tuple."""
    import ast

    if isinstance(value, ast.Tuple):
        return len(value.elts)
    if not isinstance(value, ast.Name):
        return None

    def run(stmts: list, n: int | None) -> int | None:
        for st in stmts:
            if isinstance(st, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == value.id for t in st.targets
            ):
                n = len(st.value.elts) if isinstance(st.value, ast.Tuple) else None
            elif (
                isinstance(st, ast.AugAssign) and isinstance(st.target, ast.Name) and st.target.id == value.id
            ):
                n = n + len(st.value.elts) if n is not None and isinstance(st.value, ast.Tuple) else None
            elif isinstance(st, ast.If):
                a, b = run(st.body, n), run(st.orelse, n)
                n = a if a == b else None
        return n

    return run(body, None)


def _per_sample(one: Any, two: Any) -> Any:
    """`one` (kwargs recorded on one sample) with its per-sample tensors marked, found by comparing with `two`
    (the same kwargs on two samples): a tensor whose first dimension doubles. Not yet every_row: see
    `_needs_every_row`, `_take_rows`."""
    if isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor):
        f = one.shape[0] if one.dim() else 0
        if f and two.dim() == one.dim() and two.shape[0] == 2 * f and two.shape[1:] == one.shape[1:]:
            return PerSample(one, f, every_row=not torch.equal(two[:f], two[f:]))
        return one
    if isinstance(one, dict) and isinstance(two, dict) and one.keys() == two.keys():
        return {k: _per_sample(v, two[k]) for k, v in one.items()}
    if isinstance(one, (tuple, list)) and isinstance(two, (tuple, list)) and len(one) == len(two):
        marked = [_per_sample(a, b) for a, b in zip(one, two, strict=True)]
        return type(one)(marked) if any(_has_per_sample(v) for v in marked) else one
    return one


def _needs_every_row(v: Any) -> bool:
    if isinstance(v, PerSample):
        return v.every_row
    if isinstance(v, dict):
        return any(_needs_every_row(x) for x in v.values())
    if isinstance(v, (tuple, list)):
        return any(_needs_every_row(x) for x in v)
    return False


def _take_rows(marked: Any, full: Any) -> Any:
    """The every_row tensors of `marked` replaced by their recording on all the calibration rows (`full`)."""
    if isinstance(marked, PerSample):
        return PerSample(full, marked.fold, True) if marked.every_row else marked
    if isinstance(marked, dict):
        return {k: _take_rows(v, full[k]) for k, v in marked.items()}
    if isinstance(marked, (tuple, list)) and _has_per_sample(marked):
        return type(marked)(_take_rows(a, b) for a, b in zip(marked, full, strict=True))
    return marked


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` during capture: records what it is called with, passes through.

    Records its hidden_states into `captured.inputs` (`record_inputs`) and/or its kwargs into `sink`.
    """

    def __init__(
        self,
        index: int,
        captured: CapturedInputs,
        stop: bool,
        record_inputs: bool,
        layer: nn.Module | None = None,
        sink: list | None = None,
    ) -> None:
        super().__init__()
        self.index, self.captured, self.stop, self.record_inputs = index, captured, stop, record_inputs
        self.sink = sink
        object.__setattr__(
            self, "_layer", layer
        )  # not a submodule: only read for attributes and the signature

    def __getattr__(self, name: str) -> Any:
        """Attributes the model reads off its layers (Nemotron-H's `block_type`) come from the real layer."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            kwargs = {**self._positional_as_keywords(hidden_states, args), **kwargs}
        if self.record_inputs:
            self.captured.inputs = hidden_states
        if self.sink is not None:
            for key in CACHE_KWARGS:
                kwargs.pop(key, None)
            self.sink.append(kwargs)
        if self.stop:
            raise _StopForward
        return self._like_layer_output(hidden_states)

    def _like_layer_output(self, hidden_states: torch.Tensor) -> Any:
        """hidden_states as the real layer returns it: a tuple when its forward returns one (Bamba's
        `hidden_states, attn_weights`; RWKV's `outputs`, built as `(hidden, state)` then `+= (None,)`), with
        None for the other items."""
        import ast
        import inspect
        import textwrap

        layer = self.__dict__.get("_layer")
        try:
            fn = ast.parse(textwrap.dedent(inspect.getsource(type(layer).forward))).body[0]
        except (OSError, TypeError, SyntaxError, IndexError):
            return hidden_states
        returns = [n.value for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None]
        lengths = {_tuple_length(fn.body, r) for r in returns}
        if returns and None not in lengths:
            return (hidden_states,) + (None,) * (max(lengths) - 1)
        return hidden_states

    def _positional_as_keywords(self, hidden_states: torch.Tensor, args: tuple) -> dict[str, Any]:
        """Positional arguments after hidden_states, by the layer's parameter names (a per-token input such as
        Gemma 4's per-layer embeddings is found per sample like any kwarg: see the module docstring)."""
        import inspect

        layer = self.__dict__.get("_layer")
        names = []
        if layer is not None:
            params = list(inspect.signature(layer.forward).parameters.values())[1:]
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(names) < len(args):
            raise AWQForgeError(
                f"decoder layer {self.index} is called with {len(args)} positional arguments besides "
                "hidden_states that its signature does not name; this calling convention is not supported"
            )
        return dict(zip(names, args, strict=False))


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    device: torch.device | None = None,
) -> CapturedInputs:
    """Run `model` up to its decoder `layers`, with every layer replaced by a recorder (nothing past the
    embeddings runs): the kwargs on the first row, then on two rows to find the per-sample ones (see the module
    docstring), then block 0's inputs on every row (through every layer when a kwarg must be kept per row).

    Layer kwargs are recorded per layer because they differ between layers in some families (Gemma2/3
    alternate sliding-window and full attention masks, Gemma3 local and global rotary tables).
    """
    if device is None:
        device = next(p for p in model.parameters() if p.device.type != "meta").device
    n_blocks = len(layers)
    captured = CapturedInputs(layer_kwargs=[], token_mask=padding_mask(input_ids, attention_mask))
    originals = list(layers)

    def run(ids: torch.Tensor, mask: torch.Tensor | None, inputs: bool, kwargs: bool) -> list:
        sink: list = []
        last = n_blocks - 1 if kwargs else 0
        for i in range(last + 1):
            layers[i] = _Recorder(
                i,
                captured,
                stop=i == last,
                record_inputs=inputs and i == 0,
                layer=originals[i],
                sink=sink if kwargs else None,
            )
        _run_until_stop(model, device, ids, mask)
        if kwargs and len(sink) != n_blocks:
            raise AWQForgeError(
                "capturing the decoder layers' inputs failed: the model did not call every layer"
            )
        return sink

    try:
        one_mask = None if attention_mask is None else attention_mask[:1]
        one = run(input_ids[:1], one_mask, inputs=False, kwargs=True)
        # a second row whose tokens differ from the first (the first again when all rows are the same text)
        other = next((i for i in range(1, len(input_ids)) if not torch.equal(input_ids[i], input_ids[0])), 0)
        two_mask = None if one_mask is None else torch.ones_like(attention_mask[:2])
        two = run(input_ids[[0, other]], two_mask, inputs=False, kwargs=True)
        marked = [_per_sample(a, b) for a, b in zip(one, two, strict=True)]
        del two
        every_row = any(_needs_every_row(kw) for kw in marked)
        full = run(input_ids, attention_mask, inputs=True, kwargs=every_row)
        captured.layer_kwargs = (
            [_take_rows(m, f) for m, f in zip(marked, full, strict=True)] if every_row else marked
        )
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if captured.inputs is None or len(captured.layer_kwargs) != n_blocks:
        raise AWQForgeError("capturing the decoder layers' inputs failed: the model did not call every layer")
    if captured.inputs.dim() < 2 or captured.inputs.shape[0] != len(input_ids):
        from awqforge.arch import UnsupportedArchitecture

        raise UnsupportedArchitecture(
            f"model type {getattr(getattr(model, 'config', None), 'model_type', None)!r} is not supported: its "
            f"decoder layers take hidden states of shape {tuple(captured.inputs.shape)}, whose first dimension "
            f"is not the batch of {len(input_ids)} rows (Gemma-3n's stacked AltUp streams), which calibration "
            "by rows cannot split; keep it in its original precision."
        )
    return captured


def padding_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The real-token mask (bool [n, seq]) of right-padded rows, or None when there is no padding.

    The layer kwargs are recorded on the first row, for every row, so the first row must have no padding,
    and every row's padding must be on the right: a real token then never attends to a padding position
    (causal attention), its activations are exact, and only the statistics need the mask.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool).cpu()
    if mask.shape != input_ids.shape:
        raise AWQForgeError(
            f"attention mask shape {tuple(mask.shape)} != input ids shape {tuple(input_ids.shape)}"
        )
    if bool(mask.all()):
        return None
    if not bool(mask[0].all()) or not bool((mask.cummin(dim=1).values == mask).all()):
        raise AWQForgeError("calibration padding must be on the right, with the first (longest) row unpadded")
    return mask


def _run_until_stop(
    model: nn.Module, device: torch.device, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> None:
    kwargs: dict[str, Any] = {"use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    try:
        model(input_ids=input_ids.to(device), **kwargs)
    except _StopForward:
        return
    raise AWQForgeError("capture ran past the last decoder layer")
