"""Tiny random-init models of any model type transformers ships, from `AutoConfig.for_model(type)`.

`family_config` shrinks a model type's default config (and its text sub-config, for composite configs) by
overriding the size fields it has: hidden 64, 2 layers, 4 heads / 2 kv heads of 16, 4 experts (top-2) of 64,
vocab 512. Per-family extras (a field a family needs to stay small or valid) are data in `EXTRA`. Used by
tests/test_families.py and bench/bench_families.py.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    ffn_hidden_size=128,
    moe_intermediate_size=64,
    expert_intermediate_size=64,
    shared_expert_intermediate_size=128,
    moe_shared_expert_intermediate_size=64,
    intermediate_size_mlp=128,
    num_hidden_layers=2,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,  # MHA: v -> o applies where the structure allows it
    head_dim=16,
    vocab_size=512,
    max_position_embeddings=256,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    moe_topk=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    moe_k=2,
    vocab_size_per_layer_input=512,
    hidden_size_per_layer_input=16,
    mamba_d_ssm=128,
    qk_nope_head_dim=16,
    v_head_dim=16,
    # linear attention (gated delta rule) and Mamba-2 mixers
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    mamba_n_heads=8,
    mamba_d_head=16,
    mamba_head_dim=16,
    mamba_d_state=16,
    ssm_state_size=16,
    mamba_n_groups=1,
    n_groups=1,
    mamba_chunk_size=16,
    chunk_size=16,
    mamba_expand=2,
    sliding_window=16,
    # encoder-decoder / GPT-2-era names that no `attribute_map` aliases to the fields above
    d_model=64,
    ffn_dim=128,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    n_positions=256,
    n_ctx=256,
    max_seq_len=256,
    max_target_positions=256,
    dff=128,
    d_inner=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

MAX_PARAMS = 5_000_000

# Per model type: fields its default config needs changed to be tiny, valid and hybrid (both kinds of layer).
EXTRA: dict[str, dict] = {
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], decoder_sparse_step=1),
    "qwen3_5_text": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]),
    "falcon_h1": dict(),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    "deepseek_v4": dict(o_groups=2, o_lora_rank=32, index_n_heads=2, index_head_dim=16, index_topk=4),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "nemotron_h": dict(hybrid_override_pattern="M*", mtp_hybrid_override_pattern="*"),
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention"]),
    # per-layer fields the config checks against the layer count when it is read back (save -> load)
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], attention_layers=["global", "local"]),
    "kolibri1_1": dict(index_layers=[1], kv_source_layers=[0, 1], index_num_heads=1, index_topk=16),
    "laguna": dict(num_attention_heads_per_layer=[4, 4]),
    "gemma4_unified_text": dict(per_layer_config={}),
    # per-layer inputs as wide as a group (the artifact's g32); no per-layer overrides of the 30-layer default
    "gemma4_text": dict(per_layer_config={}, hidden_size_per_layer_input=32),
    "mamba2": dict(num_heads=8, state_size=16, time_step_rank=8),  # heads x head_dim = 2 x hidden
    # linear-attention heads of 32: the forget gate's and output gate's low-rank b projections read one head's
    # width, which a group of 32 (the artifact's) must divide
    "kimi_linear": dict(num_experts_per_token=2, qk_head_dim=32, linear_head_dim=32, linear_num_heads=4),
    "axk2": dict(gated_norm_rank=32),  # its gated norms' fc2 reads the rank: a group of 32 must divide it
    "longcat_flash": dict(qk_head_dim=32, zero_expert_num=2, expert_ffn_hidden_size=64),  # nope + rope
    # sliding-window layers double the kv heads: 2 -> 4, not more than the 4 query heads
    "mimo_v2_flash": dict(num_key_value_heads=2),
    # one expert group (of 4 experts), top-2; linear attention 4 heads of 16; MLA q/k 16 nope + 16 rope
    "bailing_hybrid": dict(
        num_expert_group=1,
        num_experts_per_token=2,
        linear_num_heads=4,
        linear_head_dim=16,
        qk_head_dim=32,
        expert_swiglu_limit_list=[0, 0],  # one per layer
        share_expert_swiglu_limit_list=[0, 0],
    ),
    "rwkv": dict(attention_hidden_size=64),
    "xmod": dict(default_language="en_XX"),  # its forward needs a language (adapters) when given no lang_ids
    # 4 heads of 32 (q/k 16: its native chunkwise kernel fails on 8-wide q/k heads)
    "xlstm": dict(hidden_size=128, embedding_dim=128, num_blocks=2, num_heads=4),
    "dots3_note_text": dict(
        per_layer_config={}, head_dim=64, qk_nope_head_dim=48, index_head_dim=16, index_n_heads=2
    ),  # rope 64 x 0.25
    # rotary dims within a head of 16
    "codegen": dict(rotary_dim=8),
    "gptj": dict(rotary_dim=8),
    # attention and MoE settings in sub-configs; transformers' default attn_config lacks the rope_theta it reads
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),  # its forward clamps whatever it is
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2, hidden_size=64),
    ),
    "ergo": dict(first_dense_intermediate_size=128, shared_intermediate_size=64),
    "inkling2_text": dict(unpadded_vocab_size=512, swa_head_dim=16),
    "inkling2_loop_text": dict(unpadded_vocab_size=512, swa_head_dim=16),
    "recurrent_gemma": dict(lru_width=64, attention_window_size=16),
    "roc_bert": dict(
        pronunciation_embed_dim=16, pronunciation_vocab_size=16, shape_embed_dim=16, shape_vocab_size=16
    ),
    # attention on the [hidden, hidden] concatenation: 2 x 64 wide, 4 heads of 32
    # both layers hybrid: the shared transformer block is called by each of them, tied (as checkpoints ship)
    "zamba": dict(
        tie_word_embeddings=True,
        attention_hidden_size=128,
        attention_head_dim=32,
        mamba_dt_rank=8,
        attn_layer_period=1,
        attn_layer_offset=0,
        layers_block_type=["hybrid", "hybrid"],
    ),
    "zamba2": dict(
        tie_word_embeddings=True,
        attention_hidden_size=128,
        attention_head_dim=32,
        mamba_headdim=16,
        kv_channels=16,
        adapter_rank=8,
        layers_block_type=["hybrid", "hybrid"],
        hybrid_layer_ids=[0, 1],
    ),
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=[16, 48]),  # its LM head requires is_decoder
    # 2 layers: none left to share another's cache; one MLP width per layer
    "gemma3n_text": dict(num_kv_shared_layers=0, intermediate_size=[128, 128]),
    "gemma4_unified_assistant": dict(num_kv_shared_layers=2),
    # byte-group hash embeddings of 512 rows each; local models read the global model's 64-wide patches
    "blt": dict(encoder_hash_byte_group_vocab=512, hidden_size_global=64),
    "blt_local_encoder": dict(hidden_size_global=64),
    "blt_local_decoder": dict(hidden_size_global=64),
    "phi4_multimodal_audio": dict(
        ext_pw_out_channel=64, depthwise_separable_out_channel=64, nemo_conv_channels=64
    ),  # every layer reads the target model's cache
    # input, recurrent (looped) and output stacks of one layer each
    "dory": dict(
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        n_input_layers=1,
        n_output_layers=1,
        n_recurrent_layers=1,
    ),
    # drafters: no per-layer inputs, every layer reads the target model's cache
    "gemma4_assistant": dict(
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=2
    ),
    # transformers' defaults leave these unset, and its model reads them
    "qwen4_exp_text": dict(
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=16,
        indexer_compress_ratio=4,
    ),
    "cohere_compass_text": dict(
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    ),
}

# Fields a model type's default config must be built with (its validation rejects transformers' own defaults)
INIT: dict[str, dict] = {
    "gemma4_assistant": dict(text_config=dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0))
}


# Integer buffers a checkpoint fills and random init leaves at zero, by name suffix -> the config field bounding
# their values: DeepSeek-V4's hash routing table (token -> experts; all zeros would send every token to expert 0)
RANDOM_BUFFERS = {"tid2eid": "n_routed_experts"}


# Per-layer lists (one entry per layer, or a pattern cycled over the layers): cut to the layer count, each kind
# of layer kept (Zamba's `layers_block_type`, RecurrentGemma's `block_types`); not the MTP layers' (`mtp_...`)
PER_LAYER_LISTS = ("layer_types", "layers_block_type", "block_types")


def _has_field(cfg, key: str) -> bool:
    """A field of the config under this name, or an alias its `attribute_map` resolves (GPT-2's hidden_size is
    n_embd: setting hidden_size sets n_embd; `to_dict()` lists only n_embd)."""
    return key in cfg.to_dict() or key in getattr(cfg, "attribute_map", {})


def _shrink(cfg, model_type: str) -> None:
    for key, value in {**SIZES, **EXTRA.get(model_type, {})}.items():
        if _has_field(cfg, key) or key in EXTRA.get(model_type, {}):
            try:
                sub = getattr(cfg, key, None)
            except Exception:  # noqa: BLE001 - a per-layer field read globally (Gemma-4-unified's head_dim)
                sub = None
            if isinstance(value, dict) and isinstance(sub, transformers.PretrainedConfig):
                for k, v in value.items():  # fields of a nested config (DBRX's attn_config / ffn_config)
                    setattr(sub, k, v)
                continue
            try:
                setattr(cfg, key, value)
            except (AttributeError, ValueError, TypeError):
                pass
    n = getattr(cfg, "num_hidden_layers", None)
    for key, lt in cfg.to_dict().items():  # layer_types, mlp_layer_types, ...: one entry per layer
        if not (
            key.endswith(PER_LAYER_LISTS) and not key.startswith("mtp_") and isinstance(lt, list) and n
        ) or key in EXTRA.get(model_type, {}):
            continue
        if len(lt) != n:
            try:
                setattr(cfg, key, (list(dict.fromkeys(lt)) * n)[:n])
            except (AttributeError, ValueError, TypeError):
                pass


def _text_config(cfg) -> transformers.PretrainedConfig:
    """The config of the decoder that gets quantized: `get_text_config()`, or, where a composite config has
    several (MusicGen's text encoder and decoder), its `decoder`."""
    try:
        return cfg.get_text_config()
    except ValueError:
        return getattr(cfg, "decoder", cfg)


def family_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    """The default config of `model_type`, shrunk (see module docstring); overrides win."""
    cfg = transformers.AutoConfig.for_model(model_type, **INIT.get(model_type, {}))
    _shrink(cfg, model_type)
    text = _text_config(cfg)
    if text is not cfg:
        _shrink(text, text.model_type)
        for key, value in EXTRA.get(model_type, {}).items():  # a composite type's extras for its decoder
            if _has_field(text, key):
                setattr(text, key, value)
    for key in getattr(cfg, "sub_configs", {}):  # vision / audio towers, BLT's patcher and local models
        sub = getattr(cfg, key, None)
        if isinstance(sub, transformers.PretrainedConfig) and sub is not text:
            _shrink(sub, sub.model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_family_model(model_type: str, seed: int = 0, outliers: bool = True, **overrides) -> PreTrainedModel:
    """A random-init fp32 causal LM of `model_type` in eval mode (eager attention); norms get a spread and a
    few outlier channels as in tests/tiny_models.py."""
    torch.manual_seed(seed)
    config = family_config(model_type, **overrides)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if n_params > MAX_PARAMS:
        raise ValueError(
            f"{model_type}: {n_params / 1e6:.0f}M parameters after shrinking (fields not covered)"
        )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 1 or "norm" not in name.rsplit(".", 1)[-1]:
                continue
            plus_one = bool(w.abs().max() < 1e-6)  # zero-initialised: a (1 + w) norm
            gain = torch.exp(0.3 * torch.randn(w.shape, generator=gen))
            if outliers:
                gain[torch.randperm(w.shape[0], generator=gen)[:3]] *= 8.0
            w.copy_(gain - 1.0 if plus_one else gain)
        for name, buf in model.named_buffers():
            field = next((f for suffix, f in RANDOM_BUFFERS.items() if name.endswith(suffix)), None)
            if field is not None:
                high = getattr(config.get_text_config(), field)
                buf.copy_(torch.randint(0, high, buf.shape, generator=gen))
    return model.eval()


def logits_errors(model_type: str, bits: int = 3, group_size: int = 16, n_grid: int = 8) -> dict:
    """AWQ's and RTN's output error (logits MSE vs the FP model on held-out ids) of a tiny `model_type`,
    quantized block by block in memory as the pipeline does; also what the block reports per layer."""
    from awqforge.arch import get_adapter, keep_linears_read_at_init, refuse_nothing_to_quantize
    from awqforge.awq import BlockSettings, capture_layer_inputs, quantize_block

    calib, held_out = _ids(8, 32, 0), _ids(4, 32, 1)
    ref = build_family_model(model_type)
    out = {"family": get_adapter(ref.config).family}  # a refusal first, as in the pipeline
    with torch.no_grad():
        want = ref(held_out).logits
    with torch.device("meta"):  # the pipeline's skeleton (awqforge.streaming)
        skeleton = AutoModelForCausalLM.from_config(ref.config)
    refuse_nothing_to_quantize(skeleton, keep_linears_read_at_init(get_adapter(ref.config), skeleton))
    for method in ("rtn", "awq"):
        model = build_family_model(model_type)
        adapter = keep_linears_read_at_init(get_adapter(model.config), skeleton)
        layers = adapter.get_layers(model)
        captured = capture_layer_inputs(model, layers, calib)
        x, skipped, n_linears, scaled = captured.inputs, [], 0, set()
        for i, block in enumerate(layers):
            res = quantize_block(
                block,
                x,
                captured.layer_kwargs[i],
                settings=BlockSettings(method=method, bits=bits, group_size=group_size, n_grid=n_grid),
                adapter=adapter,
                block_index=i,
                block_prefix=f"{adapter.layers_attr}.{i}",
            )
            x, n_linears = res.outputs, n_linears + len(res.quantized)
            skipped += [f"{i}.{s}" for s in res.skipped]
            out[f"{method}_quantized"] = out.get(f"{method}_quantized", []) + [
                f"{i}.{n}" for n in res.quantized
            ]
            scaled |= {f"{i}.{m.name}" for m in res.layers if m.scale_ratio is not None}
        with torch.no_grad():
            out[method] = float((model(held_out).logits - want).pow(2).mean())
        out[f"{method}_skipped"], out["n_linears"], out[f"{method}_scaled"] = skipped, n_linears, len(scaled)
    out["ratio"] = out["awq"] / out["rtn"] if out["rtn"] > 0 else float("nan")
    out["kept_fp"] = kept_full_precision(model, adapter)
    # state / convolution parameters (not linears, not norms or routers, which absorb scales) left untouched
    fp_params = dict(ref.named_parameters())
    linear_params = {
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        for p in ("weight", "bias")
    }
    out["state_changed"] = [
        n
        for n, p in model.named_parameters()
        if any(k in n for k in ("conv", "A_log", "dt_bias", ".D"))
        and n not in linear_params
        and n in fp_params
        and not torch.equal(p, fp_params[n])
    ]
    return out


def kept_full_precision(model, adapter) -> list[str]:
    """Block parameters of 2 or more dims that are not quantized linears' (fused experts kept, convs, ...)."""
    from torch import nn

    kept = set()
    for block in adapter.get_layers(model)[:2]:
        linear_ids = {id(m.weight) for m in block.modules() if isinstance(m, nn.Linear)}
        for name, p in block.named_parameters():
            if p.dim() >= 2 and id(p) not in linear_ids:
                kept.add(name)
    return sorted(kept)


def _ids(n: int, seq: int, seed: int, vocab: int = 512) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seq), generator=gen)


def save_family_checkpoint(model_type: str, folder, tokenizer) -> None:
    build_family_model(model_type).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def artifact_roundtrip(model_type: str, ckpt, out_dir, method: str = "awq") -> dict:
    """Quantize the checkpoint with the pipeline (W4 g32 symmetric compressed-tensors), load the artifact with
    transformers' default loading and with AWQForge's loader; the two logits' max difference (relative to
    the largest logit) and each one's cosine to the FP model's."""
    from transformers import AutoModelForCausalLM

    import awqforge
    from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
    from awqforge.pipeline import run_quantization
    from awqforge.spec import JobSpec

    spec = JobSpec(
        model=str(ckpt),
        method=method,
        quant={"bits": 4, "group_size": 32, "zero_point": False},
        calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 4, "seq_len": 32},
        formats=["compressed-tensors"],
        eval={"enabled": False},
        device="cpu",
        n_grid=4,
    )
    result = run_quantization(spec, out_dir)
    artifact = result.artifacts["compressed-tensors"]
    ids = _ids(1, 16, 2)
    fp = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours = awqforge.load_quantized(artifact)
    with torch.no_grad():
        ref, mine = fp(ids).logits, ours(ids).logits
    out = {"ours_cos": float(torch.nn.functional.cosine_similarity(mine.flatten(), ref.flatten(), dim=0))}
    theirs = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval()
    with torch.no_grad():
        got = theirs(ids).logits
    out["max_diff"] = float((got - mine).abs().max() / mine.abs().max())
    out["theirs_cos"] = float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0))
    out["n_layers_quantized"] = result.metrics["n_layers_quantized"]
    return out
