"""Folding AWQ scales into the op before a mapping's linears and into the linears' input columns."""

from __future__ import annotations

import torch
from torch import nn

from awqforge.arch import Mapping, ScaledActivation


@torch.no_grad()
def fold_scales(block: nn.Module, mapping: Mapping, scales: torch.Tensor) -> None:
    """Divide the prev op's output channels by `scales` and multiply the readers' input columns.

    Leaves the block's FP function unchanged (up to rounding in the weight dtype). Under grouped-query
    attention `scales` are over prev's (KV) channels, repeated over the query heads for the readers.
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
        new = ScaledActivation(prev, s.to(device_of(mapping.linears[0])))
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
    s_in = mapping.to_linear(s)
    for lin in [*mapping.linears, *mapping.absorb]:
        lin.weight.copy_((lin.weight.float() * s_in[None, :].to(lin.weight.device)).to(lin.weight.dtype))


def device_of(mod: nn.Module) -> torch.device:
    return next(mod.parameters()).device
