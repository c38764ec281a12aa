"""The AWQ block algorithm on tiny models of every family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, build_tiny_model, tiny_input_ids

from awqforge.arch import get_adapter
from awqforge.awq import (
    BlockSettings,
    NumericalError,
    PerSample,
    capture_layer_inputs,
    for_rows,
    quantize_block,
)
from awqforge.quant import fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def quantize_model(model, ids, settings):
    """Capture block 0's inputs and every layer's kwargs (the pipeline's capture), then quantize the blocks
    in order, each on the previous block's FP output; returns the BlockResults."""
    adapter = get_adapter(model.config)
    layers = adapter.get_layers(model)
    with torch.no_grad():
        ref_hidden = model(ids, output_hidden_states=True).hidden_states  # [i]: block i's FP input
    captured = capture_layer_inputs(model, layers, ids)
    torch.testing.assert_close(captured.inputs, ref_hidden[0])
    x, results = captured.inputs, []
    for i, block in enumerate(layers):
        res = quantize_block(
            block,
            x,
            captured.layer_kwargs[i],
            settings=settings,
            adapter=adapter,
            block_index=i,
            block_prefix=f"{adapter.layers_attr}.{i}",
        )
        if i + 1 < len(layers):
            # the FP block output is the next block's FP input
            torch.testing.assert_close(res.outputs, ref_hidden[i + 1], rtol=1e-4, atol=1e-5)
        x = res.outputs
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


def test_gqa_fold_off_is_reported():
    results = quantize_model(
        build_tiny_model("qwen2"), tiny_input_ids(4, 16), BlockSettings(bits=4, group_size=32, gqa_fold=False)
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
        captured = capture_layer_inputs(model, adapter.get_layers(model), ids)
        x = captured.inputs
        for i, block in enumerate(adapter.get_layers(model)):
            res = quantize_block(
                block,
                x,
                captured.layer_kwargs[i],
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
    captured = capture_layer_inputs(model, adapter.get_layers(model), tiny_input_ids(2, 16))
    x = captured.inputs.clone()
    x[0, 3, 5] = float("nan")
    with pytest.raises(NumericalError, match=r"block 0 \(model.layers.0\)"):
        quantize_block(
            model.model.layers[0],
            x,
            captured.layer_kwargs[0],
            settings=BlockSettings(),
            adapter=adapter,
            block_index=0,
            block_prefix="model.layers.0",
        )


def test_nan_weight_names_the_layer():
    model = build_tiny_model("llama")
    adapter = get_adapter(model.config)
    ids = tiny_input_ids(2, 16)
    captured = capture_layer_inputs(model, adapter.get_layers(model), ids)
    with torch.no_grad():
        x1 = model(ids, output_hidden_states=True).hidden_states[1]
    block = model.model.layers[1]
    with torch.no_grad():
        block.mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="block 1"):
        quantize_block(
            block, x1, captured.layer_kwargs[1], settings=BlockSettings(), adapter=adapter, block_index=1
        )


def test_capture_gives_block0_inputs_and_per_layer_kwargs():
    model = build_tiny_model("gemma2")
    ids = tiny_input_ids(3, 32)
    captured = capture_layer_inputs(model, model.model.layers, ids)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states[0]
    assert captured.inputs.shape == (3, 32, 128)
    torch.testing.assert_close(captured.inputs, ref)
    assert len(captured.layer_kwargs) == 2
    masks = [kw["attention_mask"] for kw in captured.layer_kwargs]
    # recorded on one sample (the same for every sample: repeated to the rows run, awq.capture.PerSample)
    assert isinstance(masks[0], PerSample) and masks[0].tensor.shape[0] == 1 and not masks[0].every_row
    assert for_rows(captured.layer_kwargs[0], slice(1, 3))["attention_mask"].shape[0] == 2
    assert not torch.equal(masks[0].tensor, masks[1].tensor)  # sliding-window layer vs full-attention layer
    assert all("past_key_values" not in kw and "use_cache" not in kw for kw in captured.layer_kwargs)


def test_two_stage_search_matches_exhaustive_search_closely():
    ids = tiny_input_ids(16, 16)
    fast, _ = logits_mse("llama", ids, BlockSettings(bits=3, group_size=32, search_fraction=0.25))
    full, _ = logits_mse("llama", ids, BlockSettings(bits=3, group_size=32, search_fraction=1.0))
    assert fast <= full * 1.1


@pytest.mark.parametrize("width", [96, 1024, 1537])
def test_blocked_gram_equals_the_full_product(width):
    from awqforge.awq.search import accumulate_gram, mirror_gram

    g = torch.Generator().manual_seed(width)
    chunks = [torch.randn(n, width, generator=g) for n in (200, 31)]
    gram = torch.zeros(width, width)
    for x in chunks:
        accumulate_gram(gram, x)
    mirror_gram(gram)
    ref = sum(x.T @ x for x in chunks)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-3)
    assert torch.equal(gram, gram.T)


@pytest.mark.parametrize("width", [96, 1024, 1537, 4100])
def test_blocked_quadratic_form_equals_the_full_product(width):
    """gram_form multiplies the upper column blocks of G only (9/16 of the work at 4100 wide): the same
    per-row errors as (D @ G * D).sum(-1), for candidate batches and single weights."""
    from awqforge.awq.search import gram_form

    g = torch.Generator().manual_seed(width)
    x = torch.randn(2 * width, width, generator=g)
    gram = x.T @ x / x.shape[0]
    for delta in (torch.randn(3, 17, width, generator=g), torch.randn(5, width, generator=g)):
        ref = ((delta @ gram) * delta).sum(-1)
        torch.testing.assert_close(gram_form(delta, gram), ref, rtol=1e-4, atol=0)


def test_diagonal_prescreen_keeps_the_exact_picks_and_no_scale():
    """The prescreen computes the exact Gram losses of its 10 best (and of s = 1) only: on the tiny model the
    linears' mappings pick what the exact search over all 21 candidates picks, and s = 1 always has a loss."""
    ids = tiny_input_ids(8, 32)
    picks = {}
    for keep in (0, 10):
        _, results = logits_mse("llama", ids, BlockSettings(bits=3, group_size=32, prescreen=keep))
        picks[keep] = [(k, v["ratio"]) for r in results for k, v in r.scales.items()]
        for r in results:
            for v in (v for v in r.scales.values() if v["scored"] == "linears"):
                assert v["loss_identity"] is not None and v["loss"] <= v["loss_identity"]
                assert v["finalists"] == (11 if keep else 21)  # 10 and s = 1 (not among them here), or all
    assert picks[10] == picks[0]


def test_gptq_rounding_needs_four_tokens_per_input_channel():
    """With fewer calibration tokens than 4 per input channel a layer is rounded to nearest, said per layer:
    GPTQ's error feedback would fit those few tokens (on a tiny olmo2 with 1 token per channel its artifact's
    logits fell to cosine 0.79 against 0.95 rounded to nearest)."""
    ids = tiny_input_ids(4, 64)  # 256 tokens: 2 per channel of the 128-wide inputs, 1 of down_proj's 256
    _, near = logits_mse("llama", ids, BlockSettings(bits=4, group_size=32, rounding="nearest"))
    _, gptq = logits_mse("llama", ids, BlockSettings(bits=4, group_size=32, rounding="gptq"))
    for a, b in zip(near, gptq, strict=True):
        notes = [s for s in b.skipped if "rounded to nearest, not GPTQ" in s]
        assert len(notes) == len(b.quantized) and "256 calibration tokens" in notes[0]
        for name, qt in a.quantized.items():
            assert torch.equal(qt.qweight, b.quantized[name].qweight)
    ids = tiny_input_ids(16, 64)  # 1024 tokens: 8 per channel of the 128-wide inputs, 4 of down_proj's
    _, gptq = logits_mse("llama", ids, BlockSettings(bits=4, group_size=32, rounding="gptq"))
    assert not any("not GPTQ" in s for r in gptq for s in r.skipped)


def test_rescoring_keeps_only_candidates_the_coarse_samples_cannot_tell_apart():
    from awqforge.awq.search import contenders

    best = [1.0, 2.0, 0.5, 1.5, 1.2, 0.8, 1.1, 0.9]
    per_row = {
        0: best,
        1: [v * 1.10 for v in best],  # 10% worse on every sample: clearly worse
        2: [v + (0.2 if i % 2 else -0.19) for i, v in enumerate(best)],  # as good on average: a close call
        3: [v + 5.0 for v in best],
    }
    assert contenders(per_row, [0, 2, 1, 3], z=3.0) == [0, 2]
    assert contenders({0: best, 1: per_row[1]}, [0, 1], z=3.0) == [0]  # a clear best is kept alone
    assert contenders({0: best[:3], 1: best[:3]}, [0, 1], z=3.0) is None  # too few samples to test


def test_paired_rescoring_picks_what_the_exhaustive_search_picks():
    """The coarse subsample (the first 4 samples) alone can rank a worse scale first; the paired
    test sends every close call to all the samples, so the picks are the full-data search's."""
    ids = tiny_input_ids(16, 64)
    picks = {}
    for name, settings in {
        "full": BlockSettings(group_size=32, search_fraction=1.0, search_screen=0),
        "paired": BlockSettings(group_size=32, rescore_z=3.0, search_screen=0),
    }.items():
        _, results = logits_mse("llama", ids, settings)
        picks[name] = [v["ratio"] for r in results for v in r.scales.values()]
        finalists = [v["finalists"] for r in results for v in r.scales.values()]
    assert picks["paired"] == picks["full"]
    assert min(finalists) >= 1


def test_diagonal_shortlist_picks_what_the_exact_screen_picks():
    """The module search's short list straight from the diagonal prescreen (no exact Gram losses): the same
    picks as the exact screen's short list and as the full search on the tiny model."""
    ids = tiny_input_ids(16, 64)
    picks = {}
    for name, settings in {
        "full": BlockSettings(group_size=32, search_fraction=1.0, search_screen=0, prescreen=0),
        "exact": BlockSettings(group_size=32, screen_exact=True),
        "diagonal": BlockSettings(group_size=32, screen_exact=False),
    }.items():
        _, results = logits_mse("llama", ids, settings)
        picks[name] = [v["ratio"] for r in results for v in r.scales.values()]
        screens = [v["screen_loss"] for r in results for v in r.scales.values() if v["scored"] == "module"]
        assert all(sl is None for sl in screens) == (name != "exact")
    assert picks["diagonal"] == picks["exact"] == picks["full"]


def test_rescoring_race_picks_what_the_exhaustive_search_picks():
    """Chunks of 2 samples: the rest of the samples is scored chunk by chunk, dropping the candidates the
    paired test tells apart after each; the picks are the full-data search's, with fewer candidates left."""
    ids = tiny_input_ids(16, 64)
    picks, finalists = {}, {}
    for name, settings in {
        "full": BlockSettings(group_size=32, search_fraction=1.0, search_screen=0, chunk_tokens=128),
        "all rescored": BlockSettings(group_size=32, search_screen=0, chunk_tokens=128, race=False),
        "race": BlockSettings(group_size=32, search_screen=0, chunk_tokens=128),
    }.items():
        _, results = logits_mse("llama", ids, settings)
        picks[name] = [v["ratio"] for r in results for v in r.scales.values()]
        finalists[name] = [v["finalists"] for r in results for v in r.scales.values()]
    assert picks["race"] == picks["full"] == picks["all rescored"]
    assert min(finalists["race"]) >= 1
    assert sum(finalists["race"]) < sum(finalists["all rescored"])


def test_race_keeps_its_contenders_weights_with_the_same_result(monkeypatch):
    """The race's contenders keep their fake-quantized weights between chunks (limits.RACE_CACHE_BYTES):
    the same losses, picks and logits as refilling them for every chunk."""
    from awqforge import limits

    ids = tiny_input_ids(16, 64)
    settings = BlockSettings(group_size=32, search_screen=0, chunk_tokens=128)
    runs, default = {}, limits.RACE_CACHE_BYTES
    for budget in (default, 0):
        monkeypatch.setattr(limits, "RACE_CACHE_BYTES", budget)
        mse, results = logits_mse("llama", ids, settings)
        runs[budget] = (
            mse,
            [(v["ratio"], v["loss"], v["finalists"]) for r in results for v in r.scales.values()],
        )
    kept, refilled = runs[default], runs[0]
    assert kept == refilled
    assert max(f for _, _, f in kept[1]) >= 2  # a race with several contenders ran


def _correlated_layer(out_f=48, in_f=128, n=512, seed=0):
    """A weight and a Gram matrix of correlated, unevenly scaled inputs (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    x = (torch.randn(n, in_f, generator=g) @ mix) * torch.linspace(0.2, 3.0, in_f)
    return torch.randn(out_f, in_f, generator=g), x.t() @ x, x


@pytest.mark.parametrize("zero_point", [True, False])
def test_least_squares_refit_never_raises_a_groups_error(zero_point):
    from awqforge.awq.qparams import group_blocks, refine_qparams, search_clip
    from awqforge.quant import dequantize, quantize_with_qparams

    w, gram, _ = _correlated_layer()
    s = BlockSettings(bits=3, group_size=32, zero_point=zero_point)
    scales, zeros, _ = search_clip(w, gram, s)
    new_s, new_z, changed = refine_qparams(w, gram, scales, zeros, s)
    blocks = group_blocks(gram, 128, 32)

    def group_err(sc, z):
        d = (dequantize(quantize_with_qparams(w, sc, z, 3, 32), sc, z, 32) - w).reshape(48, 4, 32)
        return torch.einsum("rng,ngh,rnh->rn", d, blocks, d)

    before, after = group_err(scales, zeros), group_err(new_s, new_z)
    assert (after <= before * (1 + 1e-5)).all()  # a group only takes new parameters that help it
    assert 0 < changed <= 1 and after.sum() < before.sum()
    assert ((new_z >= 0) & (new_z <= 7) & (new_z == new_z.round())).all()  # zeros stay integer codes
    if not zero_point:
        assert torch.equal(new_z, zeros)


def test_gptq_rounding_lowers_the_output_error_of_fixed_qparams():
    from awqforge.awq.gptq import gptq_codes
    from awqforge.quant import compute_qparams, dequantize, quantize_with_qparams

    w, gram, x = _correlated_layer()
    s = BlockSettings(bits=3, group_size=32)
    scales, zeros = compute_qparams(w, 3, 32)
    q_near = quantize_with_qparams(w, scales, zeros, 3, 32)
    q_gptq = gptq_codes(w, gram, scales, zeros, s)
    assert q_gptq.min() >= 0 and q_gptq.max() <= 7 and torch.equal(q_gptq, q_gptq.round())
    err = {}
    for name, q in (("nearest", q_near), ("gptq", q_gptq.to(torch.uint8))):
        err[name] = float((x @ (dequantize(q, scales, zeros, 32) - w).t()).pow(2).mean())
    assert err["gptq"] < 0.8 * err["nearest"]
    # a Gram with an all-zero input column (a dead channel) still gives valid codes
    gram[5, :] = 0
    gram[:, 5] = 0
    q_dead = gptq_codes(w, gram, scales, zeros, s)
    assert torch.isfinite(q_dead).all() and q_dead.max() <= 7


def test_gptq_rounding_in_a_block_beats_nearest():
    ids = tiny_input_ids(16, 64)  # 4 or more tokens per input channel: GPTQ on every layer
    w3 = dict(bits=3, group_size=32)
    mse_near, _ = logits_mse("llama", ids, BlockSettings(rounding="nearest", **w3))
    mse_gptq, results = logits_mse("llama", ids, BlockSettings(rounding="gptq", **w3))
    assert mse_gptq < mse_near
    for res in results:  # 3-bit codes, and the dequantized weights are what the block computes with
        assert all(qt.qweight.max() <= 7 for qt in res.quantized.values())
    with pytest.raises(ValueError, match="rounding"):
        logits_mse("llama", ids, BlockSettings(rounding="stochastic", **w3))


def test_few_tokens_losses_from_the_inputs_equal_the_gram_form():
    """With fewer calibration tokens than a linear's input width, the block keeps the inputs X instead of
    the Gram matrix: losses ||X D^T||^2 / n, clip blocks X_g^T X_g / n, G only for GPTQ. They must equal the
    Gram form sum(D G * D), also on inputs divided by folded scales, and give the same quantized block."""
    from awqforge.awq.search import Inputs

    _, _, x = _correlated_layer(n=96)  # 96 tokens, 128 wide
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(2, 48, 128, generator=g)
    inv = torch.rand(128, generator=g) + 0.5
    kept, gram = Inputs(None, x, 96), Inputs(x.t() @ x / 96, None, 96)
    for a, b in ((kept, gram), (kept.scaled(inv), gram.scaled(inv))):
        assert a.x is not None and b.x is None
        torch.testing.assert_close(a.row_errors(delta), b.row_errors(delta), rtol=1e-4, atol=0)
        torch.testing.assert_close(a.blocks(32), b.blocks(32), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a.full_gram(), b.full_gram(), rtol=1e-4, atol=1e-3)
        assert a.blocks(32).shape == (4, 32, 32)

    ids = tiny_input_ids(4, 48)  # 192 tokens: fewer than down_proj's 256 inputs, more than 128
    _, fast = logits_mse("llama", ids, BlockSettings(bits=4, group_size=32, rounding="nearest"))
    _, slow = logits_mse(
        "llama", ids, BlockSettings(bits=4, group_size=32, rounding="nearest", keep_inputs=False)
    )
    for a, b in zip(fast, slow, strict=True):
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert la.mse_rtn == pytest.approx(lb.mse_rtn, rel=1e-4)
            assert la.mse_quant == pytest.approx(lb.mse_quant, rel=1e-4)
        for key, info in a.scales.items():
            assert info["loss"] == pytest.approx(b.scales[key]["loss"], rel=1e-4)
        for name, qt in a.quantized.items():
            assert torch.equal(qt.qweight, b.quantized[name].qweight)


def test_search_screen_covering_every_candidate_is_the_full_search():
    """search_screen = k >= the number of candidates (n_grid + 1 for duo) is the full module search: the same
    picks, losses and codes as search_screen=0, bit for bit."""
    ids = tiny_input_ids(8, 32)
    w3 = dict(bits=3, group_size=32, n_grid=10)
    _, full = logits_mse("llama", ids, BlockSettings(search_screen=0, **w3))
    for k in (11, 100):
        _, screened = logits_mse("llama", ids, BlockSettings(search_screen=k, **w3))
        for a, b in zip(full, screened, strict=True):
            assert a.scales.keys() == b.scales.keys()
            for key, info in a.scales.items():
                assert b.scales[key]["ratio"] == info["ratio"] and b.scales[key]["loss"] == info["loss"]
                assert b.scales[key]["loss_identity"] == info["loss_identity"]
                assert b.scales[key]["shortlist"] is None
            for name, qt in a.quantized.items():
                assert torch.equal(qt.qweight, b.quantized[name].qweight)
                assert torch.equal(qt.scales, b.quantized[name].scales)


def _qkv_screen_by_hand(family, ids, s):
    """Block 0's q/k/v screen computed from scratch: X = input_layernorm(block 0's input), and per candidate
    the summed squared error of q, k and v's outputs over the tokens, ||X (Q(W s)/s - W)^T||^2."""
    from awqforge.awq.search import candidates, w_mean

    model = build_tiny_model(family)
    with torch.no_grad():
        block = model.model.layers[0]
        x = block.input_layernorm(model(ids, output_hidden_states=True).hidden_states[0]).flatten(0, 1)
        attn = block.self_attn
        ws = [attn.q_proj.weight.float(), attn.k_proj.weight.float(), attn.v_proj.weight.float()]
        cands = candidates(x.abs().mean(0), w_mean(ws, s.group_size), s)
        losses = []
        for _mode, _a, sc in cands:
            losses.append(
                sum(
                    float((x @ (fake_quantize(w * sc, s.bits, s.group_size) / sc - w).T).pow(2).sum())
                    for w in ws
                )
            )
    return torch.tensor(losses), cands


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_search_screen_picks_from_its_short_list(k):
    """With search_screen=k the module is run on the k best candidates of the Gram screen only: the pick is one
    of them, the short list is the k lowest screen losses, and the screen is the linears' exact output error
    (checked against a computation from scratch on block 0's q/k/v)."""
    ids = tiny_input_ids(8, 32)
    s = BlockSettings(bits=3, group_size=32, n_grid=10, search_screen=k, prescreen=0)
    _, results = logits_mse("llama", ids, s)
    n_module = 0
    for res in results:
        for key, info in res.scales.items():
            if key.endswith("down_proj") or key.endswith("o_proj"):  # scored from the Gram, no screen
                assert info["shortlist"] is None
                continue
            n_module += 1
            screen = torch.tensor(info["screen_loss"])
            assert len(screen) == 11 and len(info["shortlist"]) == k
            assert info["shortlist"] == torch.argsort(screen, stable=True)[:k].tolist()
            ratios = [round(i / 10, 6) for i in range(10)] + [0.0]  # the grid, then s = 1
            picked = [i for i in info["shortlist"] if ratios[i] == round(info["ratio"], 6)]
            assert picked, f"{key}: ratio {info['ratio']} is not on the short list {info['shortlist']}"
            if k == 1:
                assert info["ratio"] == pytest.approx(ratios[info["shortlist"][0]])
    assert n_module == 4  # q/k/v and gate/up in each of the 2 blocks
    by_hand, _ = _qkv_screen_by_hand("llama", ids, s)
    engine = torch.tensor(
        results[0].scales[next(k for k in results[0].scales if "q_proj" in k)]["screen_loss"]
    )
    torch.testing.assert_close(engine.float(), by_hand.float(), rtol=2e-3, atol=0)


def test_search_screen_keeps_quality_and_changes_picks_only_within_the_list():
    """The screened search is not worse than the full module search by more than a few percent on the
    layers' output errors (the tiny model; the real-model figures are in bench/README.md)."""
    ids = tiny_input_ids(8, 32)
    w3 = dict(bits=3, group_size=32)
    full_mse, full = logits_mse("llama", ids, BlockSettings(search_screen=0, **w3))
    scr_mse, scr = logits_mse("llama", ids, BlockSettings(search_screen=4, **w3))
    err = lambda rs: sum(lm.mse_quant for r in rs for lm in r.layers)  # noqa: E731
    assert err(scr) <= err(full) * 1.05
    assert scr_mse <= full_mse * 1.1
