"""The screened scale search (`search_screen`) against the full module search on tiny random models.

    python bench/bench_search_screen.py                       # llama, qwen3, gemma2, phi3, mixtral; k = 0 and 8
    python bench/bench_search_screen.py --families llama --screens 0 1 2 4 --bits 3 --group-size 32
    python bench/bench_search_screen.py --families gemma3_text --shape gemma3-640 --group-size 64   # realistic width

Each family's tiny random-init model (tests/tiny_models.py: hidden 128, 2 blocks, outlier norm channels)
is quantized block by block with the engine's capture and `quantize_block`, once per k, on the same random
tokens. Printed per k: the sum of the per-layer output errors the engine reports (`LayerMetric.mse_quant`,
RTN's `mse_rtn` beside), the logits MSE against the FP model on held-out tokens, how many mappings picked the
same scale ratio as the first k, the time of the module search, and what k costs in rounding gap: the
share of RTN's logits error that k gives back against the first k (k=0, the full search, is the reference:
(mse_k - mse_0) / mse_RTN; perplexity means nothing on a random model). `--shape` builds the family at a
realistic width from its transformers config (gemma3-640: Gemma-3-270M's block, hidden 640, head_dim 256,
one KV head; gemma3-1152: Gemma-3-1B's; gemma2-2304: Gemma-2-2B's), random init with the same outlier norm
channels, a small vocabulary (the head does not enter the block search). The real-model figures (SmolLM2)
come from bench_speed.py (per-layer errors) and bench_quality.py (perplexity).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tiny_models import build_tiny_model, tiny_input_ids  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import SHAPES, parse_variant  # noqa: E402

from awqforge.arch import get_adapter  # noqa: E402
from awqforge.awq import BlockSettings, capture_layer_inputs, quantize_block  # noqa: E402


def run(family: str, ids: torch.Tensor, held_out: torch.Tensor, s: BlockSettings, shape: dict) -> dict:
    ref_model = build_tiny_model(family, **shape)
    model = build_tiny_model(family, **shape)
    adapter = get_adapter(model.config)
    layers = adapter.get_layers(model)
    with torch.no_grad():
        ref = ref_model(held_out).logits
        captured = capture_layer_inputs(model, layers, ids)
    x, errs, picks, module_s = captured.inputs, [], {}, 0.0
    t0 = time.perf_counter()
    for i, block in enumerate(layers):
        res = quantize_block(
            block, x, captured.layer_kwargs[i], settings=s, adapter=adapter, block_index=i, block_prefix=""
        )
        x = res.outputs
        errs += [(lm.mse_rtn, lm.mse_quant) for lm in res.layers]
        picks.update({f"{i}:{k}": v["ratio"] for k, v in res.scales.items()})
        module_s += res.timings.get("scale_search_module", 0.0) + res.timings.get("scale_screen", 0.0)
    blocks_s = time.perf_counter() - t0
    with torch.no_grad():
        logits_mse = float((model(held_out).logits - ref).pow(2).mean())
    return {
        "rtn": sum(r for r, _ in errs),
        "ours": sum(q for _, q in errs),
        "logits_mse": logits_mse,
        "picks": picks,
        "module_s": module_s,
        "blocks_s": blocks_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["llama", "qwen3", "gemma2", "phi3", "mixtral"])
    ap.add_argument("--screens", type=int, nargs="+", default=[0, 8])
    ap.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="BlockSettings to compare instead of --screens, the first the reference (e.g. the full search "
        "'search_screen=0,search_fraction=1' against the defaults 'default'); 'default' alone is the engine's",
    )
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    torch.set_num_threads(1)
    ids = tiny_input_ids(args.n_samples, args.seq_len, seed=0)
    held_out = tiny_input_ids(8, args.seq_len, seed=1)
    print(
        f"W{args.bits} g{args.group_size}, {args.n_samples} x {args.seq_len} random tokens, 1 thread, shape "
        f"{args.shape} {shape or ''}"
    )
    print(
        f"{'family':<12} {'settings':<34} {'sum layer MSE':>14} {'vs ref':>7} {'RTN':>12} {'logits MSE':>11} "
        f"{'same picks':>10} {'module s':>9} {'blocks s':>9} {'gap cost':>9}"
    )
    variants = args.variants or [f"search_screen={k}" for k in args.screens]
    for fam in args.families:
        base = None
        rtn = run(
            fam, ids, held_out, BlockSettings(method="rtn", bits=args.bits, group_size=args.group_size), shape
        )
        for k in variants:
            s = BlockSettings(bits=args.bits, group_size=args.group_size, **parse_variant(k))
            r = run(fam, ids, held_out, s, shape)
            base = base or r
            same = sum(base["picks"][m] == r["picks"].get(m) for m in base["picks"])
            n_maps = len(base["picks"])
            print(
                f"{fam:<12} {k:<34} {r['ours']:>14.6g} {r['ours'] / base['ours']:>7.4f} {r['rtn']:>12.6g} "
                f"{r['logits_mse']:>11.4g} {f'{same}/{n_maps}':>10} {r['module_s']:>9.2f} {r['blocks_s']:>9.2f} "
                f"{100 * (r['logits_mse'] - base['logits_mse']) / rtn['logits_mse']:>8.2f}%"
            )
        print(
            f"{fam:<12} RTN logits MSE {rtn['logits_mse']:.4g}; the reference closes "
            f"{100 * (1 - base['logits_mse'] / rtn['logits_mse']):.1f}% of it"
        )


if __name__ == "__main__":
    main()
