"""The `awqforge` command line: quantize, eval, smollm; other subcommands (serve, keys, worker) are plugins.

Plugins are entry points in the group "awqforge.commands", each `fn(argv: list[str]) -> int`; the engine
finds them through importlib.metadata and never imports the service packages itself.
Exit codes: 0 ok, 1 the job failed (message on stderr), 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from awqforge.spec import field_default  # pure pydantic

PLUGIN_GROUP = "awqforge.commands"
DEFAULT_GROUP_SIZE = field_default("quant.group_size")
# The one CLI default that differs from JobSpec's: the command line runs where the hub may be unreachable, so
# it calibrates on the English text shipped in awqforge/data; pileval (the service's default) is opt-in here.
DEFAULT_CALIBRATION = "bundled"
BUILTIN = ("quantize", "eval", "smollm", "plan", "doctor", "kernels")
# What each service command does, for `awqforge --help` (the service's own packages are not imported to
# read it: each command's --help says more). A plugin not listed here is named as a service command.
SERVICE_COMMANDS = {
    "serve": "run the API (embedded: SQLite, a local broker and one worker, unless configured)",
    "worker": "run one Celery worker that takes jobs from the queue",
    "migrate": "apply the database schema migrations (before the API and workers start)",
    "keys": "create, list and revoke API keys",
    "tenants": "manage tenants: publish namespaces and use of the service's hub token",
    "submit": "submit a quantization job to a running service",
    "jobs": "list your jobs on a running service, newest first",
    "status": "one job's status, progress and metrics",
    "cancel": "cancel a queued or running job",
    "download": "download a job's artifacts (resumes partial files, checks sha256)",
}


class _UsageError(Exception):
    pass


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default: argparse's `(default: X)` where there is a value; options whose default
    depends on other settings (None here) say it in their own help, as `default: ...`."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS:
            return action.help
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name not in BUILTIN}


def build_parser(plugins: dict | None = None) -> argparse.ArgumentParser:
    plugins = _plugins() if plugins is None else plugins
    extra = (
        f" Service commands: {', '.join(sorted(plugins))} (see `awqforge NAME --help`)." if plugins else ""
    )
    parser = argparse.ArgumentParser(
        prog="awqforge",
        description="AWQ weight quantization of Hugging Face causal LMs." + extra,
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from awqforge import spec  # pure pydantic: defaults and choices are JobSpec's own

    D = spec.field_default
    q = argparse.ArgumentParser(add_help=False)  # the job's settings: quantize and plan
    q.add_argument("model", help="local checkpoint folder or Hugging Face model id")
    q.add_argument("--revision", help="hub revision (branch, tag or commit); default: main")
    q.add_argument("--bits", type=int, default=D("quant.bits"), help="weight bit width: 2, 3, 4 or 8")
    q.add_argument(
        "--group-size",
        type=int,
        help="input channels per group: 32, 64, 128 or -1 (one group per output channel); default: 128, or "
        "the largest of 64, 32, -1 that divides the input width of every quantized layer (said on stderr)",
    )
    q.add_argument("--symmetric", action="store_true", help="symmetric quantization (no zero point)")
    q.add_argument(
        "--method",
        choices=spec.choices(spec.Method),
        default=D("method"),
        help="AWQ search, or round to nearest",
    )
    q.add_argument(
        "--calib",
        default=DEFAULT_CALIBRATION,
        metavar="SOURCE",
        help="calibration text: bundled (the English text shipped with awqforge, works offline) | pileval "
        "(the AWQ paper's Pile validation set, from the hub) | self | "
        "hf:<dataset>[@<revision>][:<split>[:<column>[:<config>]]] | file:<path> "
        "(rows with `messages` are rendered with the model's chat template)",
    )
    q.add_argument(
        "--n-samples",
        type=int,
        default=D("calibration.n_samples"),
        help="calibration sequences (a shorter text is used as far as it goes, with a warning; the bundled "
        "text fills 33 of 512 tokens with SmolLM2's tokenizer)",
    )
    q.add_argument(
        "--seq-len", type=int, default=D("calibration.seq_len"), help="tokens per calibration sequence"
    )
    q.add_argument(
        "--packing",
        choices=spec.choices(spec.Packing),
        default=D("calibration.packing"),
        help="concat: texts concatenated, cut into seq-len blocks (AutoAWQ); per_sample: each text its own "
        "sequence, truncated at seq-len (llm-compressor)",
    )
    q.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=spec.choices(spec.ArtifactFormat),
        help="artifact format (repeatable); default: awq for 4-bit, compressed-tensors for 2, 3 and 8-bit "
        "(awq is 4-bit only)",
    )
    q.add_argument("--device", choices=spec.DEVICES, default=D("device"), help="auto: CUDA when there is one")
    q.add_argument(
        "--modules-to-not-convert",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave matching modules in full precision (repeatable): a glob over full module names or their "
        "tails, e.g. mlp.down_proj, model.layers.0.*, model.layers.*.mlp.down_proj; default: none (lm_head and MoE "
        "routers always stay in full precision)",
    )
    q.add_argument(
        "--scale-search",
        choices=spec.choices(spec.ScaleSearch),
        default=D("scale_search"),
        help="how the scale grid is formed: activation mean only, duo (AutoAWQ) or both (llm-compressor)",
    )
    q.add_argument("--n-grid", type=int, default=D("n_grid"), help="points of the AWQ scale grid")
    q.add_argument("--no-clip-search", action="store_true", help="skip AWQ's weight clipping search")
    q.add_argument(
        "--refine-steps",
        type=int,
        default=D("refine_steps"),
        help="least-squares refits of each group's scale/zero after the clip search (0: AWQ as published)",
    )
    q.add_argument(
        "--search-screen",
        type=int,
        default=D("search_screen"),
        metavar="K",
        help="attention/MLP scale search: score every grid point exactly on the linears' own outputs (Gram), "
        "run the module only on the best K (K=4 raised SmolLM2's W4 perplexity by 0.24, bench/README.md); "
        "0: every grid point on the module, AWQ as published",
    )
    q.add_argument(
        "--rounding",
        choices=spec.choices(spec.Rounding),
        default=D("rounding"),
        help="round codes to nearest (AWQ) or with GPTQ error feedback after the AWQ search",
    )
    q.add_argument(
        "--gqa-fold",
        action="store_true",
        help="under grouped-query attention, fold the v -> o scale per KV channel (default: skip it)",
    )
    q.add_argument(
        "--mappings",
        metavar="JSON",
        help="AWQ mappings for a model the engine does not know, as a JSON list (or @file.json) of "
        '{"prev": ..., "linears": [...], "inspect": ...}; names relative to a decoder block; default: the engine\'s '
        "registry, or its structural fallback",
    )
    q.add_argument("--seed", type=int, default=D("seed"), help="random seed (calibration sampling, torch)")
    q.add_argument("--no-eval", action="store_true", help="skip the FP and quantized perplexity")
    q.add_argument(
        "--eval-text",
        help="evaluation text: a file, file:<path> or hf:<dataset>[:<split>[:<column>]] "
        "(default: the bundled English text)",
    )
    q.add_argument("--eval-seq-len", type=int, default=D("eval.seq_len"), help="tokens per evaluation window")
    q.add_argument(
        "--eval-max-seqs",
        type=int,
        help=f"score at most this many windows, FP and quantized; default: {D('eval.max_seqs')}",
    )
    q.add_argument(
        "--eval-all", action="store_true", help="score the whole evaluation text (no window bound)"
    )
    q.add_argument(
        "--eval-task",
        dest="eval_tasks",
        action="append",
        default=[],
        metavar="NAME_OR_PATH",
        help="an lm-evaluation-harness task run on the FP and the quantized model (repeatable): an lm-eval "
        "name, awqforge_mc / awqforge_cloze (bundled, no download), or a folder or YAML file of task definitions; "
        "default: none",
    )
    q.add_argument(
        "--eval-limit", type=int, help="at most this many examples per --eval-task; default: every example"
    )
    q.add_argument(
        "--eval-min-recovery",
        type=float,
        metavar="R",
        help="quality gate: every --eval-task's recovery (quantized / FP) at least R (exit 1 below it); default: no gate",
    )
    q.add_argument(
        "--eval-min-avg-recovery",
        type=float,
        metavar="R",
        help="quality gate: the mean recovery over tasks; default: no gate",
    )
    q.add_argument(
        "--eval-max-ppl-increase",
        type=float,
        metavar="F",
        help="quality gate: quantized perplexity at most FP x (1 + F); default: no gate",
    )
    q.add_argument(
        "--eval-prompt",
        dest="eval_prompts",
        action="append",
        metavar="TEXT",
        help="a prompt for the side-by-side greedy generations (repeatable); default: a built-in handful",
    )
    q.add_argument(
        "--eval-max-new-tokens",
        type=int,
        default=D("eval.max_new_tokens"),
        help="tokens per side-by-side generation",
    )
    job_args = q
    q = sub.add_parser(
        "quantize",
        parents=[job_args],
        help="quantize a model into one or more artifact formats",
        formatter_class=_HelpFormatter,
    )
    q.add_argument(
        "--out",
        type=Path,
        help="output folder; each format goes to OUT/<format>/; default: "
        "./<model name>-<method>-w<bits>-g<group size>",
    )
    q.add_argument("--overwrite", action="store_true", help="replace existing artifacts in OUT")
    q.add_argument(
        "--shard-size", help="max safetensors shard size, e.g. 500MB, 5GB (default: one block, 256MB..2GB)"
    )

    pl = sub.add_parser(
        "plan",
        parents=[job_args],
        help="peak memory and time estimate of a job, from the model's config.json (no weights read)",
        formatter_class=_HelpFormatter,
    )
    pl.add_argument("--json", action="store_true", help="print the plans as JSON")
    pl.add_argument(
        "--measure",
        action="store_true",
        help="time one block of this model's shape here (random weights) and base the time estimate on it",
    )

    e = sub.add_parser(
        "eval",
        help="perplexity of a quantized artifact or an FP checkpoint (prints JSON; a progress bar on stderr)",
        formatter_class=_HelpFormatter,
    )
    e.add_argument("model", help="artifact folder, checkpoint folder or hub id")
    e.add_argument("--text", help="text file; default: the bundled English text")
    e.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    e.add_argument("--max-seqs", type=int, help="score at most this many windows; default: the whole text")
    e.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when there is one"
    )
    e.add_argument("--revision", help="hub revision (branch, tag or commit); default: main")

    s = sub.add_parser(
        "smollm",
        help="convert the packaged SmolLM2-135M-Instruct GGUF once; print its folder",
        formatter_class=_HelpFormatter,
    )
    s.add_argument(
        "--cache-dir",
        type=Path,
        help="where to keep it; default: $AWQFORGE_HOME/models/SmolLM2-135M-Instruct",
    )
    _add_kernel_commands(sub)

    for name in sorted(plugins):
        sub.add_parser(
            name, help=SERVICE_COMMANDS.get(name, "a service command (see its --help)"), add_help=False
        )
    return parser


def skip_triton_without_cuda() -> bool:
    """On a machine with no GPU, make `import triton` fail in this process; True when it did.

    transformers imports torch._dynamo, which imports triton (when installed, e.g. by the [gpu] or [dev]
    extra) only to probe for it. Nothing here runs Triton without a GPU (awqforge's Triton kernel is CUDA-only;
    the CPU kernel is C++), and triton 3.x prints dozens of `nanobind: leaked ...` lines when the process exits.
    TRITON_INTERPRET=1 (Triton's CPU interpreter, the kernel tests) keeps it. Without torch imported yet, the
    GPU is looked for as a device file (NVIDIA or AMD), so that a process that must not import torch (the API)
    can call this too."""
    if "triton" in sys.modules or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            return False
    elif any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists():
        return False
    sys.modules["triton"] = None  # the import system's "not available": `import triton` raises ImportError
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = _plugins()
    if argv and argv[0] in plugins:
        return int(plugins[argv[0]].load()(argv[1:]) or 0)
    parser = build_parser(plugins)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from awqforge.errors import describe, engine_errors

    if args.command in ("quantize", "eval", "plan", "smollm"):  # doctor reports on triton itself
        skip_triton_without_cuda()
    try:
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "smollm":
            from awqforge.smollm import ensure_smollm2_checkpoint

            print(ensure_smollm2_checkpoint(args.cache_dir))
            return 0
        if args.command in ("doctor", "kernels"):
            return _kernel_command(args)
    except _UsageError as exc:
        parser.exit(2, f"awqforge {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        print("interrupted; partial output removed", file=sys.stderr)
        return 130
    except engine_errors() as exc:
        print(f"awqforge {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # never a traceback for the user; AWQFORGE_DEBUG=1 shows it
        if os.environ.get("AWQFORGE_DEBUG"):
            raise
        print(
            f"awqforge {args.command}: error: {describe(exc)} (set AWQFORGE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 2


def _model_ref(model: str) -> str:
    """Existing folders become absolute paths (the spec tells paths from hub ids by their form)."""
    p = Path(model).expanduser()
    return str(p.absolute()) if p.exists() else model


def _mappings_arg(value: str | None):
    """--mappings: inline JSON or @path to a JSON file; bad JSON is a usage error, not a traceback."""
    import json

    if not value:
        return None
    try:
        text = Path(value[1:]).expanduser().read_text() if value.startswith("@") else value
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise _UsageError(f"--mappings: {exc}") from exc


def default_formats(bits: int) -> list[str]:
    """The artifact format when none is asked for: awq (AutoAWQ/vLLM gemm) holds 4-bit only; other widths go
    to compressed-tensors (pack-quantized), which holds 2, 3, 4 and 8-bit codes."""
    return ["awq"] if bits == 4 else ["compressed-tensors"]


def _gate_arg(args) -> dict | None:
    gate = {
        "min_recovery": args.eval_min_recovery,
        "min_avg_recovery": args.eval_min_avg_recovery,
        "max_perplexity_increase": args.eval_max_ppl_increase,
    }
    return {k: v for k, v in gate.items() if v is not None} or None


def _task_ref(task: str) -> str:
    """A task folder or YAML file given relative to here becomes an absolute path; names stay as they are."""
    path = Path(task).expanduser()
    return str(path.absolute()) if path.exists() else task


def _spec_from_args(args, group_size: int | None = None):
    from pydantic import ValidationError

    from awqforge.spec import JobSpec

    eval_text = args.eval_text
    if eval_text and not eval_text.startswith(("file:", "hf:")):
        eval_text = f"file:{Path(eval_text).expanduser().absolute()}"
    try:
        return JobSpec(
            model=_model_ref(args.model),
            revision=args.revision,
            method=args.method,
            quant={
                "bits": args.bits,
                "group_size": group_size or args.group_size or DEFAULT_GROUP_SIZE,
                "zero_point": not args.symmetric,
                "modules_to_not_convert": args.modules_to_not_convert,
            },
            calibration={
                "source": args.calib,
                "n_samples": args.n_samples,
                "seq_len": args.seq_len,
                "packing": args.packing,
            },
            formats=args.formats or default_formats(args.bits),
            eval={
                "enabled": not args.no_eval,
                "text": eval_text,
                "seq_len": args.eval_seq_len,
                **({"max_seqs": None} if args.eval_all else {}),
                **({"max_seqs": args.eval_max_seqs} if args.eval_max_seqs is not None else {}),
                "tasks": [{"name": _task_ref(t), "limit": args.eval_limit} for t in args.eval_tasks],
                "gate": _gate_arg(args),
                "prompts": args.eval_prompts,
                "max_new_tokens": args.eval_max_new_tokens,
            },
            device=args.device,
            scale_search=args.scale_search,
            n_grid=args.n_grid,
            clip_search=not args.no_clip_search,
            refine_steps=args.refine_steps,
            search_screen=args.search_screen,
            rounding=args.rounding,
            gqa_fold=args.gqa_fold,
            seed=args.seed,
            mappings=_mappings_arg(args.mappings),
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise _UsageError(problems) from None


def _model_config(spec):
    """The transformers config of the spec's model: a local folder's, or config.json alone from the hub."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        spec.model, revision=spec.revision, token=spec.source.token, trust_remote_code=False
    )


def fitting_group_size(spec) -> tuple[int, str | None]:
    """The spec's group size when it divides the input width of every quantized layer, else the largest
    of the supported sizes below it that does (-1, one group per output channel, always does), and why.
    When the model's config cannot be read here, the spec's own (the engine then says what is wrong)."""
    from awqforge.arch import _linear_widths, get_adapter
    from awqforge.limits import SUPPORTED_GROUP_SIZES
    from awqforge.quant import effective_group_size

    asked = spec.quant.group_size
    try:
        config = _model_config(spec)
        adapter = get_adapter(config, mappings=spec.mappings)
        widths = set(_linear_widths(config, adapter, tuple(spec.quant.modules_to_not_convert)).values())
    except Exception:
        return asked, None

    def fits(g: int) -> bool:
        return all(w % effective_group_size(w, g) == 0 for w in widths)

    if fits(asked):
        return asked, None
    bad = sorted(w for w in widths if w % effective_group_size(w, asked))
    g = next(g for g in sorted(SUPPORTED_GROUP_SIZES, key=lambda g: g if g > 0 else 0, reverse=True)
             if g < asked and fits(g) or g == -1)  # fmt: skip
    return g, f"{asked} does not divide the input width {', '.join(map(str, bad))}"


def _fit_group_size(args, spec):
    """Without --group-size: the default, or the largest size that fits the model, said on stderr."""
    if args.group_size is not None:
        return spec
    g, why = fitting_group_size(spec)
    if g == spec.quant.group_size:
        return spec
    print(
        f"awqforge {args.command}: group size {g}, the largest that divides every quantized layer's input "
        f"width (no --group-size given; the default {why})",
        file=sys.stderr,
    )
    return _spec_from_args(args, group_size=g)


def default_out_dir(spec) -> Path:
    """./<model name>-<method>-w<bits>-g<group size> (g-1: one group per output channel)."""
    name = Path(spec.model.rstrip("/")).name or "model"
    return Path(f"{name}-{spec.method.value}-w{spec.quant.bits}-g{spec.quant.group_size}").absolute()


def _check_module_patterns(spec) -> None:
    """--modules-to-not-convert patterns that match no tensor of a local checkpoint are a usage error before
    the model is loaded (from the safetensors headers); for a hub id the engine checks them after download."""
    from awqforge.resolve import is_local_reference
    from awqforge.weight_names import local_shapes, unmatched, unmatched_message

    patterns = spec.quant.modules_to_not_convert
    if patterns and is_local_reference(spec.model):
        try:
            model_type = json.loads((Path(spec.model) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return  # the engine says what is wrong with the folder
        missing = unmatched(patterns, local_shapes(Path(spec.model)), model_type)
        if missing:
            raise _UsageError(f"--modules-to-not-convert: {unmatched_message(missing)}")


def _fmt_eta(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class _ProgressPrinter:
    """Stage messages on stderr, and one tqdm bar per stage: blocks while quantizing, windows while evaluating
    (the FP and the quantized pass each count every window once). The time left is the pipeline's estimate
    (`eta_s`: each pass timed at its own cost per window), not tqdm's average over the bar."""

    BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.4g}/{total_fmt} {unit}s [{elapsed}{postfix}]"

    def __init__(self) -> None:
        self.bar = None
        self.stage = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if event.stage == "quantize":
            done, total, unit = event.block, event.n_blocks, "block"
        else:
            done, total, unit = getattr(event, "step", None), getattr(event, "n_steps", None), "window"
        if self.bar is not None and event.stage != self.stage:
            self.close()
        if total and done is not None:
            if self.bar is None:
                self.bar = tqdm(
                    total=total, desc=event.stage, unit=unit, file=sys.stderr, bar_format=self.BAR
                )
                self.stage = event.stage
            self.bar.n = done
            eta = getattr(event, "eta_s", None)
            self.bar.set_postfix_str("" if eta is None else f"<{_fmt_eta(eta)} left", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write(self, message: str) -> None:
        """A log line on stderr, above the bar when one is shown (never glued to its end)."""
        if self.bar is None:
            print(message, file=sys.stderr)
        else:
            self.bar.write(message, file=sys.stderr)


def _quantize(args) -> int:
    from awqforge.pipeline import run_quantization
    from awqforge.report import summary_lines

    spec = _spec_from_args(args)
    _check_module_patterns(spec)
    spec = _fit_group_size(args, spec)
    out = args.out
    if out is None:
        out = default_out_dir(spec)
        print(f"awqforge quantize: output folder {out} (--out sets it)", file=sys.stderr)
    if spec.eval.enabled:
        _ensure_cpu_kernel(spec.device)  # the evaluation runs the quantized model
    printer = _ProgressPrinter()
    try:
        options = {"shard_size": args.shard_size} if args.shard_size else {}
        result = run_quantization(
            spec,
            out,
            progress=printer,
            log=printer.write,
            overwrite=args.overwrite,
            **options,
        )
    finally:
        printer.close()
    for fmt, path in result.artifacts.items():
        print(f"artifact ({fmt}): {path}")
    print(f"report: {result.report_path}")
    for line in summary_lines(result.metrics, result.layers):
        print(f"  {line}")
    evaluation = json.loads(result.report_path.read_text()).get("evaluation") or {}
    if evaluation.get("tasks"):
        from awqforge.tasks_eval import format_table

        print(format_table(evaluation["tasks"]))
    if result.quality_failure:
        print(f"error: {result.quality_failure} (artifacts kept)", file=sys.stderr)
        return 1
    return 0


def _plan(args) -> int:
    from awqforge.plan import JobSettings, describe, plan, read_config
    from awqforge.resolve import is_local_reference

    spec = _fit_group_size(args, _spec_from_args(args))
    if is_local_reference(spec.model):
        config = read_config(spec.model)
    else:
        from huggingface_hub import hf_hub_download

        config = read_config(Path(hf_hub_download(spec.model, "config.json", revision=spec.revision)).parent)
    devices = ["cpu", "cuda"] if spec.device == "auto" else [spec.device]
    settings = JobSettings.from_spec(spec)
    if is_local_reference(spec.model):
        # the plan counts the calibration rows and evaluation windows the job will use
        from transformers import AutoTokenizer

        from awqforge.timing import settings_as_run

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(spec.model), trust_remote_code=False)
        except (OSError, ValueError) as exc:  # a folder without a tokenizer: count what was asked for
            _announce(
                f"no tokenizer in {spec.model} ({type(exc).__name__}): the plan counts the samples and "
                "evaluation windows asked for"
            )
        else:
            settings, notes = settings_as_run(spec, tokenizer)
            for note in notes:
                _announce(note)
    rates, forward_rates = {}, {}
    if getattr(args, "measure", False):
        from awqforge.timing import measure_forward_rate, measure_rate

        device = "cuda" if spec.device == "cuda" else "cpu"
        _announce(f"timing one block of this model on {device} for the time estimate ...")
        rates[device], secs = measure_rate(config, settings, device)
        forward_rates[device], fwd_secs = measure_forward_rate(config, settings, device)
        _announce(
            f"one block took {secs:.1f} s ({rates[device] / 1e9:.0f} GFLOP/s by the plan's count); the whole "
            f"model's forward on {settings.eval_seq_len} tokens about {fwd_secs:.2f} s "
            f"({forward_rates[device] / 1e9:.0f} GFLOP/s)"
        )
        devices = [device]
    plans = {
        d: plan(config, settings, device=d, flops_rate=rates.get(d), forward_rate=forward_rates.get(d))
        for d in devices
    }
    if args.json:
        print(json.dumps({d: p.to_dict() for d, p in plans.items()}, indent=1))
    else:
        print("\n\n".join(describe(p) for p in plans.values()))
    return 0


def _eval(args) -> int:
    from tqdm import tqdm

    from awqforge.calibration import read_text
    from awqforge.evaluate import evaluate_path

    _ensure_cpu_kernel(args.device)
    text = read_text(args.text)
    bar = None

    def progress(done: int, total: int, unit: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="eval", unit=unit, file=sys.stderr)
        bar.update(done - bar.n)

    try:
        result = evaluate_path(
            _model_ref(args.model),
            text,
            seq_len=args.seq_len,
            max_seqs=args.max_seqs,
            device=args.device,
            revision=args.revision,
            progress=progress,
            log=lambda msg: (bar.write if bar is not None else print)(
                f"awqforge eval: {msg}", file=sys.stderr
            ),
        )
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------- doctor, kernels build


def _add_kernel_commands(sub) -> None:
    sub.add_parser(
        "doctor", help="print which kernel path each device (CPU ISA, CUDA devices) will use and why"
    )
    k = sub.add_parser("kernels", help="build the C++ CPU kernel into the kernel cache (once, at install)")
    k_sub = k.add_subparsers(dest="kernels_command", metavar="ACTION", required=True)
    b = k_sub.add_parser("build", help="compile the CPU kernel for this torch (no-op when it is cached)")
    b.add_argument(
        "--optional",
        action="store_true",
        help="exit 0 when it cannot be built (install scripts): jobs then use the reference path",
    )
    b.add_argument("--verbose", action="store_true", help="show the compiler's output")
    k_sub.add_parser("path", help="print the kernel cache folder for this torch and kernel source")


def _announce(message: str) -> None:
    print(f"awqforge: {message}", file=sys.stderr, flush=True)


def _ensure_cpu_kernel(device: str) -> None:
    """quantize (with its evaluation) and eval on the CPU: the CPU kernel loaded, or built into the cache now
    with one progress line, before any work; without a compiler, one warning and the reference path."""
    if device == "cuda":
        return
    import torch

    if device == "auto" and torch.cuda.is_available():
        return
    from awqforge.kernels import cpu

    ok, why = cpu.ensure_built(announce=_announce)
    if not ok:
        _announce(f"warning: {why}; QuantLinear runs on the CPU through the pure-torch reference (slow)")


def _kernel_command(args) -> int:
    from awqforge.kernels import cpu
    from awqforge.kernels.doctor import report_lines

    if args.command == "doctor":
        print("\n".join(report_lines()))
        return 0
    if args.kernels_command == "path":
        print(cpu.build_dir())
        return 0
    ok, what = cpu.ensure_built(announce=_announce, verbose=args.verbose)
    if not ok:
        level = "warning" if args.optional else "error"
        print(
            f"awqforge kernels build: {level}: {what}\n"
            "without it, QuantLinear runs on the CPU through the pure-torch reference (slow)",
            file=sys.stderr,
        )
        return 0 if args.optional else 1
    binary = what
    print(f"CPU kernel ready: {binary}")
    return 0
