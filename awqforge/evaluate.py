"""Perplexity on a text in non-overlapping windows, as in the AWQ paper (seq_len 2048 by default).

Each window is the tokenizer's usual prefix (BOS for tokenizers that add one, nothing otherwise) followed by
the next `seq_len - len(prefix)` tokens of the text; the loss is the mean negative log-likelihood of every
predicted token over all windows. The same function scores the FP model and the quantized one (loaded with
`load_quantized`), so the two numbers are comparable.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from awqforge.errors import InputError


def eval_windows(tokenizer, text: str, seq_len: int = 2048, max_seqs: int | None = None) -> torch.Tensor:
    """Token windows [n_windows, seq_len] cut from the text without overlap."""
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    body = seq_len - len(prefix)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // body
    if max_seqs is not None:
        n = min(n, max_seqs)
    if n == 0:
        raise InputError(f"evaluation text too short: {len(ids)} tokens, one window needs {body}")
    windows = [prefix + ids[i * body : (i + 1) * body] for i in range(n)]
    return torch.tensor(windows, dtype=torch.long)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 2048,
    max_seqs: int | None = None,
    *,
    batch_size: int = 1,
) -> dict:
    """{'perplexity', 'n_tokens' (predicted tokens), 'n_windows', 'seq_len'} of `model` on `text`."""
    windows = eval_windows(tokenizer, text, seq_len, max_seqs)
    n_prefix = len(tokenizer("", add_special_tokens=True)["input_ids"])
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    total_nll = 0.0
    count = 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # Predict every token after the prefix: positions n_prefix.. from the logits one step earlier.
        first = max(n_prefix, 1)
        pred = logits[:, first - 1 : -1].float()
        target = batch[:, first:]
        nll = nn.functional.cross_entropy(
            pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        count += target.numel()
    ppl = math.exp(total_nll / count)
    return {"perplexity": ppl, "n_tokens": count, "n_windows": len(windows), "seq_len": seq_len}


def load_fp_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """The full-precision model from a safetensors checkpoint folder (never remote code)."""
    from transformers import AutoModelForCausalLM

    from awqforge.resolve import safetensors_files

    safetensors_files(Path(path))  # refuses pickle-only folders before transformers would load them
    device = torch.device(device)
    if dtype is None:
        from awqforge.streaming import checkpoint_dtype, compute_dtype

        dtype = compute_dtype(checkpoint_dtype(Path(path)), device)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=False, use_safetensors=True
    )
    return model.to(device).eval()


def is_quantized_checkpoint(path: str | Path) -> bool:
    import json

    config = Path(path) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("quantization_config"))


def evaluate_path(
    path: str | Path,
    text: str,
    *,
    seq_len: int = 2048,
    max_seqs: int | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> dict:
    """Perplexity of a folder or hub id: a quantized artifact (load_quantized) or an FP checkpoint."""
    from transformers import AutoTokenizer

    from awqforge.resolve import resolve_model
    from awqforge.streaming import pick_device

    device = pick_device(device)
    resolved = resolve_model(str(path), revision)
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), trust_remote_code=False)
    quantized = is_quantized_checkpoint(resolved.path)
    if quantized:
        from awqforge.loading import load_quantized

        model = load_quantized(resolved.path, device=device)
    else:
        model = load_fp_model(resolved.path, device=device)
    result = perplexity(model, tokenizer, text, seq_len=seq_len, max_seqs=max_seqs)
    result.update(model=str(path), quantized=quantized)
    return result
