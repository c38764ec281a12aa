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

    def __init__(self, index: int, captured: CapturedInputs, stop: bool, record_inputs: bool) -> None:
        super().__init__()
        self.index, self.captured, self.stop, self.record_inputs = index, captured, stop, record_inputs

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if any(a is not None for a in args):  # Gemma 4 passes per_layer_input=None positionally
            raise AWQForgeError(
                f"decoder layer {self.index} is called with positional arguments besides hidden_states; "
                "this model's calling convention is not supported"
            )
        if self.record_inputs:
            self.captured.inputs = hidden_states
        else:
            for key in CACHE_KWARGS:
                kwargs.pop(key, None)
            self.captured.layer_kwargs.append(kwargs)
        if self.stop:
            raise _StopForward
        return hidden_states


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
            layers[i] = _Recorder(i, captured, stop=i == n_blocks - 1, record_inputs=False)
        _run_until_stop(model, device, input_ids[:1], None if attention_mask is None else attention_mask[:1])
        layers[0] = _Recorder(0, captured, stop=True, record_inputs=True)
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
