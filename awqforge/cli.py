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

PLUGIN_GROUP = "awqforge.commands"
BUILTIN = ("quantize", "eval", "smollm", "plan", "doctor", "kernels")


class _UsageError(Exception):
    pass


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name not in BUILTIN}


def build_parser(plugins: dict | None = None) -> argparse.ArgumentParser:
    plugins = _plugins() if plugins is None else plugins
    extra = (
        f" Service commands: {', '.join(sorted(plugins))} (see `awqforge NAME --help`)." if plugins else ""
    )
    parser = argparse.ArgumentParser(
        prog="awqforge", description="AWQ weight quantization of Hugging Face causal LMs." + extra
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = argparse.ArgumentParser(add_help=False)  # the job's settings: quantize and plan
    q.add_argument("model", help="local checkpoint folder or Hugging Face model id")
    q.add_argument("--revision", help="hub revision (branch, tag or commit)")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument(
        "--group-size", type=int, default=128, help="32, 64, 128 or -1 (one group per output channel)"
    )
    q.add_argument("--symmetric", action="store_true", help="symmetric quantization (no zero point)")
    q.add_argument("--method", choices=["awq", "rtn"], default="awq")
    q.add_argument(
        "--calib",
        default="pileval",
        metavar="SOURCE",
        help="pileval | self | hf:<dataset>[@<revision>][:<split>[:<column>[:<config>]]] | file:<path> "
        "(rows with `messages` are rendered with the model's chat template)",
    )
    q.add_argument("--n-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument(
        "--packing",
        choices=["concat", "per_sample"],
        default="concat",
        help="concat: texts concatenated, cut into seq-len blocks (AutoAWQ); per_sample: each text its own "
        "sequence, truncated at seq-len (llm-compressor)",
    )
    q.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=["awq", "compressed-tensors"],
        help="artifact format (repeatable; default awq)",
    )
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    q.add_argument(
        "--modules-to-not-convert",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave matching modules in full precision (repeatable): a glob over full module names or their "
        "tails, e.g. mlp.down_proj, model.layers.0.*, model.layers.*.mlp.down_proj",
    )
    q.add_argument("--scale-search", choices=["duo", "activation", "both"], default="duo")
    q.add_argument("--n-grid", type=int, default=20)
    q.add_argument("--no-clip-search", action="store_true")
    q.add_argument(
        "--refine-steps",
        type=int,
        default=2,
        help="least-squares refits of each group's scale/zero after the clip search (0: AWQ as published)",
    )
    q.add_argument(
        "--search-screen",
        type=int,
        default=8,
        metavar="K",
        help="attention/MLP scale search: score every grid point exactly on the linears' own outputs (Gram), "
        "run the module only on the best K (default 8; K=4 raised SmolLM2's W4 perplexity by 0.24, bench/README.md); "
        "0: every grid point on the module, AWQ as published",
    )
    q.add_argument(
        "--rounding",
        choices=["nearest", "gptq"],
        default="nearest",
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
        '{"prev": ..., "linears": [...], "inspect": ...}; names relative to a decoder block',
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-eval", action="store_true", help="skip the FP and quantized perplexity")
    q.add_argument(
        "--eval-text",
        help="evaluation text: a file, file:<path> or hf:<dataset>[:<split>[:<column>]] "
        "(default: the bundled English text)",
    )
    q.add_argument("--eval-seq-len", type=int, default=2048)
    q.add_argument(
        "--eval-max-seqs", type=int, help="score at most this many windows (default 16, FP and quantized)"
    )
    q.add_argument(
        "--eval-all", action="store_true", help="score the whole evaluation text (no window bound)"
    )
    job_args = q
    q = sub.add_parser(
        "quantize", parents=[job_args], help="quantize a model into one or more artifact formats"
    )
    q.add_argument("--out", required=True, type=Path, help="output folder; each format goes to OUT/<format>/")
    q.add_argument("--overwrite", action="store_true", help="replace existing artifacts in OUT")
    q.add_argument(
        "--shard-size", help="max safetensors shard size, e.g. 500MB, 5GB (default: one block, 256MB..2GB)"
    )

    pl = sub.add_parser(
        "plan",
        parents=[job_args],
        help="peak memory and time estimate of a job, from the model's config.json (no weights read)",
    )
    pl.add_argument("--json", action="store_true", help="print the plans as JSON")
    pl.add_argument(
        "--measure",
        action="store_true",
        help="time one block of this model's shape here (random weights) and base the time estimate on it",
    )

    e = sub.add_parser("eval", help="perplexity of a quantized artifact or an FP checkpoint (prints JSON)")
    e.add_argument("model", help="artifact folder, checkpoint folder or hub id")
    e.add_argument("--text", help="text file (default: the bundled English text)")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--max-seqs", type=int)
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--revision")

    s = sub.add_parser(
        "smollm", help="convert the packaged SmolLM2-135M-Instruct GGUF once; print its folder"
    )
    s.add_argument("--cache-dir", type=Path)
    _add_kernel_commands(sub)

    for name in sorted(plugins):
        sub.add_parser(name, help=f"service command ({plugins[name].value})", add_help=False)
    return parser


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


def _spec_from_args(args):
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
                "group_size": args.group_size,
                "zero_point": not args.symmetric,
                "modules_to_not_convert": args.modules_to_not_convert,
            },
            calibration={
                "source": args.calib,
                "n_samples": args.n_samples,
                "seq_len": args.seq_len,
                "packing": args.packing,
            },
            formats=args.formats or ["awq"],
            eval={
                "enabled": not args.no_eval,
                "text": eval_text,
                "seq_len": args.eval_seq_len,
                **({"max_seqs": None} if args.eval_all else {}),
                **({"max_seqs": args.eval_max_seqs} if args.eval_max_seqs is not None else {}),
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


class _ProgressPrinter:
    """Stage messages on stderr, and a tqdm bar with ETA over the quantized blocks and the evaluation steps."""

    def __init__(self) -> None:
        self.bar = None
        self.stage = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        done, total = (
            (event.block, event.n_blocks)
            if event.stage == "quantize"
            else (getattr(event, "step", None), getattr(event, "n_steps", None))
        )
        if self.bar is not None and event.stage != self.stage:
            self.close()
        if total:
            if self.bar is None:
                unit = "block" if event.stage == "quantize" else "step"
                self.bar = tqdm(total=total, desc=event.stage, unit=unit, file=sys.stderr)
                self.stage = event.stage
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _quantize(args) -> int:
    from awqforge.pipeline import run_quantization
    from awqforge.report import summary_lines

    spec = _spec_from_args(args)
    _check_module_patterns(spec)
    if spec.eval.enabled:
        _ensure_cpu_kernel(spec.device)  # the evaluation runs the quantized model
    printer = _ProgressPrinter()
    try:
        options = {"shard_size": args.shard_size} if args.shard_size else {}
        result = run_quantization(
            spec,
            args.out,
            progress=printer,
            log=lambda msg: print(msg, file=sys.stderr),
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
    return 0


def _plan(args) -> int:
    from awqforge.plan import JobSettings, describe, plan, read_config
    from awqforge.resolve import is_local_reference

    spec = _spec_from_args(args)
    if is_local_reference(spec.model):
        config = read_config(spec.model)
    else:
        from huggingface_hub import hf_hub_download

        config = read_config(Path(hf_hub_download(spec.model, "config.json", revision=spec.revision)).parent)
    devices = ["cpu", "cuda"] if spec.device == "auto" else [spec.device]
    settings = JobSettings.from_spec(spec)
    rates = {}
    if getattr(args, "measure", False):
        from awqforge.timing import measure_rate

        device = "cuda" if spec.device == "cuda" else "cpu"
        _announce(f"timing one block of this model on {device} for the time estimate ...")
        rates[device], secs = measure_rate(config, settings, device)
        _announce(f"one block took {secs:.1f} s ({rates[device] / 1e9:.0f} GFLOP/s by the plan's count)")
        devices = [device]
    plans = {d: plan(config, settings, device=d, flops_rate=rates.get(d)) for d in devices}
    if args.json:
        print(json.dumps({d: p.to_dict() for d, p in plans.items()}, indent=1))
    else:
        print("\n\n".join(describe(p) for p in plans.values()))
    return 0


def _eval(args) -> int:
    from awqforge.calibration import read_text
    from awqforge.evaluate import evaluate_path

    _ensure_cpu_kernel(args.device)
    text = read_text(args.text)
    result = evaluate_path(
        _model_ref(args.model),
        text,
        seq_len=args.seq_len,
        max_seqs=args.max_seqs,
        device=args.device,
        revision=args.revision,
    )
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
