"""What one block's quantization takes and gives: settings, per-layer metrics, the block result."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from awqforge.quant import QuantizedTensor


class NumericalError(RuntimeError):
    """A NaN or inf appeared: the job stops, naming the block and the layer."""


@dataclass
class BlockSettings:
    """How one block is quantized (built from a JobSpec by `from_spec`)."""

    method: str = "awq"  # "awq" | "rtn"
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    scale_search: str = "duo"  # "duo" | "activation" | "both"
    n_grid: int = 20
    clip_search: bool = True
    clip_grid: int = 20  # ratios 1 - i/clip_grid for i < max_shrink * clip_grid (AutoAWQ)
    max_shrink: float = 0.5
    skip_patterns: tuple[str, ...] = ()  # modules_to_not_convert
    chunk_tokens: int = 16384  # tokens per forward chunk (memory bound)
    search_fraction: float = 0.25  # samples scored for every grid point of a module loss
    search_topk: int = 3  # candidates rescored on the remaining samples
    search_screen: int = 8  # module-scored mappings: run the module on the best k of the linears' exact
    # output error (Gram screen) only; 0 (or k >= the number of candidates): every candidate on the module
    min_tokens: int = 16  # an expert seeing fewer calibration tokens gets no data-driven search
    module_loss: bool = True  # False: score attention/MLP mappings on their linears' outputs (Gram)
    refine_steps: int = 2  # least-squares refits of each group's scale/zero after the clip search (0: off)
    rounding: str = "nearest"  # "nearest" | "gptq": codes rounded with error feedback (same format)
    gqa_fold: bool = False  # v -> o under grouped-query attention: one scale per KV channel (False: skipped)
    gptq_damp: float = 0.01  # fraction of the mean Gram diagonal added to it before inverting
    keep_inputs: bool = (
        True  # fewer tokens than a linear's input width: keep X, not X^T X (False: always the Gram)
    )

    @classmethod
    def from_spec(cls, spec) -> BlockSettings:
        return cls(
            method=getattr(spec.method, "value", spec.method),
            bits=spec.quant.bits,
            group_size=spec.quant.group_size,
            zero_point=spec.quant.zero_point,
            scale_search=getattr(spec.scale_search, "value", spec.scale_search),
            n_grid=spec.n_grid,
            clip_search=spec.clip_search,
            refine_steps=spec.refine_steps,
            search_screen=spec.search_screen,
            rounding=getattr(spec.rounding, "value", spec.rounding),
            gqa_fold=getattr(spec, "gqa_fold", False),
            skip_patterns=tuple(spec.quant.modules_to_not_convert),
        )


@dataclass
class LayerMetric:
    """Output MSE of one linear (on its FP calibration inputs) under plain RTN and under our method."""

    name: str
    block: int
    mse_rtn: float
    mse_quant: float
    scale_ratio: float | None  # grid exponent a of the mapping that scaled this linear's input
    clip_ratio: float | None  # mean chosen clip ratio over the groups (None: no clip search)


@dataclass
class BlockResult:
    outputs: torch.Tensor  # FP block output [n, seq, hidden] = the next block's input
    quantized: dict[str, QuantizedTensor]  # by name relative to the block
    layers: list[LayerMetric]
    scales: dict[str, dict]  # by mapping name: prev, linears, mode, ratio, scales, loss, loss_identity
    skipped: list[str] = field(default_factory=list)  # "mapping: reason"
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (bench/bench_speed.py)
