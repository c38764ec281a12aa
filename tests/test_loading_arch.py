"""load_quantized on what run_quantization writes, for every family arch.py supports: fused MoE experts
(rebuilt as per-expert QuantLinears under checkpoint names; Llama 4's re-fused for transformers' own forward), GPT-NeoX's ScaledActivation (`mlp.act.scales`),
fused qkv / gate_up (Phi-3), OPT, Gemma 3. Logits close to the FP model's, generate() works, both formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import FAMILIES, MOE_FAMILIES

import awqforge
from awqforge.arch import ScaledActivation, UnfusedExperts, get_adapter
from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
from awqforge.pipeline import run_quantization
from awqforge.spec import JobSpec

FORMATS = ("awq", "compressed-tensors")
IDS = torch.tensor([[1, 5, 9, 23, 7, 4, 11, 3, 40, 17, 300, 8, 77, 12, 250, 6]])

pytestmark = pytest.mark.usefixtures("one_thread")


def quantize(ckpt, out):
    import json

    # MoE models: symmetric, as compressed-tensors with zero points is refused for them (arch.MOE_ASYMMETRIC_CT)
    moe = json.loads((Path(ckpt) / "config.json").read_text())["model_type"] in MOE_FAMILIES + [
        "deepseek_v2",
        "llama4_text",
    ]
    spec = JobSpec(
        model=str(ckpt),
        method="awq",
        quant={"bits": 4, "group_size": 32, "zero_point": not moe},
        calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 4, "seq_len": 32},
        formats=list(FORMATS),
        eval={"enabled": False},
        device="cpu",
        n_grid=4,
    )
    return run_quantization(spec, out)


def logits_of(folder: Path) -> torch.Tensor:
    """Logits of a dense checkpoint loaded by transformers itself (its own fused-expert conversions)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits.float()


def dense_copy(artifact: Path, dest: Path) -> Path:
    """The dense model an artifact encodes, written without awqforge.loading: every quantized layer dequantized
    in float32 (formats' own readers), activation scales folded into the next linear's input columns
    (act(x) / s @ W.T == act(x) @ (W / s).T), no quantization_config. transformers loads it as a plain model."""
    from awqforge.loading import _format_module

    config = json.loads((artifact / "config.json").read_text())
    qcfg = config.pop("quantization_config")
    fmt = _format_module(qcfg)
    tensors = {}
    for f in artifact.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    dense = {}
    layers = fmt.quantized_layers(list(tensors))
    for layer in layers:
        parts = {k[len(layer) + 1 :]: v for k, v in tensors.items() if k.rpartition(".")[0] == layer}
        qt = fmt.read_layer({k: v for k, v in parts.items() if k != "bias"}, qcfg)
        dense[f"{layer}.weight"] = qt.dequantize(torch.float32)
        if "bias" in parts:
            dense[f"{layer}.bias"] = parts["bias"].float()
    for name, t in tensors.items():
        if name.rpartition(".")[0] not in layers and not name.endswith(".act.scales"):
            dense[name] = t.float() if t.is_floating_point() else t
    for name, s in tensors.items():
        if name.endswith(".mlp.act.scales"):  # GPT-NeoX: act -> dense_4h_to_h
            w = name.replace(".act.scales", ".dense_4h_to_h.weight")
            dense[w] = dense[w] / s.float()[None, :]
    if config["model_type"] == "llama4_text":
        dense = fuse_llama4_experts(dense)
    dest.mkdir(parents=True)
    save_file(dense, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def fuse_llama4_experts(dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert `experts.{e}.gate_proj|up_proj|down_proj.weight` ([out, in], as quantized checkpoints of Llama 4
    name them) -> the fused [E, H, 2I] / [E, I, H] parameters transformers' Llama4TextExperts holds."""
    import re

    rx = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, t in dense.items():
        m = rx.match(name)
        if m is None:
            out[name] = t
        else:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
    for prefix, experts in groups.items():
        order = sorted(experts)
        assert order == list(range(len(order)))
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]).T for e in order]
        )
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"].T for e in order])
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_artifacts_load_for_every_family(family, tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(family)
    result = quantize(ckpt, tmp_path / "out")
    fp = logits_of(ckpt)
    for fmt in FORMATS:
        want = logits_of(dense_copy(result.artifacts[fmt], tmp_path / f"dense-{fmt}"))
        model = awqforge.load_quantized(result.artifacts[fmt])
        adapter = get_adapter(model.config)
        qlinears = [n for n, m in model.named_modules() if isinstance(m, awqforge.QuantLinear)]
        assert len(qlinears) == result.metrics["n_layers_quantized"], fmt
        # DeepSeek's first layer is dense: experts are looked at in the last one
        moe = family in MOE_FAMILIES or family == "llama4_text"
        block = adapter.get_layers(model)[-1 if moe else 0]
        if moe:
            mlp = block.feed_forward if family == "llama4_text" else block.mlp
            assert isinstance(mlp.experts, UnfusedExperts), fmt
            lay = adapter.experts
            for expert in mlp.experts:  # every expert's three linears are quantized
                for attr in (lay.gate, lay.up, lay.down):
                    assert isinstance(getattr(expert, attr), awqforge.QuantLinear), (fmt, attr)
            router = mlp.router if family == "llama4_text" else mlp.gate
            assert not isinstance(router, awqforge.QuantLinear)  # the router stays FP
        if (
            family == "gpt_neox"
        ):  # written beside compressed-tensors, which has no place for `mlp.act.scales`:
            # the GELU -> dense_4h_to_h mapping is skipped (the AWQ format alone keeps it: test_families.py)
            assert not isinstance(block.mlp.act, ScaledActivation), fmt
        with torch.no_grad():
            got = model(IDS).logits.float()
        assert torch.isfinite(got).all(), fmt
        # the loaded model computes what the artifact encodes (transformers' own forward of its dense copy) ...
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3 * want.abs().max().item())
        # ... which is close to the FP model. A loose bound: 4-bit weights of a tiny random model with outlier
        # norm gains, 128 calibration tokens (measured: cosine 0.91 gemma3_text, 0.94 qwen3_moe, >= 0.97 others;
        # RTN gives gemma3_text 0.89)
        cos, rel = cosine(got, fp), ((got - fp).norm() / fp.norm()).item()
        assert cos > 0.85 and rel < 0.6, (fmt, cos, rel)
        out = model.generate(IDS, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, IDS.shape[1] + 4)
        assert torch.equal(out[:, : IDS.shape[1]], IDS)


def test_moe_forward_runs_every_expert_through_quantlinear(tiny_checkpoint, tmp_path):
    """The unfused MoE forward really uses the per-expert QuantLinears (not a leftover fused parameter)."""
    result = quantize(tiny_checkpoint("qwen3_moe"), tmp_path / "out")
    model = awqforge.load_quantized(result.artifacts["awq"])
    called: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=n: called.add(name))
        for n, m in model.named_modules()
        if isinstance(m, awqforge.QuantLinear) and ".experts." in n
    ]
    try:
        with torch.no_grad():
            model(torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(0)))
    finally:
        for h in hooks:
            h.remove()
    n_experts = model.config.num_experts * model.config.num_hidden_layers
    assert len(called) == 3 * n_experts  # 128 tokens, top-2 of 4: every expert receives some
    assert not any(p.dim() == 3 for p in model.parameters())
