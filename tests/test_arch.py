"""Architecture adapters: registry, discovery, expert unfusing, folding, group-size check."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import FAMILIES, MOE_FAMILIES, build_tiny_model, tiny_config, tiny_input_ids

from awqforge.arch import (
    SUPPORTED_FAMILIES,
    ScaledActivation,
    UnfusedExperts,
    UnsupportedArchitecture,
    check_group_size,
    get_adapter,
)
from awqforge.awq import fold_scales

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_tiny_family_has_an_adapter():
    assert set(FAMILIES) <= set(SUPPORTED_FAMILIES)


def test_unsupported_architecture_is_refused_in_one_short_sentence():
    """Model type, what is missing, how to proceed; no list of registry families or library classes."""
    with pytest.raises(UnsupportedArchitecture) as err:
        get_adapter(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2))
    msg = str(err.value)
    assert "'gpt2'" in msg and "Conv1D" in msg and "would load" in msg and "original precision" in msg
    assert len(msg) < 400 and msg.count(". ") == 0 and "llama" not in msg


def test_gemma3_multimodal_gets_the_text_model_s_mappings():  # tests/test_multimodal.py runs it
    cfg = transformers.Gemma3Config(text_config=tiny_config("gemma3_text").to_dict())
    adapter = get_adapter(cfg)
    assert adapter.layers_attr == "model.language_model.layers" and adapter.family.startswith("gemma3 (")
    assert adapter.specs == get_adapter(tiny_config("gemma3_text")).specs


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_random_scales_keeps_the_fp_function(family):
    overrides = {"num_key_value_heads": 4} if family in ("llama", "phi3") else {}
    model = build_tiny_model(family, **overrides)
    ids = tiny_input_ids(2, 24)
    with torch.no_grad():
        ref = model(ids).logits
    adapter = get_adapter(model.config)
    gen = torch.Generator().manual_seed(0)
    applied = 0
    for block in adapter.get_layers(model):
        for m in adapter.mappings(block):
            if m.skip_reason:
                continue
            n_prev = m.to_prev(torch.ones(m.linears[0].in_features)).numel()  # KV channels under GQA
            s = torch.exp(0.5 * torch.randn(n_prev, generator=gen))
            fold_scales(block, m, s)
            applied += 1
    with torch.no_grad():
        out = model(ids).logits
    assert applied >= 2 * 3
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_v_to_o_applies_with_mha_and_with_gqa_per_kv_channel():
    gqa = get_adapter(tiny_config("llama"))
    block = build_tiny_model("llama").model.layers[0]
    vo = [m for m in gqa.mappings(block) if m.prev_name == "self_attn.v_proj"][0]
    assert vo.skip_reason is None and (vo.gqa.kv_heads, vo.gqa.n_rep, vo.gqa.head_dim) == (2, 2, 32)
    mha_block = build_tiny_model("llama", num_key_value_heads=4).model.layers[0]
    vo = [m for m in gqa.mappings(mha_block) if m.prev_name == "self_attn.v_proj"][0]
    assert vo.skip_reason is None and vo.gqa is None


def test_phi3_fused_mappings_scale_the_v_and_up_rows():
    model = build_tiny_model("phi3", num_key_value_heads=4)
    maps = {m.prev_name: m for m in get_adapter(model.config).mappings(model.model.layers[0])}
    assert maps["self_attn.qkv_proj"].prev_rows == slice(256, 384)
    assert maps["mlp.gate_up_proj"].prev_rows == slice(256, 512)


def test_neox_activation_fold_creates_scaled_activation_with_autoawq_name():
    model = build_tiny_model("gpt_neox")
    adapter = get_adapter(model.config)
    block = adapter.get_layers(model)[0]
    m = [m for m in adapter.mappings(block) if m.prev_name == "mlp.act"][0]
    fold_scales(block, m, torch.full((256,), 2.0))
    assert isinstance(block.mlp.act, ScaledActivation)
    assert "mlp.act.scales" in block.state_dict()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_experts_are_unfused_into_named_linears(family):
    model = build_tiny_model(family)
    adapter = get_adapter(model.config)
    block = adapter.prepare_block(adapter.get_layers(model)[-1])  # DeepSeek: layer 0 is dense
    assert isinstance(block.mlp.experts, UnfusedExperts)
    names = set(adapter.quantizable_linears(block))
    lay = adapter.experts
    assert {f"mlp.experts.3.{lay.gate}", f"mlp.experts.3.{lay.up}", f"mlp.experts.3.{lay.down}"} <= names
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)
    norm_map = [m for m in adapter.mappings(block) if m.prev_name == "post_attention_layernorm"][0]
    assert "mlp.gate" in norm_map.absorb_names
    if family == "qwen2_moe":
        assert "mlp.shared_expert_gate" in norm_map.absorb_names
        assert "mlp.shared_expert.up_proj" in norm_map.linear_names
    if family == "deepseek_v3":
        assert "mlp.shared_experts.up_proj" in norm_map.linear_names


def test_checkpoint_names_for_mixtral_experts():
    adapter = get_adapter(tiny_config("mixtral"))
    assert (
        adapter.checkpoint_name("model.layers.3.mlp.experts.7.w1")
        == "model.layers.3.block_sparse_moe.experts.7.w1"
    )
    assert adapter.checkpoint_name("mlp.experts.0.w2") == "block_sparse_moe.experts.0.w2"
    assert (
        get_adapter(tiny_config("qwen3_moe")).checkpoint_name("mlp.experts.0.up_proj")
        == "mlp.experts.0.up_proj"
    )


def test_never_quantize_routers_and_lm_head():
    adapter = get_adapter(tiny_config("qwen2_moe"))
    assert adapter.never_quantize("lm_head")
    assert adapter.never_quantize("mlp.gate")
    assert adapter.never_quantize("model.layers.0.mlp.shared_expert_gate")
    assert not adapter.never_quantize("mlp.gate_proj")


def test_group_size_check_names_layers_and_working_sizes():
    config = tiny_config("llama", intermediate_size=96)
    adapter = get_adapter(config)
    check_group_size(config, adapter, 32)
    with pytest.raises(ValueError) as err:
        check_group_size(config, adapter, 64)
    msg = str(err.value)
    assert "model.layers.*.mlp.down_proj (input width 96)" in msg
    assert "q_proj" not in msg
    assert "32, -1" in msg
    # a skipped layer does not count
    check_group_size(config, adapter, 64, skip_patterns=["*down_proj"])


def test_group_size_check_covers_fused_experts_on_a_model():
    model = build_tiny_model("qwen3_moe", moe_intermediate_size=96)
    adapter = get_adapter(model.config)
    with pytest.raises(ValueError, match=r"mlp\.experts\.\*\.down_proj \(input width 96\)"):
        check_group_size(model, adapter, 64)
    assert not isinstance(adapter.get_layers(model)[0].mlp.experts, UnfusedExperts)  # not mutated


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_prepared_block_state_dict_names_are_the_checkpoint_names(family, tmp_path):
    """After prepare_block, a block loads straight from the shards: names map 1:1 via checkpoint_name."""
    from safetensors.torch import load_file

    model = build_tiny_model(family)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    adapter = get_adapter(model.config)
    prefix = f"{adapter.layers_attr}.0"
    block = adapter.prepare_block(adapter.get_layers(model)[0])
    for name, tensor in block.state_dict().items():
        key = adapter.checkpoint_name(f"{prefix}.{name}")
        assert key in saved, key
        torch.testing.assert_close(saved[key], tensor)
    assert len(block.state_dict()) == len([k for k in saved if k.startswith(f"{prefix}.")])


def test_post_ln_opt_disables_the_norm_mappings():
    config = tiny_config("opt", do_layer_norm_before=False)
    model = build_tiny_model("opt", do_layer_norm_before=False)
    maps = {m.prev_name: m for m in get_adapter(config).mappings(model.model.decoder.layers[0])}
    assert "post-LN" in maps["self_attn_layer_norm"].skip_reason
    assert "post-LN" in maps["final_layer_norm"].skip_reason
    assert maps["fc1"].skip_reason is None


# -- Llama 4 (text) -------------------------------------------------------------------------------------------


def test_llama4_experts_unfused_from_the_bmm_layout_keep_the_forward_exactly():
    """[E, H, 2I] / [E, I, H] fused experts -> per-expert linears; the dense-routed forward is unchanged."""
    from awqforge.arch import UnfusedDenseExperts

    model = build_tiny_model("llama4_text")
    ids = tiny_input_ids(2, 24)
    moe = model.model.layers[1].feed_forward
    fused = moe.experts.gate_up_proj.detach().clone(), moe.experts.down_proj.detach().clone()
    with torch.no_grad():
        ref = model(ids).logits
    adapter = get_adapter(model.config)
    assert adapter.family == "llama4_text"
    for block in adapter.get_layers(model):
        adapter.prepare_block(block)
    assert isinstance(moe.experts, UnfusedDenseExperts) and len(moe.experts) == 4
    inter = model.config.intermediate_size
    for e, expert in enumerate(moe.experts):
        torch.testing.assert_close(expert.gate_proj.weight, fused[0][e, :, :inter].T)
        torch.testing.assert_close(expert.up_proj.weight, fused[0][e, :, inter:].T)
        torch.testing.assert_close(expert.down_proj.weight, fused[1][e].T)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_llama4_dense_and_moe_layers_map_with_the_router_absorbing():
    model = build_tiny_model("llama4_text", num_key_value_heads=4)
    adapter = get_adapter(model.config)
    dense, moe = (adapter.get_layers(model)[i] for i in (0, 1))
    assert not hasattr(dense.feed_forward, "experts") and hasattr(moe.feed_forward, "router")
    maps = {m.name: m for m in adapter.mappings(dense)}
    assert set(maps) == {
        "input_layernorm->self_attn.q_proj,self_attn.k_proj,self_attn.v_proj",
        "self_attn.v_proj->self_attn.o_proj",
        "post_attention_layernorm->feed_forward.gate_proj,feed_forward.up_proj",
        "feed_forward.up_proj->feed_forward.down_proj",
    }
    assert all(m.skip_reason is None for m in maps.values())  # no GQA here: v -> o applies
    maps = {m.prev_name: m for m in adapter.mappings(moe)}
    norm = maps["post_attention_layernorm"]
    assert norm.absorb_names == ["feed_forward.router"] and norm.inspect_name == "feed_forward"
    assert norm.linear_names[-2:] == [
        "feed_forward.shared_expert.gate_proj",
        "feed_forward.shared_expert.up_proj",
    ]
    assert "feed_forward.experts.3.up_proj" in norm.linear_names
    assert maps["feed_forward.experts.3.up_proj"].linear_names == ["feed_forward.experts.3.down_proj"]
    assert maps["feed_forward.shared_expert.up_proj"].linear_names == ["feed_forward.shared_expert.down_proj"]
    names = set(adapter.quantizable_linears(moe))
    assert "feed_forward.router" not in names and adapter.never_quantize("model.layers.1.feed_forward.router")
    assert len(names) == 4 + 3 * 4 + 3  # q k v o, 4 experts x 3, shared expert x 3


def test_llama4_group_size_check_reads_the_bmm_layout():
    model = build_tiny_model("llama4_text", intermediate_size=96)  # experts' and shared expert's width
    adapter = get_adapter(model.config)
    with pytest.raises(ValueError) as err:
        check_group_size(model, adapter, 64)
    msg = str(err.value)
    assert "model.layers.*.feed_forward.experts.*.down_proj (input width 96)" in msg
    assert "shared_expert.down_proj (input width 96)" in msg and "gate_proj" not in msg
    check_group_size(model, adapter, 32)


def test_llama4_multimodal_gets_the_text_model_s_mappings():  # tests/test_multimodal.py runs it
    config = transformers.Llama4Config(text_config=tiny_config("llama4_text").to_dict())
    adapter = get_adapter(config)
    assert adapter.layers_attr == "language_model.model.layers" and adapter.experts.in_out


def test_llama4_run_quantization_beats_rtn_and_names_experts_as_checkpoints_do(tiny_checkpoint, tmp_path):
    """The whole pipeline on a Llama 4 text checkpoint (fused experts on disk): AWQ's layer output error below
    RTN's at 3 bits, every expert linear quantized under `feed_forward.experts.{e}.*`, the router kept FP, and
    the artifact loaded by transformers + compressed-tensors."""
    from safetensors import safe_open

    from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
    from awqforge.pipeline import run_quantization
    from awqforge.spec import JobSpec

    ckpt = tiny_checkpoint("llama4_text")
    spec = JobSpec(
        model=str(ckpt),
        quant={"bits": 3, "group_size": 32, "zero_point": False},  # asymmetric: see test_families
        calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 8, "seq_len": 32},
        formats=["compressed-tensors"],
        eval={"enabled": False},
        device="cpu",
        n_grid=6,
    )
    result = run_quantization(spec, tmp_path / "out")
    assert sum(m.mse_quant for m in result.layers) < 0.9 * sum(m.mse_rtn for m in result.layers)
    assert result.metrics["n_layers_quantized"] == 7 + 19
    with safe_open(str(result.artifacts["compressed-tensors"] / "model.safetensors"), "pt") as h:
        keys = set(h.keys())
    for e in range(4):
        for lin in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.feed_forward.experts.{e}.{lin}.weight_packed" in keys
    assert "model.layers.1.feed_forward.router.weight" in keys
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)

    # transformers' own compressed-tensors loader reads the per-expert layout (its SequentialLlama4TextExperts)
    # and computes what our loader computes; both near the FP model. (The dependency-floor run has no dev
    # extras: everything above ran there; the load through transformers runs in the main suite.)
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import awqforge

    artifact = result.artifacts["compressed-tensors"]
    theirs = AutoModelForCausalLM.from_pretrained(  # dequantize=True: see test_formats.ASYM_UPSTREAM
        artifact, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    assert not any(p.dim() == 3 for p in theirs.parameters())  # the experts were not left fused (random)
    ours = awqforge.load_quantized(artifact)
    fp = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = tiny_input_ids(1, 16)
    with torch.no_grad():
        got, want, ref = theirs(ids).logits, ours(ids).logits, fp(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3 * want.abs().max().item())
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.9
