"""modules_to_not_convert: one pattern language over full module names, everywhere it is used."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from tiny_models import build_tiny_model, tiny_config, tiny_input_ids

from awqforge.arch import check_group_size, check_module_patterns, get_adapter
from awqforge.awq import BlockSettings, capture_layer_inputs, quantize_block
from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
from awqforge.errors import InputError
from awqforge.patterns import pattern_matches, unmatched_patterns
from awqforge.pipeline import ProgressEvent, run_quantization
from awqforge.spec import JobSpec

NAME = "model.layers.3.mlp.down_proj"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "pattern, hit",
    [
        (NAME, True),  # the full name
        ("model.layers.*.mlp.down_proj", True),  # the form our group-size error suggests
        ("model.layers.3.*", True),
        ("model.layers.3", True),  # a containing module
        ("mlp.down_proj", True),  # block-relative, as before
        ("down_proj", True),
        ("*down_proj", True),
        ("model.layers.4.*", False),
        ("model.layers.*.mlp.up_proj", False),
        ("own_proj", False),  # no substring matches: a tail starts at a dot
        ("layers.3.mlp", True),
    ],
)
def test_pattern_language(pattern, hit):
    assert pattern_matches(NAME, pattern) is hit


def test_spec_refuses_malformed_patterns():
    base = dict(model="org/name")
    for bad in ["", "mlp..down_proj", ".mlp", "mlp down", "a/b"]:
        with pytest.raises(ValidationError, match="module pattern|at least 1 character"):
            JobSpec(**base, quant={"modules_to_not_convert": [bad]})
    spec = JobSpec(**base, quant={"modules_to_not_convert": ["model.layers.*.mlp.down_proj", "lm_head"]})
    assert spec.quant.modules_to_not_convert == ["model.layers.*.mlp.down_proj", "lm_head"]


def test_group_size_check_takes_full_and_relative_patterns():
    config = tiny_config("llama", intermediate_size=96)
    adapter = get_adapter(config)
    for ok in (["model.layers.*.mlp.down_proj"], ["mlp.down_proj"], ["model.layers.0.*", "model.layers.1"]):
        check_group_size(config, adapter, 64, skip_patterns=ok)
    with pytest.raises(ValueError, match=r"model\.layers\.\*\.mlp\.down_proj"):
        check_group_size(config, adapter, 64, skip_patterns=["model.layers.0.*"])  # block 1 still counts


def test_unmatched_pattern_is_named_with_the_model_s_names():
    config = tiny_config("qwen3_moe")
    adapter = get_adapter(config)
    check_module_patterns(config, adapter, ["mlp.experts.*.down_proj", "model.layers.1.*", "lm_head"])
    with pytest.raises(ValueError) as err:
        check_module_patterns(config, adapter, ["mlp.down_proj", "model.layers.7.*", "self_attn"])
    msg = str(err.value)
    assert "'mlp.down_proj', 'model.layers.7.*'" in msg and "'self_attn'" not in msg
    assert "mlp.experts.*.down_proj" in msg  # what the model does have
    assert unmatched_patterns(["a", "b.c"], ["x.b.c"]) == ["a"]


def test_quantizer_skips_by_full_name():
    model = build_tiny_model("llama")
    adapter = get_adapter(model.config)
    layers = adapter.get_layers(model)
    ids = tiny_input_ids(4, 16)
    captured = capture_layer_inputs(model, layers, ids)
    skip = ("model.layers.0.*", "model.layers.*.mlp.down_proj")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, quantized = captured.inputs, {}
    for i, block in enumerate(layers):
        prefix = f"{adapter.layers_attr}.{i}"
        res = quantize_block(
            block,
            x,
            captured.layer_kwargs[i],
            settings=BlockSettings(bits=4, group_size=32, skip_patterns=skip),
            adapter=adapter,
            block_index=i,
            block_prefix=prefix,
        )
        quantized.update({f"{prefix}.{n}": qt for n, qt in res.quantized.items()})
        x = res.outputs
    assert quantized and not any(n.startswith("model.layers.0.") or "down_proj" in n for n in quantized)
    assert "model.layers.1.mlp.up_proj" in quantized
    params = dict(model.named_parameters())
    for n, p in before.items():
        if n.startswith("model.layers.0.") or n.endswith("down_proj.weight"):
            torch.testing.assert_close(params[n], p)  # left alone (block 0 entirely: no folding either)


def _spec(ckpt, patterns):
    return JobSpec(
        model=str(ckpt),
        quant={"bits": 4, "group_size": 32, "modules_to_not_convert": patterns},
        calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 4, "seq_len": 32},
        formats=["awq", "compressed-tensors"],
        eval={"enabled": False},
        device="cpu",
        n_grid=4,
    )


def test_full_name_patterns_end_to_end_and_third_party_load(tiny_checkpoint, tmp_path):
    """The issue's case: full names pass the check, the quantizer honours them, the artifact's config lists
    the full-precision modules by full name, and transformers' own loaders load both artifacts."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt = tiny_checkpoint("llama")
    result = run_quantization(
        _spec(ckpt, ["model.layers.0.*", "model.layers.*.mlp.down_proj"]), tmp_path / "o"
    )
    assert result.metrics["n_layers_quantized"] == 6  # block 1: q, k, v, o, gate, up
    cfg = json.loads((result.artifacts["awq"] / "config.json").read_text())["quantization_config"]
    kept = set(cfg["modules_to_not_convert"])
    assert {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    } <= kept
    assert not any(n.startswith("model.layers.1.self_attn") for n in kept)
    ct = json.loads((result.artifacts["compressed-tensors"] / "config.json").read_text())[
        "quantization_config"
    ]
    assert set(ct["ignore"]) == kept
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = tiny_input_ids(1, 16)
    model = AutoModelForCausalLM.from_pretrained(  # dequantize=True: see test_formats.ASYM_UPSTREAM
        result.artifacts["compressed-tensors"],
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True),
    )
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(  # block 0 is untouched and dense in the artifact
        model.model.layers[0].self_attn.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight
    )
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9


def test_pattern_matching_nothing_fails_before_any_work(tiny_checkpoint, tmp_path):
    stages = []
    with pytest.raises(InputError, match=r"'model\.layers\.9\.\*' matches no module"):
        run_quantization(
            _spec(tiny_checkpoint("llama"), ["model.layers.9.*"]),
            tmp_path / "o",
            progress=lambda e: stages.append(e.stage) if isinstance(e, ProgressEvent) else None,
        )
    assert "calibrate" not in stages and "quantize" not in stages
    assert not (tmp_path / "o").exists()


# -- the same check without torch: a checkpoint's tensor names (awqforge.weight_names; the API's 422) ----------


def test_header_reader_agrees_with_safetensors(tiny_checkpoint, tmp_path):
    from safetensors import safe_open

    from awqforge.weight_names import HeaderError, read_header

    path = tiny_checkpoint("llama4_text") / "model.safetensors"
    header = read_header(path)
    with safe_open(str(path), "pt") as h:
        assert set(header) == set(h.keys())
        for name in h.keys():
            sl = h.get_slice(name)
            assert header[name]["shape"] == list(sl.get_shape()) and header[name]["dtype"] == sl.get_dtype()
    with pytest.raises(HeaderError, match="ends inside"):
        import io

        read_header(io.BytesIO(path.read_bytes()[:200]))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(HeaderError, match="truncated"):
        read_header(cut)


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe", "deepseek_v3", "llama4_text"])
def test_checkpoint_names_accept_every_pattern_the_engine_accepts(family, tiny_checkpoint):
    """Every quantized linear's full name and block-relative tail, and containing modules, match the names read
    from the checkpoint's headers (fused experts expanded, Mixtral's block_sparse_moe spelled as the module's
    mlp); what the engine refuses is refused here too."""
    from awqforge.weight_names import local_shapes, unmatched

    ckpt = tiny_checkpoint(family)
    shapes = local_shapes(ckpt)
    model = build_tiny_model(family)
    adapter = get_adapter(model.config)
    patterns = ["lm_head", "model.layers.1", "model.layers.0.*"]
    for i, block in enumerate(adapter.get_layers(model)):
        for name in adapter.quantizable_linears(block, prefix=f"model.layers.{i}"):
            patterns += [f"model.layers.{i}.{name}", name, name.rpartition(".")[2]]
    assert unmatched(patterns, shapes, family) == []
    check_module_patterns(model, adapter, patterns)  # the engine agrees
    bogus = ["model.layers.9.*", "mlp.down_projj", "experts.99.up_proj", "feed_forward.experts.0.w9"]
    assert unmatched(patterns + bogus, shapes, family) == bogus
    for b in bogus:
        with pytest.raises(ValueError, match="match"):
            check_module_patterns(model, adapter, [b])


def test_names_unknown_are_not_refused():
    """An index names tensors without shapes: fused experts then need one shard's header for their count. Model
    types outside the registry may be renamed on load by transformers: left to the engine's check."""
    from awqforge.arch import SUPPORTED_FAMILIES
    from awqforge.weight_names import CHECKED_MODEL_TYPES, unmatched

    assert set(SUPPORTED_FAMILIES) == CHECKED_MODEL_TYPES
    index_only = {"model.layers.0.feed_forward.experts.gate_up_proj": None, "model.embed_tokens.weight": None}
    assert unmatched(["experts.3.up_proj", "nothing"], index_only, "llama4_text") is None
    with_count = {**index_only, "model.layers.1.feed_forward.experts.gate_up_proj": [4, 8, 16]}
    assert unmatched(
        ["model.layers.0.feed_forward.experts.3.up_proj", "experts.4.*"], with_count, "llama4_text"
    ) == ["experts.4.*"]
    assert unmatched(["x"], None, "llama") is None
    assert unmatched(["nothing"], with_count, "cohere") is None and unmatched(["x"], with_count, None) is None


def test_cli_refuses_a_pattern_that_matches_nothing_before_loading(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "awqforge", "quantize", str(tiny_checkpoint("llama")), "--out", str(tmp_path / "o"),
         "--device", "cpu", "--modules-to-not-convert", "mlp.down_projj"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--modules-to-not-convert: 'mlp.down_projj' matches no module" in proc.stderr
    assert not (tmp_path / "o").exists()
