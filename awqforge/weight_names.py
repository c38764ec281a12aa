"""A checkpoint's module names without torch: the safetensors header reader, and the names a
`modules_to_not_convert` pattern is matched against before a job is accepted.

A safetensors file starts with 8 bytes (little-endian u64: the JSON header's length), then the JSON header:
tensor name -> {dtype, shape, data_offsets}, and an optional `__metadata__`. The engine's ShardReader and the
API's submit-time check both read headers here; the API process never imports torch.

Module names come from tensor names (the name minus its last part). Two kinds of names differ between a
checkpoint and the modules the engine quantizes: fused 3-D experts (`...experts.gate_up_proj`, [E, ...]),
which the engine unfuses into `experts.{e}.gate_proj|up_proj|down_proj` (Mixtral `w1|w3|w2`), and Mixtral's
`block_sparse_moe` (transformers' `mlp`). Both spellings are kept, so a pattern that the engine would accept is
accepted here. Other model types may have tensors renamed on load by transformers (`self_attn.g_proj` ->
`gate_proj`, `backbone.` -> `model.`), which cannot be known without torch: for them, as when the names cannot
be read at all, the final word is the engine's own check, which runs before any work.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from awqforge.patterns import unmatched_patterns

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
SAFETENSORS_INDEX = "model.safetensors.index.json"
_FUSED_EXPERTS = ("gate_up_proj", "down_proj")
_EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj", "w1", "w3", "w2")
_ALIASES = ((".block_sparse_moe.", ".mlp."),)  # checkpoint spelling -> module spelling (Mixtral)

# Model types whose checkpoint tensor names are their module names, up to _ALIASES and fused experts: the
# registry's families (awqforge.arch.SUPPORTED_FAMILIES; tests/test_patterns.py keeps the two equal).
CHECKED_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "opt",
        "gpt_neox",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "deepseek_v2",
        "deepseek_v3",
        "llama4_text",
    }
)

Shapes = Mapping[str, Sequence[int] | None]  # tensor name -> shape (None: not known, e.g. from an index)


class HeaderError(ValueError):
    """Not a safetensors header (the message says what is wrong)."""


def header_length(first8: bytes) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes."""
    if len(first8) < 8:
        raise HeaderError("shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", first8[:8])
    if n == 0 or n > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {n} is not plausible for safetensors")
    return n


def parse_header(raw: bytes) -> dict[str, dict]:
    """The JSON header (without `__metadata__`): tensor name -> {dtype, shape, data_offsets}."""
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise HeaderError(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise HeaderError("the header is not a JSON object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
        ):
            raise HeaderError(f"tensor {name!r} has no dtype, shape and data_offsets")
    return header


def read_header(source: str | Path | BinaryIO) -> dict[str, dict]:
    """The header of a safetensors file (a path or a binary file object at its start)."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            header = read_header(f)
            size, start = os.fstat(f.fileno()).st_size, f.tell()
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if start + end > size:
            raise HeaderError(f"the file has {size} bytes but its header needs {start + end} (truncated?)")
        return header
    n = header_length(source.read(8))
    raw = source.read(n)
    if len(raw) != n:
        raise HeaderError(f"the file ends inside its {n}-byte header")
    return parse_header(raw)


def local_shapes(folder: Path) -> dict[str, list[int]] | None:
    """Tensor name -> shape of every safetensors file of a checkpoint folder (its index's shards, else every
    top-level *.safetensors), or None when there are none or one cannot be read."""
    index = folder / SAFETENSORS_INDEX
    try:
        if index.is_file():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            return None
        return {name: info["shape"] for f in files for name, info in read_header(f).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def module_names(shapes: Shapes) -> set[str] | None:
    """The module names a pattern may name (see the module docstring); None when fused experts are present
    but no shape says how many."""
    counts = [
        s[0]
        for t, s in shapes.items()
        if t.rpartition(".")[2] in _FUSED_EXPERTS and s is not None and len(s) == 3
    ]
    names = {"lm_head"}  # tied to the embedding, it has no tensor of its own, but is a module all the same
    for tensor, shape in shapes.items():
        module, _, leaf = tensor.rpartition(".")
        if not module:
            continue
        names.add(module)
        if (
            leaf in _FUSED_EXPERTS
            and module.rpartition(".")[2] == "experts"
            and (shape is None or len(shape) == 3)
        ):
            n = shape[0] if shape is not None else max(counts, default=None)
            if n is None:
                return None
            names.update(f"{module}.{e}.{lin}" for e in range(n) for lin in _EXPERT_LINEARS)
    for src, dst in _ALIASES:
        names.update(f".{n}.".replace(src, dst)[1:-1] for n in list(names) if src in f".{n}.")
    return names


def unmatched(patterns: Iterable[str], shapes: Shapes | None, model_type: str | None) -> list[str] | None:
    """The patterns that match no module of the checkpoint; None when its module names could not be known
    (no shapes, or a model type outside CHECKED_MODEL_TYPES)."""
    patterns = list(patterns)
    if not shapes or model_type not in CHECKED_MODEL_TYPES:  # no names (or none at all): nothing to say
        return None
    if not patterns:
        return []
    names = module_names(shapes)
    return None if names is None else unmatched_patterns(patterns, names)


def unmatched_message(missing: list[str]) -> str:
    """The reason given for patterns that match nothing (the API's 422, the CLI's refusal)."""
    return (
        f"{', '.join(repr(p) for p in missing)} match{'es' if len(missing) == 1 else ''} no module of this model's "
        "checkpoint. Patterns are globs over full module names (model.layers.*.mlp.down_proj, model.layers.0.*) "
        "or their tails (mlp.down_proj, down_proj)"
    )
