"""Turn a model reference (local folder or hub id + revision) into a local safetensors checkpoint folder.

Hub access goes through huggingface_hub, which honours HF_HOME (cache), HF_TOKEN (gated/private repos) and
HF_HUB_OFFLINE (cache only). Only the files the engine needs are fetched: config, tokenizer, chat template and
the safetensors weights. Pickled weights (.bin/.pt) are never loaded, and remote code is never trusted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from awqforge.errors import HubUnavailable, InputError

# Everything but the weights: config, generation config, tokenizer files, chat templates.
METADATA_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class ResolvedModel:
    """A checkpoint on local disk: its folder, the revision it came from and its transformers config."""

    path: Path
    revision: str | None
    config: object  # transformers.PretrainedConfig
    weight_files: list[Path]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)


# -- local paths: the one place a path named in a job (model, file: sources, uploads) becomes a real path --

# The engine's own public texts (calibration and evaluation samples): always readable.
BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "data"


def is_local_reference(model: str) -> bool:
    """A local path is written as one (absolute, ./, ../, ~); anything else is a hub id, never looked up on disk."""
    return model.startswith(("/", "./", "../", "~"))


class PathNotAllowed(InputError):
    """A path outside the allowed roots. The message shows neither the path nor whether it exists."""


def resolve_local_path(
    raw: str | Path, roots: Sequence[str | Path] | None, *, what: str = "path", base: Path | None = None
) -> Path:
    """The real path (`~`, `..` and symlinks resolved) of a path a job names, which must lie under one of
    `roots` (None: any path, for the CLI on its own machine). A relative path is taken from `base` (default:
    the working directory). Raises PathNotAllowed, whose message reveals nothing of the server's disk."""
    text = str(raw)
    if "\x00" in text:
        raise InputError(f"{what}: a path must not contain NUL bytes")
    try:
        path = Path(text).expanduser()
        path = ((base / path) if base is not None and not path.is_absolute() else path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name too long
        raise InputError(f"{what}: not a usable path ({type(exc).__name__})") from None
    if roots is None:
        return path
    for root in roots:
        try:
            if path.is_relative_to(Path(root).expanduser().resolve()):
                return path
        except (OSError, RuntimeError):
            continue
    raise PathNotAllowed(
        f"{what}: local paths are not allowed here outside the server's allowed folders "
        "(ALLOWED_LOCAL_ROOTS); use a hub id, or an upload for calibration data"
    )


def resolve_text_source(source: str | None, roots: Sequence[str | Path] | None, *, what: str) -> str | None:
    """A text source (calibration or evaluation): `file:<path>` resolved through resolve_local_path,
    anything else (pileval, self, hf:..., None) as it is."""
    if source is None or not source.startswith("file:"):
        return source
    return f"file:{resolve_local_path(source[5:], roots, what=what)}"


def resolve_spec_paths(spec, roots: Sequence[str | Path] | None):
    """A JobSpec whose every path-like field (model, calibration and evaluation `file:` sources) is resolved
    and checked against `roots` (see resolve_local_path); hub ids are left as they are."""
    model = spec.model
    if is_local_reference(model):
        model = str(resolve_local_path(model, roots, what="model"))
    calibration = spec.calibration.model_copy(
        update={"source": resolve_text_source(spec.calibration.source, roots, what="calibration.source")}
    )
    evaluation = spec.eval.model_copy(
        update={"text": resolve_text_source(spec.eval.text, roots, what="eval.text")}
    )
    return spec.model_copy(update={"model": model, "calibration": calibration, "eval": evaluation})


def resolve_model(
    model: str, revision: str | None = None, *, allowed_roots: Sequence[str | Path] | None = None
) -> ResolvedModel:
    """Local folder or hub id -> ResolvedModel; safetensors only. Raises InputError / HubUnavailable.
    A local folder must lie under `allowed_roots` (None: anywhere)."""
    if is_local_reference(model):
        path = resolve_local_path(model, allowed_roots, what="model")
        if not path.exists():
            raise InputError(f"model path {model} does not exist")
        if not path.is_dir():
            raise InputError(
                f"model path {model} is not a folder: give the checkpoint folder (with config.json)"
            )
        rev = revision
    else:
        path, rev = _download_from_hub(model, revision)
    weight_files = safetensors_files(path, source=model)
    return ResolvedModel(path=path, revision=rev, config=load_config(path), weight_files=weight_files)


def safetensors_files(path: Path, source: str | None = None) -> list[Path]:
    """The checkpoint's safetensors shards (from the index when there is one); refuses pickle-only checkpoints."""
    source = source or str(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{source}: no config.json in {path}; this is not a Hugging Face checkpoint folder")
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(
                f"{source}: {SAFETENSORS_INDEX} names shards that are missing: {', '.join(missing)}"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(
            f"{source} has only PyTorch pickle weights ({', '.join(pickles[:3])}); AWQForge loads safetensors "
            "only, because pickles can run arbitrary code. Convert the checkpoint first (load it where you trust "
            "it and save_pretrained(..., safe_serialization=True)) or use a repo that ships .safetensors."
        )
    raise InputError(f"{source}: no weights found in {path} (expected *.safetensors)")


def load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except ValueError as exc:  # unknown model_type, or a config that needs remote code
        raise InputError(
            f"cannot read the model config in {path}: {exc}. Models that need trust_remote_code are not supported."
        ) from exc
    except OSError as exc:
        raise InputError(f"cannot read the model config in {path}: {exc}") from exc


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE")  # read now, so a flag set after import still counts
    if flag is not None:
        return flag.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def _weight_patterns(files: list[str]) -> list[str]:
    """Which weight files of a hub repo to fetch: the index's shards, else the top-level safetensors."""
    top = [f for f in files if "/" not in f]
    if SAFETENSORS_INDEX in top:
        return [SAFETENSORS_INDEX, "model-*.safetensors", "model.safetensors"]
    return [f for f in top if f.endswith(".safetensors")]


def _download_from_hub(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    def from_cache(reason: str) -> tuple[Path, str | None]:
        try:
            folder = snapshot_download(
                repo_id,
                revision=revision,
                local_files_only=True,
                allow_patterns=METADATA_PATTERNS + ["*.safetensors"],
            )
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, FileNotFoundError) as exc:
            raise HubUnavailable(
                f"{reason}, and {repo_id!r}"
                f"{'@' + revision if revision else ''} is not in the local cache "
                f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}). Download it where the Hub is "
                "reachable, or pass a local checkpoint folder."
            ) from exc
        return Path(folder), revision

    if _hub_offline():
        return from_cache("HF_HUB_OFFLINE is set")
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except hf_errors.GatedRepoError as exc:
        raise InputError(f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN ({exc})") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise InputError(f"model {repo_id!r} not found on the Hub (or private: set HF_TOKEN)") from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise InputError(f"revision {revision!r} not found in {repo_id}") from exc
    except hf_errors.HfHubHTTPError as exc:
        return from_cache(f"the Hub answered with an error ({exc})")
    except (OSError, ConnectionError) as exc:
        return from_cache(f"the Hub is unreachable ({type(exc).__name__})")
    except Exception as exc:  # httpx/requests transport errors differ across huggingface_hub versions
        if "connect" in type(exc).__name__.lower() or "timeout" in type(exc).__name__.lower():
            return from_cache(f"the Hub is unreachable ({type(exc).__name__})")
        raise
    weights = _weight_patterns(files)
    if not weights:
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        what = f"only PyTorch pickle weights ({', '.join(pickles[:3])})" if pickles else "no weights"
        raise InputError(
            f"{repo_id} has {what}; AWQForge loads safetensors only (pickles can run arbitrary code)."
        )
    folder = snapshot_download(repo_id, revision=revision, allow_patterns=METADATA_PATTERNS + weights)
    return Path(folder), revision
