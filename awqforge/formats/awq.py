"""The AutoAWQ / vLLM "gemm" checkpoint: `<layer>.qweight`, `.qzeros`, `.scales` and quant_method "awq".

Symmetric quantization in this format: the layout has no symmetric variant (every AWQ kernel, AutoAWQ's
GEMM, vLLM's AWQ and AWQ-Marlin, reads `qzeros`), so a symmetric weight is stored exactly as what it is under
our convention, zero point 2**(bits-1) = 8 in every group, and the config says `zero_point: true`.
`zero_point: false` would be read by vLLM as "uint4 without zero points", which Marlin does not support, and
would silently demote the model to the slow non-Marlin AWQ kernel; AutoAWQ never loaded it in GEMM form.
The model card states that the weights are symmetric.
"""

from __future__ import annotations

from typing import Any

import torch

from awqforge.errors import InputError
from awqforge.quant import QuantizedTensor

FORMAT = "awq"
SUFFIXES = ("qweight", "qzeros", "scales")


def check_settings(bits: int, group_size: int) -> None:
    if bits != 4:
        raise InputError(
            f"format 'awq' is 4-bit only (the AutoAWQ/vLLM gemm layout); bits={bits} "
            "needs format 'compressed-tensors'"
        )


def layer_tensors(
    linear_name: str,
    qt: QuantizedTensor,
    bias: torch.Tensor | None,
    *,
    symmetric: bool,
    scale_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    # Symmetric weights already carry z = 8 under our convention: qzeros stores it as is.
    # Scales are fp16 whatever the model's dtype: that is the layout.
    from awqforge.packing import pack_awq_gemm

    del symmetric, scale_dtype

    check_settings(qt.bits, qt.group_size)
    packed = pack_awq_gemm(qt)
    out = {f"{linear_name}.{key}": packed[key] for key in SUFFIXES}
    if bias is not None:
        out[f"{linear_name}.bias"] = bias
    return out


def quantization_config(
    bits: int, group_size: int, zero_point: bool, unquantized: list[str]
) -> dict[str, Any]:
    # zero_point is always true: see the module docstring for symmetric weights.
    del zero_point
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": list(unquantized) or None,
    }


def quantized_layers(names: list[str]) -> list[str]:
    """Module names that carry AWQ packed tensors in a checkpoint's tensor names."""
    return sorted({n[: -len(".qweight")] for n in names if n.endswith(".qweight")})


def read_layer(tensors: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> QuantizedTensor:
    """`tensors`: {"qweight", "qzeros", "scales"} of one layer -> QuantizedTensor."""
    from awqforge.packing import unpack_awq_gemm

    return unpack_awq_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"], int(qcfg["group_size"]))
