"""Model families beyond the dense registry: MoE artifacts that load in transformers, new MoE families, hybrid
decoders (linear attention / Mamba-2 mixers beside attention), and the refusals for what the engine cannot map.

Every artifact here is loaded by transformers with default loading (no `dequantize=True`) and compared with
AWQForge's own loader."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_input_ids

from awqforge.calibration import BUNDLED_CALIBRATION_TEXT
from awqforge.errors import InputError
from awqforge.pipeline import run_quantization
from awqforge.spec import JobSpec

pytestmark = pytest.mark.usefixtures("one_thread")

REGISTRY_MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "llama4_text"]


def _spec(ckpt, *, zero_point=False, fmt="compressed-tensors", method="awq", bits=4):
    return JobSpec(
        model=str(ckpt),
        method=method,
        quant={"bits": bits, "group_size": 32, "zero_point": zero_point},
        calibration={"source": f"file:{BUNDLED_CALIBRATION_TEXT}", "n_samples": 4, "seq_len": 32},
        formats=[fmt],
        eval={"enabled": False},
        device="cpu",
        n_grid=4,
    )


def load_both(artifact):
    """(transformers' default loading, AWQForge's loader) of one artifact."""
    from transformers import AutoModelForCausalLM

    import awqforge

    theirs = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval()
    return theirs, awqforge.load_quantized(artifact)


@pytest.mark.parametrize("family", REGISTRY_MOE)
def test_registry_moe_artifact_loads_in_transformers_like_our_loader(family, tiny_checkpoint, tmp_path):
    pytest.importorskip("compressed_tensors")
    result = run_quantization(_spec(tiny_checkpoint(family)), tmp_path / "out")
    theirs, ours = load_both(result.artifacts["compressed-tensors"])
    ids = tiny_input_ids(1, 16)
    with torch.no_grad():
        got, want = theirs(ids).logits, ours(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_asymmetric_compressed_tensors_is_refused_up_front_with_the_alternatives(
    family, tiny_checkpoint, tmp_path
):
    with pytest.raises(InputError) as err:
        run_quantization(_spec(tiny_checkpoint(family), zero_point=True), tmp_path / "out")
    msg = str(err.value)
    assert family in msg and "zero-point" in msg and "zero_point=false" in msg and "'awq'" in msg
    assert not (tmp_path / "out").exists()  # refused before any work
