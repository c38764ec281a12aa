"""Turn a model reference (local folder or hub id + revision) into a local safetensors checkpoint folder.

Hub access goes through huggingface_hub, which honours HF_HOME (cache), HF_TOKEN (gated/private repos) and
HF_HUB_OFFLINE (cache only). Only the files the engine needs are fetched: config, tokenizer, chat template and
the safetensors weights. Pickled weights (.bin/.pt) are never loaded, and remote code is never trusted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from awqforge.errors import HubUnavailable, InputError
from awqforge.parsing import PathNotAllowed, is_local_reference, resolve_local_path  # noqa: F401 (re-exported)

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


# -- local paths: a path named in a job (model, file: sources, uploads) becomes a real path through
# awqforge.parsing.resolve_local_path (re-exported here with PathNotAllowed and is_local_reference) --

# The engine's own public texts (calibration and evaluation samples): always readable.
BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "data"


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
    model: str,
    revision: str | None = None,
    token: str | None = None,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
) -> ResolvedModel:
    """Local folder or hub id -> ResolvedModel; safetensors only. Raises InputError / HubUnavailable.

    A local folder must lie under `allowed_roots` (None: anywhere). For a hub id, `revision` (default main)
    is resolved to its commit sha, which becomes `.revision`; `token` reads private and gated repos (None:
    the client's own, from HF_TOKEN or a login)."""
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
        path, rev = download_from_hub(model, revision, token)
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


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, read at each call (the one rule: engine and service)."""
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


log = logging.getLogger("awqforge.resolve")


def hub_call_with_backoff(
    fn, *, what: str, attempts: int = 4, backoff_s: float = 1.0, max_wait_s: float = 60
):
    """Call `fn` (a huggingface_hub request); on 429 or 5xx wait (Retry-After when the hub gives one, else
    backoff_s doubling) and try again, `attempts` times in all. Other errors go straight to the caller."""
    from huggingface_hub import errors as hf_errors

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except hf_errors.HfHubHTTPError as exc:
            resp = getattr(exc, "response", None)
            status = getattr(resp, "status_code", None) or 0
            if not (status == 429 or status >= 500) or attempt == attempts:
                raise
            try:
                wait = float(resp.headers.get("Retry-After"))
            except (TypeError, ValueError):
                wait = backoff_s * 2 ** (attempt - 1)
            wait = min(wait, max_wait_s)
            log.warning("the hub answered %s to %s; retrying in %.1f s", status, what, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _hub_error(repo_id: str, revision: str | None, token: str | None, exc: Exception) -> InputError:
    """A hub refusal as a reason the user can act on: 401, 403 and 404 told apart."""
    from huggingface_hub import errors as hf_errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf_errors.GatedRepoError):
        if not token:
            return InputError(
                f"{repo_id} is gated (401 without a token): accept its terms on the Hub, then give "
                "source.token (a read token of the account that accepted them)"
            )
        return InputError(
            f"{repo_id} is gated and this token has no access ({status}): accept the repo's terms with the "
            "token's account, or use a token that has"
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return InputError(f"revision {revision!r} not found in {repo_id} (404): give a branch, tag or commit")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        if token:
            return InputError(f"model {repo_id!r} not found on the Hub (404), or this token cannot read it")
        return InputError(
            f"model {repo_id!r} not found on the Hub (404), or private: give source.token to read it"
        )
    if status == 401:
        return InputError(f"the Hub refused the token for {repo_id} (401): it is invalid or expired")
    if status == 403:
        return InputError(f"the token may not read {repo_id} (403): use a token with read access")
    return InputError(f"the Hub refused {repo_id}: {exc}")


def download_from_hub(
    repo_id: str, revision: str | None, token: str | None = None
) -> tuple[Path, str | None]:
    """The one hub download path: resolve the revision to a commit sha, check what the repo holds, then
    fetch only config, tokenizer, generation files and safetensors weights at that sha."""
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
        return Path(folder), Path(folder).name  # the cache's snapshot folder is named by the commit sha

    if hub_offline():
        return from_cache("HF_HUB_OFFLINE is set")
    api = HfApi(token=token)
    try:
        info = hub_call_with_backoff(
            lambda: api.model_info(repo_id, revision=revision or "main"), what=f"model info of {repo_id}"
        )
    except (
        hf_errors.RepositoryNotFoundError,
        hf_errors.RevisionNotFoundError,
        hf_errors.GatedRepoError,
    ) as exc:
        raise _hub_error(repo_id, revision, token, exc) from exc
    except hf_errors.HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", None) in (401, 403):
            raise _hub_error(repo_id, revision, token, exc) from exc
        return from_cache(f"the Hub answered with an error ({exc})")
    except (OSError, ConnectionError) as exc:
        return from_cache(f"the Hub is unreachable ({type(exc).__name__})")
    except Exception as exc:  # httpx/requests transport errors differ across huggingface_hub versions
        if "connect" in type(exc).__name__.lower() or "timeout" in type(exc).__name__.lower():
            return from_cache(f"the Hub is unreachable ({type(exc).__name__})")
        raise
    sha = info.sha
    files = [s.rfilename for s in (info.siblings or [])]
    if info.gated and not token:
        raise InputError(
            f"{repo_id} is gated: accept its terms on the Hub, then give source.token (a read token of the "
            "account that accepted them)"
        )
    code = [f for f in files if f.endswith(".py")]
    if code:
        raise InputError(
            f"{repo_id} ships model code ({', '.join(code[:3])}); AWQForge never runs remote code "
            "(trust_remote_code): use a model whose architecture transformers supports natively"
        )
    weights = _weight_patterns(files)
    if not weights:
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        what = f"only PyTorch pickle weights ({', '.join(pickles[:3])})" if pickles else "no weights"
        raise InputError(
            f"{repo_id} has {what}; AWQForge loads safetensors only (pickles can run arbitrary code): use a "
            "revision or repo that ships .safetensors"
        )
    try:
        meta = Path(snapshot_download(repo_id, revision=sha, allow_patterns=METADATA_PATTERNS, token=token))
        config = json.loads((meta / "config.json").read_text()) if (meta / "config.json").is_file() else {}
        if config.get("auto_map"):
            raise InputError(
                f"{repo_id} needs remote code (config.json has auto_map: {', '.join(config['auto_map'])}); "
                "AWQForge never runs trust_remote_code"
            )
        folder = snapshot_download(
            repo_id, revision=sha, allow_patterns=METADATA_PATTERNS + weights, token=token
        )
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as exc:
        raise _hub_error(repo_id, revision, token, exc) from exc
    return Path(folder), sha
