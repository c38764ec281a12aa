"""Tiny random-init image-text-to-text models (a vision tower, a projector, a 2-layer text model).

The text model is tests/tiny_models' (hidden 128, 2 layers, vocab 512 that the tiny tokenizer fits, norm gains
with outlier channels); the vision tower has 1 layer of width 32 to 64. Image / video token ids sit above the
tokenizer's ids (vocab 520), so text never contains one: calibration and the checks run text through the
language model, as the pipeline does by default.
"""

from __future__ import annotations

import torch
from tiny_models import _COMMON, tiny_config
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel

from awqforge.structure import norm_plus_one

MULTIMODAL_FAMILIES = [
    "gemma3",
    "gemma4",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_5",
    "mistral3",
    "llava",
    "llama4",
]
VOCAB = 520  # ids 512..519: image / video / special tokens of the multimodal configs
_SPECIAL = dict(
    image_token_id=512,
    image_token_index=512,
    video_token_id=513,
    boi_token_index=514,
    eoi_token_index=515,
    boi_token_id=514,
    eoi_token_id=515,
    vision_start_token_id=516,
    vision_end_token_id=517,
    audio_token_id=518,
    boa_token_id=519,
)

_VISION = {  # 1 layer, tiny widths, per vision tower's own field names
    "gemma3": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    ),
    "gemma4": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=8,
        position_embedding_size=64,
    ),
    "qwen2_5_vl": dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=128,
        fullatt_block_indexes=[0],
        window_size=32,
        patch_size=8,
    ),
    "qwen3_vl": dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=128,
        deepstack_visual_indexes=[0],
        num_position_embeddings=64,
        patch_size=8,
    ),
    "qwen3_5": dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=128,
        num_position_embeddings=64,
        patch_size=8,
    ),
    "mistral3": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=32,
        patch_size=8,
    ),
    "llava": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    ),
    "llama4": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        vision_output_dim=64,
        projector_input_dim=128,
        projector_output_dim=128,
    ),
}
# More image-text-to-text families transformers ships, measured by bench/bench_multimodal.py
EXTRA_FAMILIES = [
    "paligemma",
    "qwen2_vl",
    "smolvlm",
    "internvl",
    "llava_next",
    "glm4v",
    "qwen3_vl_moe",
    "qwen3_5_moe",
]
_VISION.update(
    paligemma=dict(_VISION["gemma3"]),
    qwen2_vl=dict(depth=1, embed_dim=32, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=8),
    smolvlm=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    ),
    internvl=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=[32, 32],
        patch_size=[8, 8],
    ),
    llava_next=dict(_VISION["llava"]),
    qwen3_vl_moe=dict(_VISION["qwen3_vl"]),
    qwen3_5_moe=dict(_VISION["qwen3_5"]),
    glm4v=dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=128,
        patch_size=8,
        image_size=32,
    ),
)
_AUDIO = {  # Gemma 4 with an audio tower too (bench/bench_multimodal.py's "gemma4 (audio)")
    "gemma4": dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        subsampling_conv_channels=[8, 8],
        output_proj_dims=32,
    ),
}
# A family's text model as it also ships: label -> (model_type, text-config fields over _text_config's)
TEXT_VARIANTS = {
    "qwen3_5 (hybrid)": ("qwen3_5", {"layer_types": ["linear_attention", "full_attention"]}),
    # per-layer embeddings: a per-token input beside hidden_states, one per layer (as wide as a group of 32)
    "gemma4 (per-layer inputs)": ("gemma4", {"hidden_size_per_layer_input": 32}),
}
_TEXT_TYPE = {
    "gemma3": "gemma3_text",
    "mistral3": "mistral",
    "llava": "llama",
    "llama4": "llama4_text",
    "paligemma": "gemma",
    "smolvlm": "llama",
    "internvl": "qwen2",
    "llava_next": "llama",
}


def _text_config(family: str) -> dict:
    text_type = _TEXT_TYPE.get(family)
    if text_type is not None:  # a text family tiny_models knows: its tiny config
        kw = tiny_config(text_type).to_dict()
        kw = {k: v for k, v in kw.items() if k not in ("architectures", "transformers_version", "model_type")}
    else:
        kw = dict(_COMMON)
        if family == "gemma4":  # no per-layer inputs (PLE) unless a variant asks (TEXT_VARIANTS)
            kw.update(
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=16,
                hidden_size_per_layer_input=0,
                num_kv_shared_layers=0,
                global_head_dim=32,
            )
        if family in ("qwen3_vl_moe", "qwen3_5_moe"):
            kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1)
        if family == "qwen3_5_moe":
            kw.update(shared_expert_intermediate_size=128)
        if family in ("qwen3_5", "qwen3_5_moe"):  # gated-delta-rule layers: 2 key / 4 value heads of 16
            kw.update(
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                linear_key_head_dim=16,
                linear_value_head_dim=16,
            )
        if family in (
            "qwen2_5_vl",
            "qwen3_vl",
            "qwen3_5",
            "qwen2_vl",
            "glm4v",
            "qwen3_vl_moe",
            "qwen3_5_moe",
        ):
            kw.update(
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
            )
        if family == "qwen3_5":  # attention layers only; TEXT_VARIANTS' "qwen3_5 (hybrid)" as it ships
            kw.update(layer_types=["full_attention", "full_attention"])
        if family == "qwen3_5_moe":  # as it ships: a gated-delta-rule layer, then an attention layer
            kw.update(layer_types=["linear_attention", "full_attention"])
    kw.update(vocab_size=VOCAB, tie_word_embeddings=False)
    return kw


def tiny_multimodal_config(family: str, **overrides):
    """The config of a tiny image-text-to-text model of `family` (a model_type of MULTIMODAL_FAMILIES)."""
    kw = dict(text_config=_text_config(family), vision_config=_VISION[family], tie_word_embeddings=False)
    kw.update(_SPECIAL)
    kw.update(overrides)
    config = AutoConfig.for_model(family, **kw)
    for key, value in _SPECIAL.items():  # configs that do not declare a token field keep it out
        if hasattr(config, key) and getattr(config, key) != value:
            setattr(config, key, value)
    return config


def variant_overrides(name: str) -> tuple[str, dict]:
    """(model_type, build_tiny_multimodal overrides) of a family or a TEXT_VARIANTS label."""
    family, text = TEXT_VARIANTS.get(name, (name, None))
    return family, ({"text_config": {**_text_config(family), **text}} if text else {})


def build_tiny_multimodal(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A random-init image-text-to-text model of `family` in eval mode (eager attention), text norms with
    outlier gains as tiny_models builds them."""
    torch.manual_seed(seed)
    config = tiny_multimodal_config(family, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Gemma's embeddings are multiplied by sqrt(hidden) (11.3 here): random-init rows of std 0.02 would start
        # the residual stream 10x larger than what two random blocks add to it without Gemma 3/4's post-norms
        # (PaliGemma's Gemma), and the quantized blocks' error would be a few percent of the logits'. Rows
        # scaled down by it start the stream at the other families' size.
        emb = model.get_input_embeddings()
        if getattr(emb, "embed_scale", None) is not None:
            emb.weight.div_(float(emb.embed_scale))
        for name, mod in model.get_decoder().named_modules():
            w = getattr(mod, "weight", None)
            if w is None or w.dim() != 1 or not name.endswith(("norm", "layernorm")):
                continue
            gain = torch.exp(0.3 * torch.randn(w.shape, generator=gen))
            gain[torch.randperm(w.shape[0], generator=gen)[:3]] *= 8.0
            w.copy_(gain - 1.0 if norm_plus_one(mod) else gain)  # Gemma's norms compute x * (1 + w)
    return model.eval()
