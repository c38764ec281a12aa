"""Perplexity on a text in non-overlapping windows, as in the AWQ paper (seq_len 2048 by default).

Each window is the tokenizer's usual prefix (BOS for tokenizers that add one, nothing otherwise) followed by
the next `seq_len - len(prefix)` tokens of the text; the loss is the mean negative log-likelihood of every
predicted token over all windows. One scoring function serves an in-memory model (`perplexity`: the quantized
one from `load_quantized`) and a checkpoint streamed block by block from its shards (`streamed_perplexity`:
the FP model, whatever its size), so the numbers are comparable. Both take `progress(done, total)`, called
after each forward step (a block of the streamed model, a window of the in-memory one), for bars and ETAs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def windows_used(ev, tokenizer) -> int | None:
    """How many windows a job with this `EvalSpec` scores: max_seqs, or fewer when its text holds less (all
    of them with max_seqs null). None where reading the text would mean downloading it (hf:, pileval)."""
    from awqforge.calibration import read_text

    text = ev.text
    if text is not None and str(text).startswith(("hf:", "pileval")):
        return None
    return eval_windows(tokenizer, read_text(text), ev.seq_len, ev.max_seqs).shape[0]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 2048,
    max_seqs: int | None = None,
    *,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """{'perplexity', 'n_tokens' (predicted tokens), 'n_windows', 'seq_len'} of an in-memory `model` on `text`."""
    windows = eval_windows(tokenizer, text, seq_len, max_seqs)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")

    def logits(start: int, stop: int) -> torch.Tensor:
        return model(input_ids=windows[start:stop].to(device), use_cache=False).logits

    return _score(logits, windows, _prefix_len(tokenizer), batch_size, progress)


@torch.no_grad()
def streamed_perplexity(
    stream,
    tokenizer,
    text: str,
    seq_len: int = 2048,
    max_seqs: int | None = None,
    *,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """perplexity() of a checkpoint run block by block from its shards (a fresh `StreamingModel`): the FP model
    is scored without ever being in memory whole. Progress counts the blocks (the head's share is small)."""
    windows = eval_windows(tokenizer, text, seq_len, max_seqs)
    stream.load_non_block(with_output_embedding=True)
    last_hidden = stream.forward_blocks(windows, batch_size=batch_size, progress=progress)

    def logits(start: int, stop: int) -> torch.Tensor:
        return stream.head_logits(windows[start:stop], last_hidden[start:stop])

    return _score(logits, windows, _prefix_len(tokenizer), batch_size)


def _prefix_len(tokenizer) -> int:
    return len(tokenizer("", add_special_tokens=True)["input_ids"])


def _score(logits_of, windows: torch.Tensor, n_prefix: int, batch_size: int, progress=None) -> dict:
    """Mean NLL of every token after the prefix, from logits_of(start, stop) over batches of windows."""
    first = max(n_prefix, 1)
    total_nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = logits_of(start, start + len(batch))
        pred = logits[:, first - 1 : -1].float()  # the logits one step before each predicted token
        target = batch[:, first:].to(pred.device)
        nll = nn.functional.cross_entropy(
            pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        count += target.numel()
        if progress is not None:
            progress(start + len(batch), len(windows))
    return {
        "perplexity": math.exp(total_nll / count),
        "n_tokens": count,
        "n_windows": len(windows),
        "seq_len": windows.shape[1],
    }


# Per window, the quantized model on QuantLinear's pure-torch reference path against the FP model streamed
# block by block: measured 1.8x for SmolLM2-135M W3 on a 2-core CPU (issue 19: 262 s vs 145 s for 10
# windows of 2048). Only the ETA's first guess: it is replaced by the pass's own rate after its first window.
REFERENCE_SLOWDOWN = 1.8


def quantized_path(bits: int, device: str | torch.device) -> tuple[str, bool]:
    """The path QuantLinear's forward takes for `bits`-bit weights on `device` (awqforge/qlinear.py), in words,
    and whether it is the pure-torch reference (dequantize the whole weight at every call)."""
    from awqforge.qlinear import kernels_enabled

    device = torch.device(device)
    if bits == 4 and kernels_enabled():
        if device.type == "cuda":
            return "the Triton W4A16 kernel", False
        if device.type == "cpu":
            from awqforge.kernels import cpu

            if cpu.is_available():
                return "the C++ CPU INT4 kernel", False
    why = f"no {bits}-bit kernel" if bits != 4 else "the INT4 kernel is not available here"
    return f"the pure-torch reference path ({why}: each weight dequantized at every call)", True


class PassTimer:
    """ETA of an evaluation made of passes that cost differently per window (the FP pass streamed block by
    block, the quantized pass window by window): each pass is timed on its own, and a pass not started yet
    is estimated from the FP pass's rate per window times its `slowdown`."""

    def __init__(self, n_windows: int, passes: dict[str, tuple[int, float]]):
        # passes: name -> (steps in the pass, expected cost per window relative to the first pass)
        self.n_windows = n_windows
        self.passes = passes
        self.done: dict[str, int] = dict.fromkeys(passes, 0)
        self.started: dict[str, float] = {}
        self.elapsed: dict[str, float] = dict.fromkeys(passes, 0.0)

    def start(self, name: str) -> None:
        import time

        self.started[name] = time.perf_counter()

    def step(self, name: str, done: int) -> None:
        import time

        self.done[name] = done
        self.elapsed[name] = time.perf_counter() - self.started[name]

    def per_window(self, name: str) -> float | None:
        """Measured seconds per window of a pass, None before its first step."""
        steps, _ = self.passes[name]
        d = self.done[name]
        return self.elapsed[name] / d * steps / self.n_windows if d else None

    def eta_s(self) -> float | None:
        first = next(iter(self.passes))
        base = self.per_window(first)
        if base is None:
            return None
        base /= self.passes[first][1]
        left = 0.0
        for name, (steps, slowdown) in self.passes.items():
            rate = self.per_window(name)
            frac_left = 1 - self.done[name] / steps
            left += (rate if rate is not None else base * slowdown) * self.n_windows * frac_left
        return left

    def windows_done(self) -> float:
        """Work done in windows (each pass counts n_windows), for a bar over all passes."""
        return sum(self.done[n] / steps * self.n_windows for n, (steps, _) in self.passes.items())


def load_fp_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """The full-precision model from a safetensors checkpoint folder (never remote code)."""
    from transformers import AutoConfig

    from awqforge.multimodal import auto_model_class
    from awqforge.resolve import safetensors_files

    safetensors_files(Path(path))  # refuses pickle-only folders before transformers would load them
    device = torch.device(device)
    if dtype is None:
        from awqforge.streaming import checkpoint_dtype, compute_dtype

        dtype = compute_dtype(checkpoint_dtype(Path(path)), device)
    auto = auto_model_class(AutoConfig.from_pretrained(str(path), trust_remote_code=False))
    model = auto.from_pretrained(str(path), dtype=dtype, trust_remote_code=False, use_safetensors=True)
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
    progress: Callable[[int, int, str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Perplexity of a folder or hub id: a quantized artifact (load_quantized) or an FP checkpoint.
    `progress(done, total, unit)` after each forward step (a window of a quantized model, a block of a streamed
    FP one); `log` gets the kernel path of a quantized model and, on the reference path, what it costs."""
    from transformers import AutoTokenizer

    from awqforge.resolve import resolve_model
    from awqforge.streaming import pick_device

    device = pick_device(device)
    resolved = resolve_model(str(path), revision)
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), trust_remote_code=False)
    quantized = is_quantized_checkpoint(resolved.path)
    if quantized:
        import time

        from awqforge.loading import load_quantized
        from awqforge.qlinear import QuantLinear

        model = load_quantized(resolved.path, device=device)
        bits = next((m.bits for m in model.modules() if isinstance(m, QuantLinear)), 4)
        kernel, reference = quantized_path(bits, device)
        if log is not None:
            log(
                f"quantized model ({bits}-bit) on {device.type}: {kernel}"
                + ("; several times slower per window than a 4-bit kernel" if reference else "")
            )
        t0 = time.perf_counter()
        result = perplexity(
            model,
            tokenizer,
            text,
            seq_len=seq_len,
            max_seqs=max_seqs,
            progress=None if progress is None else (lambda d, t: progress(d, t, "window")),
        )
        per_window = (time.perf_counter() - t0) / result["n_windows"]
        result.update(kernel=kernel, reference_path=reference, s_per_window=round(per_window, 3))
        if log is not None and reference:
            log(f"the reference path cost {per_window:.1f} s per window of {seq_len} tokens")
    else:  # an FP checkpoint of any size: streamed block by block
        from awqforge.arch import get_adapter
        from awqforge.streaming import StreamingModel

        stream = StreamingModel.from_resolved(resolved, get_adapter(resolved.config), device=device)
        result = streamed_perplexity(
            stream,
            tokenizer,
            text,
            seq_len=seq_len,
            max_seqs=max_seqs,
            progress=None if progress is None else (lambda d, t: progress(d, t, "block")),
        )
    result.update(model=str(path), quantized=quantized)
    return result
