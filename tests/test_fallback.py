"""The structural fallback (awqforge.structure) and mappings given with the job.

Every model type the fallback claims (tiny_models.FALLBACK_FAMILIES, real transformers model types outside
the registry) is read structurally, quantized with AWQ below RTN's output error, and its artifact is loaded
back by transformers' own compressed-tensors loader."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_awq import logits_mse
from tiny_models import FALLBACK_FAMILIES, build_tiny_model, tiny_config, tiny_input_ids

from awqforge.arch import _REGISTRY, UnsupportedArchitecture, get_adapter, structural_adapter
from awqforge.awq import BlockSettings
from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
from awqforge.pipeline import run_quantization
from awqforge.spec import JobSpec

W3 = dict(bits=3, group_size=32)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "qwen3_moe"])
def test_structural_reading_of_registry_families_finds_the_registry_s_mappings(family):
    config = tiny_config(family)
    registry, read = _REGISTRY[family], structural_adapter(config)
    assert read.layers_attr == registry.layers_attr
    assert read.norm_plus_one == registry.norm_plus_one  # Gemma's (1 + w) norm read from its forward
    block = build_tiny_model(family).model.layers[0]
    want = {(m.prev_name, tuple(m.linear_names), m.skip_reason is None) for m in registry.mappings(block)}
    got = {(m.prev_name, tuple(m.linear_names), m.skip_reason is None) for m in read.mappings(block)}
    # phi3's fused qkv -> o: both read the v rows as [q, k, v] and fold per KV channel (GQA)
    assert got == want


def test_parallel_and_post_norm_blocks_are_read_from_the_forward():
    cohere = {sp.prev: sp for sp in get_adapter(tiny_config("cohere")).specs}
    # one norm feeds attention and MLP: all five linears, loss on their own outputs (two modules read it)
    assert cohere["input_layernorm"].linears == (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    )
    assert cohere["input_layernorm"].inspect is None
    olmo2 = {sp.prev for sp in get_adapter(tiny_config("olmo2")).specs}
    # Olmo2 normalises attention / MLP outputs: no norm feeds a linear, only v -> o and up -> down apply
    assert olmo2 == {"self_attn.v_proj", "mlp.up_proj"}
    glm = {sp.prev: sp for sp in get_adapter(tiny_config("glm")).specs}
    assert glm["mlp.gate_up_proj"].prev_rows == "up"


def test_unmappable_block_is_refused_naming_the_module():
    with pytest.raises(UnsupportedArchitecture) as err:
        get_adapter(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2))
    msg = str(err.value)
    # GPT-2's blocks hold transformers' Conv1D, no nn.Linear (arch._LINEAR_LIKE): mappings would not help
    assert "'gpt2'" in msg and "Conv1D" in msg and "original precision" in msg


@pytest.mark.parametrize("family", FALLBACK_FAMILIES)
def test_fallback_family_awq_beats_rtn(family):
    config = tiny_config(family)
    assert family not in _REGISTRY
    assert get_adapter(config).family == f"{family} (structural)"
    ids = tiny_input_ids(8, 32)
    mse_rtn, _ = logits_mse(family, ids, BlockSettings(method="rtn", **W3))
    mse_awq, results = logits_mse(family, ids, BlockSettings(method="awq", **W3))
    assert mse_awq < mse_rtn, (mse_awq, mse_rtn)
    assert all(res.quantized for res in results)


def _spec(ckpt, **extra):
    return JobSpec(
        model=str(ckpt),
        quant={"bits": 4, "group_size": 32},
        calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 4, "seq_len": 32},
        formats=["compressed-tensors"],
        eval={"enabled": False},
        device="cpu",
        n_grid=4,
        **extra,
    )


@pytest.mark.parametrize("family", FALLBACK_FAMILIES)
def test_fallback_artifact_loads_in_transformers(family, tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ckpt = tiny_checkpoint(family)
    result = run_quantization(_spec(ckpt), tmp_path / "out")
    n_linears = sum(
        isinstance(m, torch.nn.Linear) for n, m in build_tiny_model(family).model.layers.named_modules()
    )
    assert result.metrics["n_layers_quantized"] == n_linears
    ids = tiny_input_ids(1, 16)
    fp = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(  # dequantize=True: see test_formats.ASYM_UPSTREAM
        result.artifacts["compressed-tensors"],
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True),
    ).eval()
    with torch.no_grad():
        got, want = model(ids).logits, fp(ids).logits
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9


def test_job_mappings_replace_the_adapter_s(tiny_checkpoint, tmp_path):
    mappings = [
        {"prev": "input_layernorm", "linears": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}
    ]
    result = run_quantization(_spec(tiny_checkpoint("llama"), mappings=mappings), tmp_path / "out")
    import json

    report = json.loads(result.report_path.read_text()) if result.report_path else {}
    text = json.dumps(report)
    assert "input_layernorm->self_attn.q_proj,self_attn.k_proj,self_attn.v_proj" in text
    assert "mlp.up_proj->mlp.down_proj" not in text  # the registry's specs are replaced, not added to


def test_job_mappings_that_match_nothing_or_are_malformed_are_refused():
    with pytest.raises(UnsupportedArchitecture, match=r"match no block.*block 0 has: self_attn, "):
        get_adapter(
            tiny_config("olmo2"), mappings=[{"prev": "input_layernorm", "linears": ["self_attn.q_proj"]}]
        )
    config = tiny_config("llama")
    with pytest.raises(
        UnsupportedArchitecture, match=r"match no block.*post_attention_norm -> mlp\.gate_proj"
    ):
        get_adapter(config, mappings=[{"prev": "post_attention_norm", "linears": ["mlp.gate_proj"]}])
    adapter = get_adapter(config, mappings=[{"prev": "post_attention_layernorm", "linears": ["mlp.*_proj"]}])
    assert adapter.family == "llama (user mappings)" and len(adapter.specs) == 1
    from pydantic import ValidationError

    for bad in [
        {"prev": "a b", "linears": ["x"]},
        {"prev": "norm", "linears": []},
        {"prev": "n", "linears": ["x"], "y": 1},
    ]:
        with pytest.raises(ValidationError):
            JobSpec(model="org/name", mappings=[bad])


def test_cli_mappings_argument(tmp_path):
    from awqforge import cli

    maps = '[{"prev": "input_layernorm", "linears": ["self_attn.q_proj"]}]'
    assert cli._mappings_arg(maps)[0]["prev"] == "input_layernorm"
    (tmp_path / "m.json").write_text(maps)
    assert cli._mappings_arg(f"@{tmp_path / 'm.json'}") == cli._mappings_arg(maps)
    with pytest.raises(cli._UsageError, match="--mappings"):
        cli._mappings_arg("[{not json")
    with pytest.raises(cli._UsageError, match="--mappings"):
        cli._mappings_arg(f"@{tmp_path / 'missing.json'}")
