"""Block checkpoints: a run killed at block k of n resumes at block k and writes the same artifact bytes.

After each finished block the pipeline stores, in a work folder, everything that block fed the artifact
writers (packed codes, scales, zeros, dense tensors, in call order), its layer metrics, scale mappings and
skipped-mapping notes, and then the next block's calibration inputs. Files are safetensors (no pickle),
each written to a temporary name and renamed, so a crash leaves either the old file or the new one.
Resuming replays the stored calls into fresh writers (same calls, same bytes) and continues from the
stored inputs. A folder made for another spec is ignored and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

INPUTS_NAME = "inputs.safetensors"
MANIFEST_NAME = "manifest.json"


# Bumped whenever a change of the engine changes what a block writes for the same spec (2: padding masked out
# of the statistics, kept inputs instead of Grams, the screened scale search): a job resumed by an upgraded
# worker starts over instead of mixing blocks of two engines in one artifact.
ENGINE_REVISION = 2


def spec_fingerprint(spec) -> str:
    """What decides the artifact bytes: the spec without its secrets and publish settings, the engine's
    revision and the torch version (its kernels' rounding). A retry with a new token resumes the same blocks."""
    from awqforge.spec import public_spec

    data = {k: v for k, v in public_spec(spec).items() if k != "publish"}
    data = {"spec": data, "engine": ENGINE_REVISION, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


class RecordingWriters:
    """Stands in for the list of artifact writers during one block: forwards each call to every writer and
    keeps it, so the block's contribution can be stored and replayed."""

    def __init__(self, writers: list) -> None:
        self.writers = writers
        self.ops: list[dict[str, Any]] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def __iter__(self):  # the pipeline iterates "for w in writers"; this object is its only element
        yield self

    def add_quantized(self, name: str, qt, bias: torch.Tensor | None = None) -> None:
        for w in self.writers:
            w.add_quantized(name, qt, bias)
        j = len(self.ops)
        q = qt.qweight
        nibbles = qt.bits <= 4 and q.dtype == torch.uint8 and q.shape[-1] % 2 == 0
        if nibbles:  # two codes per byte: the checkpoint costs half a byte per weight, as the artifact does
            q = q[..., 0::2] | (q[..., 1::2] << 4)
        self.ops.append(
            {
                "op": "quantized",
                "name": name,
                "bits": qt.bits,
                "group_size": qt.group_size,
                "nibbles": nibbles,
            }
        )
        self.tensors.update({f"{j}.qweight": q, f"{j}.scales": qt.scales, f"{j}.zeros": qt.zeros})
        if bias is not None:
            self.tensors[f"{j}.bias"] = bias

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        for w in self.writers:
            w.add_tensor(name, tensor)
        j = len(self.ops)
        self.ops.append({"op": "tensor", "name": name})
        self.tensors[f"{j}.tensor"] = tensor


class BlockCheckpoints:
    """The work folder of one run (see the module docstring)."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def _block_path(self, i: int) -> Path:
        return self.folder / f"block-{i:05d}.safetensors"

    def start(self, n_blocks: int) -> int:
        """Prepare the folder; return the first block still to quantize (0 when nothing usable is there)."""
        manifest = {"fingerprint": self.fingerprint, "n_blocks": n_blocks}
        path = self.folder / MANIFEST_NAME
        try:
            if json.loads(path.read_text()) == manifest:
                meta = _read_metadata(self.folder / INPUTS_NAME)
                next_block = int(meta["next_block"])
                if 0 < next_block <= n_blocks and all(
                    self._block_path(i).is_file() for i in range(next_block)
                ):
                    return next_block
        except (OSError, ValueError, KeyError):
            pass
        self.clear()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, path)
        return 0

    def save_block(
        self, i: int, rec: RecordingWriters, layers: list, mappings: dict[str, dict], skipped: list[str]
    ) -> None:
        tensors = dict(rec.tensors)
        plain: dict[str, dict] = {}  # mapping name -> its non-tensor fields
        tensor_fields: dict[str, list[str]] = {}  # mapping name -> fields stored as tensors
        for m, (name, info) in enumerate(mappings.items()):
            plain[name], tensor_fields[name] = {}, []
            for key, value in info.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"mapping{m}.{key}"] = value
                    tensor_fields[name].append(key)
                else:
                    plain[name][key] = value
        meta = {
            "ops": json.dumps(rec.ops),
            "layers": json.dumps([asdict(x) for x in layers]),
            "mappings": json.dumps(plain),
            "mapping_tensors": json.dumps(tensor_fields),
            "skipped": json.dumps(skipped),
        }
        _atomic_save(tensors, self._block_path(i), meta)

    def save_inputs(self, next_block: int, inputs: torch.Tensor) -> None:
        """Written after block next_block-1's file: the resume point only ever moves past a stored block."""
        _atomic_save({"inputs": inputs}, self.folder / INPUTS_NAME, {"next_block": str(next_block)})

    def load_inputs(self, device: torch.device | str) -> torch.Tensor:
        return load_file(str(self.folder / INPUTS_NAME), device=str(device))["inputs"]

    def replay_block(self, i: int, writers: list) -> tuple[list, dict[str, dict], list[str]]:
        """Feed block i's stored calls to `writers`; return its (layer metrics, mappings, skipped)."""
        from awqforge.awq import LayerMetric
        from awqforge.quant import QuantizedTensor

        path = self._block_path(i)
        meta = _read_metadata(path)
        tensors = load_file(str(path))
        for j, op in enumerate(json.loads(meta["ops"])):
            if op["op"] == "quantized":
                q = tensors[f"{j}.qweight"]
                if op["nibbles"]:
                    q = torch.stack((q & 0xF, q >> 4), dim=-1).reshape(*q.shape[:-1], -1)
                qt = QuantizedTensor(
                    qweight=q,
                    scales=tensors[f"{j}.scales"],
                    zeros=tensors[f"{j}.zeros"],
                    bits=op["bits"],
                    group_size=op["group_size"],
                )
                for w in writers:
                    w.add_quantized(op["name"], qt, tensors.get(f"{j}.bias"))
            else:
                for w in writers:
                    w.add_tensor(op["name"], tensors[f"{j}.tensor"])
        mappings = json.loads(meta["mappings"])
        for m, (name, keys) in enumerate(json.loads(meta["mapping_tensors"]).items()):
            for key in keys:
                mappings[name][key] = tensors[f"mapping{m}.{key}"]
        layers = [LayerMetric(**m) for m in json.loads(meta["layers"])]
        return layers, mappings, json.loads(meta["skipped"])

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
