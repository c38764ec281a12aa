"""The structural fallback on every model type it claims: AWQ's output error against RTN's, same models, same inputs.

    python bench/bench_fallback.py                    # W3 g32 and W4 g32 on tests/tiny_models.FALLBACK_FAMILIES
    python bench/bench_fallback.py --families cohere glm --bits 4

Each model is a tiny random-init transformers model of that model_type (hidden 128, 2 layers, norm gains with
a few outlier channels, as tests/tiny_models.py builds it), quantized block by block in memory through the same
capture and `quantize_block` as the pipeline, with the adapter the structural fallback reads from the model.
The error is the MSE of the logits against the FP model's on held-out token ids (not the calibration ones).
The ratio AWQ / RTN < 1 means the fallback's mappings help; tests/test_fallback.py asserts it per family.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import FALLBACK_FAMILIES, build_tiny_model, tiny_input_ids  # noqa: E402

from awqforge.arch import get_adapter  # noqa: E402
from awqforge.awq import BlockSettings, capture_layer_inputs, quantize_block  # noqa: E402


def logits_error(family: str, method: str, bits: int, group_size: int, calib, held_out) -> float:
    ref = build_tiny_model(family)
    model = build_tiny_model(family)
    adapter = get_adapter(model.config)
    layers = adapter.get_layers(model)
    captured = capture_layer_inputs(model, layers, calib)
    x = captured.inputs
    for i, block in enumerate(layers):
        res = quantize_block(
            block,
            x,
            captured.layer_kwargs[i],
            settings=BlockSettings(method=method, bits=bits, group_size=group_size),
            adapter=adapter,
            block_index=i,
            block_prefix=f"{adapter.layers_attr}.{i}",
        )
        x = res.outputs
    with torch.no_grad():
        return float((model(held_out).logits - ref(held_out).logits).pow(2).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=FALLBACK_FAMILIES)
    ap.add_argument("--bits", nargs="*", type=int, default=[3, 4])
    ap.add_argument("--group-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib, held_out = tiny_input_ids(16, 64, seed=0), tiny_input_ids(8, 64, seed=1)
    print(
        f"{'model_type':<12} {'adapter':<24} {'bits':>4} {'RTN mse':>10} {'AWQ mse':>10} {'AWQ/RTN':>8} {'s':>6}"
    )
    worst = 0.0
    for family in args.families:
        name = get_adapter(build_tiny_model(family).config).family
        for bits in args.bits:
            t0 = time.perf_counter()
            rtn = logits_error(family, "rtn", bits, args.group_size, calib, held_out)
            awq = logits_error(family, "awq", bits, args.group_size, calib, held_out)
            worst = max(worst, awq / rtn)
            print(
                f"{family:<12} {name:<24} {bits:>4} {rtn:>10.3e} {awq:>10.3e} {awq / rtn:>8.3f} "
                f"{time.perf_counter() - t0:>6.1f}"
            )
    print(f"worst AWQ/RTN: {worst:.3f} ({'AWQ below RTN on every model' if worst < 1 else 'NOT below RTN'})")


if __name__ == "__main__":
    main()
