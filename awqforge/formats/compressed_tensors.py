"""compressed-tensors "pack-quantized": `<layer>.weight_packed`, `.weight_scale`, `.weight_zero_point`
(asymmetric only), `.weight_shape`, and the quantization_config vLLM and transformers read.

Any bit width 1..8 fits this format; symmetric weights drop the zero point (their signed codes are q - 8).
"""

from __future__ import annotations

from typing import Any

import torch

from awqforge.quant import QuantizedTensor

FORMAT = "compressed-tensors"


def check_settings(bits: int, group_size: int) -> None:
    from awqforge.errors import InputError

    if not 1 <= bits <= 8:
        raise InputError(f"format 'compressed-tensors' packs 1..8-bit integers; bits={bits} is out of range")


def layer_tensors(
    linear_name: str,
    qt: QuantizedTensor,
    bias: torch.Tensor | None,
    *,
    symmetric: bool,
    scale_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Scales are stored in the model's dtype (`scale_dtype`), as llm-compressor does and vLLM expects."""
    from awqforge.packing import pack_compressed_tensors

    packed = pack_compressed_tensors(qt, symmetric=symmetric, scale_dtype=scale_dtype)
    out = {f"{linear_name}.{key}": value for key, value in packed.items()}
    if bias is not None:
        out[f"{linear_name}.bias"] = bias
    return out


def weight_args(bits: int, group_size: int, zero_point: bool) -> dict[str, Any]:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": not zero_point,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def quantization_config(
    bits: int, group_size: int, zero_point: bool, unquantized: list[str]
) -> dict[str, Any]:
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weight_args(bits, group_size, zero_point),
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": list(unquantized),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    validate_config(config)
    return config


def validate_config(config: dict[str, Any]) -> None:
    """Parse with compressed-tensors' own pydantic model when the package is installed (a dev dependency)."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:  # pragma: no cover - the package is optional at run time
        return
    QuantizationConfig.model_validate(config)


def quantized_layers(names: list[str]) -> list[str]:
    return sorted({n[: -len(".weight_packed")] for n in names if n.endswith(".weight_packed")})


def read_layer(tensors: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> QuantizedTensor:
    """`tensors`: {"weight_packed", "weight_scale", "weight_shape", ["weight_zero_point"]} -> QuantizedTensor."""
    from awqforge.packing import unpack_compressed_tensors

    groups = list(qcfg["config_groups"].values())
    if len(groups) != 1:
        raise ValueError(f"expected one compressed-tensors config group, found {len(groups)}")
    weights = groups[0]["weights"]
    group_size = -1 if weights.get("strategy") == "channel" else int(weights["group_size"])
    return unpack_compressed_tensors(
        tensors, int(weights["num_bits"]), group_size, bool(weights["symmetric"])
    )
