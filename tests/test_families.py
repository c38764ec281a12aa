"""Model families beyond the dense registry: MoE artifacts that load in transformers, new MoE families, hybrid
decoders (linear attention / Mamba-2 mixers beside attention), and the refusals for what the engine cannot map.

Every artifact here is loaded by transformers with default loading (no `dequantize=True`) and compared with
AWQForge's own loader."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tiny_models import tiny_input_ids

from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
from awqforge.errors import InputError
from awqforge.pipeline import run_quantization
from awqforge.spec import JobSpec

pytestmark = pytest.mark.usefixtures("one_thread")

REGISTRY_MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "llama4_text"]


def _spec(ckpt, *, zero_point=False, fmt="compressed-tensors", method="awq", bits=4, formats=None):
    return JobSpec(
        model=str(ckpt),
        method=method,
        quant={"bits": bits, "group_size": 32, "zero_point": zero_point},
        calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 4, "seq_len": 32},
        formats=formats or [fmt],
        eval={"enabled": False},
        device="cpu",
        n_grid=4,
    )


def load_both(artifact):
    """(transformers' default loading, AWQForge's loader) of one artifact."""
    from transformers import AutoModelForCausalLM

    import awqforge

    theirs = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval()
    return theirs, awqforge.load_quantized(artifact)


@pytest.mark.parametrize("family", REGISTRY_MOE)
def test_registry_moe_artifact_loads_in_transformers_like_our_loader(family, tiny_checkpoint, tmp_path):
    pytest.importorskip("compressed_tensors")
    result = run_quantization(_spec(tiny_checkpoint(family)), tmp_path / "out")
    theirs, ours = load_both(result.artifacts["compressed-tensors"])
    ids = tiny_input_ids(1, 16)
    with torch.no_grad():
        got, want = theirs(ids).logits, ours(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_asymmetric_compressed_tensors_is_refused_up_front_with_the_alternatives(
    family, tiny_checkpoint, tmp_path
):
    with pytest.raises(InputError) as err:
        run_quantization(_spec(tiny_checkpoint(family), zero_point=True), tmp_path / "out")
    msg = str(err.value)
    assert family in msg and "zero-point" in msg and "zero_point=false" in msg
    assert not (tmp_path / "out").exists()  # refused before any work


def test_moe_awq_format_alone_is_refused_up_front_and_kept_beside_compressed_tensors(
    tiny_checkpoint, tmp_path
):
    """transformers loads the AWQ format only through gptqmodel, which never replaces fused experts: an
    AWQ-only MoE job is refused in one sentence; beside compressed-tensors the AWQ artifact is written (vLLM)."""
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint("qwen3_moe")
    with pytest.raises(InputError) as err:
        run_quantization(_spec(ckpt, fmt="awq"), tmp_path / "out")
    msg = str(err.value)
    assert "qwen3_moe" in msg and "gptqmodel" in msg and "'compressed-tensors'" in msg and len(msg) < 400
    assert not (tmp_path / "out").exists()
    result = run_quantization(_spec(ckpt, formats=["awq", "compressed-tensors"]), tmp_path / "both")
    assert set(result.artifacts) == {"awq", "compressed-tensors"}
    cards = {fmt: (art / "README.md").read_text() for fmt, art in result.artifacts.items()}
    assert "transformers 5.13 or newer" in cards["compressed-tensors"]  # bench/bench_floor_load.py
    assert "use the compressed-tensors artifact" in cards["awq"]
    if importlib.util.find_spec("gptqmodel") is None:  # what a user without gptqmodel meets
        with pytest.raises(ImportError, match="gptqmodel"):
            AutoModelForCausalLM.from_pretrained(result.artifacts["awq"])


# Families outside the registry, read by the structural fallback (awqforge.structure): new MoE layouts and
# routers, and hybrid decoders. Each: a tiny model from AutoConfig.for_model (tests/tiny_families.py), AWQ's
# output error below RTN's, the linears no mapping reaches labelled as plain rounding, routers and state /
# convolution parameters in full precision, and the artifact loaded by transformers like by our loader.
NEW_MOE = [
    "gpt_oss",  # fused experts with biases and a clamped activation: kept fused, FP
    "glm4_moe",  # sigmoid router with expert bias, shared experts
    "olmoe",
    "granitemoe",  # no per-expert layout transformers reads: experts kept fused, FP
    "hunyuan_v1_moe",  # router is gate.wg
    "ernie4_5_moe",
    "dots1",
    "phimoe",  # per-expert names as transformers reads them: w1|w3|w2
    "minimax",  # w1|w3|w2; its residual is taken after the input norm: that norm is not scaled
    "mimo_v2_flash",  # sliding-window layers with twice the kv heads and attention sinks
]
HYBRID = [
    "qwen3_next",  # gated delta rule beside gated attention, MoE
    "qwen3_5_text",
    "qwen3_5_moe_text",
    "bamba",  # Mamba-2 beside attention
    "granitemoehybrid",
    "nemotron_h",  # checkpoint `backbone.`, module tree `model.`: the ignore list under module names
    "jamba",  # Mamba-1 (dt_proj weight read directly: kept FP)
    "lfm2_moe",  # short convolutions beside attention, w1|w3|w2 experts
    "bailing_hybrid",  # linear attention beside MLA: each layer type's norm scaled once (arch._one_fold_per_prev)
]
# Layer kwargs with one entry per sample, replayed per chunk of rows (tests/test_replay.py)
PER_SAMPLE = [
    "bloom",  # ALiBi, the heads folded into the batch
    "deepseek_v4",  # input_ids (hash routing), per-sample tensors joined to the attention mask
    "gemma4_text",  # per-layer inputs: their embedding tables and projection stay in full precision
]
# Decoder-only causal LMs outside the registry that vLLM serves, GPT-2-era config names (n_embd, d_model, ...;
# tests/tiny_families.py sets them through the config's attribute_map), and encoder-decoder families' causal-LM
# decoders (cross-attention unused without encoder states)
CAUSAL_LM = [
    "gpt_bigcode",  # fused c_attn with multi-query kv
    "gptj",  # parallel attention and MLP from one norm
    "codegen",
    "mpt",
    "ctrl",
    "xglm",
    "ergo",  # its decoder layer reads `self.self_attn.o_proj.weight`: that linear kept (arch.weight_read_directly)
    "mbart",  # BartForCausalLM-style decoder, pre-norm
    "dbrx",  # norms inside a sub-layer (norm_attn_norm) read like a block; fused experts kept; clamped qkv: no v->o
    "megatron-bert",  # pre-norm BERT: attention.ln inside the attention sub-layer feeds query/key/value
]
KEPT_IN_IGNORE = {"gemma4_text": ("model.embed_tokens_per_layer", "model.per_layer_model_projection")}


@pytest.mark.parametrize("model_type", NEW_MOE + HYBRID + PER_SAMPLE + CAUSAL_LM)
def test_family_awq_beats_rtn_and_artifact_loads_in_transformers(model_type, tiny_tokenizer, tmp_path):
    pytest.importorskip("compressed_tensors")
    from tiny_families import artifact_roundtrip, logits_errors, save_family_checkpoint

    r = logits_errors(model_type)
    assert r["family"] == f"{model_type} (structural)"
    assert r["awq"] < r["rtn"], r
    scaled_or_plain = r["awq_scaled"] + sum("plain rounding" in s for s in r["awq_skipped"])
    # a causal-LM decoder's cross-attention (no encoder states): no calibration token reaches it, said per layer
    unreached = {
        f"{s.split('.', 1)[0]}.{n}"
        for s in r["awq_skipped"]
        if "only 0 calibration tokens reach it" in s
        for n in s.split(": ")[0].split("->")[1].split(",")
    }
    assert scaled_or_plain + len(unreached) == r["n_linears"]  # every quantized linear: scaled, or labelled
    routers = [n for n in r["awq_quantized"] if n.endswith((".gate", ".router", ".gate.wg"))]
    assert routers == []  # routers stay in full precision
    assert r["state_changed"] == []  # convolution and state parameters untouched

    ckpt = tmp_path / "ckpt"
    save_family_checkpoint(model_type, ckpt, tiny_tokenizer)
    rt = artifact_roundtrip(model_type, ckpt, tmp_path / "out")
    assert rt["max_diff"] < 1e-2, rt  # transformers' default loading computes what our loader computes
    assert rt["ours_cos"] > 0.8, rt
    if model_type in KEPT_IN_IGNORE:
        config = json.loads((tmp_path / "out" / "compressed-tensors" / "config.json").read_text())
        assert set(KEPT_IN_IGNORE[model_type]) <= set(config["quantization_config"]["ignore"])


def test_one_norm_is_folded_into_once_on_a_hybrid_block():
    """Bailing-hybrid: the MLA layer's `input_layernorm -> q_a_proj, kv_a_proj_with_mqa, g_proj` resolves on the
    linear-attention layer to g_proj alone; folding the norm twice would rescale q/k/v's inputs unmatched."""
    from tiny_families import logits_errors

    r = logits_errors("bailing_hybrid")
    assert any(
        s.startswith("0.input_layernorm->self_attn.g_proj: ") and "folds its scales into input_layernorm" in s
        for s in r["awq_skipped"]
    ), r["awq_skipped"]
    assert r["awq"] < r["rtn"], r


def test_bloom_is_read_as_its_settings_run_it():
    """Bloom takes the residual after the norm only under apply_residual_connection_post_layernorm, and reads
    `self.dense.weight` only on its pretraining_tp > 1 slow path: with neither, its norms are scaled and every
    linear is quantized; with the slow path on, dense and dense_4h_to_h are kept."""
    from tiny_families import build_family_model, logits_errors

    from awqforge.arch import get_adapter

    r = logits_errors("bloom")
    assert r["n_linears"] == 8 and r["awq"] < r["rtn"], r
    assert not any(
        s.endswith("query_key_value: no AWQ mapping applies (plain rounding)") for s in r["awq_skipped"]
    )
    assert not any(
        s.endswith("dense_h_to_4h: no AWQ mapping applies (plain rounding)") for s in r["awq_skipped"]
    )
    model = build_family_model("bloom")
    adapter, block = get_adapter(model.config), model.transformer.h[0]
    assert not adapter.weight_read_directly(block, "self_attention.dense")
    block.self_attention.pretraining_tp, block.self_attention.slow_but_exact = 2, True
    assert adapter.weight_read_directly(block, "self_attention.dense")


def test_streamed_blocks_hold_the_buffers_transformers_computes(tiny_tokenizer, tmp_path):
    """FalconH1Model's init, not its mixer's, fills every layer's non-persistent `mamba.mup_vector`: the streamed
    loader runs the init of a buffer's owner and of its ancestors (was: left uninitialised, NaN at times), and
    no init rewrites a loaded weight."""
    from tiny_families import save_family_checkpoint
    from transformers import AutoModelForCausalLM

    from awqforge.arch import get_adapter
    from awqforge.resolve import resolve_model
    from awqforge.streaming import StreamingModel

    save_family_checkpoint("falcon_h1", tmp_path, tiny_tokenizer)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    resolved = resolve_model(str(tmp_path))
    stream = StreamingModel.from_resolved(resolved, get_adapter(resolved.config), device=torch.device("cpu"))
    stream.load_non_block()
    want_embed = ref.model.embed_tokens.weight
    for i, ref_block in enumerate(ref.model.layers):
        block = stream.load_block(i)
        for name, buf in ref_block.named_buffers():
            torch.testing.assert_close(block.get_buffer(name), buf, msg=name)
        for name, p in ref_block.named_parameters():
            torch.testing.assert_close(block.get_parameter(name), p, msg=name)
        stream.free_block(i)
    torch.testing.assert_close(stream.model.model.embed_tokens.weight, want_embed)


def test_plain_rounding_is_labelled_per_layer_and_state_params_stay_full_precision():
    """Qwen3-Next: the gated delta rule's out_proj (a gated norm before it) gets plain rounding, said per layer;
    its input projections are scaled from the norm; conv1d, A_log and dt_bias are untouched."""
    from tiny_families import build_family_model, logits_errors

    r = logits_errors("qwen3_next")
    assert "0.linear_attn.out_proj: no AWQ mapping applies (plain rounding)" in r["awq_skipped"]
    assert not any("in_proj" in s for s in r["awq_skipped"])
    assert {"linear_attn.conv1d.weight"} <= set(r["kept_fp"])
    model = build_family_model("qwen3_next")
    params = dict(model.model.layers[0].linear_attn.named_parameters())
    assert {"A_log", "dt_bias", "conv1d.weight"} <= set(params)
    assert r["state_changed"] == []


@pytest.mark.parametrize(
    ("model_type", "says"),
    [
        ("hrm_text", "recurrence"),  # arch._REFUSED
        ("xmod", "no norm feeds a linear"),  # post-norm encoder blocks (the structural fallback)
        ("xmod", "default_language"),  # arch._NEEDS_FIELD: checked first, with or without the job's mappings
        ("gpt2", "Conv1D"),  # arch._LINEAR_LIKE: no nn.Linear in its blocks, only transformers' Conv1D
        ("openai-gpt", "Conv1D"),
        ("zamba", "share the weights"),  # a shared transformer block tied across the hybrid layers
        ("zamba2", "share the weights"),
        ("dory", "n_recurrent_loops"),  # arch._REFUSED: a looped recurrent stack
        ("inkling2_loop_text", "loop_num_passes"),
        ("gemma4_assistant", "drafter"),  # arch._REFUSED by its own type (its text config is gemma4_text)
        ("musicgen", "several text models"),  # text encoder and decoder: get_text_config() is ambiguous
        ("blt", "num_hidden_layers"),  # several stacks, no layer count
    ],
)
def test_refusals_are_one_short_sentence_naming_type_reason_and_way_forward(model_type, says):
    from tiny_families import family_config

    from awqforge.arch import UnsupportedArchitecture, get_adapter

    config = family_config(model_type)
    if says == "default_language":
        config.default_language = None  # as xmod checkpoints ship
    with pytest.raises(UnsupportedArchitecture) as err:
        get_adapter(
            config, mappings=[{"prev": "x", "linears": ["y"]}] if says == "default_language" else None
        )
    msg = str(err.value)
    assert f"'{model_type}'" in msg and says in msg and len(msg) < 400 and msg.count(". ") == 0


def test_tiny_configs_set_size_fields_through_the_attribute_map():
    """GPT-2 names its sizes n_embd / n_layer / n_head (hidden_size etc. are `attribute_map` aliases, absent
    from `to_dict()`); MPT d_model / n_layers / n_heads: the tiny builder shrinks them all."""
    from tiny_families import family_config

    gpt2 = family_config("gpt2")
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.n_positions) == (64, 2, 4, 256)
    mpt = family_config("mpt")
    assert (mpt.d_model, mpt.n_layers, mpt.n_heads) == (64, 2, 4)
    dbrx = family_config("dbrx")  # nested sub-config fields
    assert dbrx.ffn_config.moe_num_experts == 4 and dbrx.attn_config.kv_n_heads == 2


def test_gemma4_text_without_per_layer_inputs_is_quantized():
    from tiny_families import family_config

    from awqforge.arch import get_adapter

    assert (
        get_adapter(family_config("gemma4_text", hidden_size_per_layer_input=0)).family
        == "gemma4_text (structural)"
    )


def test_unexpected_errors_while_reading_a_block_become_a_refusal():
    """A config whose model cannot be built is refused in one sentence, without transformers' class list."""
    import transformers

    from awqforge.arch import UnsupportedArchitecture, get_adapter

    config = transformers.BertConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64
    )
    config.model_type = "not_a_causal_lm"
    with pytest.raises(UnsupportedArchitecture) as err:
        get_adapter(config)
    msg = str(err.value)
    assert "'not_a_causal_lm'" in msg and len(msg) < 400 and "Configuration class" not in msg


@pytest.mark.parametrize(
    ("model_type", "kept"),
    [
        (
            "falcon_mamba",
            "mixer.out_proj",
        ),  # FalconMambaPreTrainedModel._init_weights: module.out_proj.weight
        ("nanochat", "self_attn.o_proj"),  # NanoChatPreTrainedModel._init_weights: module.o_proj.weight
    ],
)
def test_linears_transformers_initialises_by_name_stay_full_precision_and_the_artifact_loads(
    model_type, kept, tiny_tokenizer, tmp_path
):
    """transformers runs the model's `_init_weights` on every module after loading; where it reads a child
    linear's `.weight`, a quantized linear (no `weight`) would stop the load: that linear is kept."""
    pytest.importorskip("compressed_tensors")
    from tiny_families import artifact_roundtrip, save_family_checkpoint

    ckpt = tmp_path / "ckpt"
    save_family_checkpoint(model_type, ckpt, tiny_tokenizer)
    rt = artifact_roundtrip(model_type, ckpt, tmp_path / "out")
    assert rt["max_diff"] < 1e-2 and rt["ours_cos"] > 0.8, rt
    report = json.loads((tmp_path / "out" / "compressed-tensors" / "quant_report.json").read_text())
    quantized = {layer["name"] for layer in report["layers"]}
    assert not any(n.endswith(kept) for n in quantized) and quantized, quantized
    ignore = json.loads((tmp_path / "out" / "compressed-tensors" / "config.json").read_text())
    assert any(n.endswith(kept) for n in ignore["quantization_config"]["ignore"])


@pytest.mark.parametrize("model_type", ["modernbert-decoder", "falcon", "rwkv", "xlstm"])
def test_a_model_with_no_linear_to_quantize_is_refused_up_front(model_type, tiny_tokenizer, tmp_path):
    """ModernBERT-decoder: its `_init_weights` reads every linear's weight; Falcon: FalconLinear has its own
    forward; RWKV and xLSTM: their `_init_weights` reads the weight of every nn.Linear it is given. Refused
    before any work, in one sentence, rather than failing once every block is done (or at load)."""
    from tiny_families import save_family_checkpoint

    from awqforge.arch import UnsupportedArchitecture

    save_family_checkpoint(model_type, tmp_path / "ckpt", tiny_tokenizer)
    with pytest.raises(UnsupportedArchitecture) as err:
        run_quantization(_spec(tmp_path / "ckpt"), tmp_path / "out")
    msg = str(err.value)
    assert f"'{model_type}'" in msg and "none of its blocks' linears" in msg
    assert msg.count(". ") == 0 and len(msg) < 400
    assert not (tmp_path / "out").exists()


def test_activation_scales_only_in_the_awq_format(tiny_tokenizer, tmp_path):
    """GPT-NeoX's GELU -> dense_4h_to_h mapping puts its scales in `mlp.act.scales` (AutoAWQ's layout, read by
    the AWQ format's loaders): with compressed-tensors among the formats it is skipped, said why, and
    transformers computes what our loader does."""
    pytest.importorskip("compressed_tensors")
    from safetensors import safe_open
    from tiny_families import artifact_roundtrip, save_family_checkpoint

    ckpt = tmp_path / "ckpt"
    save_family_checkpoint("gpt_neox", ckpt, tiny_tokenizer)
    rt = artifact_roundtrip("gpt_neox", ckpt, tmp_path / "ct")
    assert rt["max_diff"] < 1e-2, rt
    report = json.loads((tmp_path / "ct" / "compressed-tensors" / "quant_report.json").read_text())
    assert (
        "gpt_neox.layers.0: mlp.act->mlp.dense_4h_to_h: the activation's scales have no place in a "
        "compressed-tensors artifact" in report["skipped_mappings"]
    )
    awq = run_quantization(_spec(ckpt, fmt="awq"), tmp_path / "awq").artifacts["awq"]
    with safe_open(str(awq / "model.safetensors"), "pt") as f:
        assert any(k.endswith("mlp.act.scales") for k in f.keys())
