"""Each job option means the same thing for every method: AWQ (nearest rounding), AWQ with GPTQ rounding and
RTN. Module patterns, calibration, devices and reports are run through each and compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_resume import spec_for

from awqforge.errors import InputError
from awqforge.pipeline import run_quantization
from awqforge.spec import JobSpec

METHODS = {
    "awq": {"method": "awq"},
    "awq+gptq": {"method": "awq", "rounding": "gptq"},
    "rtn": {"method": "rtn"},
}


def _spec(model: Path, method: str, **overrides) -> JobSpec:
    return spec_for(model, **{"quant": {"bits": 4, "group_size": 64}, **METHODS[method], **overrides})


def _tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names.update(st.keys())
    return names


def _quantized_modules(folder: Path) -> set[str]:
    """Modules stored as int4 (an AWQ qweight, or compressed-tensors' weight_packed)."""
    return {n.rsplit(".", 1)[0] for n in _tensor_names(folder) if n.endswith((".qweight", ".weight_packed"))}


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """Every method with the same module patterns: block 0 whole, and down_proj of every block, kept in FP."""
    ckpt = tiny_checkpoint("llama")
    patterns = ["model.layers.0.*", "model.layers.*.mlp.down_proj"]
    out = {}
    for method in METHODS:
        spec = _spec(ckpt, method, quant={"bits": 4, "group_size": 64, "modules_to_not_convert": patterns})
        out[method] = run_quantization(spec, tmp_path_factory.mktemp(method))
    return out


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_module_patterns_keep_the_same_modules_in_fp(runs, method, fmt):
    folder = runs[method].artifacts[fmt]
    quantized = _quantized_modules(folder)
    assert quantized, "nothing was quantized"
    assert not any(m.startswith("model.layers.0.") for m in quantized), sorted(quantized)
    assert not any(m.endswith("mlp.down_proj") for m in quantized), sorted(quantized)
    names = _tensor_names(folder)
    assert (
        "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.down_proj.weight" in names
    )
    # and every method quantized exactly the same modules
    assert quantized == _quantized_modules(runs["awq"].artifacts[fmt])
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    ignored = config.get("modules_to_not_convert") or config.get("ignore") or []
    assert any("layers.0" in str(x) for x in ignored), ignored


def test_reports_have_one_shape_for_every_method(runs):
    reports = {m: json.loads(r.report_path.read_text()) for m, r in runs.items()}
    keys = {m: set(r) for m, r in reports.items()}
    assert keys["awq"] == keys["rtn"] == keys["awq+gptq"]
    layer_keys = {m: {tuple(sorted(layer)) for layer in r["layers"]} for m, r in reports.items()}
    assert len(set(map(frozenset, layer_keys.values()))) == 1, layer_keys
    layer_names = {m: sorted((lr["block"], lr["name"]) for lr in r["layers"]) for m, r in reports.items()}
    assert layer_names["awq"] == layer_names["rtn"] == layer_names["awq+gptq"]
    for m, r in reports.items():
        assert r["settings"]["quant"]["modules_to_not_convert"] == [
            "model.layers.0.*",
            "model.layers.*.mlp.down_proj",
        ], m
        assert (
            runs[m].metrics["n_layers_quantized"]
            == len(r["layers"])
            == runs["awq"].metrics["n_layers_quantized"]
        )


def test_calibration_is_read_by_the_searching_methods_only(runs):
    """AWQ (either rounding) reports the calibration it read; RTN reads none and says so, in the same field."""
    for m in ("awq", "awq+gptq"):
        cal = json.loads(runs[m].report_path.read_text())["calibration"]
        assert cal and cal["samples"] == 4, (m, cal)
    assert json.loads(runs["rtn"].report_path.read_text())["calibration"] is None


@pytest.mark.parametrize("method", list(METHODS))
def test_a_pattern_that_matches_nothing_is_refused_alike(tiny_checkpoint, tmp_path, method):
    spec = _spec(
        tiny_checkpoint("llama"),
        method,
        quant={"bits": 4, "group_size": 64, "modules_to_not_convert": ["nothing.*"]},
    )
    with pytest.raises(InputError, match="nothing"):
        run_quantization(spec, tmp_path / "out")


@pytest.mark.parametrize("method", list(METHODS))
def test_devices_alike(tiny_checkpoint, tmp_path, method):
    """cpu runs everywhere and is recorded; cuda without a GPU is the same clear refusal for every method."""
    ckpt = tiny_checkpoint("llama")
    spec = _spec(ckpt, method, formats=["awq"])
    report = json.loads(run_quantization(spec, tmp_path / "cpu").report_path.read_text())
    assert "cpu" in json.dumps(report["environment"] if "environment" in report else report).lower()
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="(?i)cuda"):
            run_quantization(_spec(ckpt, method, formats=["awq"], device="cuda"), tmp_path / "cuda")
