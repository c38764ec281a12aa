"""Short calibration: 32 paragraphs (~10k tokens), our two packings against llm-compressor, W4 g64 on SmolLM2.

    python bench/bench_calibration.py                  # ours concat + per_sample, llm-compressor (per sample)
    python bench/bench_calibration.py --skip-llmc

The calibration file is a jsonl of 32 `text` lines made from the bundled calibration text
(awqforge/data/calibration_en.txt): consecutive paragraphs joined until each line holds at least
--min-line-tokens SmolLM2 tokens, as a user's short file of paragraphs would be. It is smaller than
n_samples x seq_len = 32 x 512, the case the engine used to refuse.

- ours, `packing=concat`: run_quantization on the file (AutoAWQ's way: as many 512-token blocks as the text fills).
- ours, `packing=per_sample`: each line its own sequence, truncated at 512 (llm-compressor's way).
- llm-compressor: AWQModifier + round to nearest on the same lines, each line one sample of at most 512 tokens
  (the token lists our per_sample packing makes), batches of one (bench/llmc_awq.py, its own virtualenv).

Every model is scored by bench/common.perplexity on the same evaluation windows as bench_quality.py (the bundled
evaluation text, disjoint from the calibration text). Prints a table and one PASS/FAIL line per packing
(ours <= llm-compressor in perplexity); results go to WORK/results.json after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_quality import DEFAULT_LLMC_PYTHON, eval_text, run_llmc  # noqa: E402


def paragraph_lines(tokenizer, n_lines: int, min_tokens: int) -> list[str]:
    """n_lines texts of consecutive bundled-calibration paragraphs, each at least min_tokens tokens."""
    from awqforge.calibration import BUNDLED_CALIBRATION_TEXT

    paragraphs = [p.strip() for p in BUNDLED_CALIBRATION_TEXT.read_text().split("\n\n") if p.strip()]
    lines, current = [], []
    for p in paragraphs:
        current.append(p)
        if len(tokenizer("\n\n".join(current), add_special_tokens=False)["input_ids"]) >= min_tokens:
            lines.append("\n\n".join(current))
            current = []
            if len(lines) == n_lines:
                return lines
    raise SystemExit(f"the bundled text fills only {len(lines)} lines of {min_tokens} tokens")


def run_ours(ckpt: Path, data: Path, packing: str, args, out_dir: Path, windows, n_prefix: int) -> dict:
    from awqforge.loading import load_quantized
    from awqforge.pipeline import run_quantization
    from awqforge.spec import JobSpec

    spec = JobSpec(
        model=str(ckpt),
        quant={"bits": 4, "group_size": args.group_size},
        calibration={
            "source": f"file:{data}",
            "n_samples": args.n_samples,
            "seq_len": args.seq_len,
            "packing": packing,
        },
        formats=["awq"],
        eval={"enabled": False},
        device="cpu",
    )
    cpu0 = time.process_time()
    with common.Timer() as t:
        result = run_quantization(
            spec,
            out_dir / f"awq-{packing}",
            overwrite=True,
            log=lambda m: print(f"  [{packing}] {m}", file=sys.stderr),
        )
    cpu_s = time.process_time() - cpu0
    report = json.loads(result.report_path.read_text())
    model = load_quantized(result.artifacts["awq"], device="cpu", dtype=torch.float32)
    ppl = common.perplexity(model, windows, n_prefix)
    return {
        "label": f"AWQForge AWQ, packing={packing}",
        **ppl,
        "wall_s": t.s,
        "cpu_s": cpu_s,
        "calibration": report["calibration"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF checkpoint folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--min-line-tokens", type=int, default=300, help="tokens per jsonl line, at least")
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument(
        "--packings", nargs="+", default=["concat", "per_sample"], choices=["concat", "per_sample"]
    )
    ap.add_argument("--llmc-python", default=DEFAULT_LLMC_PYTHON)
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--skip-ours", action="store_true", help="only llm-compressor's row, on the same file")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work-dir", default="/tmp/awqforge-bench-calibration")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = common.set_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        ckpt = Path(args.model)
    else:
        from awqforge.smollm import ensure_smollm2_checkpoint

        ckpt = ensure_smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))

    lines = paragraph_lines(tokenizer, args.n_samples, args.min_line_tokens)
    data = work / "paragraphs.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    # llm-compressor's way with a text dataset: each line tokenized (with the tokenizer's special tokens) and
    # truncated at seq_len; the same token lists our per_sample packing makes.
    rows = [tokenizer(line)["input_ids"][: args.seq_len] for line in lines]
    n_tokens = sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) for line in lines)

    text, eval_sources = eval_text(args.eval_windows, args.eval_seq_len, tokenizer)
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    windows = common.eval_windows(
        tokenizer(text, add_special_tokens=False)["input_ids"], args.eval_seq_len, args.eval_windows, prefix
    )
    data_pt = work / "data.pt"
    torch.save({"calib_rows": rows, "eval": windows, "n_prefix": len(prefix)}, data_pt)
    meta = {
        "model": str(ckpt),
        "calibration_file": str(data),
        "lines": len(lines),
        "tokens": n_tokens,
        "asked": f"{args.n_samples} x {args.seq_len}",
        "eval_sources": eval_sources,
        "eval_windows": list(windows.shape),
        "threads": threads,
    }
    print(f"calibration: {len(lines)} lines, {n_tokens} tokens; asked {meta['asked']}", flush=True)

    fp_model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    fp = common.perplexity(fp_model, windows, len(prefix))
    del fp_model
    print(f"FP: {fp['perplexity']:.3f}", flush=True)
    results: list[dict] = []
    out = work / "results.json"

    def save(targets=None) -> None:
        out.write_text(json.dumps({"meta": meta, "fp": fp, "rows": results, "targets": targets}, indent=2))

    for packing in [] if args.skip_ours else args.packings:
        row = run_ours(ckpt, data, packing, args, work, windows, len(prefix))
        results.append({"key": packing, **row})
        print(f"{row['label']}: {row['perplexity']:.3f} in {row['wall_s']:.1f} s", flush=True)
        save()
    if not args.skip_llmc:
        llmc = run_llmc(
            args.llmc_python,
            ckpt,
            data_pt,
            bits=4,
            group_size=args.group_size,
            threads=threads,
            duo_scaling="true",
            log_path=work / "llmc.log",
        )
        results.append(
            {
                "key": "llmc",
                "label": f"llm-compressor {llmc['version']} AWQ, per sample",
                **llmc,
                "wall_s": llmc["oneshot_s"],
                "cpu_s": llmc.get("oneshot_cpu_s"),
            }
        )
        print(f"llm-compressor: {llmc['perplexity']:.3f} in {llmc['oneshot_s']:.1f} s", flush=True)
        save()

    print(
        f"\n{ckpt.name}, W4 g{args.group_size}, {meta['lines']} lines / {n_tokens} tokens, FP {fp['perplexity']:.3f}"
    )
    print(f"{'method':<44} {'ppl':>8} {'samples x len':>14} {'tokens':>7} {'wall s':>8} {'CPU s':>8}")
    for r in results:
        cal = r.get("calibration") or {}
        shape = f"{cal.get('samples', r.get('calib_shape', ['?'])[0])} x {cal.get('seq_len', '<=512')}"
        tokens = cal.get("tokens", r.get("calib_tokens"))
        print(
            f"{r['label']:<44} {r['perplexity']:>8.3f} {shape:>14} {tokens!s:>7} "
            f"{r['wall_s']:>8.1f} {r.get('cpu_s') or float('nan'):>8.1f}"
        )
    targets = []
    peer = next((r for r in results if r["key"] == "llmc"), None)
    for r in results:
        if peer is not None and r["key"] != "llmc":
            ok = r["perplexity"] <= peer["perplexity"]
            targets.append(
                f"{r['label']}: {r['perplexity']:.3f} vs llm-compressor {peer['perplexity']:.3f} -> "
                f"{'PASS' if ok else 'FAIL'} (ours <= llm-compressor)"
            )
    for line in targets:
        print(line)
    save(targets)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
