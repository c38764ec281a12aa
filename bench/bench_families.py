"""Every model family transformers ships with a causal-LM head: what the engine does with it.

    python bench/bench_families.py                       # every type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    python bench/bench_families.py qwen3_next gpt_oss    # some types
    python bench/bench_families.py --out bench/results/families.md

Per model type, a tiny random model from `AutoConfig.for_model(type)` shrunk by tests/tiny_families.py
(hidden 64, 2 layers, 4 experts, norms with outlier channels):

- status: AWQ (every quantized linear's input is scaled), partly RTN (the linears no mapping reaches get plain
  rounding, listed per layer in the report), refused (the engine's one-sentence reason), or not measured (the
  tiny config could not be built: the reason);
- AWQ/RTN: logits MSE vs the FP model on held-out ids, W3 g16, quantized block by block in memory;
- kept FP: block parameters that are not quantized linears (fused experts that cannot be unfused, convs, ...);
- load: the pipeline's artifact (W4 g32 symmetric, compressed-tensors) loaded by transformers' default loading,
  its logits within 1% of AWQForge's own loader's ("yes"), or why not.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_families import artifact_roundtrip, build_family_model, logits_errors  # noqa: E402

from awqforge.arch import UnsupportedArchitecture  # noqa: E402


class _Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise _Timeout


def _short(exc: BaseException, n: int = 160) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= n else text[: n - 3] + "..."


def measure(model_type: str, tokenizer, timeout_s: int) -> dict:
    row = {"type": model_type, "status": "", "ratio": None, "kept": "", "load": "", "note": ""}
    signal.alarm(timeout_s)
    try:
        try:
            build_family_model(model_type)
        except Exception as exc:
            row["status"], row["note"] = "not measured", f"tiny config: {_short(exc)}"
            return row
        try:
            r = logits_errors(model_type)
        except UnsupportedArchitecture as exc:
            row["status"], row["note"] = "refused", str(exc)
            return row
        except Exception as exc:
            row["status"], row["note"] = "failed", _short(exc, 300)
            return row
        row["ratio"] = r["ratio"]
        plain = [s.split(": ")[0] for s in r["awq_skipped"] if "plain rounding" in s]
        row["status"] = "AWQ" if not plain else f"partly RTN ({len(plain)}/{r['n_linears']} linears)"
        row["note"] = ", ".join(sorted({p.split(".", 1)[1] for p in plain}))[:200]
        row["kept"] = ", ".join(r["kept_fp"])[:120]
        with tempfile.TemporaryDirectory() as d:
            try:
                ckpt = Path(d) / "ckpt"
                build_family_model(model_type).save_pretrained(ckpt)
                tokenizer.save_pretrained(ckpt)
                rt = artifact_roundtrip(model_type, ckpt, Path(d) / "out")
                row["load"] = (
                    "yes" if rt["max_diff"] < 1e-2 else f"no (logits differ by {rt['max_diff']:.2%})"
                )
            except Exception as exc:
                row["load"] = f"no ({_short(exc)})"
        return row
    except _Timeout:
        row["status"] = row["status"] or "failed"
        row["note"] = f"timed out after {timeout_s} s"
        return row
    finally:
        signal.alarm(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="*")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--timeout", type=int, default=120)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers
    from conftest import train_tiny_tokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    tokenizer = train_tiny_tokenizer()
    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    lines = [
        f"transformers {transformers.__version__}, torch {torch.__version__}: {len(types)} causal-LM model types",
        "",
        "| model type | status | AWQ/RTN | load in transformers | kept FP | note |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    t0 = time.perf_counter()
    rows = []
    for t in types:
        row = measure(t, tokenizer, args.timeout)
        rows.append(row)
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else ""
        note = row["note"].replace("|", "/")
        line = f"| {t} | {row['status']} | {ratio} | {row['load']} | {row['kept']} | {note} |"
        lines.append(line)
        print(line, flush=True)
    done = [r for r in rows if r["ratio"] is not None]
    counts = {}
    for r in rows:
        key = r["status"].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    summary = [
        "",
        f"{len(rows)} types in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{k or '?'} {v}" for k, v in sorted(counts.items())),
        f"quantized: {len(done)}; AWQ below RTN on {sum(r['ratio'] < 1 for r in done)}; "
        f"artifact loads in transformers: {sum(r['load'] == 'yes' for r in done)}",
    ]
    lines += summary
    print("\n".join(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
