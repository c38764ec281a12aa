"""Data and measurement shared by the benchmarks and by the llm-compressor runner.

Imports only torch and the standard library: `bench/llmc_awq.py` runs in llm-compressor's own virtualenv, where
awqforge is not installed, and must window and score text with exactly the same code as our side.
Texts are the English licences every Debian machine has; tokenisation happens in the caller (transformers is in
both virtualenvs), this module only slices token ids and scores them.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

LICENSES = Path("/usr/share/common-licenses")
# Calibration and evaluation texts share no file: GPL-3 calibrates, the others evaluate.
CALIB_FILES = ("GPL-3",)
EVAL_FILES = ("GFDL-1.3", "MPL-2.0", "GPL-2", "LGPL-2.1", "Apache-2.0", "Artistic", "MPL-1.1", "GPL-1")


def read_texts(names: tuple[str, ...] | list[str], root: Path = LICENSES) -> str:
    """The named files of `root`, joined by a blank line."""
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"missing text files under {root}: {missing}")
    return "\n\n".join((root / n).read_text(encoding="utf-8").strip() for n in names)


def calibration_samples(
    ids: list[int] | torch.Tensor, n_samples: int, max_seq_len: int = 512
) -> torch.Tensor:
    """`n_samples` contiguous, non-overlapping slices of `ids`, as long as the text allows (at most max_seq_len).

    A short text gives shorter samples rather than repeated ones: GPL-3 is ~7.7k SmolLM2 tokens, so 32 samples
    are ~239 tokens each.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    seq_len = min(max_seq_len, ids.numel() // n_samples)
    if seq_len < 16:
        raise ValueError(f"{ids.numel()} tokens are too few for {n_samples} calibration samples")
    return ids[: n_samples * seq_len].view(n_samples, seq_len).clone()


def eval_windows(
    ids: list[int] | torch.Tensor,
    seq_len: int = 1024,
    max_windows: int | None = 20,
    prefix: list[int] | tuple = (),
) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len]: `prefix` (the tokenizer's BOS, if it adds one) + the next
    seq_len - len(prefix) text tokens; the tail shorter than a window is dropped. Same cut as
    awqforge.evaluate.eval_windows, on token ids instead of a tokenizer."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    body = seq_len - len(prefix)
    n = ids.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens do not fill one window of {seq_len}")
    windows = ids[: n * body].view(n, body)
    if prefix:
        windows = torch.cat([torch.tensor(list(prefix), dtype=torch.long).expand(n, -1), windows], dim=1)
    return windows.clone()


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, n_prefix: int = 0, batch_size: int = 1) -> dict:
    """exp(mean next-token NLL) over every predicted token of every window (those after the prefix).

    Each window is scored on its own (no context carried over), as in the AWQ paper and in
    awqforge.evaluate.perplexity, whose loss this reproduces.
    """
    model.eval()
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    first = max(n_prefix, 1)
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, first - 1 : -1].float()
        target = batch[:, first:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss in window {start}")
        nll += loss.item()
        count += target.numel()
    return {"perplexity": math.exp(nll / count), "n_tokens": count, "n_windows": int(windows.shape[0])}


def gap_closed(fp: float, rtn: float, quant: float) -> float:
    """Share of RTN's perplexity gap to FP that `quant` closes (1.0 = back to FP, negative = worse than RTN)."""
    gap = rtn - fp
    return float("nan") if gap <= 0 else (rtn - quant) / gap


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op threads so both sides of a speed comparison use the same number."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


class Timer:
    """`with Timer() as t: ...` then `t.s` holds the wall seconds."""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self._t0


def emit_json(obj: dict) -> None:
    """One JSON line on stdout, prefixed so a parent process can find it among library logging."""
    sys.stdout.write("BENCH_JSON " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse_emitted(stdout: str) -> dict:
    """The last `emit_json` object in a child's stdout."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])
    raise ValueError("no BENCH_JSON line in the child's output")


# Realistic block shapes of the families the speed and screen benchmarks build as random models (the blocks of
# real small checkpoints; a small vocabulary unless the script sets one): tests/tiny_models.tiny_config's
# family defaults with these fields over them. "tiny" keeps the test models' width (hidden 128).
SHAPES: dict[str, dict] = {
    "tiny": {},
    # Gemma-3-270M's block: hidden 640, head_dim 256, one KV head, sliding and full layers
    "gemma3-640": dict(hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1,
                       head_dim=256, query_pre_attn_scalar=256, sliding_window=32),
    # Gemma-3-1B's
    "gemma3-1152": dict(hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=256, query_pre_attn_scalar=256, sliding_window=32),
    # Gemma-2-2B's
    "gemma2-2304": dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, query_pre_attn_scalar=256, sliding_window=32),
    # Qwen2.5-0.5B's: 14 heads over 2 KV heads, biases on q/k/v
    "qwen2-896": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                      head_dim=64),
    # Qwen3-0.6B's: head_dim 128, q/k norms
    "qwen3-1024": dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128),
    # a Mistral block at SmolLM2-360M's width (hidden 960, 15 heads over 5 KV heads)
    "mistral-960": dict(hidden_size=960, intermediate_size=2560, num_attention_heads=15, num_key_value_heads=5,
                        head_dim=64, sliding_window=4096),
    # Phi-3's fused qkv and gate_up, multi-head attention, at hidden 1024
    "phi3-1024": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                      head_dim=64),
    # MoE blocks at hidden 768: 16 routed experts, top 4 (Qwen2-MoE with its shared expert)
    "qwen3_moe-768": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4,
                          head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=384),
    "qwen2_moe-768": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4,
                          head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=384,
                          shared_expert_intermediate_size=1536),
    # DeepSeek-V3's MLA and routing (block 0 dense, then MoE with one shared expert) at hidden 768
    "deepseek_v3-768": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12,
                            head_dim=32, q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32,
                            qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=16, num_experts_per_tok=4,
                            moe_intermediate_size=384, n_shared_experts=1, first_k_dense_replace=1),
    # Llama-4's interleaved MoE (top 1, a shared expert) at hidden 768
    "llama4_text-768": dict(hidden_size=768, intermediate_size=768, intermediate_size_mlp=2048,
                            num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_local_experts=16,
                            num_experts_per_tok=1, attention_chunk_size=8192),
}  # fmt: skip


def parse_variant(text: str) -> dict:
    """'search_screen=0,search_fraction=1' -> BlockSettings overrides, typed as the dataclass's defaults;
    'default' -> none (the engine's own settings)."""
    from awqforge.awq import BlockSettings

    if text == "default":
        return {}
    defaults = BlockSettings()
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        kind = type(getattr(defaults, name))
        out[name] = value.lower() in ("1", "true", "on") if kind is bool else kind(value)
    return out
