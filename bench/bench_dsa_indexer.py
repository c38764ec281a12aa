"""DSA indexers after quantization: how much of the FP model's top-k token selection AWQ and RTN keep.

    taskset -c 1 python bench/bench_dsa_indexer.py                      # the five DSA families
    taskset -c 1 python bench/bench_dsa_indexer.py --tree /tmp/base glm_moe_dsa   # another checkout's engine

Tiny random-init models (tests/tiny_families.py) with index_topk 8 below the 32 held-out tokens, so the
indexer's selection matters (the families table's tiny configs select every token); W3 g16, quantized block by
block as tests/tiny_families.logits_errors does. Per family: the fraction of the FP indexer's top-k indices the
quantized model's indexer still selects (rows with at least top-k causal keys) and the logits MSE vs FP.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings
from pathlib import Path

TOPK = 8
FAMILIES = ["deepseek_v32", "glm_moe_dsa", "dots3_note_text", "hy_v4", "deepseek_v4"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="*", default=FAMILIES)
    ap.add_argument(
        "--tree", default=str(Path(__file__).resolve().parents[1]), help="checkout whose engine runs"
    )
    args = ap.parse_args()
    sys.path[:0] = [args.tree, f"{args.tree}/tests"]
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from tiny_families import _ids, build_family_model

    from awqforge.arch import get_adapter
    from awqforge.awq import BlockSettings, capture_layer_inputs, quantize_block

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)

    def run(model, ids):
        sel = []
        hooks = [
            m.register_forward_hook(lambda _m, _a, o: sel.append(o))
            for n, m in model.named_modules()
            if n.endswith("indexer")
        ]
        with torch.no_grad():
            logits = model(ids).logits
        for h in hooks:
            h.remove()
        return logits, sel

    for fam in args.families:
        calib, held = _ids(8, 32, 0), _ids(4, 32, 1)
        want, fp_sel = run(build_family_model(fam, index_topk=TOPK), held)
        row = [fam]
        for method in ("rtn", "awq"):
            model = build_family_model(fam, index_topk=TOPK)
            adapter = get_adapter(model.config)
            layers = adapter.get_layers(model)
            with contextlib.redirect_stderr(io.StringIO()):
                cap = capture_layer_inputs(model, layers, calib)
                x = cap.inputs
                for i, block in enumerate(layers):
                    x = quantize_block(
                        block,
                        x,
                        cap.layer_kwargs[i],
                        settings=BlockSettings(method=method, bits=3, group_size=16, n_grid=8),
                        adapter=adapter,
                        block_index=i,
                        block_prefix=f"{adapter.layers_attr}.{i}",
                    ).outputs
            got, q_sel = run(model, held)
            kept = []
            for a, b in zip(fp_sel, q_sel, strict=True):
                a, b = a[:, TOPK - 1 :].long(), b[:, TOPK - 1 :].long()
                kept.append(float((a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean()))
            mse = float((got - want).pow(2).mean())
            row.append(f"{method}: top-k kept {sum(kept) / len(kept):.3f}, logits MSE {mse:.3e}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
