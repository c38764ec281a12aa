"""AWQ on one decoder block, by job: `settings` (what a block takes and gives), `capture` (every decoder
layer's inputs), `search` (the FP pass's statistics and the scale search), `folding`, `qparams` (fake
quantization, clip search, least-squares refit), `gptq` (error-feedback rounding) and `block`
(`quantize_block`, the algorithm in order; its docstring describes it)."""

from awqforge.awq.block import quantize_block
from awqforge.awq.capture import CapturedInputs, PerSample, capture_layer_inputs, for_rows
from awqforge.awq.folding import fold_scales
from awqforge.awq.settings import BlockResult, BlockSettings, LayerMetric, NumericalError

__all__ = [
    "BlockResult",
    "BlockSettings",
    "CapturedInputs",
    "LayerMetric",
    "NumericalError",
    "PerSample",
    "capture_layer_inputs",
    "fold_scales",
    "for_rows",
    "quantize_block",
]
