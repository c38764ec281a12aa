"""Artifacts checked by third-party code: transformers + compressed-tensors, and an AWQ reader written here
from the published layout (never awqforge.packing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from awqforge.errors import InputError
from awqforge.formats import ArtifactExists, ArtifactWriter, ModelCardInfo, verify_manifest
from awqforge.quant import QuantizedTensor, quantize_tensor
from awqforge.spec import QuantSettings

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a quantized model is only useful if the serving stack loads it",
    "activation aware weight quantization keeps salient channels accurate",
    "hello world this is a tiny tokenizer for tests",
    "vllm and transformers read the same checkpoint",
]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


# --------------------------------------------------------------------------------------------
# A tiny Llama checkpoint with its tokenizer, and an RTN quantization of it (shared with test_loading)
# --------------------------------------------------------------------------------------------


def build_tiny_checkpoint(root: Path, *, tie: bool = False, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(root)

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # default init is tiny (std 0.02): widen so that quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(root, safe_serialization=True)
    (root / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n\n# tiny llama\n")
    (root / "LICENSE").write_text("Apache License 2.0 (test)\n")
    return root


def quantize_linears(
    model: nn.Module, bits: int, group_size: int, zero_point: bool
) -> dict[str, QuantizedTensor]:
    """RTN of every Linear but lm_head: {module name: QuantizedTensor}."""
    return {
        name: quantize_tensor(module.weight.detach().float(), bits, group_size, zero_point)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head"
    }


def load_source(root: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()


def write_artifact(
    source: Path, out: Path, fmt: str, *, bits: int = 4, group_size: int = 32, zero_point: bool = True, **kw
) -> tuple[Path, dict[str, QuantizedTensor]]:
    """Quantize the source by RTN and stream it through ArtifactWriter the way the pipeline does."""
    model = load_source(source)
    qts = quantize_linears(model, bits, group_size, zero_point)
    settings = QuantSettings(bits=bits, group_size=group_size, zero_point=zero_point)
    with ArtifactWriter(out, fmt, source_dir=source, settings=settings, **kw) as writer:
        modules = dict(model.named_modules())
        for name in qts:
            writer.add_quantized(name, qts[name], modules[name].bias)
        for name, tensor in model.state_dict().items():
            module_name, _, attr = name.rpartition(".")
            if module_name in qts:
                continue
            writer.add_tensor(name, tensor)
        writer.finish_tensors()
        card = ModelCardInfo(
            base_model="acme/tiny-llama",
            method="rtn",
            calibration="none (round-to-nearest)",
            fp_perplexity=12.3456,
            quant_perplexity=13.5,
            eval_description="the built-in text, 64-token windows",
            metrics={"size_before_bytes": 4_000_000, "size_after_bytes": 1_000_000},
        )
        writer.finalize(card)
    return out, qts


def dense_reference(source: Path, qts: dict[str, QuantizedTensor]) -> nn.Module:
    """The source model with each quantized linear's weight replaced by its dequantized (fake-quant) weight."""
    model = load_source(source)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, qt in qts.items():
            modules[name].weight.copy_(qt.dequantize(torch.float32))
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny-llama")


# --------------------------------------------------------------------------------------------
# An AWQ gemm reader written from the published layout (AutoAWQ WQLinear_GEMM, vLLM awq)
# --------------------------------------------------------------------------------------------

# In each int32 word, nibble k (bits 4k..4k+3) holds output channel PACK_ORDER[k] of eight consecutive ones.
PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def read_awq_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] -> int64 [rows, cols] of unsigned 4-bit values."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    rows, n = words.shape
    out = torch.empty(rows, n * 8, dtype=torch.int64)
    for k, channel in enumerate(PACK_ORDER):
        out[:, channel::8] = (words >> (4 * k)) & 0xF
    return out


def read_awq_layer(tensors: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """Dense W [out, in] = (q - z) * s from qweight [in, out/8], qzeros [in/g, out/8], scales [in/g, out]."""
    q = read_awq_int4(tensors["qweight"])  # [in, out]
    z = read_awq_int4(tensors["qzeros"])  # [G, out]
    s = tensors["scales"].float()  # [G, out]
    g = q.shape[0] if group_size == -1 else group_size
    z_full = z.repeat_interleave(g, dim=0)
    s_full = s.repeat_interleave(g, dim=0)
    return ((q - z_full).float() * s_full).t()


def read_safetensors_dir(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --------------------------------------------------------------------------------------------
# AWQ
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size,zero_point", [(32, True), (-1, True), (64, False)])
def test_awq_artifact_read_by_independent_reader(source, tmp_path, group_size, zero_point):
    out, qts = write_artifact(source, tmp_path / "awq", "awq", group_size=group_size, zero_point=zero_point)
    tensors = read_safetensors_dir(out)
    for name, qt in qts.items():
        layer = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")}
        assert layer["qweight"].dtype == torch.int32 and layer["qweight"].shape == (
            qt.shape[1],
            qt.shape[0] // 8,
        )
        assert layer["scales"].dtype == torch.float16
        assert f"{name}.weight" not in tensors
        q = read_awq_int4(layer["qweight"])
        assert torch.equal(q.t(), qt.qweight.to(torch.int64))
        z = read_awq_int4(layer["qzeros"])
        assert torch.equal(z.t(), qt.zeros.to(torch.int64))
        if not zero_point:
            assert bool((z == 8).all())  # symmetric: explicit zero point 8
        expected = (
            qt.qweight.float() - qt.zeros.float().repeat_interleave(qt.shape[1] // qt.scales.shape[1], dim=1)
        ) * qt.scales.half().float().repeat_interleave(qt.shape[1] // qt.scales.shape[1], dim=1)
        torch.testing.assert_close(read_awq_layer(layer, group_size), expected, rtol=0, atol=0)
    # everything else unchanged
    src = read_safetensors_dir(source)
    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        assert torch.equal(tensors[name], src[name])

    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }
    assert config["model_type"] == "llama" and config["hidden_size"] == 128


def test_awq_configs_parse_with_transformers(source, tmp_path):
    from transformers import AutoConfig, AwqConfig

    out, _ = write_artifact(source, tmp_path / "awq", "awq")
    config = AutoConfig.from_pretrained(out)
    awq = AwqConfig.from_dict(config.quantization_config)
    assert (awq.bits, awq.group_size, awq.zero_point) == (4, 32, True)
    assert str(getattr(awq.format, "value", awq.format)) == "gemm"
    assert awq.modules_to_not_convert == ["lm_head"]
    assert vllm_awq_keys(config.quantization_config) == (4, 32, True)


def vllm_awq_keys(qcfg: dict) -> tuple[int, int, bool]:
    """What vLLM's AWQConfig/AWQMarlinConfig.from_config read (vLLM cannot be installed here)."""
    assert qcfg["quant_method"] == "awq"
    bits = next(qcfg[k] for k in ("w_bit", "bits") if k in qcfg)
    group = next(qcfg[k] for k in ("q_group_size", "group_size") if k in qcfg)
    return bits, group, qcfg["zero_point"]


def test_awq_refuses_other_bit_widths(source, tmp_path):
    settings = QuantSettings(bits=3, group_size=32)
    with pytest.raises(InputError, match="4-bit only"):
        ArtifactWriter(tmp_path / "x", "awq", source_dir=source, settings=settings)
    assert not list(tmp_path.iterdir())  # refused before creating anything


# --------------------------------------------------------------------------------------------
# compressed-tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,group_size,zero_point", [(4, 32, True), (4, -1, False), (3, 32, True), (8, 64, False)]
)
def test_compressed_tensors_decompressed_by_transformers(source, tmp_path, bits, group_size, zero_point):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out, qts = write_artifact(
        source, tmp_path / "ct", "compressed-tensors", bits=bits, group_size=group_size, zero_point=zero_point
    )
    tensors = read_safetensors_dir(out)
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32
    assert tensors[f"{name}.weight_shape"].tolist() == [128, 128]
    assert (f"{name}.weight_zero_point" in tensors) == zero_point

    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    modules = dict(model.named_modules())
    for name, qt in qts.items():
        torch.testing.assert_close(
            modules[name].weight.detach().float(), qt.dequantize(torch.float32), rtol=0, atol=0
        )
    src = read_safetensors_dir(source)
    torch.testing.assert_close(modules["lm_head"].weight.detach(), src["lm_head.weight"], rtol=0, atol=0)


ASYM_UPSTREAM = (
    "compressed-tensors 0.20 builds the compressed skeleton on meta without packing weight_zero_point "
    "([out, G] instead of the packed [out*bits/32, G] its own compressor writes and vLLM reads), so transformers "
    "re-initialises asymmetric zero points unless dequantize=True"
)


@pytest.mark.parametrize(
    "zero_point", [False, pytest.param(True, marks=pytest.mark.xfail(reason=ASYM_UPSTREAM, strict=False))]
)
def test_compressed_tensors_runs_compressed_in_transformers(source, tmp_path, zero_point):
    """Default loading (compressed modules, decompressed on the fly) computes the fake-quantized model."""
    from transformers import AutoModelForCausalLM

    out, qts = write_artifact(source, tmp_path / "ct", "compressed-tensors", zero_point=zero_point)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = dense_reference(source, qts)
    ids = torch.tensor([[1, 5, 9, 23, 7, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_compressed_tensors_config_parses(source, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoConfig, CompressedTensorsConfig

    out, _ = write_artifact(source, tmp_path / "ct", "compressed-tensors", group_size=-1, zero_point=False)
    qcfg = AutoConfig.from_pretrained(out).quantization_config
    ct = QuantizationConfig.model_validate(qcfg)
    assert ct.format == "pack-quantized" and str(ct.quantization_status.value) == "compressed"
    weights = ct.config_groups["group_0"].weights
    assert (weights.num_bits, weights.symmetric, weights.strategy, weights.group_size) == (
        4,
        True,
        "channel",
        None,
    )
    assert ct.ignore == ["lm_head"]
    hf = CompressedTensorsConfig.from_dict(qcfg)
    assert hf.quantization_config.config_groups["group_0"].targets == ["Linear"]
    assert vllm_picks_wna16(qcfg)


def vllm_picks_wna16(qcfg: dict) -> bool:
    """vLLM's CompressedTensorsConfig (cannot be installed here) parses each group's weights with compressed-tensors'
    QuantizationArgs and picks its W4A16/W8A16 scheme for static group/channel int weights, no activation
    quantization, format pack-quantized and 4 or 8 bits."""
    from compressed_tensors.quantization import QuantizationArgs

    ok = qcfg["format"] == "pack-quantized"
    for group in qcfg["config_groups"].values():
        weights = QuantizationArgs.model_validate(group["weights"])
        ok &= group.get("input_activations") is None and not weights.dynamic
        ok &= weights.strategy in ("group", "channel") and weights.num_bits in (4, 8)
    return ok


def test_tensors_keep_the_checkpoint_dtype(source, tmp_path):
    """The pipeline may hand over fp32 tensors; the artifact keeps the source's dtype (here bf16)."""
    import shutil

    src = tmp_path / "bf16-src"
    shutil.copytree(source, src)
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(config))
    out, _ = write_artifact(src, tmp_path / "ct", "compressed-tensors")
    tensors = read_safetensors_dir(out)
    assert tensors["model.norm.weight"].dtype == torch.bfloat16
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32


# --------------------------------------------------------------------------------------------
# Side files, card, manifest, sharding, atomicity
# --------------------------------------------------------------------------------------------


def test_side_files_card_and_manifest(source, tmp_path):
    from transformers import AutoTokenizer

    out, _ = write_artifact(source, tmp_path / "awq", "awq")
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "manifest.json",
        "LICENSE",
    } <= names
    assert not (out / "model.safetensors.index.json").exists()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "user: hello\n"

    text = (out / "README.md").read_text()
    front = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", text, re.S).group(1))
    assert front["base_model"] == "acme/tiny-llama"
    assert front["base_model_relation"] == "quantized"
    assert front["license"] == "apache-2.0"
    assert front["pipeline_tag"] == "text-generation"
    assert front["library_name"] == "transformers"
    assert {"awq", "4-bit"} <= set(front["tags"])
    for needle in (
        "12.3456",
        "13.5000",
        "vllm serve",
        "from_pretrained",
        "round-to-nearest",
        "| weight bits | 4 |",
        "32 input channels per group",
        "`lm_head`",
        "# tiny-llama, 4-bit RTN (awq)\n",  # the model's name, not the output folder's
    ):
        assert needle in text, needle

    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["files"]["model.safetensors"]["size"] == (out / "model.safetensors").stat().st_size
    assert verify_manifest(out) == []
    # a flipped byte is caught
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    assert verify_manifest(out) == ["sha256 mismatch: model.safetensors"]


def test_sharding_writes_a_valid_index(source, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out, qts = write_artifact(source, tmp_path / "ct", "compressed-tensors", shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = read_safetensors_dir(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in shards:  # the bound holds except for a single tensor larger than it
        from safetensors import safe_open

        with safe_open(str(out / f), "pt") as h:
            sizes = [h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys()]
        assert sum(sizes) <= 100_000 or len(sizes) == 1
    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    reference = dense_reference(source, qts)
    ids = torch.tensor([[1, 5, 9, 23]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_tied_embeddings_store_the_embedding_once(tmp_path):
    src = build_tiny_checkpoint(tmp_path / "tied-src", tie=True)
    out, _ = write_artifact(src, tmp_path / "awq", "awq")
    tensors = read_safetensors_dir(out)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    assert json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"] == [
        "lm_head"
    ]


class Boom(RuntimeError):
    pass


def test_exception_mid_write_leaves_nothing(source, tmp_path):
    final = tmp_path / "out"
    settings = QuantSettings(bits=4, group_size=32)
    with pytest.raises(Boom):
        with ArtifactWriter(final, "awq", source_dir=source, settings=settings, shard_size=1000) as writer:
            writer.add_tensor("a", torch.zeros(1000))
            writer.add_tensor("b", torch.zeros(1000))  # first shard flushed to staging
            assert any(writer.staging_dir.iterdir())
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_failure_during_finalize_leaves_nothing(source, tmp_path, monkeypatch):
    import awqforge.formats.writer as writer_mod

    def broken(_root):
        raise Boom("disk full")

    monkeypatch.setattr(writer_mod, "write_manifest", broken)
    with pytest.raises(Boom):
        write_artifact(source, tmp_path / "out", "awq")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_refused_unless_overwrite(source, tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    settings = QuantSettings(bits=4, group_size=32)
    with pytest.raises(ArtifactExists, match="already exists"):
        ArtifactWriter(final, "awq", source_dir=source, settings=settings)
    assert (final / "old.txt").read_text() == "old"

    write_artifact(source, final, "awq", overwrite=True)
    assert not (final / "old.txt").exists() and (final / "model.safetensors").exists()
    assert verify_manifest(final) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copy left


def test_writer_rejects_misuse(source, tmp_path):
    settings = QuantSettings(bits=4, group_size=32)
    with ArtifactWriter(
        tmp_path / "out", "compressed-tensors", source_dir=source, settings=settings
    ) as writer:
        writer.add_tensor("x", torch.zeros(2))
        with pytest.raises(ValueError, match="added twice"):
            writer.add_tensor("x", torch.zeros(2))
        qt = quantize_tensor(torch.randn(16, 64), 4, 64)
        with pytest.raises(ValueError, match="group_size"):
            writer.add_quantized("layer", qt)
        with pytest.raises(ValueError, match="module name"):
            writer.add_quantized("layer.weight", quantize_tensor(torch.randn(16, 64), 4, 32))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bits,group_size,zero_point", [(4, 32, True), (4, -1, False), (3, 64, True), (8, 32, True)]
)
def test_compressed_tensors_tensors_equal_the_libraries_own(source, tmp_path, bits, group_size, zero_point):
    """compressed-tensors' own compressor, given our scales and zero points, writes the very tensors we wrote."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from awqforge.formats.compressed_tensors import weight_args

    out, qts = write_artifact(
        source, tmp_path / "ct", "compressed-tensors", bits=bits, group_size=group_size, zero_point=zero_point
    )
    tensors = read_safetensors_dir(out)
    args = QuantizationArgs.model_validate(weight_args(bits, group_size, zero_point))
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    mid = 2 ** (bits - 1)
    for name, qt in qts.items():
        state = {"weight": qt.dequantize(torch.float32), "weight_scale": qt.scales.float()}
        if zero_point:
            state["weight_zero_point"] = (qt.zeros.to(torch.int16) - mid).to(torch.int8)
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        assert set(theirs) == {k.rpartition(".")[2] for k in tensors if k.startswith(name + ".")}
        for key, value in theirs.items():
            assert torch.equal(tensors[f"{name}.{key}"], value.to(tensors[f"{name}.{key}"].dtype)), (
                name,
                key,
            )


def test_card_from_spec_and_compressed_tensors_notes(source, tmp_path):
    from awqforge.formats import parse_size, render_card
    from awqforge.spec import JobSpec

    spec = JobSpec(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        formats=["compressed-tensors"],
        quant={"bits": 3, "group_size": 64},
        publish={"repo_id": "me/smol-w3"},
    )
    info = ModelCardInfo.from_spec(
        spec, {"fp_perplexity": 10.0, "quant_perplexity": 11.25, "size_after_bytes": 10**8}
    )
    assert info.repo_id == "me/smol-w3" and info.quant_perplexity == 11.25 and "pileval" in info.calibration
    text = render_card(
        info,
        fmt="compressed-tensors",
        bits=3,
        group_size=64,
        zero_point=True,
        unquantized=["lm_head"],
        source_meta={"license": "apache-2.0"},
        has_chat_template=True,
    )
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "3-bit" in front["tags"]
    assert "compressed-tensors" in front["tags"] and front["license"] == "apache-2.0"
    assert "vllm serve" not in text and "INT4" not in text  # vLLM serves no 3-bit; no 3-bit kernel either
    for needle in (
        "vLLM does not serve 3-bit",
        "pure-torch reference path: there is no 3-bit kernel",
        "dequantize=True",
        "4 and 8 bits",
        "11.2500",
        "scale_search",
        "apply_chat_template",
    ):
        assert needle in text, needle
    # a local source path is not Hub metadata
    local = render_card(
        ModelCardInfo(base_model="/models/tiny"),
        fmt="awq",
        bits=4,
        group_size=128,
        zero_point=False,
        unquantized=[],
        source_meta={},
        has_chat_template=False,
    )
    assert "base_model" not in yaml.safe_load(local.split("---")[1])
    assert "zero point of 8" in local
    assert (parse_size("5GB"), parse_size("2MiB"), parse_size(1234)) == (5 * 10**9, 2 * 2**20, 1234)


def _tables(tokens) -> list[list[list[str]]]:
    """The tables of a markdown-it token stream, as rows of cell texts."""
    tables, rows, row, cell = [], None, None, None
    for tok in tokens:
        if tok.type == "table_open":
            rows = []
        elif tok.type == "table_close":
            tables.append(rows)
        elif tok.type == "tr_open":
            row = []
        elif tok.type == "tr_close":
            rows.append(row)
        elif tok.type in ("th_open", "td_open"):
            cell = ""
        elif tok.type in ("th_close", "td_close"):
            row.append(cell)
        elif tok.type == "inline" and row is not None and cell is not None:
            cell += "".join(c.content for c in tok.children or [])
    return tables


@pytest.mark.parametrize("bits, fmt", [(4, "awq"), (3, "compressed-tensors"), (8, "compressed-tensors")])
def test_card_is_markdown_that_renders_and_names_what_serves_it(bits, fmt):
    """The card rendered by a Markdown parser: every table row has its two cells (a `|` inside a value such
    as `mean|x|` is escaped), the title is the model's name, a local base model is named, never its path."""
    from markdown_it import MarkdownIt

    from awqforge.formats import render_card
    from awqforge.spec import JobSpec

    spec = JobSpec(
        model="/srv/private/models/SmolLM2-135M-Instruct",
        formats=[fmt],
        quant={"bits": bits, "group_size": 64},
        calibration={"source": "file:/srv/private/calib/texts.txt"},
        eval={"text": "file:/srv/private/eval.txt"},
    )
    info = ModelCardInfo.from_spec(spec, {"size_before_bytes": 269_060_096, "size_after_bytes": 97_000_000})
    text = render_card(
        info,
        fmt=fmt,
        bits=bits,
        group_size=64,
        zero_point=True,
        unquantized=["lm_head"],
        source_meta={},
        has_chat_template=False,
    )
    front, body = text.split("---\n", 2)[1:]
    assert "base_model" not in yaml.safe_load(front) and "/srv" not in text  # no server path is published
    assert body.lstrip().startswith(f"# SmolLM2-135M-Instruct, {bits}-bit AWQ ({fmt})\n")
    tokens = MarkdownIt("commonmark").enable("table").parse(body)
    tables = _tables(tokens)
    assert len(tables) == 2  # quantization settings, evaluation
    for table in tables:
        assert all(len(row) == 2 for row in table), table
    settings = dict(tables[0][1:])
    assert settings["scale_search"].startswith("duo: s = mean|x|^a / mean|w|^(1-a)")
    assert settings["base model"] == "SmolLM2-135M-Instruct (a local checkpoint)"
    assert settings["calibration set"].startswith("file texts.txt")
    assert "256.6 MiB before, 92.5 MiB after" in body
    served = bits in (4, 8)
    assert ("vllm serve" in body) == served and ("vLLM does not serve" in body) == (not served)
    assert ("INT4 kernels" in body) == (bits == 4)
    assert ("pure-torch reference path" in body) == (bits != 4)


def test_shards_are_spooled_to_disk_and_read_back_exactly(source, tmp_path):
    """Tensors leave memory as they are added; the shard written from the spool is a valid safetensors file."""
    from safetensors.torch import load_file

    writer = ArtifactWriter(
        tmp_path / "spool", "awq", source_dir=source, settings=QuantSettings(bits=4, group_size=32)
    )
    torch.manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(7, 5).bfloat16(),
        "b.i32": torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32),
        "c.u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "d.scalar": torch.tensor(3.5),
        "e.f16": torch.randn(2, 3, 4).half(),
        "f.empty": torch.zeros(0, 4),
    }
    for name, t in tensors.items():
        writer._add(name, t)
    assert writer._shard is not None and writer._shard.nbytes == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert not hasattr(writer._shard, "tensors")  # nothing but offsets is kept in memory
    writer._flush_shard()
    path, names = writer._shard_files[0]
    back = load_file(str(path))
    assert names == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    writer.abort()
    assert not writer.staging_dir.exists()
