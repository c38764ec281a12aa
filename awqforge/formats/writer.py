"""ArtifactWriter: streams tensors into safetensors shards in a staging folder, then publishes atomically.

Order of calls (the pipeline):
    writer = ArtifactWriter(out_dir / "awq", "awq", source_dir=resolved.path, settings=spec.quant)
    for each block:  writer.add_quantized(name, qt, bias) / writer.add_tensor(name, t)   (any order)
    embeddings, final norm, lm_head:  writer.add_tensor(...)
    writer.finish_tensors()        # shards renamed, index, config.json, tokenizer... : staging_dir now loads
    ... evaluate load_quantized(writer.staging_dir) ...
    writer.finalize(card)          # README.md, manifest.json, rename onto final_dir
On any exception: writer.abort() (the context manager does it), which removes the staging folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from awqforge.errors import AWQForgeError, InputError
from awqforge.formats import awq as awq_format
from awqforge.formats import compressed_tensors as ct_format
from awqforge.formats.card import ModelCardInfo, read_source_card_metadata, render_card
from awqforge.manifest import write_manifest
from awqforge.multimodal import PROCESSOR_FILES
from awqforge.parsing import parse_size
from awqforge.quant import QuantizedTensor

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5 * 10**9  # "5GB" as transformers counts it
SAFE_INDEX_NAME = "model.safetensors.index.json"
SAFE_SINGLE_NAME = "model.safetensors"
FORMATS = {awq_format.FORMAT: awq_format, ct_format.FORMAT: ct_format}

# Files copied from the source checkpoint as they are: tokenizer, chat template, generation config, licence.
_COPY_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    *PROCESSOR_FILES,  # image-text-to-text checkpoints' processor and preprocessor configs
    "LICENSE*",
    "LICENCE*",
    "NOTICE*",
    "USE_POLICY*",
)
_EMBEDDING_NAMES = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|word_embeddings|embed_positions)$")


class ArtifactExists(AWQForgeError, FileExistsError):
    """The final folder already exists and overwrite was not asked for."""


class QuantSettingsLike(Protocol):
    bits: int
    group_size: int
    zero_point: bool


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The checkpoint's floating dtype as config.json states it (torch_dtype, or dtype in transformers 5)."""
    for cfg in (config, config.get("text_config") or {}):
        name = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
    return None


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class _ShardSpool:
    """One safetensors shard written incrementally: tensor bytes are appended to a spool file as they come,
    the header (which must precede the data and name every offset) is written when the shard closes, and
    the data is then streamed behind it. Peak memory is one tensor, not one shard."""

    def __init__(self, stem: Path) -> None:
        self.path = stem.with_suffix(".safetensors.partial")
        self._data_path = stem.with_suffix(".data.partial")
        self._data = open(self._data_path, "wb")
        self.names: list[str] = []
        self._entries: dict[str, dict[str, Any]] = {}
        self.nbytes = 0

    def append(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        n = _tensor_bytes(t)
        if n:
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._entries[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.nbytes, self.nbytes + n],
        }
        self.names.append(name)
        self.nbytes += n

    def close(self) -> Path:
        self._data.close()
        header = {"__metadata__": {"format": "pt"}, **self._entries}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors' own writer does
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
        self._data_path.unlink()
        return self.path


class ArtifactWriter:
    """Writes one artifact (one format) into `<final_dir>`'s staging sibling and publishes it atomically."""

    def __init__(
        self,
        final_dir: str | Path,
        fmt: str,
        *,
        source_dir: str | Path,
        settings: QuantSettingsLike,
        shard_size: int | str = DEFAULT_SHARD_SIZE,
        overwrite: bool = False,
        unquantized_names: Callable[[list[str], str], list[str]] | None = None,
    ) -> None:
        """`unquantized_names(names, fmt)` rewrites the list of modules left in full precision: under module
        names (StreamingModel.unquantized_names; multimodal models: the towers as patterns, awqforge.multimodal)."""
        fmt = getattr(fmt, "value", fmt)
        self._unquantized_names = unquantized_names
        if fmt not in FORMATS:
            raise InputError(f"unknown artifact format {fmt!r}: use one of {sorted(FORMATS)}")
        self.fmt: str = fmt
        self._format = FORMATS[fmt]
        self.bits = int(settings.bits)
        self.group_size = int(settings.group_size)
        self.zero_point = bool(settings.zero_point)
        self._format.check_settings(self.bits, self.group_size)

        self.final_dir = Path(final_dir).absolute()
        self.source_dir = Path(source_dir)
        self.shard_size = parse_size(shard_size, field="shard size")
        if self.shard_size <= 0:
            raise InputError("shard size must be positive")
        self.overwrite = overwrite
        if self.final_dir.exists() and not overwrite:
            # Fail before hours of work, not at the end.
            raise ArtifactExists(f"{self.final_dir} already exists: remove it or pass overwrite=True")
        source_config = self.source_dir / "config.json"
        if not source_config.is_file():
            raise InputError(f"no config.json in the source checkpoint {self.source_dir}")
        self.source_config: dict[str, Any] = json.loads(source_config.read_text())
        self.dtype = _config_dtype(self.source_config)

        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        self.staging_dir = self.final_dir.parent / f".{self.final_dir.name}.staging-{uuid.uuid4().hex[:12]}"
        self.staging_dir.mkdir()

        self._state = "open"
        # Tensor bytes go to disk as they arrive: memory stays at one tensor, whatever the shard size.
        self._shard: _ShardSpool | None = None
        self._shard_files: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._quantized: list[str] = []
        self._dense_2d: list[str] = []  # modules with a 2-D .weight left as is: candidates for `ignore`
        self.total_size = 0  # bytes of tensor data written

    # -- tensors ---------------------------------------------------------------------------------

    @property
    def tied_embeddings(self) -> bool:
        cfg = self.source_config
        text_cfg = cfg.get("text_config") or {}
        return bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))

    def add_tensor(self, name: str, tensor: torch.Tensor, *, keep_dtype: bool = False) -> None:
        """A tensor written as is (norms, embeddings, unquantized linears); `keep_dtype`: in its own dtype
        rather than the checkpoint's (a multimodal model's towers, which may differ from the text model's)."""
        if name == "lm_head.weight" and self.tied_embeddings:
            # Tied: transformers and vLLM take lm_head from the embedding; storing it twice would only cost space.
            log.debug("skipping lm_head.weight: tie_word_embeddings is set")
            return
        if name.endswith(".weight") and tensor.dim() == 2:
            self._dense_2d.append(name[: -len(".weight")])
        self._add(name, tensor if keep_dtype else self._as_checkpoint_dtype(tensor))

    def _as_checkpoint_dtype(self, tensor: torch.Tensor) -> torch.Tensor:
        # The pipeline may compute in fp32; what is stored keeps the source checkpoint's dtype.
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            return tensor.to(self.dtype)
        return tensor

    def add_quantized(self, linear_name: str, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        """One quantized linear (`linear_name` is the module name, without `.weight`), packed for this format."""
        if linear_name.endswith(".weight"):
            raise ValueError(f"add_quantized takes the module name, not the parameter name: {linear_name!r}")
        if qt.bits != self.bits or qt.group_size != self.group_size:
            raise ValueError(
                f"{linear_name}: quantized with bits={qt.bits}, group_size={qt.group_size} but the artifact "
                f"is bits={self.bits}, group_size={self.group_size}"
            )
        if bias is not None:
            bias = self._as_checkpoint_dtype(bias)
        tensors = self._format.layer_tensors(
            linear_name, qt, bias, symmetric=not self.zero_point, scale_dtype=self.dtype
        )
        for name, tensor in tensors.items():
            self._add(name, tensor)
        self._quantized.append(linear_name)

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        if self._state != "open":
            raise RuntimeError(f"cannot add {name!r}: the writer is {self._state}")
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        t = tensor.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != _tensor_bytes(t) or t.data_ptr() == tensor.data_ptr():
            # Own the bytes: a view would drag its whole storage into the file, and the caller may reuse its buffer.
            t = t.clone()
        nbytes = _tensor_bytes(t)
        if self._shard is not None and self._shard.names and self._shard.nbytes + nbytes > self.shard_size:
            self._flush_shard()
        if self._shard is None:
            self._shard = _ShardSpool(self.staging_dir / f"shard-{len(self._shard_files) + 1:05d}")
        self._names.add(name)
        self._shard.append(name, t)
        self.total_size += nbytes

    def _flush_shard(self) -> None:
        if self._shard is None or not self._shard.names:
            return
        path = self._shard.close()
        self._shard_files.append((path, list(self._shard.names)))
        self._shard = None

    @property
    def quantized_modules(self) -> list[str]:
        return list(self._quantized)

    def unquantized_modules(self) -> list[str]:
        """Linear-like modules left in full precision: the config's `ignore` / `modules_to_not_convert`."""
        quantized = set(self._quantized)
        names = [n for n in self._dense_2d if n not in quantized and not _EMBEDDING_NAMES.search(n)]
        if self._unquantized_names is not None:
            names = self._unquantized_names(names, self.fmt)
        if "lm_head" not in quantized and "lm_head" not in names:
            names.append("lm_head")  # tied or not, the skeleton has an lm_head Linear that must stay dense
        return names

    # -- everything but tensors ------------------------------------------------------------------

    def quantization_config(self) -> dict[str, Any]:
        return self._format.quantization_config(
            self.bits, self.group_size, self.zero_point, self.unquantized_modules()
        )

    def finish_tensors(self) -> Path:
        """Close the shards and write index, config.json, tokenizer, generation config, chat template."""
        if self._state != "open":
            raise RuntimeError(f"finish_tensors() called on a writer that is {self._state}")
        if not self._quantized:
            raise ValueError("no quantized layer was added: nothing to write as a quantized artifact")
        self._flush_shard()
        n = len(self._shard_files)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._shard_files, start=1):
            final_name = SAFE_SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.staging_dir / final_name)
            weight_map.update(dict.fromkeys(names, final_name))
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.staging_dir / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

        config = dict(self.source_config)
        config.pop("quantization_config", None)
        config["quantization_config"] = self.quantization_config()
        (self.staging_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self._copy_side_files()
        self._state = "tensors finished"
        return self.staging_dir

    def _copy_side_files(self) -> None:
        for pattern in _COPY_PATTERNS:
            for src in self.source_dir.glob(pattern):
                if src.is_file():
                    shutil.copy2(src, self.staging_dir / src.name)

    def has_chat_template(self) -> bool:
        if any((self.staging_dir / n).is_file() for n in ("chat_template.jinja", "chat_template.json")):
            return True
        tok_cfg = self.staging_dir / "tokenizer_config.json"
        return tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text()).get("chat_template"))

    def finalize(self, card: ModelCardInfo) -> Path:
        """Write README.md and manifest.json, then rename the staging folder onto final_dir. Returns final_dir."""
        if self._state == "open":
            self.finish_tensors()
        if self._state != "tensors finished":
            raise RuntimeError(f"finalize() called on a writer that is {self._state}")
        readme = render_card(
            card,
            fmt=self.fmt,
            bits=self.bits,
            group_size=self.group_size,
            zero_point=self.zero_point,
            unquantized=self.unquantized_modules(),
            source_meta=read_source_card_metadata(self.source_dir),
            has_chat_template=self.has_chat_template(),
            title=None,  # the repo's name, else the model's name (card.render_card): never the output folder
        )
        (self.staging_dir / "README.md").write_text(readme)
        write_manifest(self.staging_dir)
        _fsync_tree(self.staging_dir)
        self._publish()
        self._state = "finalized"
        return self.final_dir

    def _publish(self) -> None:
        final = self.final_dir
        if not final.exists():
            os.rename(self.staging_dir, final)
            return
        if not self.overwrite:
            raise ArtifactExists(
                f"{final} appeared while this artifact was being written: not replacing it (overwrite=False)"
            )
        # Swap: old aside, new in, old removed; if the second rename fails the old one is put back.
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(final, old)
        try:
            os.rename(self.staging_dir, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the staging folder (idempotent); the final folder is never touched."""
        if self._state == "finalized":
            return
        self._shard = {}
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        self._state = "aborted"

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving the block without finalize() (an exception or not) leaves nothing behind.
        if self._state != "finalized":
            self.abort()
