"""awqforge.load_quantized over both formats: QuantLinear layers, logits of the fake-quantized model, generation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_formats import build_tiny_checkpoint, dense_reference, load_source, quantize_linears, write_artifact

import awqforge
from awqforge.errors import InputError
from awqforge.formats import ArtifactWriter
from awqforge.spec import QuantSettings

IDS = torch.tensor([[1, 5, 9, 23, 7, 4, 11, 3]])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny-llama")


def stored_reference(source: Path, qts: dict, fmt: str):
    """The dense model the artifact encodes: AWQ stores fp16 scales, compressed-tensors the model's dtype."""
    if fmt == "awq":
        qts = {k: replace(qt, scales=qt.scales.half().float()) for k, qt in qts.items()}
    return dense_reference(source, qts)


def assert_matches_reference(model, reference) -> None:
    with torch.no_grad():
        got, want = model(IDS).logits.float(), reference(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    out = model.generate(IDS, max_new_tokens=6, do_sample=False)
    ref = reference.generate(IDS, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 6)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "fmt,bits,group_size,zero_point",
    [
        ("awq", 4, 32, True),
        ("awq", 4, -1, False),
        ("compressed-tensors", 4, 64, True),
        ("compressed-tensors", 8, -1, False),
    ],
)
def test_load_quantized_matches_fake_quantized_model(source, tmp_path, fmt, bits, group_size, zero_point):
    out, qts = write_artifact(
        source, tmp_path / "art", fmt, bits=bits, group_size=group_size, zero_point=zero_point
    )
    model = awqforge.load_quantized(out)
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, awqforge.QuantLinear)}
    assert set(qlinears) == set(qts)
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    for name, qt in qts.items():  # the codes QuantLinear holds are the ones we wrote
        held = qlinears[name].quantized_tensor()
        assert torch.equal(held.qweight, qt.qweight) and torch.equal(held.zeros, qt.zeros)
    assert model.generation_config.eos_token_id == 2
    assert_matches_reference(model, stored_reference(source, qts, fmt))


def test_sharded_artifact_loads(source, tmp_path):
    out, qts = write_artifact(source, tmp_path / "art", "awq", shard_size="50KB")
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    assert_matches_reference(awqforge.load_quantized(out), stored_reference(source, qts, "awq"))


def test_tied_embeddings(tmp_path):
    src = build_tiny_checkpoint(tmp_path / "tied-src", tie=True, seed=1)
    out, qts = write_artifact(src, tmp_path / "art", "compressed-tensors")
    model = awqforge.load_quantized(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_matches_reference(model, stored_reference(src, qts, "compressed-tensors"))


def test_staging_folder_loads_before_finalize(source, tmp_path):
    """The pipeline evaluates the artifact from the staging folder, between finish_tensors() and finalize()."""
    model = load_source(source)
    qts = quantize_linears(model, 4, 32, True)
    settings = QuantSettings(bits=4, group_size=32)
    with ArtifactWriter(tmp_path / "art", "awq", source_dir=source, settings=settings) as writer:
        for name, tensor in model.state_dict().items():
            module_name = name.rpartition(".")[0]
            if module_name not in qts:
                writer.add_tensor(name, tensor)
        for name, qt in qts.items():
            writer.add_quantized(name, qt)
        staging = writer.finish_tensors()
        loaded = awqforge.load_quantized(staging)
        with torch.no_grad():
            assert torch.isfinite(loaded(IDS).logits).all()
        # finalize not called: leaving the block removes the staging folder
    assert list(tmp_path.iterdir()) == []


def test_refuses_what_it_cannot_load(source, tmp_path):
    with pytest.raises(InputError, match="no quantization_config"):
        awqforge.load_quantized(source)
    with pytest.raises(InputError, match="not a checkpoint folder"):
        awqforge.load_quantized(tmp_path / "nope")
    bad = tmp_path / "gptq"
    bad.mkdir()
    cfg = json.loads((source / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="not an AWQ or compressed-tensors"):
        awqforge.load_quantized(bad)
