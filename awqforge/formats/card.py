"""README.md model card: Hub metadata (YAML front matter) and a body saying what was done and how to load it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from awqforge import __version__

if TYPE_CHECKING:  # pragma: no cover
    from awqforge.spec import JobSpec


@dataclass
class ModelCardInfo:
    """What the card says beyond what the writer knows (format, bits, layers left in full precision)."""

    base_model: str
    method: str = "awq"
    calibration: str | None = None  # e.g. "pileval, 128 samples x 512 tokens"
    fp_perplexity: float | None = None
    quant_perplexity: float | None = None
    eval_description: str | None = None  # e.g. "wikitext-2 test, 2048-token windows"
    repo_id: str | None = None  # where the artifact is published; used in the loading snippets
    base_model_revision: str | None = None
    license: str | None = None  # overrides what is read from the source card
    extra_settings: dict[str, Any] = field(default_factory=dict)  # scale search, grid, clip search, seed...
    metrics: dict[str, Any] = field(default_factory=dict)  # sizes, wall time, layers quantized
    model_class: str = "AutoModelForCausalLM"  # the transformers class of the loading snippet
    pipeline_tag: str = "text-generation"
    tasks: list[dict] = field(default_factory=list)  # lm-eval rows: task, metric, fp, quantized, recovery
    generations: list[dict] = field(default_factory=list)  # prompt, fp, quantized
    quality_failure: str | None = None  # the quality gate this artifact missed
    quantized_experts: bool = False  # MoE experts quantized: the transformers release that reads them is said

    @classmethod
    def from_spec(
        cls, spec: JobSpec, metrics: dict[str, Any] | None = None, repo_id: str | None = None
    ) -> ModelCardInfo:
        metrics = dict(metrics or {})
        cal = spec.calibration
        ev = spec.eval
        # The real counts when the source had less text than asked for (pipeline metrics), else the request.
        samples = metrics.pop("calibration_samples", cal.n_samples)
        tokens = metrics.pop("calibration_tokens", None)
        metrics.pop("calibration_shortfall", None)
        calibration = (
            f"{source_label(cal.source)}, {cal.packing.value} packing, {samples} samples of up to "
            f"{cal.seq_len} tokens"
        )
        calibration += f" ({tokens} tokens)" if tokens is not None else ""
        return cls(
            base_model=spec.model,
            method=spec.method.value,
            calibration=None if spec.method.value == "rtn" else calibration,
            fp_perplexity=metrics.pop("fp_perplexity", None),
            quant_perplexity=metrics.pop("quant_perplexity", None),
            eval_description=(
                f"{source_label(ev.text) if ev.text else 'the bundled English text'}, {ev.seq_len}-token windows"
                + (f", at most {ev.max_seqs}" if ev.max_seqs else "")
                if ev.enabled
                else None
            ),
            repo_id=repo_id or (spec.publish.repo_id if spec.publish else None),
            base_model_revision=spec.revision,
            extra_settings={**describe_method(spec), "seed": spec.seed},
            metrics=metrics,
        )


def source_label(source: str) -> str:
    """A text source as a published card names it: a file by its name only (never a server path)."""
    if source == "bundled":
        return "bundled (the English text shipped with AWQForge)"
    if source.startswith("file:"):
        return f"file {Path(source[5:]).name}"
    return source


_SCALE_SEARCH = {
    "duo": "duo: s = mean|x|^a / mean|w|^(1-a), a on {n} grid points, plus s = 1 (AutoAWQ)",
    "activation": "activation: s = mean|x|^a, a on {n} grid points (the AWQ paper)",
    "both": "both: the activation and duo grids, {n} points each (llm-compressor)",
}


def describe_method(spec: JobSpec) -> dict[str, str]:
    """What ran, step by step, in words: the same labels in the model card and quant_report.json."""
    if spec.method.value == "rtn":
        return {
            "method": "RTN: round-to-nearest from the weights alone; no calibration data read",
            "scale_search": "none",
            "clip_search": "none",
            "refine_steps": "none",
            "search_screen": "none",
            "gqa_fold": "none",
            "rounding": "round to nearest",
        }
    k = spec.refine_steps
    modes = 2 if spec.scale_search.value == "both" else 1  # the grid(s), plus s = 1 for duo alone
    n_cands = spec.n_grid * modes + (1 if spec.scale_search.value == "duo" else 0)
    return {
        "method": "AWQ: per-channel scales searched on calibration activations and folded into the previous op",
        "scale_search": _SCALE_SEARCH[spec.scale_search.value].format(n=spec.n_grid),
        "search_screen": (
            f"attention and MLP mappings: every grid point ranked on the mapping's linears' own output error "
            f"(the diagonal of their input Gram matrix), the best {spec.search_screen} scored on the "
            "attention / MLP output, with no scale beside them (an AWQForge addition; search_screen=0 scores every "
            "grid point on the module output)"
            if 0 < spec.search_screen < n_cands
            else "off: every grid point scored on the attention / MLP output (AWQ as published)"
        ),
        "gqa_fold": "grouped-query attention: the v -> o scale searched and folded per KV channel, shared by the "
        "query heads of its group (an AWQForge addition; AutoAWQ and llm-compressor skip this mapping)"
        if spec.gqa_fold
        else "off: v -> o skipped under grouped-query attention (as AutoAWQ and llm-compressor)",
        "clip_search": "per-group clip ratio 1, 0.95, ..., 0.55 minimising the group's output error (AutoAWQ); "
        "not for q/k projections"
        if spec.clip_search
        else "off",
        "refine_steps": (
            f"{k} refit{'s' if k > 1 else ''} of each group's scale and zero for its output error (an AWQForge "
            "addition, not in published AWQ; refine_steps=0 turns it off)"
            if spec.clip_search and k
            else "off (AWQ as published)"
        ),
        "rounding": "round to nearest (AWQ as published)"
        if spec.rounding.value == "nearest"
        else "GPTQ error feedback through the inverse input Gram matrix, after the AWQ scale and clip search "
        "(an AWQForge addition)",
    }


_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


def read_source_card_metadata(source_dir: str | Path) -> dict[str, Any]:
    """The YAML front matter of the source model's README.md, {} when absent or unreadable."""
    path = Path(source_dir) / "README.md"
    if not path.is_file():
        return {}
    match = _FRONT_MATTER.match(path.read_text(errors="replace"))
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _looks_like_hub_id(ref: str) -> bool:
    return bool(re.match(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$", ref))


def _fmt_ppl(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def _fmt_score(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _tasks_section(info: ModelCardInfo) -> list[str]:
    """The task table hubs publish (task, metric, FP, quantized, recovery), the gate verdict and the
    side-by-side generations."""
    lines: list[str] = []
    if info.tasks:
        lines += [
            "",
            "### Tasks (lm-evaluation-harness)",
            "",
            "| task | metric | FP | quantized | recovery |",
            "|---|---|---|---|---|",
        ]
        for r in info.tasks:
            rec = "-" if r.get("recovery") is None else f"{r['recovery']:.3f}"
            lines.append(
                f"| {r['task']} | {r['metric']} | {_fmt_score(r.get('fp'), r.get('fp_stderr'))} | "
                f"{_fmt_score(r.get('quantized'), r.get('stderr'))} | {rec} |"
            )
        lines += ["", "Recovery = quantized / FP (FP / quantized where lower is better); ± is the stderr."]
    if info.quality_failure:
        lines += [
            "",
            f"**This artifact did not pass its quality gate** ({info.quality_failure}). A copy on a hub was "
            "published with an explicit override.",
        ]
    if info.generations:
        lines += ["", "### Side-by-side generations (greedy)", ""]
        for g in info.generations:
            lines += [
                f"**Prompt:** {_one_line(g['prompt'])}",
                "",
                f"- original: {_one_line(g['fp'])}",
                f"- quantized: {_one_line(g['quantized'])}",
                "",
            ]
    return lines


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(empty)"


def _fmt_bytes(n: Any) -> str:
    """Binary units (KiB, MiB, GiB), as everywhere else in AWQForge."""
    if not isinstance(n, int | float):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _cell(value: Any) -> str:
    """Text for one Markdown table cell: `|` escaped (`mean|x|` would end the cell), no line breaks."""
    return " ".join(str(value).split()).replace("|", "\\|")


def model_name(ref: str) -> str:
    """The model's own name: a hub id's name part, or a local checkpoint folder's name (never its path)."""
    return Path(ref.rstrip("/")).name or ref


def serving(fmt: str, bits: int) -> dict[str, str | None]:
    """What serves a `fmt` checkpoint of `bits`-bit weights: vLLM's quantization method (None: vLLM does not
    serve it) and the AWQForge kernel its QuantLinear runs (awqforge/qlinear.py)."""
    vllm = None
    if fmt == "awq" and bits == 4:
        vllm = "awq_marlin"
    elif fmt == "compressed-tensors" and bits in (4, 8):
        vllm = "compressed-tensors"
    kernel = (
        "AWQForge's INT4 kernels: C++ on the CPU, Triton W4A16 on CUDA"
        if bits == 4
        else f"AWQForge's pure-torch reference path: there is no {bits}-bit kernel, each weight is dequantized "
        "at every call, several times slower than the 4-bit kernels"
    )
    return {"vllm": vllm, "kernel": kernel}


# bench/bench_floor_load.py: transformers 5.4 loads a compressed-tensors MoE artifact with its experts
# left at random (no code path dequantizes fused experts before 5.13); 5.13 and later read them.
MOE_TRANSFORMERS_NOTE = (
    "The MoE experts are quantized: transformers 5.13 or newer reads them (earlier 5.x releases leave "
    "quantized experts unread); vLLM reads them in any release that serves this model type."
)
MOE_AWQ_NOTE = (
    "The MoE experts are quantized in the AWQ layout, which vLLM reads; transformers cannot load them (its "
    "AWQ layers never replace fused experts): use the compressed-tensors artifact there."
)


def render_card(
    info: ModelCardInfo,
    *,
    fmt: str,
    bits: int,
    group_size: int,
    zero_point: bool,
    unquantized: list[str],
    source_meta: dict[str, Any],
    has_chat_template: bool,
    title: str | None = None,
) -> str:
    """The README.md text; `title` (default: the repo id's name, else the model's name with its
    quantization) heads it. A local base model is named by its folder's name only, never by its path."""
    meta: dict[str, Any] = {}
    hub_base = _looks_like_hub_id(info.base_model)
    if hub_base:
        meta["base_model"] = info.base_model
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = info.pipeline_tag
    license_ = info.license or source_meta.get("license")
    if license_:
        meta["license"] = license_
        for key in ("license_name", "license_link"):
            if source_meta.get(key):
                meta[key] = source_meta[key]
    language = source_meta.get("language")
    if language:
        meta["language"] = language
    tags = [info.method, f"{bits}-bit", "quantized", fmt, "awqforge"]
    if fmt == "compressed-tensors":
        tags.insert(2, "int4" if bits == 4 else f"int{bits}")
    meta["tags"] = list(dict.fromkeys(tags))

    name = info.repo_id or "path/to/this/folder"
    base_name = info.base_model if hub_base else model_name(info.base_model)
    if title is None:
        title = (
            model_name(info.repo_id)
            if info.repo_id
            else f"{model_name(info.base_model)}, {bits}-bit {info.method.upper()} ({fmt})"
        )
    serve = serving(fmt, bits)
    scheme = "symmetric" if not zero_point else "asymmetric (zero point)"
    groups = "one group per output channel" if group_size == -1 else f"{group_size} input channels per group"
    method_text = info.extra_settings.get("method") or {
        "awq": "AWQ (activation-aware weight quantization: per-channel scales searched on calibration activations)",
        "rtn": "round-to-nearest (no calibration)",
    }.get(info.method, info.method)
    base = base_name + (f" (revision `{info.base_model_revision}`)" if info.base_model_revision else "")
    if not hub_base:
        base += " (a local checkpoint)"

    lines = [
        f"# {title}",
        "",
        f"{bits}-bit weight-only quantization of "
        + (
            f"[{base_name}](https://huggingface.co/{base_name})"
            if hub_base
            else f"{base_name} (a local checkpoint)"
        )
        + f", in the **{fmt}** checkpoint format, made with AWQForge {__version__}.",
        "",
        "## Quantization",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | {_cell(base)} |",
        f"| method | {_cell(method_text)} |",
        f"| weight bits | {bits} |",
        f"| grouping | {groups} |",
        f"| scheme | {scheme} |",
        f"| format | {fmt}" + (" (AutoAWQ gemm layout)" if fmt == "awq" else " (pack-quantized)") + " |",
        f"| calibration set | {_cell(info.calibration or 'none')} |",
    ]
    for key, value in info.extra_settings.items():
        if key == "method":
            continue
        lines.append(f"| {_cell(key)} | {_cell(value)} |")
    kept = ", ".join(f"`{m}`" for m in unquantized) or "nothing"
    lines.append(f"| left in full precision | {_cell(kept)} |")
    if fmt == "awq" and not zero_point:
        lines += [
            "",
            "Symmetric weights are stored with an explicit zero point of 8 in every group (the AWQ layout always carries `qzeros`), so the config says `zero_point: true`.",
        ]
    lines += [
        "",
        "## Evaluation",
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| original | {_fmt_ppl(info.fp_perplexity)} |",
        f"| quantized | {_fmt_ppl(info.quant_perplexity)} |",
        "",
        f"Perplexity on {info.eval_description or 'no evaluation text'} (lower is better).",
    ]
    lines += _tasks_section(info)
    sizes = info.metrics
    if "size_before_bytes" in sizes or "size_after_bytes" in sizes:
        lines += [
            "",
            f"Weights: {_fmt_bytes(sizes.get('size_before_bytes'))} before, {_fmt_bytes(sizes.get('size_after_bytes'))} after.",
        ]

    vllm_quant = serve["vllm"]
    lines += ["", "## Use it"]
    if vllm_quant:
        lines += [
            "",
            "### vLLM",
            "",
            "```bash",
            f"vllm serve {name}",
            "```",
            "",
            "```python",
            "from vllm import LLM, SamplingParams",
            "",
            f'llm = LLM(model="{name}", quantization="{vllm_quant}")'
            + ('  # "awq" on GPUs older than Ampere' if fmt == "awq" else ""),
            'print(llm.generate(["The capital of France is"], SamplingParams(max_tokens=32))[0].outputs[0].text)',
            "```",
        ]
    else:
        lines += [
            "",
            f"vLLM does not serve {bits}-bit weight-only checkpoints (its weight-only kernels cover 4 and 8 bits): "
            "load this one with transformers or AWQForge.",
        ]
    lines += [
        "",
        "### transformers",
        "",
        "```python",
        f"from transformers import {info.model_class}, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        f'model = {info.model_class}.from_pretrained("{name}", device_map="auto")',
        "```",
        "",
        "(needs `pip install compressed-tensors`)"
        if fmt == "compressed-tensors"
        else "(needs `pip install gptqmodel` for AWQ checkpoints)",
    ]
    if fmt == "compressed-tensors" and info.quantized_experts:
        lines += ["", MOE_TRANSFORMERS_NOTE]
    elif fmt == "awq" and info.quantized_experts:
        lines += ["", MOE_AWQ_NOTE]
    if fmt == "compressed-tensors" and zero_point:
        lines += [
            "",
            "With asymmetric weights, transformers 5.x + compressed-tensors 0.20 mis-size the packed zero points when they keep "
            "the model compressed; load with `quantization_config=CompressedTensorsConfig(dequantize=True)` there.",
        ]
    lines += [
        "",
        "### AWQForge (CPU or GPU)",
        "",
        f"Runs on {serve['kernel']}.",
        "",
        "```python",
        "import awqforge",
        "",
        f'model = awqforge.load_quantized("{name}", device="cpu")',
        "```",
    ]
    if has_chat_template:
        lines += [
            "",
            "The tokenizer's chat template is included: use `tokenizer.apply_chat_template` for chat models.",
        ]
    lines += ["", "`manifest.json` lists every file with its size and sha256."]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{front}\n---\n\n" + "\n".join(lines) + "\n"
