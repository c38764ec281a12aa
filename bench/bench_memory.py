"""Peak RSS of run_quantization on random-init Llama checkpoints of growing depth, and one larger than RAM.

    python bench/bench_memory.py                      # hidden 2048 / intermediate 5632, 4, 8, 16, 32 layers
    python bench/bench_memory.py --layers 4 8         # fewer depths
    nohup python bench/bench_memory.py --huge > /tmp/awqforge-huge.log 2>&1 &   # a checkpoint > free RAM

Checkpoints are bf16 safetensors written one layer per shard (never the whole model in memory), with the
SmolLM2 tokenizer, cached under --work-dir. Each quantization runs in its own child process; its peak RSS is
the ru_maxrss that os.wait4 reports for that child alone. Calibration is small (8 x 128 tokens of the bundled
text) so that the activations stay a minor term: what grows with depth is what the engine keeps of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GIB = 1024**3


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }


def _random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norm weights
        return torch.ones(shape, dtype=torch.bfloat16)
    # std 1/sqrt(fan_in) keeps activations of a deep random stack finite
    return (
        torch.empty(shape, dtype=torch.float32)
        .normal_(0.0, shape[1] ** -0.5, generator=generator)
        .to(torch.bfloat16)
    )


def checkpoint_bytes(cfg: dict) -> int:
    per_layer = sum(torch.Size(s).numel() for s in _layer_shapes(cfg).values())
    other = 2 * cfg["vocab_size"] * cfg["hidden_size"] + cfg["hidden_size"]
    return 2 * (per_layer * cfg["num_hidden_layers"] + other)


def write_checkpoint(path: Path, cfg: dict, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random-init Llama checkpoint, one shard per decoder layer, written tensor group by tensor group."""
    from safetensors.torch import save_file

    if (path / "model.safetensors.index.json").is_file():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    n_layers = cfg["num_hidden_layers"]
    n_shards = n_layers + 2
    weight_map: dict[str, str] = {}
    total = 0

    def write(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{index:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()

    v, h = cfg["vocab_size"], cfg["hidden_size"]
    write(1, {"model.embed_tokens.weight": _random((v, h), gen)})
    for layer in range(n_layers):
        write(
            layer + 2, {f"model.layers.{layer}.{k}": _random(s, gen) for k, s in _layer_shapes(cfg).items()}
        )
    write(n_shards, {"model.norm.weight": _random((h,), gen), "lm_head.weight": _random((v, h), gen)})
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in tokenizer_dir.iterdir():
        if (
            f.name.startswith(("tokenizer", "special_tokens", "chat_template"))
            or f.name == "generation_config.json"
        ):
            shutil.copy(f, tmp / f.name)
    tmp.rename(path)
    return path


def _tokenizer_dir() -> Path:
    from awqforge.smollm import ensure_smollm2_checkpoint

    return ensure_smollm2_checkpoint()


def child(spec_json: str, out_dir: str, shard_size: str = "") -> int:
    """Run inside the measured process: one run_quantization, metrics as JSON."""
    from awqforge.pipeline import run_quantization
    from awqforge.spec import JobSpec

    spec = JobSpec.model_validate_json(spec_json)

    def progress(ev) -> None:  # to the child's log, so a long run can be followed
        if ev.block is not None or ev.stage != "quantize":
            print(
                f"{time.strftime('%H:%M:%S')} {ev.stage}: {ev.message} rss {common.peak_rss_bytes() / GIB:.2f} GiB",
                file=sys.stderr,
                flush=True,
            )

    with common.Timer() as t:
        kwargs = {"shard_size": shard_size} if shard_size else {}
        result = run_quantization(spec, out_dir, progress=progress, **kwargs)
    m = result.metrics
    common.emit_json(
        {
            "wall_s": t.s,
            "stages_s": m.get("wall_time_s"),
            "engine_peak_rss_bytes": m.get("peak_rss_bytes"),
            "self_peak_rss_bytes": common.peak_rss_bytes(),
            "size_before_bytes": m.get("size_before_bytes"),
            "size_after_bytes": m.get("size_after_bytes"),
            "n_layers_quantized": m.get("n_layers_quantized"),
        }
    )
    return 0


def measure(
    ckpt: Path,
    out_dir: Path,
    *,
    method: str,
    n_samples: int,
    seq_len: int,
    calib_source: str,
    log_path: Path,
    threads: int,
    shard_size: str = "",
) -> dict:
    """run_quantization in a child process; returns its metrics and its peak RSS from os.wait4."""
    from awqforge.spec import JobSpec

    spec = JobSpec(
        model=str(ckpt),
        method=method,
        quant={"bits": 4, "group_size": 128, "zero_point": True},
        calibration={"source": calib_source, "n_samples": n_samples, "seq_len": seq_len},
        formats=["awq"],
        eval={"enabled": False},
        device="cpu",
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        spec.model_dump_json(),
        str(out_dir),
        shard_size,
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.write(stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"quantization of {ckpt} failed (exit {proc.returncode}); see {log_path}")
    result = common.parse_emitted(stdout)
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    result["artifact_bytes"] = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    return result


def free_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (what `free -b` shows as available)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def run_depths(args, work: Path, tok_dir: Path, calib_source: str) -> None:
    rows = []
    for layers in args.layers:
        cfg = llama_config(2048, 5632, layers, 32, 4, args.vocab)
        with common.Timer() as tg:
            ckpt = write_checkpoint(work / f"llama-h2048-L{layers}", cfg, tok_dir)
        r = measure(
            ckpt,
            work / f"out-L{layers}",
            method=args.method,
            n_samples=args.n_samples,
            seq_len=args.seq_len,
            calib_source=calib_source,
            log_path=work / f"L{layers}.log",
            threads=args.threads,
            shard_size=args.shard_size,
        )
        r.update(layers=layers, checkpoint_bytes=checkpoint_bytes(cfg), generate_s=tg.s)
        rows.append(r)
        print(
            f"{layers} layers: peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB, {r['wall_s']:.0f} s", flush=True
        )
        shutil.rmtree(work / f"out-L{layers}", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)

    print(
        f"\nrandom-init Llama, hidden 2048, intermediate 5632, bf16; method {args.method}, W4 g128, "
        f"calibration {args.n_samples} x {args.seq_len}, {args.threads} threads, "
        f"shard size {args.shard_size or 'engine default'}"
    )
    head = f"{'layers':>6} {'checkpoint GiB':>14} {'peak RSS GiB':>12} {'RSS/checkpoint':>14} {'wall s':>7} {'quantize s':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        q = (r.get("stages_s") or {}).get("quantize")
        print(
            f"{r['layers']:>6} {r['checkpoint_bytes'] / GIB:>14.2f} {r['peak_rss_bytes'] / GIB:>12.2f} "
            f"{r['peak_rss_bytes'] / r['checkpoint_bytes']:>14.2f} {r['wall_s']:>7.0f} {q if q is None else round(q):>10}"
        )
    if len(rows) >= 2:
        growth = rows[-1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"] - 1
        verdict = "PASS" if growth < 0.25 else "FAIL"
        print(
            f"\npeak RSS growth {rows[0]['layers']} -> {rows[-1]['layers']} layers: {growth * 100:.1f}% "
            f"-> {verdict} (target < 25%)"
        )
    (work / "memory.json").write_text(json.dumps(rows, indent=2))


def run_huge(args, work: Path, tok_dir: Path, calib_source: str) -> None:
    free = free_ram_bytes()
    cfg = llama_config(4096, 14336, 1, 32, 8, args.vocab)
    per_layer = checkpoint_bytes({**cfg, "num_hidden_layers": 2}) - checkpoint_bytes(cfg)
    layers = args.huge_layers or int((free * 1.10 - checkpoint_bytes(cfg)) // per_layer) + 2
    cfg = llama_config(4096, 14336, layers, 32, 8, args.vocab)
    size = checkpoint_bytes(cfg)
    disk = shutil.disk_usage(work).free
    print(
        f"available RAM {free / GIB:.1f} GiB; checkpoint {layers} layers = {size / GIB:.1f} GiB; disk free {disk / GIB:.1f} GiB",
        flush=True,
    )
    if size <= free:
        raise SystemExit("the checkpoint would not exceed available RAM; raise --huge-layers")
    if disk < size * 1.4:
        raise SystemExit(f"not enough disk under {work} for the checkpoint and its 4-bit artifact")
    ckpt = work / f"llama-h4096-L{layers}"
    try:
        with common.Timer() as tg:
            write_checkpoint(ckpt, cfg, tok_dir)
        print(f"checkpoint written in {tg.s:.0f} s", flush=True)
        r = measure(
            ckpt,
            work / "out-huge",
            method=args.method,
            n_samples=args.huge_samples,
            seq_len=args.seq_len,
            calib_source=calib_source,
            log_path=work / "huge.log",
            threads=args.threads,
            shard_size=args.shard_size,
        )
        r.update(layers=layers, checkpoint_bytes=size, available_ram_bytes=free, generate_s=tg.s)
        print(json.dumps(r, indent=2))
        print(
            f"\nhuge: {layers} layers, checkpoint {size / GIB:.1f} GiB > available RAM {free / GIB:.1f} GiB; "
            f"peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB; artifact {r['artifact_bytes'] / GIB:.1f} GiB; "
            f"{r['wall_s'] / 60:.1f} min ({args.method})"
        )
        (work / "huge.json").write_text(json.dumps(r, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(work / "out-huge", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(argv[1], argv[2], argv[3] if len(argv) > 3 else "")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--method", default="awq", choices=["awq", "rtn"])
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49152, help="the SmolLM2 tokenizer's vocabulary")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--huge", action="store_true", help="one checkpoint larger than available RAM (hidden 4096)"
    )
    ap.add_argument(
        "--huge-layers", type=int, default=0, help="default: enough to exceed available RAM by 10%%"
    )
    ap.add_argument("--huge-samples", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument(
        "--shard-size",
        default="",
        help="artifact shard size passed to run_quantization (default: the engine's)",
    )
    ap.add_argument("--work-dir", default="/tmp/awqforge-bench-memory")
    args = ap.parse_args(argv)

    from awqforge.calibration import BUNDLED_CALIBRATION_TEXT

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = _tokenizer_dir()
    calib_source = f"file:{BUNDLED_CALIBRATION_TEXT}"
    start = time.time()
    if args.huge:
        run_huge(args, work, tok_dir, calib_source)
    else:
        run_depths(args, work, tok_dir, calib_source)
    print(f"\ntotal {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
