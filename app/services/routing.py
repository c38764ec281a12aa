"""Choosing a worker queue (GPU memory class) from the model's size, at submit time."""

from __future__ import annotations

import logging
from pathlib import Path

from app.core.config import settings

log = logging.getLogger("awqforge.routing")


def checkpoint_bytes(model: str, revision: str | None = None) -> int | None:
    """Bytes of the model's safetensors weights: from disk for a local path, else from the hub's metadata."""
    if model.startswith(("/", "./", "../", "~")):
        path = Path(model).expanduser()
        files = list(path.glob("*.safetensors")) if path.is_dir() else []
        return sum(f.stat().st_size for f in files) or None
    try:
        from huggingface_hub import HfApi

        info = HfApi(endpoint=settings.HF_ENDPOINT, token=False).model_info(  # never the service token
            model, revision=revision, files_metadata=True, timeout=5
        )
        sizes = [s.size for s in (info.siblings or []) if s.rfilename.endswith(".safetensors") and s.size]
        return sum(sizes) or None
    except Exception as exc:  # hub unreachable or private: fall back to the default queue
        log.info("no size for %s (%s); using the default queue", model, type(exc).__name__)
        return None


def queue_for(model: str, revision: str | None, device: str) -> str:
    """cpu when the job asks for the CPU; gpu-24g when the fp16 weights fit in a 24 GB card
    next to activations; gpu-80g otherwise; DEFAULT_QUEUE when the size cannot be known."""
    if device == "cpu":
        return "cpu"
    size = checkpoint_bytes(model, revision)
    if size is None:
        return settings.DEFAULT_QUEUE
    return "gpu-24g" if size <= settings.GPU_24G_MAX_MODEL_BYTES else "gpu-80g"
