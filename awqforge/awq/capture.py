"""Every decoder layer's inputs: block 0's hidden states and each layer's own kwargs (masks, rotary tables).

The one capture path, used by the streamed pipeline (`StreamingModel.capture`) and on any in-memory model:
every decoder layer is replaced by a recorder, so nothing past the embeddings runs.
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


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` during capture: records what it is called with, passes through.

    Two passes: one sample through every recorder for the kwargs (a batch of one, so masks and rotary tables
    broadcast over any chunk of samples that quantize_block runs), then all samples up to layer 0 only.
    """

    def __init__(
        self,
        index: int,
        captured: CapturedInputs,
        stop: bool,
        record_inputs: bool,
        layer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.index, self.captured, self.stop, self.record_inputs = index, captured, stop, record_inputs
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
        else:
            for key in CACHE_KWARGS:
                kwargs.pop(key, None)
            self.captured.layer_kwargs.append(kwargs)
        if self.stop:
            raise _StopForward
        return self._like_layer_output(hidden_states)

    def _like_layer_output(self, hidden_states: torch.Tensor) -> Any:
        """hidden_states as the real layer returns it: a tuple when its forward returns one (Bamba's
        `hidden_states, attn_weights`), with None for the other items."""
        import ast
        import inspect
        import textwrap

        layer = self.__dict__.get("_layer")
        try:
            fn = ast.parse(textwrap.dedent(inspect.getsource(type(layer).forward)))
        except (OSError, TypeError, SyntaxError):
            return hidden_states
        returns = [n.value for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None]
        if returns and all(isinstance(r, ast.Tuple) for r in returns):
            return (hidden_states,) + (None,) * (len(returns[-1].elts) - 1)
        return hidden_states

    def _positional_as_keywords(self, hidden_states: torch.Tensor, args: tuple) -> dict[str, Any]:
        """Positional arguments after hidden_states, by the layer's parameter names; a per-token input (a
        tensor shaped like hidden_states' [batch, seq]) cannot be replayed from one sample, so it is refused."""
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
        for name, value in zip(names, args, strict=False):
            if (
                isinstance(value, torch.Tensor)
                and value.dim() >= 2
                and value.shape[:2] == hidden_states.shape[:2]
            ):
                raise AWQForgeError(
                    f"decoder layer {self.index} takes a per-token input besides hidden_states ({name}, e.g. "
                    "Gemma 4's per-layer embeddings), which layer-by-layer calibration cannot replay"
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
    """Run `model` up to its decoder `layers` once, with every layer replaced by a recorder.

    Layer kwargs are recorded per layer because they differ between layers in some families (Gemma2/3
    alternate sliding-window and full attention masks, Gemma3 local and global rotary tables).
    """
    if device is None:
        device = next(p for p in model.parameters() if p.device.type != "meta").device
    n_blocks = len(layers)
    captured = CapturedInputs(layer_kwargs=[], token_mask=padding_mask(input_ids, attention_mask))
    originals = list(layers)
    try:
        for i in range(n_blocks):
            layers[i] = _Recorder(
                i, captured, stop=i == n_blocks - 1, record_inputs=False, layer=originals[i]
            )
        _run_until_stop(model, device, input_ids[:1], None if attention_mask is None else attention_mask[:1])
        layers[0] = _Recorder(0, captured, stop=True, record_inputs=True, layer=originals[0])
        _run_until_stop(model, device, input_ids, attention_mask)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if captured.inputs is None or len(captured.layer_kwargs) != n_blocks:
        raise AWQForgeError("capturing the decoder layers' inputs failed: the model did not call every layer")
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
