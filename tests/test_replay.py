"""Layer kwargs with one entry per sample, replayed for any chunk of calibration rows (awqforge.awq.capture).

The capture records each layer's kwargs on one sample; what has one entry per sample is found by recording
them on two samples. Bloom's ALiBi folds the heads into the batch ([batch * heads, 1, seq]) and is the same
for every sample: repeated. DeepSeek-V4's `input_ids` (hash routing) and Gemma 4's per-layer inputs (a per-token
input that differs per layer and per sample) differ between samples: recorded for every row and sliced.
DeepSeek-V4 joins per-sample tensors to the attention mask, which is then repeated to the chunk's rows."""

from __future__ import annotations

import pytest
import torch
from tiny_families import _ids, build_family_model

from awqforge.arch import get_adapter
from awqforge.awq import PerSample, capture_layer_inputs, for_rows
from awqforge.awq.search import main_output

pytestmark = pytest.mark.usefixtures("one_thread")

# model type -> (kwarg, its fold: entries per sample or the config field that gives it, recorded for every row)
PER_SAMPLE = {
    "bloom": ("alibi", "n_head", False),  # the heads folded into the batch
    "deepseek_v4": ("input_ids", 1, True),
    "gemma4_text": ("per_layer_input", 1, True),
}


def _layer_outputs(model, layers, ids) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, o: outs.append(main_output(o))) for layer in layers]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("model_type", sorted(PER_SAMPLE))
def test_blocks_replayed_in_chunks_of_rows_give_the_models_own_layer_outputs(model_type):
    key, fold, every_row = PER_SAMPLE[model_type]
    model = build_family_model(model_type)
    fold = getattr(model.config, fold) if isinstance(fold, str) else fold
    layers = get_adapter(model.config).get_layers(model)
    ids = _ids(4, 32, 0)
    want = _layer_outputs(model, layers, ids)
    captured = capture_layer_inputs(model, layers, ids)
    recorded = captured.layer_kwargs[0][key]
    assert isinstance(recorded, PerSample) and (recorded.fold, recorded.every_row) == (fold, every_row)
    assert recorded.tensor.shape[0] == (4 if every_row else 1) * fold
    x = captured.inputs
    with torch.no_grad():
        for i, block in enumerate(layers):
            chunks = [slice(0, 1), slice(1, 4)]  # chunks of different sizes, one not starting at row 0
            x = torch.cat(
                [main_output(block(x[sl], **for_rows(captured.layer_kwargs[i], sl))) for sl in chunks]
            )
            torch.testing.assert_close(x, want[i], rtol=1e-4, atol=1e-5)


def test_kwargs_the_same_for_every_sample_stay_as_recorded():
    """Rotary tables and position ids ([1, ...] for any batch) are kept as one sample's, not wrapped."""
    model = build_family_model("llama")
    layers = get_adapter(model.config).get_layers(model)
    kw = capture_layer_inputs(model, layers, _ids(3, 16, 0)).layer_kwargs[0]
    assert isinstance(kw["position_ids"], torch.Tensor) and kw["position_ids"].shape[0] == 1
    assert all(isinstance(t, torch.Tensor) for t in kw["position_embeddings"])


def test_one_row_repeated_or_sliced():
    t = torch.arange(6.0).reshape(2, 3)  # one sample, 2 entries (heads) per sample
    assert torch.equal(PerSample(t, 2, False).rows(slice(3, 5)), torch.cat([t, t]))
    rows = torch.arange(8.0).reshape(4, 2)  # every row, one entry per sample
    assert torch.equal(PerSample(rows, 1, True).rows(slice(1, 3)), rows[1:3])
    nested = {"a": (PerSample(rows, 1, True), None), "b": 1}
    assert (
        torch.equal(for_rows(nested, slice(2, 4))["a"][0], rows[2:4])
        and for_rows(nested, slice(0, 1))["b"] == 1
    )
