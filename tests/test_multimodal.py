"""Image-text-to-text checkpoints (awqforge/multimodal.py): the language model quantized, the towers kept.

Every family of tiny_multimodal.MULTIMODAL_FAMILIES is built from its transformers config (1 vision layer,
2 text layers), saved with a tokenizer and processor files, quantized by the pipeline with AWQ and with RTN,
and each artifact is loaded by transformers' AutoModelForImageTextToText (compressed-tensors' own loader): the
towers come back as the source's dense weights, the text logits of AWQ are closer to the FP model's than
RTN's, and our own loader computes the same logits as transformers.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers
from tiny_models import tiny_input_ids
from tiny_multimodal import MULTIMODAL_FAMILIES, build_tiny_multimodal, variant_overrides

from awqforge.arch import UnsupportedArchitecture, get_adapter
from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
from awqforge.loading import load_quantized
from awqforge.pipeline import run_quantization
from awqforge.spec import JobSpec

pytestmark = pytest.mark.usefixtures("one_thread")
needs_ct = pytest.mark.skipif(  # transformers' loader of the artifacts (a dev dependency)
    importlib.util.find_spec("compressed_tensors") is None, reason="compressed-tensors is not installed"
)

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
SIDE_FILES = {
    "preprocessor_config.json": {"image_processor_type": "SiglipImageProcessor", "size": {"height": 32}},
    "processor_config.json": {"processor_class": "TinyProcessor", "image_seq_length": 4},
}


@pytest.fixture(scope="module")
def mm_checkpoint(tmp_path_factory, tiny_tokenizer):
    """mm_checkpoint(family or TEXT_VARIANTS label) -> (folder, FP model): safetensors, tokenizer, chat template,
    processor files."""
    cache = {}

    def make(name: str):
        family, overrides = variant_overrides(name)
        if family not in transformers.CONFIG_MAPPING:  # newer than the transformers installed
            pytest.skip(f"transformers {transformers.__version__} has no model type {family!r}")
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"mm-{family}")
            model = build_tiny_multimodal(family, **overrides)
            model.save_pretrained(folder)
            tiny_tokenizer.save_pretrained(folder)
            (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
            for name, content in SIDE_FILES.items():
                (folder / name).write_text(json.dumps(content))
            cache[name] = (folder, model)
        return cache[name]

    return make


def _quantize(ckpt, out, method="awq", formats=("compressed-tensors",), bits=3, zero_point=False, skip=()):
    spec = JobSpec(
        model=str(ckpt),
        method=method,
        quant={
            "bits": bits,
            "group_size": 32,
            "zero_point": zero_point,
            "modules_to_not_convert": list(skip),
        },
        calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 16, "seq_len": 64},
        formats=list(formats),
        eval={"enabled": False},
        device="cpu",
        n_grid=8,
    )
    return run_quantization(spec, out)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@needs_ct
# + MoE language models (Qwen3-VL-MoE's experts kept fused; Qwen3.5-MoE's per expert, beside gated-delta-rule
# layers), Qwen3.5 as it ships (gated-delta-rule + attention layers), Gemma 4 with per-layer inputs (a per-token
# input per layer, captured per row), and PaliGemma (a composite model whose own init does not set its Gemma
# language model's embed_scale)
@pytest.mark.parametrize(
    "name",
    [
        *MULTIMODAL_FAMILIES,
        "qwen3_vl_moe",
        "qwen3_5_moe",
        "qwen3_5 (hybrid)",
        "gemma4 (per-layer inputs)",
        "paligemma",
    ],
)
def test_language_model_quantized_towers_kept_loads_in_transformers(name, mm_checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText

    ckpt, fp = mm_checkpoint(name)
    family = variant_overrides(name)[0]
    ids = tiny_input_ids(4, 32, seed=7)
    # the source as transformers loads it, in the artifact's attention implementation: PaliGemma's text-only
    # forward is causal in eager attention (the in-memory model's) and bidirectional in sdpa
    want = _logits(AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32), ids)
    errors = {}
    for method in ("rtn", "awq"):
        result = _quantize(ckpt, tmp_path / method, method=method)
        art = result.artifacts["compressed-tensors"]
        config = json.loads((art / "config.json").read_text())
        source = json.loads((ckpt / "config.json").read_text())
        assert config["architectures"] == source["architectures"]
        assert config["model_type"] == family
        if config["text_config"].get(
            "hidden_size_per_layer_input"
        ):  # Gemma 4's per-layer embeddings: kept FP
            ignore = config["quantization_config"]["ignore"]
            assert {"embed_tokens_per_layer", "per_layer_model_projection"} <= {
                n.rsplit(".", 1)[-1] for n in ignore
            }
        model, info = AutoModelForImageTextToText.from_pretrained(
            art, dtype=torch.float32, output_loading_info=True
        )
        assert not any(v for k, v in info.items() if k != "error_msgs"), info  # every tensor placed
        assert type(model).__name__ == source["architectures"][0]
        # the towers and the projector: plain Linear layers, bit for bit the source's weights
        mm = result_multimodal(result)
        fp_modules = dict(fp.named_modules())
        n_tower_linears = 0
        for name, mod in model.named_modules():
            if any(name.startswith(t + ".") for t in mm["kept_in_checkpoint_dtype"]) and isinstance(
                mod, torch.nn.Linear
            ):
                assert not hasattr(mod, "weight_packed"), name
                torch.testing.assert_close(mod.weight, fp_modules[name].weight, rtol=0, atol=0)
                n_tower_linears += 1
        assert n_tower_linears > 0
        lm_linears = [
            n
            for n, m in fp.get_decoder().named_modules()
            if isinstance(m, torch.nn.Linear) and "layers." in n and not n.endswith(("router", "mlp.gate"))
        ]
        assert result.metrics["n_layers_quantized"] >= len(lm_linears)
        got = _logits(model, ids)
        assert torch.isfinite(got).all()
        errors[method] = float((got - want).pow(2).mean())
        if method == "awq":  # our loader (INT4 kernels / dequantized codes) computes what transformers does
            ours = _logits(load_quantized(art, dtype=torch.float32), ids)
            torch.testing.assert_close(ours, got, rtol=1e-3, atol=1e-3)
    assert errors["awq"] < errors["rtn"], errors


def result_multimodal(result) -> dict:
    return json.loads(result.report_path.read_text())["multimodal"]


@needs_ct
def test_artifact_keeps_architecture_processor_files_and_says_how_it_was_calibrated(mm_checkpoint, tmp_path):
    ckpt, _ = mm_checkpoint("llava")
    skip = "model.language_model.layers.0.mlp.down_proj"  # patterns name modules (transformers' module tree)
    result = _quantize(
        ckpt, tmp_path / "out", formats=("compressed-tensors", "awq"), bits=4, zero_point=True, skip=[skip]
    )
    for fmt, art in result.artifacts.items():
        for name in [*SIDE_FILES, "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]:
            assert (art / name).read_bytes() == (ckpt / name).read_bytes(), (fmt, name)
        report = json.loads((art / "quant_report.json").read_text())["multimodal"]
        assert report["kept_in_checkpoint_dtype"] == ["model.vision_tower", "model.multi_modal_projector"]
        assert report["language_model"] == {"path": "model.language_model", "model_type": "llama"}
        assert "text only, through the language model" in report["calibration"]
        card = (art / "README.md").read_text()
        assert "text only, through the language model" in card
        assert "AutoModelForImageTextToText.from_pretrained" in card
        assert "pipeline_tag: image-text-to-text" in card
        qcfg = json.loads((art / "config.json").read_text())["quantization_config"]
        if fmt == "awq":  # substring match in transformers' and vLLM's AWQ loaders
            assert qcfg["modules_to_not_convert"][:2] == ["vision_tower", "multi_modal_projector"]
        else:  # regexes that match the module tree's and the checkpoint's names
            assert qcfg["ignore"][:2] == [
                r"re:(.*\.)?vision_tower(\..*)?$",
                r"re:(.*\.)?multi_modal_projector(\..*)?$",
            ]
        # a linear left out by the job: listed under its module name, not the checkpoint's
        assert skip in qcfg.get("ignore", qcfg.get("modules_to_not_convert"))
    # the blocks under module names (LLaVA's checkpoint: language_model.model.layers.*): a key no renaming
    # touches, which transformers 5.13 reads too (it mangles renamed compressed keys; bench/bench_floor_load.py)
    from safetensors import safe_open

    with safe_open(str(result.artifacts["awq"] / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.language_model.layers.0.self_attn.q_proj.qweight" in names
    assert not any(n.startswith("language_model.model.layers.") for n in names)
    # asymmetric weights through transformers (dequantize=True: see test_formats.ASYM_UPSTREAM)
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    model = AutoModelForImageTextToText.from_pretrained(
        result.artifacts["compressed-tensors"],
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True),
    )
    ids = tiny_input_ids(1, 16)
    ours = _logits(load_quantized(result.artifacts["awq"], dtype=torch.float32), ids)
    torch.testing.assert_close(ours, _logits(model, ids), rtol=1e-3, atol=1e-3)
    # an image through the artifact: the tower's features are the source model's, the logits close to its
    _, fp = mm_checkpoint("llava")
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image_ids = torch.cat([torch.full((1, 16), 512), tiny_input_ids(1, 8)], dim=1)  # 16 patches, 8 words
    with torch.no_grad():
        feats = [m.model.get_image_features(pixel_values=pixels).pooler_output for m in (model, fp)]
        torch.testing.assert_close(feats[0], feats[1], rtol=0, atol=0)
        got, want = (m(input_ids=image_ids, pixel_values=pixels).logits for m in (model, fp))
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95


def test_towers_stay_in_their_own_dtype(tiny_tokenizer, tmp_path):
    """A bf16 text model beside an fp32 vision tower and projector: the towers are written in fp32."""
    from safetensors import safe_open

    model = build_tiny_multimodal("llava").to(torch.bfloat16)
    model.model.vision_tower.float()
    model.model.multi_modal_projector.float()
    model.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["dtype"] = config["text_config"]["dtype"] = "bfloat16"  # the text model's, as such checkpoints say
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    result = _quantize(tmp_path / "ckpt", tmp_path / "out", method="rtn", bits=4)
    art = result.artifacts["compressed-tensors"]
    with safe_open(str(art / "model.safetensors"), "pt") as f:
        dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}
    assert {d for n, d in dtypes.items() if n.startswith(("vision_tower.", "multi_modal_projector."))} == {
        "F32"
    }
    assert dtypes["language_model.model.embed_tokens.weight"] == "BF16"
    assert dtypes["model.language_model.layers.0.mlp.down_proj.weight_scale"] == "BF16"
    loaded = load_quantized(art, dtype=torch.float32)
    assert torch.isfinite(_logits(loaded, tiny_input_ids(1, 8))).all()


def test_adapter_is_the_text_model_s_on_the_language_model_layers():
    from tiny_multimodal import tiny_multimodal_config

    llava = get_adapter(tiny_multimodal_config("llava"))
    assert llava.layers_attr == "model.language_model.layers" and llava.family.startswith(
        "llava (language model"
    )
    llama4 = get_adapter(tiny_multimodal_config("llama4"))
    assert llama4.layers_attr == "language_model.model.layers" and llama4.experts.in_out
    assert get_adapter(tiny_multimodal_config("qwen3_vl")).family == "qwen3_vl (language model, structural)"
    # experts per expert where transformers' loader merges per-expert tensors for a sub-model's type (Qwen3.5-MoE:
    # its text model's), fused and in full precision where it merges none (Qwen3-VL-MoE)
    assert get_adapter(tiny_multimodal_config("qwen3_5_moe")).experts.keep_fused is None
    assert "merges no per-expert" in get_adapter(tiny_multimodal_config("qwen3_vl_moe")).experts.keep_fused
    if "gemma4" not in transformers.CONFIG_MAPPING:
        return
    # Gemma 4 normalises the values (v_norm) between v_proj and o_proj: no v -> o scaling, even without GQA
    gemma4 = tiny_multimodal_config("gemma4")
    gemma4.text_config.num_key_value_heads = 4
    vo = [sp for sp in get_adapter(gemma4).specs if sp.prev == "self_attn.v_proj"]
    assert len(vo) == 1 and "v_norm" in vo[0].disabled
    # an audio tower and its embedder are kept like the vision tower (bench_multimodal's "gemma4 (audio)")
    from tiny_multimodal import _AUDIO

    from awqforge.multimodal import tower_paths

    model = build_tiny_multimodal("gemma4", audio_config=_AUDIO["gemma4"])
    assert tower_paths(model, "model.language_model.layers") == [
        "model.vision_tower",
        "model.audio_tower",
        "model.embed_vision",
        "model.embed_audio",
    ]


def _one_sentence(msg: str, *words: str) -> None:
    assert len(msg) < 500 and msg.count(". ") == 0 and msg.endswith("."), msg
    assert "should be one of" not in msg and "Config, " not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_refusals_are_one_sentence():
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32
    )
    gpt2_text = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2).to_dict()
    with pytest.raises(UnsupportedArchitecture) as err:
        get_adapter(transformers.LlavaConfig(text_config=gpt2_text, vision_config=vision))
    _one_sentence(str(err.value), "'llava'", "'gpt2'", "mappings")
    with pytest.raises(UnsupportedArchitecture) as err:  # towers, but no image-text-to-text model
        get_adapter(transformers.CLIPConfig())
    _one_sentence(str(err.value), "'clip'", "image-text-to-text")
    with pytest.raises(UnsupportedArchitecture) as err:  # no causal LM: no list of config classes
        get_adapter(transformers.AutoConfig.for_model("clip_text_model"))
    assert "should be one of" not in str(err.value) and len(str(err.value)) < 700


def test_streamed_buffers_get_their_sub_model_s_init(mm_checkpoint):
    """PaliGemma's own `_init_weights` has no case for its Gemma language model's scaled embedding: the
    embed_scale buffer (not in the checkpoint) is set by GemmaModel's init, as transformers' loader does, and the
    captured block-0 inputs are the scaled embeddings (an uninitialised buffer made them ~0: AWQ then searched
    its scales on nothing)."""
    from transformers import AutoConfig

    from awqforge.resolve import safetensors_files
    from awqforge.streaming import StreamingModel

    ckpt, fp = mm_checkpoint("paligemma")
    config = AutoConfig.from_pretrained(ckpt)
    stream = StreamingModel(config, safetensors_files(ckpt), get_adapter(config), device=torch.device("cpu"))
    stream.load_non_block()
    emb = stream.model.get_input_embeddings()
    assert float(emb.embed_scale) == pytest.approx(config.text_config.hidden_size**0.5)
    ids = tiny_input_ids(2, 16)
    with torch.no_grad():
        want = fp.get_input_embeddings()(ids)
    torch.testing.assert_close(stream.capture(ids).inputs, want)
