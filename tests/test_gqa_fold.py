"""The v -> o scale under grouped-query attention: one scale per KV channel, repeated over the query heads of
its group as o_proj's input scale (awqforge.arch.GQALayout), searched on the group's activations."""

from __future__ import annotations

import pytest
import torch
from test_awq import quantize_model
from tiny_models import FALLBACK_FAMILIES, FAMILIES, build_tiny_model, tiny_input_ids

from awqforge.arch import GQALayout, get_adapter
from awqforge.awq import BlockSettings, fold_scales

pytestmark = pytest.mark.usefixtures("one_thread")


def _gqa_families() -> list[str]:
    out = []
    for fam in FAMILIES + FALLBACK_FAMILIES:
        cfg = build_tiny_model(fam).config.get_text_config()
        kv = getattr(cfg, "num_key_value_heads", None)
        if kv and kv < cfg.num_attention_heads:
            out.append(fam)
    return out


GQA_FAMILIES = _gqa_families()


def _vo(adapter, block):
    return [m for m in adapter.mappings(block) if m.gqa is not None or m.linear_names[0].endswith("o_proj")]


def test_layout_repeats_each_kv_channel_over_its_query_heads():
    lay = GQALayout(kv_heads=2, n_rep=3, head_dim=4)
    s = torch.arange(8.0)
    e = lay.expand(s)
    assert e.shape == (24,)
    # query head h reads KV head h // n_rep (transformers' repeat_kv)
    for h in range(6):
        torch.testing.assert_close(e[h * 4 : h * 4 + 4], s[(h // 3) * 4 : (h // 3) * 4 + 4])
    torch.testing.assert_close(lay.reduce(e), s)


def test_the_tiny_models_cover_gqa_families():
    assert {"llama", "qwen2", "gemma2", "gemma3_text", "phi3", "mixtral", "llama4_text"} <= set(GQA_FAMILIES)


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_gqa_fold_applies_and_is_exact_in_fp(family):
    model = build_tiny_model(family)
    ids = tiny_input_ids(2, 24)
    with torch.no_grad():
        ref = model(ids).logits
    adapter = get_adapter(model.config)
    gen = torch.Generator().manual_seed(0)
    folded = 0
    for block in adapter.get_layers(model):
        for m in adapter.mappings(block):
            if m.skip_reason or m.gqa is None:
                continue
            n_prev = m.gqa.kv_heads * m.gqa.head_dim
            assert m.linears[0].in_features == n_prev * m.gqa.n_rep
            s = torch.exp(0.7 * torch.randn(n_prev, generator=gen))
            fold_scales(block, m, s)
            folded += 1
    assert folded == len(adapter.get_layers(model))  # one v -> o per block, none skipped
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_a_wrong_head_mapping_would_not_be_exact():
    """The test above can fail: repeating the scales in the other order (head h -> KV head h % kv) changes
    the function."""
    model = build_tiny_model("llama")
    ids = tiny_input_ids(2, 24)
    with torch.no_grad():
        ref = model(ids).logits
    adapter = get_adapter(model.config)
    block = adapter.get_layers(model)[0]
    m = next(m for m in adapter.mappings(block) if m.gqa is not None)
    lay = m.gqa
    m.gqa = GQALayout(lay.n_rep, lay.kv_heads, lay.head_dim) if lay.n_rep != lay.kv_heads else None
    s = torch.exp(torch.randn(lay.kv_heads * lay.head_dim, generator=torch.Generator().manual_seed(1)))
    if m.gqa is None:  # kv_heads == n_rep: interleave by hand
        wrong = s.reshape(lay.kv_heads, 1, lay.head_dim).expand(-1, lay.n_rep, -1).transpose(0, 1).reshape(-1)
        m.gqa = type("Wrong", (), {"expand": staticmethod(lambda _s: wrong)})()
    with torch.no_grad():
        block.self_attn.v_proj.weight.div_(s[:, None])
        block.self_attn.o_proj.weight.mul_(m.gqa.expand(s)[None, :])
        out = model(ids).logits
    assert not torch.allclose(out, ref, rtol=1e-3, atol=1e-3)


def _outlier_kv_channels(model):
    """A few KV channels 12x larger, o_proj's matching columns (every query head of the group) 12x smaller: the
    FP function is unchanged and o_proj's inputs get the outlier channels trained models have (a random tiny
    model's attention output has none, and a scale has nothing to find there)."""
    adapter = get_adapter(model.config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in adapter.get_layers(model):
            m = next(m for m in adapter.mappings(block) if m.gqa is not None)
            n = m.gqa.kv_heads * m.gqa.head_dim
            f = torch.ones(n)
            f[torch.randperm(n, generator=gen)[: max(2, n // 16)]] = 12.0
            m.prev.weight[m.prev_rows or slice(None)] *= f[:, None]
            m.linears[0].weight /= m.gqa.expand(f)[None, :]
    return model


def _logits_mse(family, ids, settings):
    ref_model = _outlier_kv_channels(build_tiny_model(family))
    with torch.no_grad():
        ref = ref_model(ids).logits
    model = _outlier_kv_channels(build_tiny_model(family))
    results = quantize_model(model, ids, settings)
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref).pow(2).mean()), results


@pytest.mark.parametrize(
    "family", ["llama", "qwen2", "gemma2", "gemma3_text", "phi3", "mixtral", "llama4_text"]
)
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_quantized_error_with_the_fold_is_lower(family, rounding):
    ids = tiny_input_ids(8, 32)
    kw = dict(bits=3, group_size=32, rounding=rounding)
    on_mse, on = _logits_mse(family, ids, BlockSettings(gqa_fold=True, **kw))
    off_mse, off = _logits_mse(family, ids, BlockSettings(gqa_fold=False, **kw))
    assert any("gqa_fold=False" in s for s in off[0].skipped)
    mappings_skipped = [s for s in on[0].skipped if "rounded to nearest, not GPTQ" not in s]
    assert not any("v_proj" in s or "qkv_proj" in s for s in mappings_skipped)
    for res in on:
        info = next(v for v in res.scales.values() if v["gqa"] is not None)
        assert info["loss"] <= info["loss_identity"]  # the search's pick is at least as good as no scale
    # o_proj's own output error (exact, on its calibration inputs) and the model's logits error
    o_on = sum(lm.mse_quant for r in on for lm in r.layers if lm.name.endswith("o_proj"))
    o_off = sum(lm.mse_quant for r in off for lm in r.layers if lm.name.endswith("o_proj"))
    assert o_on < o_off
    assert on_mse < off_mse


def test_outlier_channels_keep_the_fp_function():
    ids = tiny_input_ids(2, 24)
    with torch.no_grad():
        ref = build_tiny_model("llama")(ids).logits
        out = _outlier_kv_channels(build_tiny_model("llama"))(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_gqa_fold_is_reported_in_the_scales():
    results = quantize_model(
        build_tiny_model("qwen2"), tiny_input_ids(4, 16), BlockSettings(bits=4, group_size=32, gqa_fold=True)
    )
    info = next(v for v in results[0].scales.values() if v["prev"] == "self_attn.v_proj")
    assert info["gqa"] == [2, 2, 32]
    assert info["scales"].shape == (64,)  # one per KV channel
