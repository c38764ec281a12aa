"""The AWQ block algorithm on tiny models of every family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, build_tiny_model, tiny_input_ids

from awqforge.arch import get_adapter
from awqforge.awq import BlockSettings, NumericalError, capture_block_inputs, quantize_block
from awqforge.quant import fake_quantize


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread; OpenMP workers spinning on a shared machine cost far more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def quantize_model(model, ids, settings):
    """Capture every block's FP inputs, then quantize the blocks in order; returns the BlockResults."""
    adapter = get_adapter(model.config)
    captured = capture_block_inputs(model, ids)
    # the light capture (blocks bypassed) gives the same block-0 inputs and every block's kwargs
    light = capture_block_inputs(model, ids, run_layers=False)
    torch.testing.assert_close(light[0][0], captured[0][0])
    assert [kw.keys() for _, kw in light] == [kw.keys() for _, kw in captured]
    results = []
    for i, block in enumerate(adapter.get_layers(model)):
        res = quantize_block(
            block,
            captured[i][0],
            light[i][1],  # as a streaming pipeline would: only the kwargs of the light capture
            settings=settings,
            adapter=adapter,
            block_index=i,
            block_prefix=f"{adapter.layers_attr}.{i}",
        )
        if i + 1 < len(captured):
            # the FP block output is the next block's FP input
            torch.testing.assert_close(res.outputs, captured[i + 1][0], rtol=1e-4, atol=1e-5)
        results.append(res)
    return results


def logits_mse(family, ids, settings, **overrides):
    ref_model = build_tiny_model(family, **overrides)
    with torch.no_grad():
        ref = ref_model(ids).logits
    model = build_tiny_model(family, **overrides)
    results = quantize_model(model, ids, settings)
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref).pow(2).mean()), results


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_and_awq_beats_rtn_on_its_layers(family):
    ids = tiny_input_ids(8, 32)
    w3 = dict(bits=3, group_size=32)
    mse_rtn, _ = logits_mse(family, ids, BlockSettings(method="rtn", **w3))
    mse_awq, results = logits_mse(family, ids, BlockSettings(method="awq", **w3))
    assert mse_awq < mse_rtn
    for res in results:
        assert res.quantized and res.scales
        rtn = torch.tensor([lm.mse_rtn for lm in res.layers])
        ours = torch.tensor([lm.mse_quant for lm in res.layers])
        assert torch.isfinite(rtn).all() and torch.isfinite(ours).all()
        assert ours.sum() < rtn.sum()


def test_rtn_is_plain_round_to_nearest_and_codes_match_the_block():
    model = build_tiny_model("llama")
    originals = {
        n: m.weight.detach().clone()
        for n, m in model.model.layers[0].named_modules()
        if hasattr(m, "in_features")
    }
    results = quantize_model(model, tiny_input_ids(4, 16), BlockSettings(method="rtn", bits=4, group_size=64))
    block = model.model.layers[0]
    for name, qt in results[0].quantized.items():
        w = block.get_submodule(name).weight
        torch.testing.assert_close(qt.dequantize(), w.float())
        torch.testing.assert_close(w, fake_quantize(originals[name], 4, 64))
    assert all(lm.mse_rtn == lm.mse_quant for lm in results[0].layers)
    assert results[0].scales == {}


def test_gqa_skip_is_reported():
    results = quantize_model(
        build_tiny_model("qwen2"), tiny_input_ids(4, 16), BlockSettings(bits=4, group_size=32)
    )
    assert any("v_proj->self_attn.o_proj" in s and "grouped-query" in s for s in results[0].skipped)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_expert_without_tokens_gives_no_nan(family):
    model = build_tiny_model(family, num_experts_per_tok=1)
    adapter = get_adapter(model.config)
    v = torch.randn(128)
    with torch.no_grad():
        for block in adapter.get_layers(model):
            router = block.mlp.gate.weight
            router.zero_()
            router[0], router[1] = v, -v  # top-1 is always expert 0 or 1: experts 2 and 3 get nothing
    results = quantize_model(model, tiny_input_ids(4, 16), BlockSettings(bits=3, group_size=32))
    lay = adapter.experts
    for res in results:
        assert torch.isfinite(res.outputs).all()
        assert any(f"mlp.experts.2.{lay.up}->" in s and "0 calibration tokens" in s for s in res.skipped)
        assert f"mlp.experts.3.{lay.down}" in res.quantized
        for lm in res.layers:
            assert lm.mse_rtn == lm.mse_rtn and lm.mse_quant == lm.mse_quant  # not NaN
    with torch.no_grad():
        assert torch.isfinite(model(tiny_input_ids(2, 16)).logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_blocks(dtype):
    ids = tiny_input_ids(4, 32)
    ref_model = build_tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(ids).logits
    errs = {}
    for method in ("rtn", "awq"):
        model = build_tiny_model("llama", dtype=dtype)
        adapter = get_adapter(model.config)
        captured = capture_block_inputs(model, ids)
        x = captured[0][0]
        for i, block in enumerate(adapter.get_layers(model)):
            res = quantize_block(
                block,
                x,
                captured[i][1],
                settings=BlockSettings(method=method, bits=3, group_size=32),
                adapter=adapter,
                block_index=i,
            )
            assert res.outputs.dtype == dtype
            x = res.outputs
        assert model.model.layers[0].input_layernorm.weight.dtype == dtype
        with torch.no_grad():
            errs[method] = float((model(ids).logits.float() - ref).pow(2).mean())
    assert errs["awq"] < errs["rtn"]


@pytest.mark.parametrize("search", ["activation", "both"])
def test_scale_search_modes_symmetric_and_per_channel(search):
    s = BlockSettings(bits=4, group_size=-1, zero_point=False, scale_search=search, search_fraction=1.0)
    mse_awq, results = logits_mse("gemma2", tiny_input_ids(4, 32), s)
    mse_rtn, _ = logits_mse(
        "gemma2", tiny_input_ids(4, 32), BlockSettings(method="rtn", bits=4, group_size=-1, zero_point=False)
    )
    assert mse_awq < mse_rtn
    modes = {info["mode"] for res in results for info in res.scales.values()}
    assert modes <= ({"activation"} if search == "activation" else {"activation", "duo"})
    qt = next(iter(results[0].quantized.values()))
    assert qt.scales.shape[1] == 1 and (qt.zeros == 8).all()


def test_linear_output_loss_option():
    mse, results = logits_mse(
        "llama", tiny_input_ids(4, 32), BlockSettings(bits=3, group_size=32, module_loss=False)
    )
    mse_rtn, _ = logits_mse(
        "llama", tiny_input_ids(4, 32), BlockSettings(method="rtn", bits=3, group_size=32)
    )
    assert mse < mse_rtn


def test_skip_patterns_leave_layers_in_full_precision():
    model = build_tiny_model("llama")
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    results = quantize_model(
        model, tiny_input_ids(4, 16), BlockSettings(bits=4, group_size=32, skip_patterns=("*down_proj",))
    )
    assert "mlp.down_proj" not in results[0].quantized
    assert any("up_proj->mlp.down_proj" in s for s in results[0].skipped)
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, w)


def test_nan_input_names_block_and_layer():
    model = build_tiny_model("llama")
    adapter = get_adapter(model.config)
    captured = capture_block_inputs(model, tiny_input_ids(2, 16))
    x = captured[0][0].clone()
    x[0, 3, 5] = float("nan")
    with pytest.raises(NumericalError, match=r"block 0 \(model.layers.0\)"):
        quantize_block(
            model.model.layers[0],
            x,
            captured[0][1],
            settings=BlockSettings(),
            adapter=adapter,
            block_index=0,
            block_prefix="model.layers.0",
        )


def test_nan_weight_names_the_layer():
    model = build_tiny_model("llama")
    adapter = get_adapter(model.config)
    captured = capture_block_inputs(model, tiny_input_ids(2, 16))
    block = model.model.layers[1]
    with torch.no_grad():
        block.mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="block 1"):
        quantize_block(
            block, captured[1][0], captured[1][1], settings=BlockSettings(), adapter=adapter, block_index=1
        )


def test_capture_without_running_layers_gives_per_layer_kwargs():
    model = build_tiny_model("gemma2")
    ids = tiny_input_ids(3, 32)
    full = capture_block_inputs(model, ids, batch_size=2)
    light = capture_block_inputs(model, ids, run_layers=False)
    assert len(full) == len(light) == 2
    assert full[0][0].shape == (3, 32, 128)
    torch.testing.assert_close(light[0][0], full[0][0])
    assert light[1][0] is None
    masks = [kw["attention_mask"] for _, kw in full]
    assert not torch.equal(masks[0], masks[1])  # sliding-window layer vs full-attention layer
    for (_, a), (_, b) in zip(full, light, strict=True):
        assert a.keys() == b.keys()
        torch.testing.assert_close(a["attention_mask"], b["attention_mask"])


def test_two_stage_search_matches_exhaustive_search_closely():
    ids = tiny_input_ids(16, 16)
    fast, _ = logits_mse("llama", ids, BlockSettings(bits=3, group_size=32, search_fraction=0.25))
    full, _ = logits_mse("llama", ids, BlockSettings(bits=3, group_size=32, search_fraction=1.0))
    assert fast <= full * 1.1
