"""bench/bench_speed.py --layers N cuts the per-layer lists of a config (layer_types) with its blocks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_speed import cut_checkpoint, cut_config  # noqa: E402


def test_cut_gemma3_checkpoint_with_layer_types_loads(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("gemma3_text")  # layer_types: sliding, full
    cut = cut_checkpoint(ckpt, tmp_path / "cut", 1)
    config = json.loads((cut / "config.json").read_text())
    src = json.loads((ckpt / "config.json").read_text())
    assert src["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["num_hidden_layers"] == 1 and config["layer_types"] == src["layer_types"][:1]
    model = transformers.AutoModelForCausalLM.from_pretrained(cut)  # transformers checks the list's length
    assert len(model.model.layers) == 1


def test_cut_config_nested_text_config_and_index_lists():
    config = {
        "text_config": {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "moe_layers": [1, 3]},
    }
    assert cut_config(config, 2) == 2
    assert config["text_config"] == {"num_hidden_layers": 2, "layer_types": ["a", "b"], "moe_layers": [1]}
    assert cut_config({"num_hidden_layers": 5, "layer_types": list("abcde")}, 0) == 5
