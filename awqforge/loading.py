"""Load an AWQForge (or any AWQ gemm / compressed-tensors pack-quantized) checkpoint onto QuantLinear layers.

The transformers model is built from config.json on the meta device (never with remote code) and put in the
layout the pipeline quantized (`awqforge.arch`): for a supported family, every decoder layer goes through
`adapter.prepare_block`, which unfuses transformers-5 fused 3-D MoE experts into per-expert `nn.Linear`s
(the checkpoint's per-expert layout), and module names map to checkpoint names through
`adapter.checkpoint_name` (Mixtral: `.mlp.` -> `.block_sparse_moe.`). An activation with a `<act>.scales`
tensor in the checkpoint (AWQ folded scales into a non-homogeneous activation, GPT-NeoX's GELU) is wrapped in
`arch.ScaledActivation`. Then the quantized linears are replaced by `QuantLinear`s built from the unpacked
tensors, and every other tensor is loaded from the safetensors shards as is. Families without an adapter load
with module names = checkpoint names, as long as every quantized layer is an `nn.Linear` there.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awqforge.errors import InputError
from awqforge.parsing import is_local_reference
from awqforge.streaming import ShardReader

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
    if p.exists() or is_local_reference(str(path)):
        raise InputError(f"{path} is not a checkpoint folder")
    from awqforge.resolve import download_from_hub

    return download_from_hub(str(path), revision)[0]  # the one hub download path


def _weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    if (root / _INDEX).is_file():
        weight_map: dict[str, str] = json.loads((root / _INDEX).read_text())["weight_map"]
        return sorted({root / f for f in weight_map.values()}), weight_map
    if (root / _SINGLE).is_file():
        return [root / _SINGLE], None
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise InputError(f"{root} holds pickle weights (.bin/.pt): only safetensors checkpoints are loaded")
    raise InputError(f"no {_SINGLE} or {_INDEX} in {root}")


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


def _adapter(config: Any):
    """The family's adapter, or None for a family AWQForge does not quantize (loaded with plain names)."""
    from awqforge.arch import UnsupportedArchitecture, get_adapter

    try:
        return get_adapter(config)
    except UnsupportedArchitecture:
        return None


class _Names:
    """Checkpoint name -> model name, for module or tensor names of the (prepared) model.

    First the adapter's own mapping (`adapter.checkpoint_name`, the names the pipeline writes blocks under),
    then transformers' registered renamings (transformers >= 5), which the pipeline's non-block tensors keep
    in their source-checkpoint form (GPT-NeoX `embed_out` -> `lm_head`) and other tools may use too.
    """

    def __init__(self, model: nn.Module, adapter: Any, names: Iterable[str], *, tensor_names: bool) -> None:
        self.model_names = set(names)
        self.table: dict[str, str] = {}
        for name in self.model_names:
            key = adapter.checkpoint_name(name) if adapter is not None else name
            if self.table.get(key, name) != name:
                raise InputError(
                    f"model names {self.table[key]!r} and {name!r} map to one checkpoint name {key!r}"
                )
            self.table[key] = name
        self.tensor_names = tensor_names
        self._rename = _transformers_renamer(model)

    def get(self, ckpt_name: str) -> str | None:
        if ckpt_name in self.table:
            return self.table[ckpt_name]
        if self._rename is None:
            return None
        if self.tensor_names:
            renamed = self._rename(ckpt_name)
        else:  # renamings are written for tensor names: rename a (made-up) tensor of the module
            renamed = self._rename(f"{ckpt_name}.weight").removesuffix(".weight")
        return renamed if renamed in self.model_names else None


def _transformers_renamer(model: nn.Module):
    """transformers' checkpoint-key renamings for this model class (no expert fusion), or None."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5: checkpoint names are module names
        return None
    renamings = [c for c in get_model_conversion_mapping(model) or [] if isinstance(c, WeightRenaming)]
    prefix = getattr(model, "base_model_prefix", None)
    meta_state = dict(model.state_dict(keep_vars=True))
    return lambda key: rename_source_key(key, renamings, [], prefix, meta_state)[0]


def _wrap_scaled_activations(
    model: nn.Module, modules: _Names, candidates: list[str], tensors: ShardReader, dtype: torch.dtype
) -> set[str]:
    """Wrap each activation module `<act>` with a `<act>.scales` tensor in arch.ScaledActivation; returns the
    checkpoint names consumed."""
    from awqforge.arch import ScaledActivation

    consumed: set[str] = set()
    for name in candidates:
        ckpt_module = name[: -len(".scales")]
        module_name = modules.get(ckpt_module)
        if module_name is None:
            continue  # reported as unexpected
        act = model.get_submodule(module_name)
        if isinstance(act, ScaledActivation) or "scales" in act._parameters or "scales" in act._buffers:
            continue  # the module has a `scales` tensor of its own: loaded as a plain tensor
        if isinstance(act, nn.Linear) or any(True for _ in act.parameters()):
            raise InputError(
                f"{name}: activation scales for {module_name}, which is a {type(act).__name__} with weights, "
                "not an activation function"
            )
        value = tensors.get(name)
        if value.dim() != 1:
            raise InputError(f"{name}: activation scales must be a vector, got shape {tuple(value.shape)}")
        wrapped = ScaledActivation(act, value.to(dtype) if value.is_floating_point() else value)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        consumed.add(name)
    return consumed


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
    from transformers import AutoConfig, GenerationConfig

    from awqforge.multimodal import auto_model_class
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
    adapter = _adapter(config)
    with _parameters_on_meta():
        # image-text-to-text checkpoints: AutoModelForImageTextToText (awqforge/multimodal.py)
        model = auto_model_class(config).from_config(config, dtype=dtype, trust_remote_code=False)
    if adapter is not None:
        # Fused 3-D experts -> per-expert nn.Linear (on meta), as the pipeline quantized and wrote them.
        for block in adapter.get_layers(model):
            adapter.prepare_block(block)

    files, _ = _weight_files(root)
    tensors = ShardReader(files)
    names = tensors.names()
    layers = fmt.quantized_layers(names)
    modules = _Names(model, adapter, (n for n, _ in model.named_modules()), tensor_names=False)
    layer_set = set(layers)
    act_scales = [n for n in names if n.endswith(".scales") and n[: -len(".scales")] not in layer_set]
    consumed = _wrap_scaled_activations(model, modules, act_scales, tensors, dtype)
    for layer in layers:
        prefix = layer + "."
        own = {n[len(prefix) :]: n for n in names if n.startswith(prefix) and "." not in n[len(prefix) :]}
        module_name = modules.get(layer) or layer
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise InputError(
                f"{layer} is quantized in the checkpoint but {type(model).__name__} has no nn.Linear at "
                f"{module_name} ({type(linear).__name__ if linear is not None else 'missing'})"
            )
        parts = {key: tensors.get(full) for key, full in own.items() if key != "bias"}
        qt = fmt.read_layer(parts, qcfg)
        if qt.shape != (linear.out_features, linear.in_features):
            raise InputError(
                f"{layer}: checkpoint shape {qt.shape} != model's {(linear.out_features, linear.in_features)}"
            )
        bias = tensors.get(own["bias"]).to(dtype) if "bias" in own else None
        qlinear = QuantLinear.from_quantized(qt, bias, dtype)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, qlinear)
        consumed.update(own.values())

    expected = _Names(model, adapter, model.state_dict(keep_vars=True), tensor_names=True)
    unexpected = []
    for name in names:
        if name in consumed:
            continue
        target = expected.get(name)
        if target is None:
            unexpected.append(name)
            continue
        value = tensors.get(name)
        if value.is_floating_point():
            value = value.to(dtype)
        _set_tensor(model, target, value)
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
