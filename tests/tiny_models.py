"""Tiny random-init transformers models of every family AWQForge supports (shared by the tests).

Hidden 128, intermediate 256, 2 layers, 4 heads, 2 kv heads (head_dim 32), vocab 512: every input
width is divisible by 64, so group sizes 32 and 64 work. Norm weights get a spread and a few outlier
channels, as trained models have, so activation-aware scaling has something to find.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "opt",
    "gpt_neox",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "llama4_text",
]
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
# model types outside the registry that the structural fallback (awqforge.structure) claims: Llama-shaped,
# parallel (cohere), post-norm (olmo2), fused gate_up (glm), LayerNorm + ungated GELU MLP (starcoder2)
FALLBACK_FAMILIES = [
    "internlm3",
    "cohere",
    "glm",
    "olmo2",
    "granite",
    "helium",
    "smollm3",
    "ernie4_5",
    "starcoder2",
]

_COMMON = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """The config of a tiny model of `family` (a model_type from FAMILIES); overrides win."""
    kw = dict(_COMMON)
    if family == "opt":
        kw = dict(
            hidden_size=128,
            ffn_dim=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=512,
            word_embed_proj_dim=128,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    elif family == "gpt_neox":
        kw = dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=512,
            max_position_embeddings=256,
            rotary_pct=0.5,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    elif family in ("gemma2", "gemma3_text"):
        kw.update(
            sliding_window=16, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32
        )
    elif family == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    elif family == "qwen2_moe":
        kw.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
            decoder_sparse_step=1,
        )
    elif family in ("deepseek_v2", "deepseek_v3"):
        kw.update(  # MLA (one kv head per head) with a q LoRA rank; layer 0 dense, layer 1 MoE, shared expert
            num_key_value_heads=4,
            head_dim=16,  # the rotary part (qk_rope_head_dim), as DeepSeek configs set it
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=64,
            kv_lora_rank=64,
            qk_rope_head_dim=16,
            qk_nope_head_dim=32,
            v_head_dim=32,
            n_group=1,
            topk_group=1,
        )
    elif family == "llama4_text":
        kw.update(  # layer 0 dense, layer 1 MoE (4 routed experts, top-1, a shared expert); layer 0 is NoPE
            num_attention_heads=4,
            intermediate_size=128,  # each expert's and the shared expert's
            intermediate_size_mlp=256,  # the dense layers'
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            no_rope_layers=[0, 1],
            use_qk_norm=True,
            attention_chunk_size=16,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        )
    elif family == "qwen3_moe":
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1)
    kw.update(overrides)
    cls = transformers.CONFIG_MAPPING[family]
    return cls(**kw)


def build_tiny_model(
    family: str, dtype: torch.dtype = torch.float32, seed: int = 0, outliers: bool = True, **overrides
) -> PreTrainedModel:
    """A random-init causal LM of `family` in eval mode (eager attention, deterministic for a seed)."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    plus_one = family.startswith("gemma")
    with torch.no_grad():
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if w is None or w.dim() != 1 or not name.endswith(("norm", "layer_norm", "layernorm")):
                continue
            gain = torch.exp(0.3 * torch.randn(w.shape, generator=gen))
            if outliers:
                idx = torch.randperm(w.shape[0], generator=gen)[:3]
                gain[idx] *= 8.0
            w.copy_(gain - 1.0 if plus_one else gain)
            b = getattr(mod, "bias", None)
            if b is not None:
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model.to(dtype).eval()


def tiny_input_ids(n: int = 4, seq: int = 32, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    """Random token ids [n, seq] (ids 3.. so no special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seq), generator=gen)
