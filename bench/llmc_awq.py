"""llm-compressor's AWQ on our calibration samples, scored on our evaluation windows; prints one JSON line.

Runs with llm-compressor's own virtualenv (it pins its own transformers), never with awqforge's:

    /work/venvs/llmc/bin/python bench/llmc_awq.py --model CKPT_DIR --data data.pt --bits 4 --group-size 64

`data.pt` holds {"calib": LongTensor [n, seq], "eval": LongTensor [w, seq_len]} written by bench_quality.py, so
both sides see the same tokens; perplexity comes from bench/common.py, the function our side uses too. With
"calib_rows" (a list of token lists of any length, written by bench_calibration.py) each row is one sample,
llm-compressor's own way with a text dataset, run in batches of one (no padding).
`--gptq`: AWQModifier followed by GPTQModifier (llm-compressor's strongest weight-only recipe) instead of
QuantizationModifier (round to nearest), the peer of our `rounding=gptq`.
Only the `oneshot` call is timed (model loading and evaluation are not).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _no_pin_memory_without_cuda() -> None:
    # llm-compressor pins its activation cache for host-to-device copies; without a CUDA runtime
    # pin_memory() raises. On CPU the pinned copy buys nothing, so return the tensor itself.
    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def _recipe(
    bits: int, group_size: int, symmetric: bool, duo_scaling, n_grid: int, gptq: bool = False
) -> list:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    # The presets (W4A16_ASYM, W3A16) fix group 128 and W3A16 is symmetric: build the scheme by hand.
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=bits,
            type="int",
            strategy="group",
            group_size=group_size,
            symmetric=symmetric,
            dynamic=False,
        ),
    )
    rounding = GPTQModifier if gptq else QuantizationModifier
    return [
        AWQModifier(duo_scaling=duo_scaling, n_grid=n_grid),
        rounding(config_groups={"group_0": scheme}, ignore=["lm_head"]),
    ]


@torch.no_grad()
def _bake_fake_quant(model: torch.nn.Module) -> int:
    """Replace every quantized weight by its quantize-dequantize value and switch the on-the-fly QDQ off."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    n = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
            continue
        module.weight.data = forward_quantize(module, module.weight.data, "weight", scheme.weights)
        module.quantization_enabled = False
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF checkpoint folder (safetensors)")
    ap.add_argument("--data", required=True, help="torch file with 'calib' and 'eval' LongTensors")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--duo-scaling", default="true", choices=["true", "false", "both"])
    ap.add_argument("--n-grid", type=int, default=20)
    ap.add_argument(
        "--batch-size", type=int, default=0, help="calibration batch; 0 = all samples in one batch"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument(
        "--gptq", action="store_true", help="AWQModifier then GPTQModifier (not round to nearest)"
    )
    args = ap.parse_args(argv)

    threads = common.set_threads(args.threads)
    _no_pin_memory_without_cuda()
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = torch.load(args.data)
    rows = data.get("calib_rows")
    if rows is not None:  # one sample per text, of its own length: batches of one, as llm-compressor does
        n, seq = len(rows), max(len(r) for r in rows)
        dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
        args.batch_size = 1
    else:
        calib: torch.Tensor = data["calib"]
        n, seq = calib.shape
        dataset = Dataset.from_dict(
            {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
        )

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    duo = {"true": True, "false": False, "both": "both"}[args.duo_scaling]
    recipe = _recipe(args.bits, args.group_size, args.symmetric, duo, args.n_grid, args.gptq)

    cpu0 = time.process_time()
    with common.Timer() as t:
        model = (
            oneshot(
                model=model,
                tokenizer=tokenizer,
                dataset=dataset,
                recipe=recipe,
                num_calibration_samples=n,
                max_seq_length=seq,
                batch_size=args.batch_size or n,
                shuffle_calibration_samples=False,
            )
            or model
        )
    result = {
        "impl": "llm-compressor",
        "version": llmcompressor.__version__,
        "bits": args.bits,
        "group_size": args.group_size,
        "symmetric": args.symmetric,
        "duo_scaling": args.duo_scaling,
        "n_grid": args.n_grid,
        "gptq": args.gptq,
        "per_sample": rows is not None,
        "calib_tokens": sum(len(r) for r in rows) if rows is not None else n * seq,
        "dtype": args.dtype,
        "threads": threads,
        "calib_shape": [n, seq],
        "oneshot_s": t.s,
        "oneshot_cpu_s": time.process_time() - cpu0,
    }
    result["n_quantized"] = _bake_fake_quant(model)
    if not args.skip_eval:
        with common.Timer() as te:
            result.update(common.perplexity(model, data["eval"], data.get("n_prefix", 0)))
        result["eval_s"] = te.s
    result["peak_rss_bytes"] = common.peak_rss_bytes()
    common.emit_json(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
