"""This machine's rate for the plan's time estimate: one decoder block of the model, timed.

`awqforge.plan` counts the FLOPs of a job per stage and divides by a rate. The default rate
(plan.DEVICE_FLOPS) is one number per device kind and can be an order of magnitude off; `measure_rate`
builds one block of the model's own shape (random weights, from its config; a small vocabulary, which
no block reads), runs the calibration forward and `quantize_block` with the job's settings on random
tokens of the job's calibration size, and returns plan.block_flops / the measured seconds: the rate the
plan then uses (`plan(..., flops_rate=...)`, `awqforge plan --measure`). One block costs 1/n_layers of
the quantize stage, so the measurement is short next to the job.

The timed block rescores exactly plan.RESCORED module-scored candidates on the rest of the samples, the
work the plan counts, instead of racing them: on random weights and tokens the candidates' losses are close
and the race keeps more of them than on a trained model (SmolLM2's block: 14.1 s raced against 8.4 s with
two, where the real model's blocks take 8.6 s on average; bench/README.md, issue 21, stop 5).
`measure_forward_rate` times the same one-block model and the output head on an evaluation window: the rate of
the stages that only run the model (plan(..., forward_rate=...)).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch

from awqforge.plan import RESCORED, JobSettings, block_flops, forward_flops


def _one_block_config(config: dict[str, Any]):
    from transformers import AutoConfig

    cfg = copy.deepcopy(config)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    n = text.get("num_hidden_layers", 1)
    text["num_hidden_layers"] = 1
    for key in ("layer_types", "no_rope_layers"):
        if isinstance(text.get(key), list) and len(text[key]) == n:
            text[key] = text[key][:1]
    for key in ("mlp_only_layers", "moe_layers"):
        if isinstance(text.get(key), list):
            text[key] = [i for i in text[key] if i < 1]
    text["vocab_size"] = min(int(text.get("vocab_size") or 1024), 1024)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(text.get(key), int) and text[key] >= text["vocab_size"]:
            text[key] = 0
    text.pop("quantization_config", None)
    built = AutoConfig.for_model(**text)
    return built.get_text_config() if hasattr(built, "get_text_config") else built


def _one_block_model(config: dict[str, Any], device: str):
    from transformers import AutoModelForCausalLM

    cfg = _one_block_config(config)
    torch.manual_seed(0)
    return cfg, AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device).eval()


@torch.no_grad()
def measure_block_seconds(config: dict[str, Any], settings: JobSettings, device: str = "cpu") -> float:
    """Seconds `quantize_block` takes on one block of this model's shape with these settings (plan.RESCORED
    candidates rescored on the rest of the samples, as the plan counts)."""
    from awqforge.arch import get_adapter
    from awqforge.awq import BlockSettings, capture_layer_inputs, quantize_block

    cfg, model = _one_block_model(config, device)
    adapter = get_adapter(model.config)
    layers = adapter.get_layers(model)
    ids = torch.randint(3, cfg.vocab_size, (settings.n_samples, settings.seq_len))
    captured = capture_layer_inputs(model, layers, ids.to(device))
    # the fields the plan's settings share with a block's (both derive from JobSpec); the rest keep their defaults
    shared = {f.name for f in dataclasses.fields(BlockSettings)} & {
        f.name for f in dataclasses.fields(settings)
    }
    s = BlockSettings(
        **{name: getattr(settings, name) for name in shared},
        race=False,
        rescore_z=0.0,
        search_topk=RESCORED,
    )
    t0 = time.perf_counter()
    quantize_block(layers[0], captured.inputs, captured.layer_kwargs[0], settings=s, adapter=adapter)
    return time.perf_counter() - t0


def measure_rate(config: dict[str, Any], settings: JobSettings, device: str = "cpu") -> tuple[float, float]:
    """(FLOP/s for plan(..., flops_rate=...), the measured seconds of one block)."""
    secs = measure_block_seconds(config, settings, device)
    return block_flops(config, settings) / max(secs, 1e-6), secs


@torch.no_grad()
def measure_forward_rate(
    config: dict[str, Any], settings: JobSettings, device: str = "cpu", repeats: int = 2
) -> tuple[float, float]:
    """(FLOP/s for plan(..., forward_rate=...), the estimated seconds of the whole model's forward on one
    evaluation window of eval.seq_len tokens).

    Timed, after one untimed run each: the one-block model's body (embedding, the block, the final norm)
    and the output head's matmul on a slice of the vocabulary, scaled to the whole vocabulary (on a small
    model the head is most of the work, and a large matmul runs nearer the machine's peak than a block).
    The window's seconds are n_layers bodies plus the head; the rate is plan.forward_flops of the whole
    model over those seconds, so the plan's forward stages come out at this mix of work."""
    from awqforge.plan import ModelShape

    cfg, model = _one_block_model(config, device)
    shape = ModelShape.from_config(config)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    ids = torch.randint(3, cfg.vocab_size, (1, settings.eval_seq_len), device=device)

    def timed(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    body_s = timed(lambda: body(ids))
    cols = min(shape.vocab, HEAD_SLICE)
    h = torch.randn(settings.eval_seq_len, shape.hidden, device=device)
    w = torch.randn(cols, shape.hidden, device=device) / shape.hidden**0.5
    head_s = timed(lambda: torch.nn.functional.linear(h, w)) * shape.vocab / cols
    window_s = shape.n_layers * body_s + head_s
    return forward_flops(shape.total_params, settings.eval_seq_len) / max(window_s, 1e-9), window_s


HEAD_SLICE = 8192  # vocabulary columns of the head's timed matmul (scaled to the whole vocabulary)


def settings_as_run(spec, tokenizer) -> tuple[JobSettings, list[str]]:
    """The plan's settings for this job counted as it will run: the calibration rows and evaluation windows
    its local sources hold when they hold fewer than asked (the job uses what there is), and one line per
    such change. Sources that would have to be downloaded are counted as asked."""
    from awqforge.calibration import samples_used
    from awqforge.evaluate import windows_used

    settings, notes = JobSettings.from_spec(spec), []
    used = samples_used(spec.calibration, tokenizer)
    if used is not None and used < settings.n_samples:
        notes.append(
            f"calibration: {spec.calibration.source} holds {used} samples of {settings.seq_len} tokens "
            f"({settings.n_samples} asked); the plan counts the {used} the job will use"
        )
        settings = dataclasses.replace(settings, n_samples=used)
    windows = windows_used(spec.eval, tokenizer) if settings.eval_enabled else None
    if windows is not None and (settings.eval_max_seqs is None or windows < settings.eval_max_seqs):
        notes.append(
            f"evaluation: the text holds {windows} windows of {settings.eval_seq_len} tokens "
            f"({settings.eval_max_seqs or 'all'} asked); the plan counts the {windows} the job will score"
        )
        settings = dataclasses.replace(settings, eval_max_seqs=windows)
    return settings, notes
