"""Load an AWQForge (or any AWQ gemm / compressed-tensors pack-quantized) checkpoint onto QuantLinear layers.

The transformers model is built from config.json on the meta device (never with remote code), the quantized
linears are replaced by `QuantLinear`s built from the unpacked tensors, and every other tensor is loaded
from the safetensors shards as is. Limitation: a quantized layer must be an `nn.Linear` in transformers'
model class; models whose experts transformers fuses into one 3-D parameter (MoE, transformers >= 5) are
refused with a message (they load in vLLM).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awqforge.errors import InputError

log = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _format_module(qcfg: dict[str, Any]):
    from awqforge.formats import awq as awq_format
    from awqforge.formats import compressed_tensors as ct_format

    method = str(qcfg.get("quant_method", "")).lower()
    if method == "awq":
        if str(qcfg.get("version", qcfg.get("format", "gemm"))).lower() != "gemm":
            raise InputError(f"only the AWQ 'gemm' layout is supported, config says {qcfg.get('version')!r}")
        return awq_format
    if method == "compressed-tensors":
        if qcfg.get("format") != "pack-quantized":
            raise InputError(
                f"only compressed-tensors 'pack-quantized' is supported, config says {qcfg.get('format')!r}"
            )
        return ct_format
    raise InputError(f"not an AWQ or compressed-tensors checkpoint (quant_method={method or None!r})")


def _resolve_dir(path: str | Path, revision: str | None) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(path).startswith(("/", ".", "~")):
        raise InputError(f"{path} is not a checkpoint folder")
    from huggingface_hub import snapshot_download

    from awqforge.errors import HubUnavailable

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
    try:
        return Path(snapshot_download(str(path), revision=revision, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, auth: one message for the user
        raise HubUnavailable(
            f"{path} is not a local folder and could not be fetched from the Hub: {exc}"
        ) from exc


def _weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    if (root / _INDEX).is_file():
        weight_map: dict[str, str] = json.loads((root / _INDEX).read_text())["weight_map"]
        return sorted({root / f for f in weight_map.values()}), weight_map
    if (root / _SINGLE).is_file():
        return [root / _SINGLE], None
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise InputError(f"{root} holds pickle weights (.bin/.pt): only safetensors checkpoints are loaded")
    raise InputError(f"no {_SINGLE} or {_INDEX} in {root}")


class _Tensors:
    """name -> tensor over every shard, opened lazily."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in files}
        self.where = {name: f for f, h in self._handles.items() for name in h.keys()}

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters are created on meta (no memory, no init cost); buffers (rotary tables) are computed for real."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _pick_dtype(dtype: torch.dtype | None, device: torch.device, config: Any) -> torch.dtype:
    if dtype is not None:
        return dtype
    if device.type == "cpu":
        # Our CPU kernel computes in fp32, and bf16 dense layers are slow on CPUs without bf16 arithmetic.
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if saved in (torch.float16, torch.bfloat16) else torch.float16


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(name)


def load_quantized(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    revision: str | None = None,
) -> nn.Module:
    """A transformers causal LM with QuantLinear layers, in eval mode, from a local folder (or a Hub id).

    `dtype` (activations, scales and unquantized weights) defaults to float32 on CPU and to the checkpoint's
    fp16/bf16 (else fp16) on GPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from awqforge.qlinear import QuantLinear

    root = _resolve_dir(path, revision)
    device = torch.device(device)
    raw_config = json.loads((root / "config.json").read_text())
    qcfg = raw_config.get("quantization_config")
    if not qcfg:
        raise InputError(f"{root}/config.json has no quantization_config: not a quantized checkpoint")
    fmt = _format_module(qcfg)

    config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the quantized layers ourselves, not transformers' quantizer
    dtype = _pick_dtype(dtype, device, config)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)

    files, _ = _weight_files(root)
    tensors = _Tensors(files)
    names = tensors.names()
    layers = fmt.quantized_layers(names)
    consumed: set[str] = set()
    for layer in layers:
        prefix = layer + "."
        own = {n[len(prefix) :]: n for n in names if n.startswith(prefix) and "." not in n[len(prefix) :]}
        try:
            linear = model.get_submodule(layer)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise InputError(
                f"{layer} is quantized in the checkpoint but {type(model).__name__} has no nn.Linear there "
                f"({type(linear).__name__ if linear is not None else 'missing'}); fused MoE experts are not supported "
                "by load_quantized (vLLM loads them)"
            )
        parts = {key: tensors.get(full) for key, full in own.items() if key != "bias"}
        qt = fmt.read_layer(parts, qcfg)
        if qt.shape != (linear.out_features, linear.in_features):
            raise InputError(
                f"{layer}: checkpoint shape {qt.shape} != model's {(linear.out_features, linear.in_features)}"
            )
        bias = tensors.get(own["bias"]).to(dtype) if "bias" in own else None
        qlinear = QuantLinear.from_quantized(qt, bias, dtype)
        parent_name, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, qlinear)
        consumed.update(own.values())

    expected = dict(model.state_dict(keep_vars=True))
    unexpected = []
    for name in names:
        if name in consumed:
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        value = tensors.get(name)
        if value.is_floating_point():
            value = value.to(dtype)
        _set_tensor(model, name, value)
    if unexpected:
        raise InputError(
            f"checkpoint tensors the model does not have: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )

    model.tie_weights()
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise InputError(
            f"tensors missing from the checkpoint: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    if (root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(root)
    model.to(device)
    model.eval()
    return model
