"""What one block's quantization takes and gives: settings, per-layer metrics, the block result."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from awqforge import limits
from awqforge.quant import QuantizedTensor
from awqforge.spec import field_default, spec_value


class NumericalError(RuntimeError):
    """A NaN or inf appeared: the job stops, naming the block and the layer."""


# Each block setting a job chooses and the JobSpec field it is: its default and its value come from there
# (the rest below are the algorithm's own).
BLOCK_SETTINGS_FROM_SPEC = {
    "method": "method",
    "bits": "quant.bits",
    "group_size": "quant.group_size",
    "zero_point": "quant.zero_point",
    "scale_search": "scale_search",
    "n_grid": "n_grid",
    "clip_search": "clip_search",
    "skip_patterns": "quant.modules_to_not_convert",
    "search_screen": "search_screen",
    "refine_steps": "refine_steps",
    "rounding": "rounding",
    "gqa_fold": "gqa_fold",
}


def _default(name: str):
    return field_default(BLOCK_SETTINGS_FROM_SPEC[name])


@dataclass
class BlockSettings:
    """How one block is quantized (built from a JobSpec by `from_spec`)."""

    method: str = _default("method")  # "awq" | "rtn"
    bits: int = _default("bits")
    group_size: int = _default("group_size")
    zero_point: bool = _default("zero_point")
    scale_search: str = _default("scale_search")  # "duo" | "activation" | "both"
    n_grid: int = _default("n_grid")
    clip_search: bool = _default("clip_search")
    clip_grid: int = limits.CLIP_GRID  # ratios 1 - i/clip_grid for i < max_shrink * clip_grid (AutoAWQ)
    max_shrink: float = limits.MAX_SHRINK
    skip_patterns: tuple[str, ...] = _default("skip_patterns")  # modules_to_not_convert
    chunk_tokens: int = limits.CHUNK_TOKENS  # tokens per forward chunk (memory bound)
    search_fraction: float = 0.125  # samples scored for every grid point of a module loss (at least 4)
    search_topk: int = 3  # candidates rescored on the remaining samples (rescore_z 0)
    # > 0: rescore, instead of the top search_topk, every candidate whose coarse per-sample errors are not
    # rescore_z standard errors above the coarse best's (a paired test); none when the best is clear
    rescore_z: float = 3.0
    rescore_max: int = limits.RESCORE_MAX  # at most this many rescored, best first (0: all the test keeps)
    # rescore as a race: after each further chunk of samples the paired test (on all samples so far) drops
    # the rescored candidates now clearly worse than the best so far (False: all rescored on every sample)
    race: bool = True
    # > 0: Gram-scored losses (the linears' mappings and the module screen) computed exactly for the best
    # `prescreen` candidates of the diagonal approximation sum(dW^2 diag(G)) only (0: every candidate)
    prescreen: int = 10
    # False: a module-scored mapping's short list (search_screen) comes from the diagonal prescreen directly,
    # without the exact Gram losses of the screen
    screen_exact: bool = False
    search_screen: int = _default(
        "search_screen"
    )  # module-scored mappings: run the module on the best k of the linears' output error (the diagonal
    # prescreen, or the exact Gram screen with screen_exact) only; 0 (or k >= the candidates): every candidate
    min_tokens: int = 16  # an expert seeing fewer calibration tokens gets no data-driven search
    module_loss: bool = True  # False: score attention/MLP mappings on their linears' outputs (Gram)
    refine_steps: int = _default(
        "refine_steps"
    )  # least-squares refits of each group's scale/zero after the clip search (0: off)
    rounding: str = _default(
        "rounding"
    )  # "nearest" | "gptq": codes rounded with error feedback (same format)
    gqa_fold: bool = _default("gqa_fold")  # v -> o under grouped-query attention: one scale per KV channel
    # False: mappings whose scales go into an activation (GELU's `act.scales`) are skipped; compressed-tensors'
    # loaders (transformers, vLLM) have no place for that tensor, only the AWQ format's do (AutoAWQ's layout)
    activation_scales: bool = True
    # GPTQ rounding only where the calibration tokens are at least this many per input channel (else
    # nearest, said per layer): on a tiny model with 1 token per channel GPTQ lost to nearest rounding
    gptq_tokens_per_input: float = limits.GPTQ_TOKENS_PER_INPUT
    gptq_damp: float = 0.01  # fraction of the mean Gram diagonal added to it before inverting
    keep_inputs: bool = (
        True  # fewer tokens than a linear's input width: keep X, not X^T X (False: always the Gram)
    )

    @classmethod
    def from_spec(cls, spec) -> BlockSettings:
        formats = {getattr(f, "value", f) for f in spec.formats}
        return cls(
            **{name: spec_value(spec, path) for name, path in BLOCK_SETTINGS_FROM_SPEC.items()},
            activation_scales="compressed-tensors" not in formats,
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
