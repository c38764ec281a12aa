"""AWQForge: activation-aware weight quantization, INT4 kernels and artifacts.

Heavy names (torch modules) load lazily so that `awqforge.spec` stays importable without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "QuantLinear": ("awqforge.qlinear", "QuantLinear"),
    "load_quantized": ("awqforge.loading", "load_quantized"),
    "run_quantization": ("awqforge.pipeline", "run_quantization"),
    "JobSpec": ("awqforge.spec", "JobSpec"),
}

if TYPE_CHECKING:  # pragma: no cover
    from awqforge.loading import load_quantized
    from awqforge.pipeline import run_quantization
    from awqforge.qlinear import QuantLinear
    from awqforge.spec import JobSpec


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'awqforge' has no attribute {name!r}")


__all__ = ["QuantLinear", "load_quantized", "run_quantization", "JobSpec", "__version__"]
