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

from tiny_families import artifact_roundtrip, build_family_model, family_config, logits_errors  # noqa: E402

from awqforge.arch import UnsupportedArchitecture, get_adapter  # noqa: E402


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
            try:  # refused up front from its config alone, model or not (MusicGen)
                get_adapter(family_config(model_type))
            except UnsupportedArchitecture as refusal:
                row["status"], row["note"] = "refused", str(refusal)
            except Exception:  # noqa: BLE001 - the config itself cannot be read: not measured, as said
                pass
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
    ap.add_argument(
        "--update",
        type=Path,
        help="re-measure TYPES in this results file: their rows replaced, summary redone",
    )
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
    header = [
        f"transformers {transformers.__version__}, torch {torch.__version__}: {len(types)} causal-LM model types",
        "",
        "| model type | status | AWQ/RTN | load in transformers | kept FP | note |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    t0 = time.perf_counter()
    table = {}
    for t in types:
        row = measure(t, tokenizer, args.timeout)
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else ""
        note = row["note"].replace("|", "/")
        table[t] = f"| {t} | {row['status']} | {ratio} | {row['load']} | {row['kept']} | {note} |"
        print(table[t], flush=True)
    seconds = time.perf_counter() - t0
    notes = []
    if args.update:
        old = args.update.read_text().splitlines()
        header = old[:4]
        end = next((i for i in range(4, len(old)) if not old[i].startswith("| ")), len(old))
        table = {**{_cells(line)[0]: line for line in old[4:end]}, **table}
        notes = "\n".join(old[end + 3 :]).strip("\n").splitlines()  # what follows the summary: kept
        notes.append(
            f"Re-measured {time.strftime('%Y-%m-%d')} on {_cpu()}, transformers {transformers.__version__}: "
            f"{', '.join(types)} (`python bench/bench_families.py --update {args.update} TYPES`)."
        )
    summary = _summary(list(table.values()), seconds, len(types))
    print("\n".join(summary))
    out = args.out or args.update
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        body = [table[t] for t in sorted(table)]
        out.write_text("\n".join(header + body + summary + ([""] + notes if notes else [])).rstrip() + "\n")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _summary(rows: list[str], seconds: float, n_measured: int) -> list[str]:
    """Counts by status; quantized types, AWQ below RTN, artifacts that load, over the whole table."""
    counts: dict[str, int] = {}
    done = below = loads = 0
    for line in rows:
        _, status, ratio, load, *_ = _cells(line)
        key = status.split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
        if ratio:
            done += 1
            below += ratio != "nan" and float(ratio) < 1
            loads += load == "yes"
    return [
        "",
        f"{len(rows)} types ({n_measured} measured in {seconds:.0f} s): "
        + ", ".join(f"{k or '?'} {v}" for k, v in sorted(counts.items())),
        f"quantized: {done}; AWQ below RTN on {below}; artifact loads in transformers: {loads}",
    ]


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
