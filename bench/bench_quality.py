"""Quality and speed: FP, RTN, our AWQ and llm-compressor's AWQModifier on SmolLM2-135M-Instruct, same data.

llm-compressor gives two rows: AWQModifier + QuantizationModifier (round to nearest, the peer of our default)
and AWQModifier + GPTQModifier (the stronger peer of our rounding=gptq; --llmc-recipes picks).

    python bench/bench_quality.py                      # W4 g64 and W3 g64, llm-compressor from /work/venvs/llmc
    python bench/bench_quality.py --bits 4 --skip-llmc

Calibration: 32 blocks x 512 tokens of the bundled calibration text (awqforge/data/calibration_en.txt), made by
awqforge.calibration.load_calibration, the function run_quantization uses; llm-compressor gets the very same
token tensor. Evaluation: 20 non-overlapping windows of 1024 tokens of the bundled evaluation text (topped up
with two more licences when it is short of 20 windows), scored for every model by bench/common.perplexity.
Ours runs end to end through run_quantization and is scored after load_quantized (our QuantLinear layers);
llm-compressor's model is scored with its quantize-dequantize weights baked in. Wall times: our whole
run_quantization (resolve, calibrate, quantize, package) and its quantize stage, against llm-compressor's
`oneshot` call (its model load and evaluation excluded), in the same run with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LLMC_PYTHON = "/work/venvs/llmc/bin/python"
# The bundled evaluation text is ~19.7k SmolLM2 tokens, short of 20 x 1024: these licences, in none of the
# calibration text, top it up.
EVAL_TOP_UP = ("BSD", "GFDL-1.2")


def eval_text(windows: int, seq_len: int, tokenizer) -> tuple[str, list[str]]:
    """The bundled evaluation text, topped up with EVAL_TOP_UP licences until it fills `windows` windows."""
    from awqforge.calibration import BUNDLED_EVAL_TEXT

    parts, names = [BUNDLED_EVAL_TEXT.read_text().strip()], [f"awqforge/data/{BUNDLED_EVAL_TEXT.name}"]
    for extra in EVAL_TOP_UP:
        if len(tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"]) >= windows * seq_len:
            break
        parts.append(common.read_texts([extra]))
        names.append(str(common.LICENSES / extra))
    return "\n\n".join(parts), names


def run_ours(
    ckpt: Path,
    *,
    method: str,
    bits: int,
    group_size: int,
    calib_source: str,
    n_samples: int,
    seq_len: int,
    out_dir: Path,
    windows: torch.Tensor,
    n_prefix: int,
    rounding: str = "nearest",
    search_screen: int | None = None,
    gqa_fold: bool = False,
) -> dict:
    """run_quantization end to end, then perplexity of the artifact loaded onto QuantLinear layers."""
    from awqforge.loading import load_quantized
    from awqforge.pipeline import run_quantization
    from awqforge.spec import JobSpec

    fmt = "awq" if bits == 4 else "compressed-tensors"
    spec = JobSpec(
        model=str(ckpt),
        method=method,
        quant={"bits": bits, "group_size": group_size, "zero_point": True},
        calibration={"source": calib_source, "n_samples": n_samples, "seq_len": seq_len},
        formats=[fmt],
        eval={"enabled": False},
        device="cpu",
        rounding=rounding,
        gqa_fold=gqa_fold,
        **({} if search_screen is None else {"search_screen": search_screen}),
    )
    cpu0 = time.process_time()
    with common.Timer() as t:
        result = run_quantization(
            spec,
            out_dir
            / (
                f"{method}-w{bits}g{group_size}"
                + ("" if rounding == "nearest" else f"-{rounding}")
                + ("" if search_screen is None else f"-screen{search_screen}")
                + ("-gqa" if gqa_fold else "")
            ),
            overwrite=True,
            progress=_progress_printer(f"W{bits} {method}"),
        )
    cpu_s = time.process_time() - cpu0
    artifact = Path(result.artifacts[fmt])
    model = load_quantized(artifact, device="cpu", dtype=torch.float32)
    with common.Timer() as te:
        ppl = common.perplexity(model, windows, n_prefix)
    del model
    stages = result.metrics.get("wall_time_s", {})
    return {
        "impl": f"awqforge {method}",
        "bits": bits,
        "group_size": group_size,
        "search_screen": spec.search_screen,
        "gqa_fold": spec.gqa_fold,
        **ppl,
        "total_s": t.s,
        "cpu_s": cpu_s,
        "quantize_s": stages.get("quantize"),
        "stages_s": stages,
        "eval_s": te.s,
        "artifact": str(artifact),
    }


def _progress_printer(tag: str):
    """A run_quantization progress callback that prints stage changes and each block to stderr."""
    last = {"stage": None}

    def show(ev) -> None:
        if ev.stage != last["stage"] or ev.block is not None:
            last["stage"] = ev.stage
            eta = f", eta {ev.eta_s:.0f} s" if ev.eta_s is not None else ""
            print(f"  [{tag}] {ev.stage}: {ev.message}{eta}", file=sys.stderr, flush=True)

    return show


def run_llmc(
    python: str,
    ckpt: Path,
    data_path: Path,
    *,
    bits: int,
    group_size: int,
    threads: int,
    duo_scaling: str,
    log_path: Path,
    gptq: bool = False,
) -> dict:
    """bench/llmc_awq.py in llm-compressor's virtualenv; its chatter goes to log_path. gptq: AWQModifier then
    GPTQModifier, llm-compressor's stronger recipe (the peer of our rounding=gptq)."""
    cmd = [
        python,
        str(REPO / "bench" / "llmc_awq.py"),
        "--model",
        str(ckpt),
        "--data",
        str(data_path),
        "--bits",
        str(bits),
        "--group-size",
        str(group_size),
        "--threads",
        str(threads),
        "--duo-scaling",
        duo_scaling,
    ] + (["--gptq"] if gptq else [])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, check=False)
        log.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"llm-compressor run failed (exit {proc.returncode}); see {log_path}")
    return common.parse_emitted(proc.stdout)


# our rows: rounding -> (results key, label)
DEFAULT_SCREEN = 8  # JobSpec's search_screen default (checked in main)
OURS = {"nearest": ("awq", "AWQ (awqforge)"), "gptq": ("awq+gptq", "AWQ + GPTQ rounding (awqforge)")}


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def print_report(fp: dict, rows: list[dict], meta: dict) -> list[str]:
    """The side-by-side table, then one line per target; returns the target lines."""
    print(
        f"\n{Path(meta['model']).name}, calibration {meta['calib_shape'][0]} x {meta['calib_shape'][1]} tokens, "
        f"evaluation {fp['n_windows']} x {meta['eval_seq_len']} tokens, {meta['threads']} threads"
    )
    print(f"FP perplexity (float32): {fp['perplexity']:.3f}\n")
    head = f"{'bits':>4}  {'method':<48} {'ppl':>9} {'+ppl vs FP':>10} {'RTN gap closed':>15} {'wall s':>8} {'CPU s':>8} {'quantize s':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['bits']:>4}  {r['label']:<48} {r['perplexity']:>9.3f} {r['perplexity'] - fp['perplexity']:>10.3f} "
            f"{_fmt(r.get('gap_closed', float('nan')) * 100, '.1f') + '%':>15} {_fmt(r.get('wall_s'), '.1f'):>8} "
            f"{_fmt(r.get('cpu_s'), '.1f'):>8} "
            f"{_fmt(r.get('quantize_s'), '.1f'):>10}"
        )
    targets = []
    for bits in meta["bits"]:
        by = {r["key"]: r for r in rows if r["bits"] == bits}
        # each of our rows against its peer: nearest rounding vs AWQ + round to nearest, our GPTQ rounding vs
        # AWQModifier + GPTQModifier (when that row ran)
        peers = {"awq": by.get("llmc"), "awq+gptq": by.get("llmc+gptq") or by.get("llmc")}
        for key, label in OURS.values():
            targets += _targets(bits, label, by.get(key), peers[key])
    print()
    for line in targets:
        print(line)
    return targets


def _targets(bits: int, label: str, ours: dict | None, llmc: dict | None) -> list[str]:
    """PASS/FAIL lines of one of our rows: quality and time against llm-compressor, gap closed at W4."""
    targets = []
    if ours and llmc:
        ok = ours["perplexity"] <= llmc["perplexity"]
        targets.append(
            f"W{bits} {label}: {ours['perplexity']:.3f} vs llm-compressor {llmc['perplexity']:.3f} ppl "
            f"-> {'PASS' if ok else 'FAIL'} (ours <= llm-compressor)"
        )
        ratio = ours["wall_s"] / llmc["wall_s"]
        qratio = ours["quantize_s"] / llmc["wall_s"] if ours.get("quantize_s") else float("nan")
        cratio = ours["cpu_s"] / llmc["cpu_s"] if ours.get("cpu_s") and llmc.get("cpu_s") else float("nan")
        targets.append(
            f"W{bits} {label}: time ours/llm-compressor = {ratio:.2f} wall (whole run_quantization), "
            f"{qratio:.2f} (quantize stage), {cratio:.2f} CPU -> {'PASS' if ratio <= 0.5 else 'FAIL'} (<= 0.5)"
        )
    if ours and bits in (3, 4):
        g = ours.get("gap_closed", float("nan"))
        targets.append(
            f"W{bits} {label}: closes {g * 100:.1f}% of RTN's gap to FP -> {'PASS' if g >= 0.72 else 'MISS'} "
            "(aim 72%)"
        )
    return targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF checkpoint folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument(
        "--calib-text", help="calibration text file (default: the bundled awqforge/data/calibration_en.txt)"
    )
    ap.add_argument("--llmc-python", default=DEFAULT_LLMC_PYTHON)
    ap.add_argument(
        "--llmc-duo-scaling",
        default="true",
        choices=["true", "false", "both"],
        help="llm-compressor's duo_scaling (its default is true, like ours)",
    )
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument(
        "--llmc-recipes",
        default="both",
        choices=["awq", "awq+gptq", "both"],
        help="llm-compressor rows: AWQModifier + round to nearest, AWQModifier + GPTQModifier, or both (default)",
    )
    ap.add_argument("--skip-rtn", action="store_true")
    ap.add_argument(
        "--search-screen",
        type=int,
        nargs="+",
        metavar="K",
        help="our AWQ rows with these search_screen values, one row each in this run (0: the full module "
        "search; default: the engine's default only)",
    )
    ap.add_argument(
        "--gqa-fold",
        default="off",
        choices=["on", "off", "both"],
        help="our AWQ rows with the v -> o scale folded per KV channel under grouped-query attention (the "
        "engine's default is off), without it (as AutoAWQ / llm-compressor; the default), or both rows",
    )
    ap.add_argument(
        "--skip-ours",
        action="store_true",
        help="only the peer's rows (an earlier run's rows of ours on the same data stay in its results.json)",
    )
    ap.add_argument(
        "--rounding",
        default="both",
        choices=["nearest", "gptq", "both"],
        help="our AWQ with codes rounded to nearest, with GPTQ error feedback, or both rows (default)",
    )
    ap.add_argument(
        "--fp-perplexity", type=float, help="reuse the FP perplexity of an earlier run on the same data"
    )
    ap.add_argument(
        "--crosscheck",
        action="store_true",
        help="also score FP with awqforge.evaluate.perplexity (must equal bench/common's number)",
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads for both sides (default: all cores)"
    )
    ap.add_argument("--work-dir", default="/tmp/awqforge-bench-quality")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from awqforge.calibration import BUNDLED_CALIBRATION_TEXT, load_calibration
    from awqforge.spec import CalibrationSpec, JobSpec

    assert JobSpec.model_fields["search_screen"].default == DEFAULT_SCREEN
    threads = common.set_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        ckpt = Path(args.model)
    else:
        from awqforge.smollm import ensure_smollm2_checkpoint

        ckpt = ensure_smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))

    calib_source = f"file:{args.calib_text or BUNDLED_CALIBRATION_TEXT}"
    calib = load_calibration(
        CalibrationSpec(source=calib_source, n_samples=args.n_samples, seq_len=args.seq_len), tokenizer
    )
    text, eval_sources = eval_text(args.eval_windows, args.eval_seq_len, tokenizer)
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # BOS for tokenizers that add one
    windows = common.eval_windows(
        tokenizer(text, add_special_tokens=False)["input_ids"], args.eval_seq_len, args.eval_windows, prefix
    )
    if windows.shape[0] < args.eval_windows:
        print(
            f"note: the evaluation text fills only {windows.shape[0]} windows of {args.eval_seq_len} tokens"
        )
    data_path = work / "data.pt"
    torch.save({"calib": calib, "eval": windows, "n_prefix": len(prefix)}, data_path)
    meta = {
        "model": str(ckpt),
        "calib_source": calib_source,
        "calib_shape": list(calib.shape),
        "eval_sources": eval_sources,
        "eval_seq_len": args.eval_seq_len,
        "threads": threads,
        "bits": args.bits,
        "group_size": args.group_size,
    }

    fp_model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    if args.fp_perplexity:  # from an earlier run on the same data: saves one evaluation
        fp = {
            "perplexity": args.fp_perplexity,
            "n_tokens": windows.numel() - windows.shape[0] * max(len(prefix), 1),
            "n_windows": int(windows.shape[0]),
            "reused": True,
        }
    else:
        fp = common.perplexity(fp_model, windows, len(prefix))
    if args.crosscheck:  # the engine's own evaluate.perplexity must agree with bench/common's copy of it
        from awqforge.evaluate import perplexity as engine_perplexity

        meta["fp_engine_perplexity"] = engine_perplexity(
            fp_model, tokenizer, text, args.eval_seq_len, args.eval_windows
        )
        print(f"FP, awqforge.evaluate.perplexity: {meta['fp_engine_perplexity']}", flush=True)
    del fp_model
    print(f"FP: {fp}", flush=True)

    rows: list[dict] = []
    out = work / "results.json"

    def save(targets: list[str] | None = None) -> None:  # after every row: a late failure loses nothing
        out.write_text(
            json.dumps({"meta": meta, "fp": fp, "rows": rows, "targets": targets}, indent=2, default=str)
        )

    for bits in args.bits:
        kw = dict(
            bits=bits,
            group_size=args.group_size,
            calib_source=calib_source,
            n_samples=args.n_samples,
            seq_len=args.seq_len,
            out_dir=work,
            windows=windows,
            n_prefix=len(prefix),
        )
        rtn = None
        if not args.skip_rtn:
            rtn = run_ours(ckpt, method="rtn", **kw)
            rows.append({**rtn, "key": "rtn", "label": "RTN (awqforge)", "wall_s": rtn["total_s"]})
            print(f"W{bits} RTN: {rtn['perplexity']:.3f}", flush=True)
        ours_roundings = ["nearest", "gptq"] if args.rounding == "both" else [args.rounding]
        screens = args.search_screen or [None]
        folds = {"on": [True], "off": [False], "both": [False, True]}[args.gqa_fold]
        for rounding in [] if args.skip_ours else ours_roundings:
            for screen, fold in [(sc, f) for f in folds for sc in screens]:
                ours = run_ours(
                    ckpt, method="awq", rounding=rounding, search_screen=screen, gqa_fold=fold, **kw
                )
                key, label = OURS[rounding]
                if screen is not None:
                    label = f"{label}, search_screen={screen}"
                    if screen != DEFAULT_SCREEN:  # the default's row keeps the key the targets read
                        key = f"{key}-screen{screen}"
                if fold:
                    label, key = f"{label}, GQA fold", f"{key}-gqa"
                rows.append({**ours, "key": key, "label": label, "wall_s": ours["total_s"]})
                print(f"W{bits} {label}: {ours['perplexity']:.4f} in {ours['total_s']:.1f} s", flush=True)
        recipes = {"awq": [False], "awq+gptq": [True], "both": [False, True]}[args.llmc_recipes]
        for gptq in [] if args.skip_llmc else recipes:
            llmc = run_llmc(
                args.llmc_python,
                ckpt,
                data_path,
                bits=bits,
                group_size=args.group_size,
                threads=threads,
                duo_scaling=args.llmc_duo_scaling,
                log_path=work / f"llmc-w{bits}{'-gptq' if gptq else ''}.log",
                gptq=gptq,
            )
            label = f"AWQ (llm-compressor {llmc['version']})"
            rows.append(
                {
                    **llmc,
                    "key": "llmc+gptq" if gptq else "llmc",
                    "label": f"AWQ + GPTQModifier (llm-compressor {llmc['version']})" if gptq else label,
                    "wall_s": llmc["oneshot_s"],
                    "cpu_s": llmc.get("oneshot_cpu_s"),
                }
            )
            print(
                f"W{bits} {rows[-1]['label']}: {llmc['perplexity']:.3f} in {llmc['oneshot_s']:.1f} s",
                flush=True,
            )
        if rtn:
            for r in rows:
                if r["bits"] == bits:
                    r["gap_closed"] = common.gap_closed(fp["perplexity"], rtn["perplexity"], r["perplexity"])
        save()

    save(print_report(fp, rows, meta))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
