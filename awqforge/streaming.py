"""The model as a skeleton on the meta device whose pieces are read from the safetensors shards on demand.

Nothing here ever holds the whole model: `StreamingModel` builds the transformers model from its config on the
meta device (no memory, no init), materialises the non-block pieces (embeddings, final norm, rotary tables)
for capturing, and materialises one decoder block at a time (`load_block` / `free_block`). Tensors are read
one by one with `safe_open`, so peak memory is one block plus the activations.

Checkpoint names and module names differ for some models in transformers >= 5 (MoE experts are stored per
expert on disk and fused into 3-D parameters in memory): blocks are loaded through the conversions transformers
registers for the model, then the adapter unfuses the experts into per-expert linears (`prepare_block`), whose
names `adapter.checkpoint_name` maps back to the checkpoint's for writing.
"""

from __future__ import annotations

import ctypes
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awqforge.awq.capture import CapturedInputs, capture_layer_inputs, for_rows
from awqforge.errors import AWQForgeError, InputError
from awqforge.weight_names import HeaderError, read_header

_ITEM_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
}
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def release_memory(device: torch.device) -> None:
    """Return freed memory: glibc keeps freed heap chunks (RSS creeps up block after block) unless trimmed;
    CUDA's caching allocator keeps blocks too. (No gc.collect(): reference counting already freed the block's
    tensors, and a full collection over transformers' objects costs about a second per block.)"""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def pick_device(device: str | torch.device) -> torch.device:
    """'auto' = cuda when available, else cpu; asking for cuda without one is an InputError."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    return dev


def compute_dtype(checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype blocks run in: the checkpoint's on GPU; float32 on CPU, where bf16/fp16 matmuls are slow
    and imprecise. Statistics and losses are float32 in any case (awqforge.awq)."""
    if device.type == "cpu" or checkpoint_dtype not in (torch.float16, torch.bfloat16):
        return torch.float32
    return checkpoint_dtype


class ShardReader:
    """Tensor name -> shard file over a safetensors checkpoint; reads tensors one at a time.

    Files are opened per `read` call and closed after it, so that pages of shards already consumed do not
    stay mapped (and counted in RSS) for the rest of the job.
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = list(files)
        self.where: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        self.nbytes: dict[str, int] = {}
        for f in self.files:
            try:
                header = read_header(f)
            except (HeaderError, OSError) as exc:
                raise InputError(f"{f.name}: not a readable safetensors file ({exc})") from None
            for name, info in header.items():
                self.where[name] = f
                self.dtypes[name] = info["dtype"]
                self.nbytes[name] = math.prod(info["shape"]) * _ITEM_BYTES.get(info["dtype"], 4)

    def names(self) -> list[str]:
        return list(self.where)

    def floating_dtype(self) -> torch.dtype:
        """The checkpoint's dtype: the floating dtype that holds most of its bytes."""
        counts: dict[str, int] = defaultdict(int)
        for name, d in self.dtypes.items():
            if d in SAFETENSORS_DTYPES:
                counts[d] += self.nbytes[name]
        if not counts:
            raise InputError("the checkpoint has no floating-point tensors")
        return SAFETENSORS_DTYPES[max(counts, key=counts.get)]

    def get(self, name: str) -> torch.Tensor:
        """One CPU tensor as stored."""
        return next(self.read([name]))[1]

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, CPU tensor as stored) for each name, grouped by shard file."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for n in names:
            by_file[self.where[n]].append(n)
        for f, group in by_file.items():
            with safe_open(str(f), framework="pt") as handle:
                for n in group:
                    yield n, handle.get_tensor(n)


# -- checkpoint <-> module names ----------------------------------------------------------------------


def _conversions(model: nn.Module) -> list | None:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers < 5: checkpoint names are module names
        return None
    conversions = get_model_conversion_mapping(model)
    return conversions or None


def _checkpoint_to_module(
    model: nn.Module, tensors: dict[str, torch.Tensor], conversions: list | None, meta_state: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> module tensors, with transformers' registered conversions (renames, expert fusion)."""
    if not conversions:
        return tensors
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key

    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)
    pending: dict[str, Any] = {}
    for key in sorted(tensors, key=dot_natural_key):
        target, pattern = _rename(key, renamings, converters, prefix, meta_state)
        if pattern is not None:
            unit = pending.setdefault(target, deepcopy(pattern_to_converter[pattern]))
        else:
            unit = pending.setdefault(target, WeightRenaming(key, target))
            pattern = key
        unit.add_tensor(target, key, pattern, tensors[key])
    out: dict[str, torch.Tensor] = {}
    for first_name, unit in pending.items():
        for name, value in unit.convert(first_name, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out


def _rename(key: str, renamings: list, converters: list, prefix: str | None, meta_state: dict) -> tuple:
    """transformers' renaming of one checkpoint key (`rename_source_key`), with its loader's fallback: a key that
    is already a module tensor's name and whose renaming is not keeps its name (DeepSeek-V4's `.norm.` ->
    `.kv_norm.` renaming would otherwise send `model.norm.weight` to a `model.kv_norm` that does not exist)."""
    from transformers.core_model_loading import rename_source_key

    target, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
    if target not in meta_state and key in meta_state:
        return rename_source_key(key, [], [], prefix, meta_state)
    return target, pattern


# -- the streamed model -------------------------------------------------------------------------------


class _Inject(nn.Module):
    """A decoder layer stand-in that passes its input through, or returns a fixed output."""

    def __init__(self, output: torch.Tensor | None) -> None:
        super().__init__()
        self.output = output

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.output is None else self.output.to(hidden_states.device)


class StreamingModel:
    """A causal LM skeleton on meta whose non-block pieces and blocks are loaded from the shards on demand."""

    def __init__(
        self,
        config,
        weight_files: list[Path],
        adapter,
        *,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> None:
        from awqforge.multimodal import (
            auto_model_class,
            is_multimodal,
            tower_paths,
        )

        self.config = config
        self.adapter = adapter
        self.device = device
        self.reader = ShardReader(weight_files)
        self.checkpoint_dtype = self.reader.floating_dtype()
        self.dtype = dtype or compute_dtype(self.checkpoint_dtype, device)
        with torch.device("meta"):
            self.model = auto_model_class(config).from_config(
                config, dtype=self.dtype, trust_remote_code=False
            )
        self.model.eval()
        from awqforge.arch import keep_linears_read_at_init

        self.adapter = adapter = keep_linears_read_at_init(adapter, self.model)
        self.layers = adapter.get_layers(self.model)
        self.layers_prefix = adapter.layers_attr
        self.n_blocks = len(self.layers)

        self._conversions = _conversions(self.model)
        self._targets = self._module_names_of_checkpoint_keys()
        self._sources = self._group_by_block(self._targets)
        # Image-text-to-text models: the towers are never run here (text calibration), so they are not loaded
        # (awqforge/multimodal.py).
        self.towers = tuple(tower_paths(self.model, adapter.layers_attr)) if is_multimodal(config) else ()

    @classmethod
    def from_resolved(
        cls, resolved, adapter, *, device: torch.device, dtype: torch.dtype | None = None
    ) -> StreamingModel:
        return cls(resolved.config, resolved.weight_files, adapter, device=device, dtype=dtype)

    def _module_names_of_checkpoint_keys(self) -> dict[str, str]:
        """Checkpoint key -> the module tensor it becomes (its first target, for keys fused into one)."""
        if not self._conversions:
            return {k: k for k in self.reader.names()}
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        renamings = [c for c in self._conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in self._conversions if isinstance(c, WeightConverter)]
        base = getattr(self.model, "base_model_prefix", None)
        meta_state = self._meta_state()
        return {k: _rename(k, renamings, converters, base, meta_state)[0] for k in self.reader.names()}

    def _group_by_block(self, targets: dict[str, str]) -> dict[int | None, list[str]]:
        """Checkpoint keys by the block they belong to (None: not in a block)."""
        prefix = self.layers_prefix + "."
        groups: dict[int | None, list[str]] = defaultdict(list)
        for key, target in targets.items():
            block = None
            if target.startswith(prefix):
                head = target[len(prefix) :].split(".", 1)[0]
                block = int(head) if head.isdigit() else None
            groups[block].append(key)
        return groups

    def module_tensor_name(self, checkpoint_key: str) -> str | None:
        """The module tensor a checkpoint key is loaded into (transformers' renamings applied)."""
        return self._targets.get(checkpoint_key)

    def module_names(self) -> dict[str, str]:
        """Checkpoint module name -> module name, for every module with a `.weight` in the checkpoint."""
        w = ".weight"
        return {
            k[: -len(w)]: t[: -len(w)]
            for k, t in self._targets.items()
            if k.endswith(w) and t is not None and t.endswith(w)
        }

    def unquantized_names(self, names: list[str], fmt: str) -> list[str]:
        """The artifact's ignore list under module names: transformers' loaders (AWQ's `modules_to_not_convert`,
        compressed-tensors' `ignore`) match it against the module tree, not the checkpoint's names (nemotron_h:
        `backbone.` in the checkpoint, `model.` in the module tree); vLLM maps its own names onto it alike."""
        modules = self.module_names()
        return list(dict.fromkeys(modules.get(n, n) for n in names))

    def _in_tower(self, module_tensor: str) -> bool:
        return any(module_tensor.startswith(t + ".") for t in self.towers)

    def block_bytes(self, index: int = 0) -> int:
        """Bytes block `index` takes in the checkpoint."""
        return sum(self.reader.nbytes[k] for k in self._sources.get(index, []))

    def block_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    # -- loading ------------------------------------------------------------------------------------

    def _module_tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        tensors = dict(self.reader.read(keys))
        return _checkpoint_to_module(self.model, tensors, self._conversions, self._meta_state())

    def _meta_state(self) -> dict[str, Any]:
        return dict(self.model.state_dict(keep_vars=True))

    def _set(self, name: str, value: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        if value.is_floating_point():
            value = value.to(self.dtype)
        value = value.to(self.device)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        elif attr in module._buffers:
            module._buffers[attr] = value
        else:
            raise InputError(f"checkpoint tensor {name!r} has no place in {type(self.model).__name__}")

    def load_non_block(self, *, with_output_embedding: bool = False) -> None:
        """Embeddings, final norm, rotary and other buffers: what runs before the blocks. lm_head, unless tied to
        the embedding or asked for, is left on meta (the pipeline reads it again when it writes it)."""
        out_emb = self.model.get_output_embeddings()
        tied = bool(getattr(self.model.config.get_text_config(), "tie_word_embeddings", False))
        skip = None
        if out_emb is not None and not tied and not with_output_embedding:
            skip = next((f"{n}.weight" for n, m in self.model.named_modules() if m is out_emb), None)
        keys = [
            k
            for k in self._sources.get(None, [])
            if self._targets[k] != skip and not self._in_tower(self._targets[k])
        ]
        # Buffers first: transformers' init of their owner (an embedding with an embed_scale) also re-inits its
        # weights, which must not overwrite what is loaded next.
        self._init_buffers(self.model, skip_prefix=self.layers_prefix + ".")
        for name, value in self._module_tensors(keys).items():
            self._set(name, value)
        self.model.tie_weights()

    def _init_buffers(self, root: nn.Module, skip_prefix: str | None = None) -> None:
        """Buffers not in the checkpoint (rotary inv_freq, embed scales) computed by transformers' own init: that
        of their owner, then of the owner's ancestors, root first (FalconH1Model's init fills every layer's
        `mamba.mup_vector`). Every other tensor is flagged `_is_hf_initialized` meanwhile, as transformers'
        loader does, so that no init rewrites a loaded weight."""
        owners, fresh = {}, set()
        for name, buf in list(root.named_buffers()):
            if buf.device.type != "meta" or (skip_prefix and name.startswith(skip_prefix)):
                continue
            module_name, _, attr = name.rpartition(".")
            module = root.get_submodule(module_name) if module_name else root
            module._buffers[attr] = torch.empty_like(buf, device="cpu", dtype=buf.dtype)
            fresh.add(id(module._buffers[attr]))
            owners[id(module)] = module
        if not owners:
            return
        names = {id(m): n for n, m in self.model.named_modules()}
        chain: dict[str, nn.Module] = {}
        for module in owners.values():
            parts = names[id(module)].split(".") if names[id(module)] else []
            for i in range(len(parts)):  # the ancestors, root first
                chain.setdefault(".".join(parts[:i]), self.model.get_submodule(".".join(parts[:i])))
        guarded = [
            t
            for t in [*self.model.parameters(), *self.model.buffers()]
            if id(t) not in fresh and not getattr(t, "_is_hf_initialized", False)
        ]
        for t in guarded:
            t._is_hf_initialized = True
        try:
            for name, module in chain.items():
                if id(module) in owners:
                    continue
                try:
                    init_weights_of(self.model, name)(module)
                except Exception:  # noqa: BLE001 - an ancestor's init on a meta skeleton: best effort
                    pass
            for module in owners.values():
                init_weights_of(self.model, names[id(module)])(module)
        finally:
            for t in guarded:
                del t._is_hf_initialized
        for module in owners.values():
            for attr, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[attr] = buf.to(self.device)

    def unload_non_block(self) -> None:
        """Back to meta for everything outside the blocks (the embeddings are not needed while quantizing)."""
        for name, module in self.model.named_modules():
            if name == self.layers_prefix or name.startswith(self.layers_prefix + "."):
                continue
            for attr, p in list(module._parameters.items()):
                if p is not None and p.device.type != "meta":
                    module._parameters[attr] = nn.Parameter(p.to("meta"), requires_grad=False)

    def load_block(self, index: int) -> nn.Module:
        """Block `index` with its weights read from the shards, on the device, in the compute dtype, experts unfused."""
        block = self.layers[index]
        prefix = self.block_prefix(index) + "."
        self._init_buffers(block)  # before the weights, see load_non_block
        tensors = self._module_tensors(self._sources.get(index, []))
        for name in list(tensors):
            if not name.startswith(prefix):
                raise AWQForgeError(f"checkpoint tensor for block {index} maps outside it: {name}")
            # popped: each tensor as read is freed once converted, not all of them at the end
            self._set(name, tensors.pop(name))
        missing = [n for n, p in block.named_parameters() if p.device.type == "meta"]
        if missing:
            raise InputError(f"block {index}: tensors missing from the checkpoint: {missing[:6]}")
        # Fused MoE experts become per-expert linears, named as in the checkpoint (adapter.checkpoint_name).
        return self.adapter.prepare_block(block)

    def free_block(self, index: int) -> None:
        """Back to meta: the block's memory is released (and handed back to the OS, see release_memory)."""
        block = self.layers[index]
        for module in block.modules():
            for attr, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[attr] = nn.Parameter(p.to("meta"), requires_grad=False)
        release_memory(self.device)

    def block_tensors_for_checkpoint(self, index: int, exclude: set[str]) -> dict[str, torch.Tensor]:
        """The block's current tensors (after scale folding, experts unfused) under checkpoint names, in the
        checkpoint dtype, except the block-relative names in `exclude` (the quantized linears' weights and biases)."""
        prefix = self.block_prefix(index)
        out = {}
        for name, t in self.layers[index].state_dict().items():  # persistent tensors only
            if name in exclude:
                continue
            t = t.detach()
            out[self.adapter.checkpoint_name(f"{prefix}.{name}")] = (
                t.to(self.checkpoint_dtype) if t.is_floating_point() else t
            )
        return out

    def non_block_checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Embeddings, final norm, lm_head... as stored in the source checkpoint, one at a time."""
        yield from self.reader.read(self._sources.get(None, []))

    # -- capture ------------------------------------------------------------------------------------

    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CapturedInputs:
        """Block 0's inputs and every decoder layer's kwargs (see `awqforge.awq.capture`)."""
        return capture_layer_inputs(self.model, self.layers, input_ids, attention_mask, device=self.device)

    @torch.no_grad()
    def forward_blocks(
        self, input_ids: torch.Tensor, batch_size: int = 1, progress: Callable[[int, int], None] | None = None
    ) -> torch.Tensor:
        """The last block's output for input_ids [n, seq], with one block in memory at a time;
        progress(blocks done, n_blocks) after each block."""
        captured = self.capture(input_ids)
        hidden = captured.inputs
        for i in range(self.n_blocks):
            if progress is not None and i:
                progress(i, self.n_blocks)
            block = self.load_block(i)
            outs = []
            for start in range(0, len(hidden), batch_size):
                x = hidden[start : start + batch_size]
                out = block(x, **for_rows(captured.layer_kwargs[i], slice(start, start + len(x))))
                outs.append(out[0] if isinstance(out, tuple) else out)
            hidden = torch.cat(outs)
            self.free_block(i)
        if progress is not None:
            progress(self.n_blocks, self.n_blocks)
        return hidden

    @torch.no_grad()
    def head_logits(self, input_ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """Logits through the model's own head (final norm, lm_head, logit softcapping...) for the given last
        block output: the model runs with its layers replaced by pass-throughs, the last one returning it."""
        originals = list(self.layers)
        try:
            for i in range(self.n_blocks):
                self.layers[i] = _Inject(last_hidden if i == self.n_blocks - 1 else None)
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer


def init_weights_of(model: nn.Module, module_name: str) -> Callable[[nn.Module], None]:
    """The `_init_weights` transformers runs on the module at `module_name`: that of its nearest enclosing
    PreTrainedModel (transformers' `smart_apply`). A composite model's sub-model inits its own modules: PaliGemma's
    has no case for the Gemma language model's scaled embedding, whose `embed_scale` only GemmaModel's init sets."""
    from transformers import PreTrainedModel

    init, node = model._init_weights, model
    for part in module_name.split(".") if module_name else []:
        node = getattr(node, part)
        if isinstance(node, PreTrainedModel):
            init = node._init_weights
    return init


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The floating dtype a checkpoint folder stores its weights in."""
    from awqforge.resolve import safetensors_files

    return ShardReader(safetensors_files(path)).floating_dtype()
