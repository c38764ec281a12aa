"""Image-text-to-text families: the pipeline with AWQ and RTN, artifacts loaded by transformers.

    python bench/bench_multimodal.py                       # W3 g32 and W4 g32, every family
    python bench/bench_multimodal.py --families llava gemma3 --bits 4

Each model is a tiny random-init transformers model of that model_type (tests/tiny_multimodal.py: a 1-layer
vision tower, the projector, a 2-layer text model of hidden 128 with outlier norm gains), saved with the tests'
tokenizer and quantized by `run_quantization` (calibration: the bundled English text, 16 x 64 tokens, through
the language model) into compressed-tensors, symmetric. The artifact is loaded with transformers'
`AutoModelForImageTextToText` (compressed-tensors' loader); the error is the MSE of its text logits against
the source checkpoint's, loaded alike, on held-out token ids. AWQ/RTN < 1: AWQ's scales help. `tower` = whether the vision tower and
projector came back bit-identical to the source. A family the engine refuses prints its one-sentence reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import train_tiny_tokenizer  # noqa: E402
from tiny_models import tiny_input_ids  # noqa: E402
from tiny_multimodal import (  # noqa: E402
    _AUDIO,
    EXTRA_FAMILIES,
    MULTIMODAL_FAMILIES,
    TEXT_VARIANTS,
    _text_config,
    build_tiny_multimodal,
)

from awqforge.calibration import BUNDLED_CALIBRATION_TEXT  # noqa: E402
from awqforge.errors import AWQForgeError  # noqa: E402
from awqforge.pipeline import run_quantization  # noqa: E402
from awqforge.spec import JobSpec  # noqa: E402

# Qwen3.5 as it ships (gated-delta-rule layers beside attention), Gemma 4 with per-layer inputs
VARIANTS = TEXT_VARIANTS
OTHER_OVERRIDES = {
    "gemma4 (audio)": ("gemma4", {"audio_config": _AUDIO["gemma4"]})
}  # beside the vision tower


def run(ckpt: Path, out: Path, method: str, bits: int, group_size: int) -> Path:
    spec = JobSpec(
        model=str(ckpt),
        method=method,
        quant={"bits": bits, "group_size": group_size, "zero_point": False},
        calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 16, "seq_len": 64},
        formats=["compressed-tensors"],
        eval={"enabled": False},
        device="cpu",
        n_grid=8,
    )
    return run_quantization(spec, out).artifacts["compressed-tensors"]


def measure(family: str, fp, ckpt: Path, work: Path, bits: int, group_size: int, held_out) -> dict:
    from transformers import AutoModelForImageTextToText

    # the reference as transformers loads the source (its default attention, as the artifact's): PaliGemma's
    # text-only forward is causal in eager attention and bidirectional in sdpa (a skipped mask and
    # `is_causal=False`), so an eager in-memory model against an sdpa-loaded artifact differs with no quantization
    ref = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        want = ref(input_ids=held_out).logits
    del ref
    row: dict = {"loads": "yes", "tower": "kept"}
    for method in ("rtn", "awq"):
        art = run(ckpt, work / f"{method}-{bits}", method, bits, group_size)
        try:
            model, info = AutoModelForImageTextToText.from_pretrained(
                art, dtype=torch.float32, output_loading_info=True
            )
        except Exception as exc:  # noqa: BLE001 - reported as the row's result
            row["loads"] = f"no ({str(exc)[:80]})"
            return row
        bad = {k: len(v) for k, v in info.items() if k != "error_msgs" and v}
        if bad:  # tensors transformers did not place (it re-initialises them): not a load
            row["loads"] = "no (" + ", ".join(f"{n} {k}" for k, n in bad.items()) + ")"
        report = json.loads((art / "quant_report.json").read_text())["multimodal"]
        fp_mods = dict(fp.named_modules())
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and any(
                name.startswith(t + ".") for t in report["kept_in_checkpoint_dtype"]
            ):
                if not torch.equal(mod.weight, fp_mods[name].weight):
                    row["tower"] = "CHANGED"
        with torch.no_grad():
            row[method] = float((model(input_ids=held_out).logits - want).pow(2).mean())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--families", nargs="*", default=[*MULTIMODAL_FAMILIES, *VARIANTS, *OTHER_OVERRIDES, *EXTRA_FAMILIES]
    )
    ap.add_argument("--bits", nargs="*", type=int, default=[3, 4])
    ap.add_argument("--group-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizer = train_tiny_tokenizer()
    held_out = tiny_input_ids(8, 64, seed=1)
    print(
        f"{'model_type':<18} {'bits':>4} {'status':<8} {'RTN mse':>10} {'AWQ mse':>10} {'AWQ/RTN':>8} "
        f"{'transformers':>12} {'towers':>7} {'s':>5}"
    )
    for name in args.families:
        family, text_over = VARIANTS.get(name, (name, None))
        overrides = {"text_config": {**_text_config(family), **text_over}} if text_over else {}
        if name in OTHER_OVERRIDES:
            family, overrides = OTHER_OVERRIDES[name]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            fp = build_tiny_multimodal(family, **overrides)
            fp.save_pretrained(work / "ckpt")
            tokenizer.save_pretrained(work / "ckpt")
            for bits in args.bits:
                t0 = time.perf_counter()
                try:
                    row = measure(family, fp, work / "ckpt", work, bits, args.group_size, held_out)
                except (AWQForgeError, ValueError) as exc:
                    print(f"{name:<18} {bits:>4} refused  {str(exc)}")
                    break
                ratio = row["awq"] / row["rtn"] if "awq" in row else float("nan")
                print(
                    f"{name:<18} {bits:>4} {'AWQ':<8} {row.get('rtn', float('nan')):>10.3e} "
                    f"{row.get('awq', float('nan')):>10.3e} {ratio:>8.3f} {row['loads']:>12} "
                    f"{row['tower']:>7} {time.perf_counter() - t0:>5.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
