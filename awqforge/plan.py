"""Memory and time plan of a job, from the model's config.json and the job's settings alone.

Pure Python (no torch): the API computes it at submit time to pick the smallest queue class whose
memory fits, and `awqforge plan` prints it. It follows what the engine holds while it works:

- quantize (one block at a time, awq.quantize_block; on CPU the block is first read as stored, beside its
  converted weights), held through the block: its weights in the compute
  dtype (the search reads them in place, no copy), the calibration hidden states going in and coming out
  ([n, seq, hidden] each), the inspected modules' inputs and outputs (module losses), and per distinct
  linear input either the inputs themselves in fp32 (when the block sees fewer tokens than the input is
  wide; on CPU those of q/k/v and gate/up are the recorded module inputs, not copies) or its fp32 Gram
  matrix. On top of that the largest of three phases: the FP pass (the forward of a chunk: MLP
  intermediate, attention scores); the scale search (the candidate weights of the largest module-loss
  mapping, e.g. gate+up, in the compute dtype, the module's forward on a chunk, and the fake-quantize
  temporaries, which work in row chunks of CHUNK_ELEMS); the quantize phase (the block's codes, the
  widest linear's fp32 copy off CPU, its scaled inputs, and with rounding=gptq the float64 Cholesky
  factors and the fp32 Gram matrix of the widest input).
- evaluate: the quantized model loaded whole (packed codes, scales, the embedding and lm_head in the
  compute dtype) and a window's logits.
- evaluate_tasks (eval.tasks, or eval.prompts): lm-eval's tasks and the generations run on the FP model
  loaded whole in the compute dtype (evaluate.load_fp_model), then on the quantized one (the FP model is
  freed first: tasks_eval.evaluate_models), each with a batch of requests' logits.

The compute dtype is float32 on CPU and the checkpoint's dtype on GPU (streaming.compute_dtype).
Figures against measured peaks: bench/bench_plan.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from awqforge import limits
from awqforge import spec as job_spec
from awqforge.errors import InputError

GIB = 1024**3
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# Sustained rates of the search's mixed work (matmuls and elementwise passes); rough, per device kind.
DEVICE_FLOPS = {"cpu": 1.0e11, "cuda": 4.0e13}
_FQ_PASSES = 4  # fp32 temporaries alive at once in a fake-quantize-and-compare of one row chunk
_CHUNK_TOKENS = limits.CHUNK_TOKENS  # the engine's own constants (awq.BlockSettings, awq.search)
_CHUNK_ELEMS = limits.CHUNK_ELEMS
_CPU_RUNTIME = GIB // 4  # RSS a CPU job adds before its first block (bench/bench_plan.py: 0.25-0.26 GiB)
_MODULE_INPUTS = ("attn_in", "mlp_in", "shared_in")  # linear inputs that are an inspected module's input
_CLIP_RATIOS = limits.CLIP_RATIOS
_EVAL_WINDOWS_DEFAULT = 40  # the built-in evaluation text at seq_len 2048 is about this many windows
# lm-eval pads a batch to its longest request: 1024 tokens covers the common zero- and few-shot tasks (the
# bundled ones are under 100); a task of longer contexts needs more than planned.
_TASK_CONTEXT_TOKENS = 1024
# Tokens an example costs forward (a context per choice: the bundled multiple-choice task runs ~140) and the
# examples of a task without `limit` (registry tasks range from hundreds to tens of thousands).
_TASK_TOKENS_PER_EXAMPLE = 256
_TASK_EXAMPLES_DEFAULT = 1000
# Module-scored candidates the estimate charges the rest of the samples for: the race (awq.search) keeps about
# this many to the end on a trained model; awqforge.timing times its block with exactly this many rescored.
RESCORED = 2


class PlanError(InputError):
    """The config does not say enough to plan (missing sizes)."""


@dataclass(frozen=True)
class Linear:
    name: str
    out_features: int
    in_features: int
    input_key: str  # linears reading the same tensor share one Gram matrix
    tokens_share: float = 1.0  # fraction of the block's tokens it sees (MoE experts: top_k / n_experts)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the plan needs, read from a transformers config.json (text config for multimodal ones)."""

    model_type: str
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    n_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    checkpoint_bytes: int = 2
    checkpoint_dtype: str = "bfloat16"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        cfg = dict(config.get("text_config") or {}) or config
        outer = config

        def get(*names, default=None):
            for n in names:
                for c in (cfg, outer):
                    if c.get(n) is not None:
                        return c[n]
            return default

        hidden = get("hidden_size", "n_embd", "d_model")
        n_layers = get("num_hidden_layers", "n_layer", "num_layers")
        n_heads = get("num_attention_heads", "n_head")
        if not (hidden and n_layers and n_heads):
            raise PlanError("config.json has no hidden_size / num_hidden_layers / num_attention_heads")
        n_experts = int(get("num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
        intermediate = get("intermediate_size", "ffn_dim", "n_inner", default=None) or 4 * hidden
        dtype = str(get("torch_dtype", "dtype", default="bfloat16")).removeprefix("torch.")
        return cls(
            model_type=str(get("model_type", default="unknown")),
            hidden=int(hidden),
            intermediate=int(intermediate),
            n_layers=int(n_layers),
            n_heads=int(n_heads),
            n_kv_heads=int(get("num_key_value_heads", default=n_heads) or n_heads),
            head_dim=int(get("head_dim", default=0) or hidden // n_heads),
            vocab=int(get("vocab_size", default=32000)),
            tied=bool(get("tie_word_embeddings", default=False)),
            n_experts=n_experts,
            experts_per_token=int(get("num_experts_per_tok", "top_k", default=2) or 2) if n_experts else 0,
            expert_intermediate=int(get("moe_intermediate_size", default=intermediate) or intermediate)
            if n_experts
            else 0,
            shared_intermediate=int(get("shared_expert_intermediate_size", default=0) or 0),
            checkpoint_bytes=_DTYPE_BYTES.get(dtype, 2),
            checkpoint_dtype=dtype if dtype in _DTYPE_BYTES else "bfloat16",
        )

    def block_linears(self) -> list[Linear]:
        h, a, kv = self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        out = [
            Linear("self_attn.q_proj", a, h, "attn_in"),
            Linear("self_attn.k_proj", kv, h, "attn_in"),
            Linear("self_attn.v_proj", kv, h, "attn_in"),
            Linear("self_attn.o_proj", h, a, "o_in"),
        ]
        if self.n_experts:
            share = min(1.0, self.experts_per_token / self.n_experts)
            for e in range(self.n_experts):
                i = self.expert_intermediate
                out += [
                    Linear(f"mlp.experts.{e}.gate_proj", i, h, f"expert{e}_in", share),
                    Linear(f"mlp.experts.{e}.up_proj", i, h, f"expert{e}_in", share),
                    Linear(f"mlp.experts.{e}.down_proj", h, i, f"expert{e}_down", share),
                ]
            if self.shared_intermediate:
                i = self.shared_intermediate
                out += [
                    Linear("mlp.shared_expert.gate_proj", i, h, "shared_in"),
                    Linear("mlp.shared_expert.up_proj", i, h, "shared_in"),
                    Linear("mlp.shared_expert.down_proj", h, i, "shared_down"),
                ]
        else:
            i = self.intermediate
            out += [
                Linear("mlp.gate_proj", i, h, "mlp_in"),
                Linear("mlp.up_proj", i, h, "mlp_in"),
                Linear("mlp.down_proj", h, i, "down_in"),
            ]
        return out

    @property
    def block_linear_params(self) -> int:
        return sum(lin.out_features * lin.in_features for lin in self.block_linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def total_params(self) -> int:
        return self.n_layers * (self.block_linear_params + 2 * self.hidden) + self.embedding_params


# Each planner setting and the JobSpec field it is: its default and its value come from there.
JOB_SETTINGS_FROM_SPEC = {
    "bits": "quant.bits",
    "group_size": "quant.group_size",
    "n_samples": "calibration.n_samples",
    "seq_len": "calibration.seq_len",
    "method": "method",
    "rounding": "rounding",
    "scale_search": "scale_search",
    "n_grid": "n_grid",
    "search_screen": "search_screen",
    "clip_search": "clip_search",
    "eval_enabled": "eval.enabled",
    "eval_seq_len": "eval.seq_len",
    "eval_max_seqs": "eval.max_seqs",
    "eval_tasks": "eval.tasks",
    "eval_prompts": "eval.prompts",
}


def _default(name: str):
    return job_spec.field_default(JOB_SETTINGS_FROM_SPEC[name])


@dataclass
class JobSettings:
    """The job fields the plan reads (a JobSpec gives them all: JobSettings.from_spec)."""

    bits: int = _default("bits")
    group_size: int = _default("group_size")
    n_samples: int = _default("n_samples")
    seq_len: int = _default("seq_len")
    method: str = _default("method")
    rounding: str = _default("rounding")
    scale_search: str = _default("scale_search")
    n_grid: int = _default("n_grid")
    search_screen: int = _default("search_screen")
    clip_search: bool = _default("clip_search")
    eval_enabled: bool = _default("eval_enabled")
    eval_seq_len: int = _default("eval_seq_len")
    eval_max_seqs: int | None = _default("eval_max_seqs")
    eval_tasks: tuple = _default("eval_tasks")  # EvalTaskSpec (or dicts of its fields)
    eval_prompts: tuple | None = _default("eval_prompts")

    @property
    def evaluates_tasks(self) -> bool:
        """The job loads the FP model whole for lm-eval tasks or side-by-side generations (pipeline.py)."""
        return bool(self.eval_tasks or self.eval_prompts)

    @classmethod
    def from_spec(cls, spec) -> JobSettings:
        return cls(**{name: job_spec.spec_value(spec, path) for name, path in JOB_SETTINGS_FROM_SPEC.items()})


@dataclass
class MemoryPlan:
    device: str  # "cpu" | "cuda"
    compute_dtype: str
    peak_bytes: int
    peak_stage: str  # quantize | evaluate | evaluate_tasks
    quantize_peak_bytes: int
    evaluate_peak_bytes: int
    evaluate_tasks_peak_bytes: int = 0  # lm-eval tasks and generations: the FP model whole (0: no tasks)
    components: dict[str, int] = field(default_factory=dict)  # quantize stage, persistent + largest transient
    transient: str = ""  # which transient sets the quantize peak
    est_seconds: float = 0.0
    est_seconds_by_stage: dict[str, float] = field(default_factory=dict)
    # the rate the time estimate divides the FLOP count by: DEVICE_FLOPS's rough default, or measured on
    # this machine by timing one block (awqforge.timing.measure_rate)
    flops_rate: float = 0.0
    flops_rate_source: str = "default"
    # the rate of the stages that run the model forward (calibrate, evaluate, evaluate_tasks): measured by
    # timing forwards of one block (awqforge.timing.measure_forward_rate); 0: flops_rate's
    forward_rate: float = 0.0
    n_blocks: int = 0
    params: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_gib"] = round(self.peak_bytes / GIB, 2)
        return d


def _n_candidates(s: JobSettings) -> int:
    modes = 2 if s.scale_search == "both" else 1
    return s.n_grid * modes + (0 if s.scale_search in ("activation", "both") else 1)


def _group(in_f: int, group_size: int) -> int:
    return in_f if group_size == -1 or group_size >= in_f else group_size


def plan(
    config: dict[str, Any],
    settings: JobSettings,
    *,
    device: str = "cuda",
    flops_rate: float | None = None,
    forward_rate: float | None = None,
) -> MemoryPlan:
    """Peak memory (bytes) and a time estimate of a job on one device kind ("cpu" or "cuda").

    flops_rate: FLOP/s of this machine for the search's work, measured (awqforge.timing.measure_rate times
    one block of the model); default DEVICE_FLOPS[device], an order of magnitude only. forward_rate: FLOP/s
    of the model's forward (evaluation runs large matmuls, nearer the machine's peak than the search's mixed
    work: awqforge.timing.measure_forward_rate); default flops_rate's."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    shape = ModelShape.from_config(config)
    s = settings
    e = 4 if device == "cpu" else min(shape.checkpoint_bytes, 4)
    h = shape.hidden
    n, seq = s.n_samples, s.seq_len
    tokens = n * seq
    linears = shape.block_linears()
    p_lin = sum(lin.out_features * lin.in_features for lin in linears)
    widths: dict[str, tuple[int, float]] = {}
    for lin in linears:
        widths.setdefault(lin.input_key, (lin.in_features, lin.tokens_share))
    awq = s.method == "awq"

    comp: dict[str, int] = {
        # on CPU the job's own process: the libraries it imports (transformers' model code, the tokenizer)
        # and allocator state, about the same for every shape (measured by bench/bench_plan.py)
        "runtime": _CPU_RUNTIME if device == "cpu" else 0,
        "block_weights": p_lin * e + 2 * h * e,
        "calibration_activations": 2 * tokens * h * e,  # this block's inputs and its outputs
    }
    # per distinct input: the inputs themselves (fp32) when the block sees fewer tokens than it is wide,
    # else its fp32 Gram matrix (normalised in place)
    kept, grams, widest_kept = 0, 0, 0
    for key, (w, share) in widths.items():
        if tokens < w:
            n_tok = int(tokens * share)
            widest_kept = max(widest_kept, 4 * n_tok * w)
            if not (e == 4 and awq and key in _MODULE_INPUTS):  # else the module-loss record itself
                kept += 4 * n_tok * w
        else:
            grams += 4 * w * w
    comp["gram_matrices"] = grams
    comp["kept_inputs"] = kept
    # module losses: the attention and MLP modules' inputs and FP outputs, kept for the whole search
    comp["module_loss_records"] = 4 * tokens * h * e if awq else 0

    # phases on top of that (the largest one counts)
    chunk = min(tokens, max(1, _CHUNK_TOKENS // seq) * seq)
    inter = shape.expert_intermediate * shape.experts_per_token if shape.n_experts else shape.intermediate
    chunk_samples = max(1, chunk // seq)
    mlp_forward = 3 * chunk * inter * e
    attn_forward = chunk_samples * shape.n_heads * seq * seq * e
    forward = mlp_forward + attn_forward + 4 * chunk * h * e
    if e != 4:  # hooks cast each linear input to fp32
        forward += 4 * chunk * max(w for w, _ in widths.values())
    fq = _FQ_PASSES * 4 * _CHUNK_ELEMS
    phases: dict[str, dict[str, int]] = {"forward": {"transient_forward": forward}}
    if device == "cpu" and shape.checkpoint_bytes != e:
        # loading the block: the shard's tensors as stored (safetensors keeps the file's pages mapped until the
        # last of them is converted) beside the converted weights
        phases["load"] = {"transient_load": p_lin * shape.checkpoint_bytes}
    if awq:
        # module losses: the candidate weights of the mapping's linears, swapped in, and the module's forward
        by_input: dict[str, int] = {}
        for lin in linears:
            if lin.input_key in _MODULE_INPUTS or lin.input_key.startswith("expert"):
                if not lin.input_key.endswith("_down"):
                    group = "attn" if lin.input_key == "attn_in" else "mlp"
                    by_input[group] = by_input.get(group, 0) + lin.out_features * lin.in_features * e

        # (the candidates are fake-quantized before the module runs: the larger of the two counts), and the
        # race's contenders' weights kept between chunks where all of them fit limits.RACE_CACHE_BYTES
        def race_cache(group: int) -> int:
            return min(limits.RESCORE_MAX, limits.RACE_CACHE_BYTES // group) * group if group else 0

        module = {
            "attn": by_input.get("attn", 0)
            + race_cache(by_input.get("attn", 0))
            + max(fq, attn_forward + 4 * chunk * h * e),
            "mlp": by_input.get("mlp", 0)
            + race_cache(by_input.get("mlp", 0))
            + max(fq, mlp_forward + 2 * chunk * h * e),
        }
        phases["scale_search"] = {"transient_scale_search": max(module.values())}
    biggest = max(linears, key=lambda lin: lin.out_features * lin.in_features)
    n_big = biggest.out_features * biggest.in_features
    codes = p_lin + 5 * sum(
        lin.out_features * (lin.in_features // _group(lin.in_features, s.group_size)) for lin in linears
    )  # uint8 codes, fp32 scales, uint8 zeros
    # clip search and final quantize of the widest linear: its fp32 copy (off CPU), scaled inputs, chunks
    quantize = (4 * n_big if e != 4 else 0) + widest_kept + fq
    phases["quantize"] = {"block_codes": codes, "transient_quantize": quantize}
    gptq_lins = [lin for lin in linears if awq and _gptq_applies(s, lin, tokens)]
    if gptq_lins:
        w_in = max(lin.in_features for lin in gptq_lins)
        n_g = max(lin.out_features * lin.in_features for lin in gptq_lins)
        gptq = 3 * 8 * w_in * w_in + 4 * w_in * w_in + 4 * 4 * n_g
        phases["quantize"]["transient_quantize"] = max(quantize, gptq)
    which = max(phases, key=lambda k: sum(phases[k].values()))
    comp.update(phases[which])
    quantize_peak = sum(comp.values())

    # evaluate: the quantized model whole, plus one window's logits (fp32, a few copies)
    eval_peak = 0
    if s.eval_enabled:
        q_bytes = shape.n_layers * (p_lin * s.bits / 8 + 2 * 2 * p_lin / _group(shape.hidden, s.group_size))
        eval_peak = int(
            q_bytes
            + shape.embedding_params * e
            + shape.n_layers * 2 * h * e
            + 3 * s.eval_seq_len * shape.vocab * 4
        )
    # evaluate_tasks: the FP model whole in the compute dtype (freed before the quantized model, which is
    # smaller, is loaded) and a batch of requests' logits with their log-softmax
    tasks_peak = 0
    if s.evaluates_tasks:
        logits = 2 * limits.TASK_BATCH_SIZE * _TASK_CONTEXT_TOKENS * shape.vocab * e
        tasks_peak = int(comp["runtime"] + shape.total_params * e + logits)
    stages = {"quantize": quantize_peak, "evaluate": eval_peak, "evaluate_tasks": tasks_peak}
    peak_stage = max(stages, key=stages.get)  # the first on a tie
    peak = stages[peak_stage]

    rate = flops_rate or DEVICE_FLOPS[device]
    secs = _time(shape, s, rate, forward_rate or rate, linears, widths, tokens)
    return MemoryPlan(
        device=device,
        compute_dtype="float32" if e == 4 else shape.checkpoint_dtype,
        peak_bytes=int(peak),
        peak_stage=peak_stage,
        quantize_peak_bytes=int(quantize_peak),
        evaluate_peak_bytes=int(eval_peak),
        evaluate_tasks_peak_bytes=tasks_peak,
        components={k: int(v) for k, v in comp.items()},
        transient=which,
        est_seconds=round(sum(secs.values()), 1),
        est_seconds_by_stage={k: round(v, 1) for k, v in secs.items()},
        flops_rate=float(rate),
        flops_rate_source="measured" if flops_rate else "default",
        forward_rate=float(forward_rate or 0.0),
        n_blocks=shape.n_layers,
        params=shape.total_params,
    )


def block_flops(config: dict[str, Any], settings: JobSettings) -> float:
    """The FLOP count the time estimate charges for quantizing one decoder block (what a measured block time
    is divided into to get this machine's rate)."""
    shape = ModelShape.from_config(config)
    linears = shape.block_linears()
    widths: dict[str, tuple[int, float]] = {}
    for lin in linears:
        widths.setdefault(lin.input_key, (lin.in_features, lin.tokens_share))
    return _block_flops(shape, settings, linears, widths, settings.n_samples * settings.seq_len)


def _block_flops(shape: ModelShape, s: JobSettings, linears, widths, tokens: int) -> float:
    p_lin = sum(lin.out_features * lin.in_features for lin in linears)
    fwd = 2 * tokens * p_lin + 4 * s.n_samples * s.seq_len**2 * shape.hidden
    # Gram matrices, where the inputs are not kept instead (a wide one by its upper blocks only)
    block = fwd + sum(
        2 * tokens * share * w * w * limits.blocked_share(limits.gram_blocks(w))
        for w, share in widths.values()
        if tokens >= w
    )
    if s.method == "awq":
        c = _n_candidates(s)
        screened = 0 < s.search_screen < c
        on_module = s.search_screen if screened else c  # the screen's short list, or every candidate
        # the short list on the coarse eighth, then a race on the rest: about RESCORED stay to the end
        block += on_module * 0.125 * fwd + min(RESCORED, on_module) * 0.875 * fwd
        for lin in linears:
            nw = lin.out_features * lin.in_features
            t = min(tokens * lin.tokens_share, lin.in_features)
            if t == lin.in_features:  # from the Gram matrix: a wide one's quadratic forms by blocks
                t *= limits.blocked_share(limits.form_blocks(lin.in_features))
            g = _group(lin.in_features, s.group_size)
            # scored on their outputs: about half the linears, all of them when the module search is screened
            block += c * (20 * nw + 2 * nw * t) / (1 if screened else 2)
            if s.clip_search:
                block += _CLIP_RATIOS * (2 * nw * g + 20 * nw) + 8 * nw * g
            if _gptq_applies(s, lin, tokens):
                block += lin.in_features**3 + 2 * nw * lin.in_features
    return block


def _gptq_applies(s: JobSettings, lin, tokens: int) -> bool:
    """Whether the engine rounds this linear with GPTQ: rounding=gptq and enough calibration tokens reach it
    (limits.GPTQ_TOKENS_PER_INPUT per input channel; awq.block rounds the others to nearest)."""
    return (
        s.rounding == "gptq" and tokens * lin.tokens_share >= limits.GPTQ_TOKENS_PER_INPUT * lin.in_features
    )


def forward_flops(params: int, tokens: int) -> float:
    """The FLOP count the estimate charges a forward of `tokens` tokens through a model of `params`
    parameters (what awqforge.timing's measured forward is divided into, too)."""
    return 2.0 * tokens * params


def _time(
    shape: ModelShape, s: JobSettings, rate: float, fwd_rate: float, linears, widths, tokens: int
) -> dict[str, float]:
    """FLOP count per stage over a rate (the search's, or the forward's for the stages that only run the
    model): an order-of-magnitude estimate with the default rate, within the model's own error once the
    rates are measured on the machine."""
    block = _block_flops(shape, s, linears, widths, tokens)
    out = {
        # tokenizing and the embedding's gather (no matmul): the calibration rows' hidden states
        "calibrate": forward_flops(shape.hidden, tokens) / fwd_rate,
        "quantize": shape.n_layers * block / rate,
    }
    if s.eval_enabled:  # the FP and the quantized model over the windows
        windows = s.eval_max_seqs or _EVAL_WINDOWS_DEFAULT
        out["evaluate"] = 2 * forward_flops(shape.total_params, windows * s.eval_seq_len) / fwd_rate
    if s.eval_tasks:  # every task's examples forward through the FP and the quantized model
        examples = sum(_task_limit(t) or _TASK_EXAMPLES_DEFAULT for t in s.eval_tasks)
        out["evaluate_tasks"] = (
            2 * forward_flops(shape.total_params, examples * _TASK_TOKENS_PER_EXAMPLE) / fwd_rate
        )
    return out


def _task_limit(task) -> int | None:
    return task.get("limit") if isinstance(task, dict) else task.limit


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a local checkpoint folder."""
    path = Path(model_dir).expanduser() / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise PlanError(f"{path} not found: a checkpoint folder has a config.json") from exc
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path} is not valid JSON: {exc}") from exc


def fits(plan_: MemoryPlan, capacity_bytes: int) -> bool:
    return plan_.peak_bytes <= capacity_bytes


def format_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def describe(p: MemoryPlan) -> str:
    """Human-readable plan: peak, components, time."""
    lines = [
        f"device {p.device} ({p.compute_dtype}), {p.n_blocks} blocks, {p.params / 1e9:.2f} B parameters",
        f"peak {format_bytes(p.peak_bytes)} ({p.peak_stage}); quantize {format_bytes(p.quantize_peak_bytes)}, "
        f"evaluate {format_bytes(p.evaluate_peak_bytes)}"
        + (
            f", evaluate_tasks {format_bytes(p.evaluate_tasks_peak_bytes)}"
            if p.evaluate_tasks_peak_bytes
            else ""
        ),
    ]
    for k, v in sorted(p.components.items(), key=lambda kv: -kv[1]):
        if not v:
            continue
        lines.append(f"  {k:28s} {format_bytes(v)}")
    est = ", ".join(f"{k} {v:.0f} s" for k, v in p.est_seconds_by_stage.items())
    lines.append(f"time estimate {p.est_seconds:.0f} s ({est})")
    lines.append(
        f"  at {p.flops_rate / 1e9:.0f} GFLOP/s "
        + (
            "measured on this machine (one block timed)"
            if p.flops_rate_source == "measured"
            else "(a rough default for the device kind; `awqforge plan --measure` times one block here)"
        )
    )
    if p.forward_rate:
        lines.append(
            f"  the model's forwards (calibrate, evaluate) at {p.forward_rate / 1e9:.0f} GFLOP/s measured"
        )
    return "\n".join(lines)


__all__ = ["JobSettings", "MemoryPlan", "ModelShape", "PlanError", "describe", "plan", "read_config"]
