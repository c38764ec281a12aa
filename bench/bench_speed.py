"""Where our AWQ's time goes per block, and our wall time against llm-compressor's on the same blocks.

    python bench/bench_speed.py                            # SmolLM2-135M cut to its first 4 blocks, W4 g64
    python bench/bench_speed.py --layers 30 --llmc-python /work/venvs/llmc/bin/python   # the whole model
    python bench/bench_speed.py --model CKPT_DIR --layers 0 --skip-llmc                  # another model, all blocks
    python bench/bench_speed.py --family gemma3_text --shape gemma3-640 --layers 2       # a random model, real width

The checkpoint is cut to its first --layers decoder blocks (0: all), written once under --work-dir. Both sides
get the same calibration tokens (--n-samples x --seq-len of the bundled text, bench/common.py) and run on
--threads threads. Ours: the engine's own capture and `quantize_block`, block after block, with the stage
times each block reports (fp_pass: the FP forward with the statistics hooks; rtn_error: the RTN baseline of
the metrics; scale_search_module / scale_search_linear: the grid search over scales scored on the inspected
module (attention, MLP) or exactly from the Gram matrix (v->o, up->down); scale_screen: the Gram screen
that shortlists the module-scored candidates (--search-screen); fold; clip_search; refit;
quantize: codes, dequantized weight and metrics), then packing into the AWQ gemm layout. llm-compressor:
bench/llmc_awq.py in its own virtualenv, its `oneshot` call timed. The machine may be shared: compare the
ratio, which is measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LLMC_PYTHON = os.environ.get("AWQFORGE_LLMC_PYTHON", "/work/venvs/llmc/bin/python")


# per-layer lists (one entry per decoder block) and lists of block indices in transformers configs
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "swa_layers", "attention_types_per_layer")
LAYER_INDEX_KEYS = ("mlp_only_layers", "moe_layers", "full_attn_idxs")


def cut_config(config: dict, layers: int) -> int:
    """Cut a config.json dict (and its nested text_config) to its first `layers` blocks (0: all), per-layer
    lists (`layer_types`: sliding / full attention, ...) included; returns the number of blocks kept."""
    kept = None
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict) or "num_hidden_layers" not in cfg:
            continue
        n = cfg["num_hidden_layers"]
        keep = min(layers, n) if layers else n
        cfg["num_hidden_layers"] = keep
        for key in PER_LAYER_KEYS:
            if isinstance(cfg.get(key), list) and len(cfg[key]) == n:
                cfg[key] = cfg[key][:keep]
        for key in LAYER_INDEX_KEYS:
            if isinstance(cfg.get(key), list) and all(isinstance(i, int) for i in cfg[key]):
                cfg[key] = [i for i in cfg[key] if i < keep]
        kept = keep if kept is None else kept
    if kept is None:
        raise ValueError("config.json has no num_hidden_layers")
    return kept


def cut_checkpoint(src: Path, dest: Path, layers: int) -> Path:
    """src with only its first `layers` decoder blocks (config and tensors), tokenizer files copied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (dest / "config.json").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    keep = cut_config(config, layers)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                parts = k.split(".")
                if "layers" in parts and int(parts[parts.index("layers") + 1]) >= keep:
                    continue
                tensors[k] = h.get_tensor(k)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja", ".txt", ".model") and f.name not in ("config.json",):
            shutil.copy(f, dest / f.name)
    return dest


def random_checkpoint(family: str, shape: str, layers: int, dest: Path) -> Path:
    """A bf16 random-init checkpoint of `family` with `layers` blocks of shape SHAPES[shape], SmolLM2's tokenizer."""
    if (dest / "config.json").exists():
        return dest
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_tiny_model

    from awqforge.smollm import ensure_smollm2_checkpoint

    tok_src = ensure_smollm2_checkpoint()
    extra = {}
    if family in ("gemma2", "gemma3_text"):  # sliding and full attention alternating, as Gemma-2's blocks
        extra["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + [
            "sliding_attention"
        ] * (layers % 2)
    if family == "llama4_text":  # every block MoE, rope on all but the last of each four (Llama-4's pattern)
        extra.update(
            interleave_moe_layer_step=1, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(layers)]
        )
    model = build_tiny_model(
        family,
        dtype=torch.bfloat16,
        num_hidden_layers=layers,
        vocab_size=49152,
        max_position_embeddings=8192,
        **common.SHAPES[shape],
        **extra,
    )
    model.save_pretrained(dest)
    for f in tok_src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or f.suffix == ".jinja":
            shutil.copy(f, dest / f.name)
    return dest


def ours(ckpt: Path, calib: torch.Tensor, bits: int, group_size: int, **overrides) -> dict:
    from awqforge.arch import get_adapter
    from awqforge.awq import BlockSettings, quantize_block
    from awqforge.packing import pack_awq_gemm
    from awqforge.resolve import resolve_model
    from awqforge.streaming import StreamingModel

    resolved = resolve_model(str(ckpt), None)
    adapter = get_adapter(resolved.config)
    times: dict[str, float] = defaultdict(float)
    cpu0 = time.process_time()
    with common.Timer() as total:
        t0 = time.perf_counter()
        stream = StreamingModel.from_resolved(resolved, adapter, device=torch.device("cpu"))
        stream.load_non_block()
        captured = stream.capture(calib)
        stream.unload_non_block()
        times["capture"] += time.perf_counter() - t0
        x = captured.inputs
        settings = BlockSettings(bits=bits, group_size=group_size, **overrides)
        per_block, per_block_cpu, per_block_stages, picks, layers, finalists = [], [], [], {}, {}, {}
        for i in range(stream.n_blocks):
            t0 = time.perf_counter()
            block = stream.load_block(i)
            times["load_block"] += time.perf_counter() - t0
            t0, c0 = time.perf_counter(), time.process_time()
            res = quantize_block(
                block,
                x,
                captured.layer_kwargs[i],
                settings=settings,
                adapter=adapter,
                block_index=i,
                block_prefix=stream.block_prefix(i),
            )
            per_block.append(time.perf_counter() - t0)
            per_block_cpu.append(time.process_time() - c0)
            per_block_stages.append(dict(res.timings))
            for k, v in res.timings.items():
                times[k] += v
            for name, info in res.scales.items():
                picks[f"{i}:{name}"] = info["ratio"]
                if info.get("scored") == "module":
                    finalists[f"{i}:{name}"] = info.get("finalists")
            for lm in res.layers:
                layers[f"{i}:{lm.name}"] = (lm.mse_rtn, lm.mse_quant)
            t0 = time.perf_counter()
            for qt in res.quantized.values():
                pack_awq_gemm(qt)
            times["packing"] += time.perf_counter() - t0
            x = res.outputs
            stream.free_block(i)
    return {
        "total_s": total.s,
        "cpu_s": time.process_time()
        - cpu0,  # this process's CPU time: steadier than wall on a shared machine
        "stages": dict(times),
        "per_block_s": per_block,
        "per_block_cpu_s": per_block_cpu,
        "per_block_stages": per_block_stages,
        "picks": picks,  # chosen grid ratio per block and mapping
        "finalists": finalists,  # module-scored mappings: candidates scored on every sample
        "layers": layers,  # per block and linear: (RTN output MSE, ours)
    }


def report(label: str, mine: dict) -> None:
    print(
        f"\nours, {label}: {mine['total_s']:.1f} s wall ({', '.join(f'{t:.1f}' for t in mine['per_block_s'])} s "
        f"per block), {mine['cpu_s']:.1f} s CPU ({', '.join(f'{t:.1f}' for t in mine['per_block_cpu_s'])} per block)"
    )
    if mine.get("finalists"):
        print(
            f"  module-scored mappings, candidates scored on every sample: {list(mine['finalists'].values())}"
        )
    for stage, t in sorted(mine["stages"].items(), key=lambda kv: -kv[1]):
        per = ", ".join(f"{b.get(stage, 0.0):.2f}" for b in mine["per_block_stages"])
        print(f"  {stage:<22} {t:8.2f} s  {100 * t / mine['total_s']:5.1f} %   per block: {per}")


def compare(base_label: str, base: dict, label: str, other: dict) -> None:
    """Quality of `other` against `base` in the same run: the picks and every layer's output error."""
    same = sum(base["picks"][k] == other["picks"].get(k) for k in base["picks"])
    print(f"\n{label} vs {base_label}: same scale ratio on {same} of {len(base['picks'])} mappings")
    for k in base["picks"]:
        if base["picks"][k] != other["picks"].get(k):
            print(f"  {k}: ratio {base['picks'][k]:.2f} -> {other['picks'].get(k)}")
    sum_b = sum(q for _, q in base["layers"].values())
    sum_o = sum(q for _, q in other["layers"].values())
    sum_r = sum(r for r, _ in base["layers"].values())
    print(
        f"  sum of per-layer output MSE: RTN {sum_r:.6g}, {base_label} {sum_b:.6g}, {label} {sum_o:.6g} ({sum_o / sum_b:.4f}x)"
    )
    blocks = sorted({k.split(":")[0] for k in base["layers"]}, key=int)
    for b in blocks:
        kb = [k for k in base["layers"] if k.split(":")[0] == b]
        sb = sum(base["layers"][k][1] for k in kb)
        so = sum(other["layers"][k][1] for k in kb)
        sr = sum(base["layers"][k][0] for k in kb)
        print(f"  block {b}: RTN {sr:.6g}, {base_label} {sb:.6g}, {label} {so:.6g} ({so / sb:.4f}x)")
    print(
        f"  time {label} / {base_label}: {other['total_s'] / base['total_s']:.2f}x wall, "
        f"{other['cpu_s'] / base['cpu_s']:.2f}x CPU; scale_search_module "
        f"{other['stages'].get('scale_search_module', 0) / max(base['stages'].get('scale_search_module', 0), 1e-9):.2f}x"
        " wall (same run)"
    )


def llmc(
    python: str, ckpt: Path, calib: torch.Tensor, bits: int, group_size: int, threads: int, work: Path
) -> dict:
    data = work / "speed-data.pt"
    torch.save({"calib": calib, "eval": calib[:1]}, data)
    cmd = [python, str(REPO / "bench" / "llmc_awq.py"), "--model", str(ckpt), "--data", str(data)]
    cmd += ["--bits", str(bits), "--group-size", str(group_size), "--threads", str(threads), "--skip-eval"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llm-compressor failed:\n{proc.stderr[-3000:]}")
    return common.parse_emitted(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--layers", type=int, default=4, help="first N decoder blocks (0: all)")
    ap.add_argument("--family", help="a random-init model of this model_type (tests/tiny_models.py) instead")
    ap.add_argument("--shape", choices=list(common.SHAPES), default="tiny", help="--family's block shape")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llmc-python", default=DEFAULT_LLMC_PYTHON)
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument(
        "--search-screen",
        type=int,
        nargs="+",
        default=[8],
        metavar="K",
        help="our scale search's screen (0: off, the full module search); several values run back to back in "
        "this process, each compared with the first (picks, per-layer errors, time); llm-compressor is "
        "compared with the last",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="our runs with these BlockSettings instead of --search-screen's, each compared with the first "
        "(e.g. 'search_screen=0,search_fraction=1' default 'rounding=gptq'; 'default': the engine's own)",
    )
    ap.add_argument("--json-out", help="write our runs (stage times, picks, per-layer errors) to this file")
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "awqforge-bench" / "speed"))
    args = ap.parse_args()
    common.set_threads(args.threads)
    work = Path(args.work_dir)
    if args.family:
        n = args.layers or 2
        src = random_checkpoint(args.family, args.shape, n, work / f"{args.family}-{args.shape}-random-{n}")
    elif args.model:
        src = Path(args.model)
    else:
        from awqforge.smollm import ensure_smollm2_checkpoint

        src = ensure_smollm2_checkpoint()
    ckpt = cut_checkpoint(src, work / f"{src.name}-{args.layers or 'all'}-layers", args.layers)
    from transformers import AutoTokenizer

    from awqforge.calibration import BUNDLED_CALIBRATION_TEXT

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok(BUNDLED_CALIBRATION_TEXT.read_text(), add_special_tokens=False)["input_ids"]
    calib = common.calibration_samples(ids, args.n_samples, args.seq_len)
    print(
        f"{ckpt.name}: {args.n_samples} x {args.seq_len} tokens, W{args.bits} g{args.group_size}, {args.threads} thread(s)"
    )
    runs = {}
    for label in args.variants or [f"search_screen={k}" for k in args.search_screen]:
        runs[label] = ours(ckpt, calib, args.bits, args.group_size, **common.parse_variant(label))
        report(label, runs[label])
    labels = list(runs)
    for label in labels[1:]:
        compare(labels[0], runs[labels[0]], label, runs[label])
    mine = runs[labels[-1]]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(runs, indent=1))
    if not args.skip_llmc:
        peer = llmc(args.llmc_python, ckpt, calib, args.bits, args.group_size, args.threads, work)
        print(f"\nllm-compressor {peer.get('version')}: oneshot {peer['oneshot_s']:.1f} s")
        print(f"ours / llm-compressor wall time: {mine['total_s'] / peer['oneshot_s']:.2f}x (same run)")


if __name__ == "__main__":
    main()
