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


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa", "dots3_note_text", "hy_v4", "deepseek_v4"])
def test_every_reader_of_a_folded_norm_is_compensated_in_a_dsa_attention(family):
    """DSA attentions pass their normed input (and q_a_layernorm's output) on to an indexer whose linears
    (wk, weights_proj, wq_b; DeepSeek-V4's compressor) pick the top-k tokens: they must take the scales too.
    Scales folded by every applicable mapping leave the model's function, the indexer's selection included
    (index_topk below the sequence length, so the selection matters), unchanged; and every linear that reads a
    folded norm's output (forward hooks) is among that mapping's linears."""
    from tiny_families import build_family_model

    from awqforge.awq.folding import fold_scales
    from awqforge.structure import is_norm

    model = build_family_model(family, index_topk=3)
    adapter = get_adapter(model.config)
    layers = adapter.get_layers(model)
    ids = torch.randint(
        0, model.config.get_text_config().vocab_size, (1, 12), generator=torch.Generator().manual_seed(3)
    )
    maps = {i: [m for m in adapter.mappings(b) if m.skip_reason is None] for i, b in enumerate(layers)}

    # which linears read each norm prev's output (the same values: a cast of it counts)
    outputs: dict[int, torch.Tensor] = {}
    readers: dict[tuple[int, str], set[str]] = {}
    hooks = []
    for i, block in enumerate(layers):
        norms = {m.prev_name: m.prev for m in maps[i] if is_norm(m.prev)}
        for name, norm in norms.items():
            hooks.append(
                norm.register_forward_hook(
                    lambda _m, _a, out, key=(i, name): outputs.__setitem__(id(_m), (key, out))
                )
            )
        for lname, lin in block.named_modules():
            if isinstance(lin, torch.nn.Linear):

                def pre(_m, args, lname=lname):
                    x = args[0]
                    for key, out in outputs.values():
                        if x.shape == out.shape and torch.equal(x.to(out.dtype), out):
                            readers.setdefault(key, set()).add(lname)

                hooks.append(lin.register_forward_pre_hook(pre))
    selections: list[torch.Tensor] = []
    for name, mod in model.named_modules():
        if name.endswith("indexer"):
            hooks.append(mod.register_forward_hook(lambda _m, _a, out: selections.append(out)))
    with torch.no_grad():
        ref = model(ids).logits
    for h in hooks:
        h.remove()
    assert selections and readers
    for (i, norm), names in readers.items():
        mapped = {n for m in maps[i] if m.prev_name == norm for n in m.linear_names}
        assert names <= mapped, f"layer {i}: {sorted(names - mapped)} read {norm}'s output uncompensated"

    fp_sel = [s.clone() for s in selections]
    selections.clear()
    hooks = [
        mod.register_forward_hook(lambda _m, _a, out: selections.append(out))
        for name, mod in model.named_modules()
        if name.endswith("indexer")
    ]
    gen = torch.Generator().manual_seed(5)
    for i, block in enumerate(layers):
        for m in maps[i]:
            if is_norm(m.prev):
                fold_scales(block, m, torch.exp(torch.randn(m.linears[0].in_features, generator=gen)))
    with torch.no_grad():
        out = model(ids).logits
    for h in hooks:
        h.remove()
    topk = 3
    for a, b in zip(
        fp_sel, selections, strict=True
    ):  # rows with at least top-k causal keys (no ties of -inf)
        assert torch.equal(a[..., topk - 1 :, :].sort(-1).values, b[..., topk - 1 :, :].sort(-1).values)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


class _Scorer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wk, self.wq = torch.nn.Linear(16, 8), torch.nn.Linear(8, 8)

    def forward(self, x, q_resid):
        return self.wk(x.to(self.wk.weight.dtype)) * self.wq(q_resid)


class _Opaque(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 4)

    def forward(self, *args):  # which parameter gets which tensor is not readable
        return self.proj(args[0])


class _ToyMLA(torch.nn.Module):
    def __init__(self, scorer):
        super().__init__()
        self.q_a_proj, self.q_a_layernorm = torch.nn.Linear(16, 8), torch.nn.RMSNorm(8)
        self.q_b_proj, self.kv_a_proj_with_mqa = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16)
        self.o_proj, self.scorer = torch.nn.Linear(16, 16), scorer

    def forward(self, hidden_states):
        q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states)) * 2.0
        kv = self.kv_a_proj_with_mqa(hidden_states)
        return self.o_proj(self.q_b_proj(q_resid) * kv * self.scorer(hidden_states, q_resid).mean())


class _ToyBlock(torch.nn.Module):
    def __init__(self, scorer):
        super().__init__()
        self.input_layernorm, self.self_attn = torch.nn.RMSNorm(16), _ToyMLA(scorer)

    def forward(self, hidden_states):
        return hidden_states + self.self_attn(self.input_layernorm(hidden_states))


def test_a_child_given_a_folded_norm_s_output_is_followed_or_the_mapping_disabled():
    from awqforge.structure import block_specs

    specs = {sp.prev: sp for sp in block_specs(_ToyBlock(_Scorer()), 16)}
    # the child's forward is followed: its linears reading the input (through a cast) or q_a_layernorm's
    # output (through a product with a constant) take the same scales
    assert specs["input_layernorm"].linears == (
        "self_attn.q_a_proj",
        "self_attn.kv_a_proj_with_mqa",
        "self_attn.scorer.wk",
    )
    assert specs["self_attn.q_a_layernorm"].linears == ("self_attn.q_b_proj", "self_attn.scorer.wq")
    assert specs["input_layernorm"].disabled is None and specs["self_attn.q_a_layernorm"].disabled is None
    opaque = {sp.prev: sp for sp in block_specs(_ToyBlock(_Opaque()), 16)}
    for norm in ("input_layernorm", "self_attn.q_a_layernorm"):
        assert (
            opaque[norm].disabled == "its output also reaches self_attn.scorer, whose reads are not followed"
        )
