"""Publish backends: a local folder laid out like a hub (default) or the Hugging Face Hub.

Both publish a job's artifacts (one sub folder per format when there are several, the model card at the
root) in one commit, honour `private` without ever flipping an existing repo's visibility, and make no
new commit when the remote files already match.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.core.config import settings
from awqforge.manifest import sha256_file

log = logging.getLogger("awqforge.hub")

COMMIT_MESSAGE = "Upload quantized model (AWQForge)"


class PublishRefused(Exception):
    """The hub refused the publish for a reason retrying will not change (ownership, visibility, rights)."""


@dataclass
class Published:
    location: str  # the local folder, or the repo URL
    revision: str | None  # the commit sha (local hub: a content hash)
    commit_url: str | None = None
    committed: bool = True  # False when the remote files already matched: no new commit


class Hub(Protocol):
    def publish(self, folders: dict[str, Path], repo_id: str, *, private: bool, tenant: str) -> Published:
        """Upload each folder under its path in the repo ("" = the root) in one commit."""
        ...


def _files(folders: dict[str, Path]) -> dict[str, Path]:
    """path in repo -> local file, for every file of every folder (a single file keeps its name)."""
    out: dict[str, Path] = {}
    for prefix, folder in folders.items():
        folder = Path(folder)
        items = (
            [(folder.name, folder)]
            if folder.is_file()
            else [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*")) if p.is_file()]
        )
        for rel, path in items:
            out[f"{prefix}/{rel}" if prefix else rel] = path
    # Several formats: the first format's model card also at the root, so the repo page has one.
    if "README.md" not in out:
        card = next((p for k, p in out.items() if k.endswith("/README.md")), None)
        if card is not None:
            out["README.md"] = card
    return out


class LocalHub:
    """`HUB_DIR/<owner>/<name>/...`: each publish replaces the repo's files atomically.

    Ownership and visibility live in `HUB_DIR/.repos/<owner>/<name>.json`, created exclusively by the
    first publish: the repo then belongs to that tenant, and another tenant's publish is refused without
    touching the files. The revision is a hash of the repo's file list and contents.
    """

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _paths(self, repo_id: str) -> tuple[Path, Path]:
        dest = (self.root / repo_id).resolve()
        meta = (self.root / ".repos" / f"{repo_id}.json").resolve()
        if (
            not dest.is_relative_to(self.root)
            or dest.parent == self.root
            or dest == self.root
            or dest.parent.parent != self.root
            or repo_id.startswith(".")
        ):
            raise ValueError(f"repo id {repo_id!r} escapes the hub folder")
        return dest, meta

    @contextlib.contextmanager
    def _lock(self, meta: Path) -> Iterator[None]:
        meta.parent.mkdir(parents=True, exist_ok=True)
        with open(meta.with_suffix(".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def repo_meta(self, repo_id: str) -> dict | None:
        _, meta = self._paths(repo_id)
        return json.loads(meta.read_text()) if meta.exists() else None

    def publish(self, folders: dict[str, Path], repo_id: str, *, private: bool, tenant: str) -> Published:
        dest, meta_path = self._paths(repo_id)
        files = _files(folders)
        digest = hashlib.sha256()
        for rel in sorted(files):
            digest.update(f"{rel}\0{sha256_file(files[rel])}\n".encode())
        revision = digest.hexdigest()[:40]
        with self._lock(meta_path):
            try:  # the first publish creates the record exclusively: that tenant owns the repo
                fd = os.open(meta_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                meta = {"owner": tenant, "private": private, "revision": None}
                with os.fdopen(fd, "w") as f:
                    json.dump(meta, f)
            except FileExistsError:
                meta = json.loads(meta_path.read_text())
            if meta["owner"] != tenant:
                raise PublishRefused(f"hub repo {repo_id} belongs to another tenant; publish somewhere else")
            if bool(meta["private"]) != private:
                raise PublishRefused(
                    f"hub repo {repo_id} exists as {'private' if meta['private'] else 'public'}; it is not "
                    f"changed to {'private' if private else 'public'} (set publish.private to match, or "
                    "choose another repo)"
                )
            if meta.get("revision") == revision and dest.is_dir():
                return Published(location=str(dest), revision=revision, committed=False)
            staging = dest.with_name(f".{dest.name}.uploading")
            shutil.rmtree(staging, ignore_errors=True)
            for rel, src in files.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, staging / rel)
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if dest.exists():
                dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
            meta["revision"] = revision
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta))
            tmp.replace(meta_path)
        return Published(location=str(dest), revision=revision)


def _status(exc: Exception) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


class HuggingFaceHub:
    """huggingface_hub.HfApi: the repo is created if new (with the requested visibility), then every file
    goes in one create_commit. The client itself drops files whose remote oid already matches, and makes
    no commit when nothing changed. 429 and 5xx are retried with backoff, honouring Retry-After."""

    def __init__(self, token: str | None, endpoint: str | None = None, *, attempts: int | None = None):
        from huggingface_hub import HfApi

        # False, not None: never fall back to a token from the environment or a login file.
        self.api = HfApi(endpoint=endpoint, token=token or False)
        self.attempts = attempts or settings.PUBLISH_ATTEMPTS

    def _with_retries(self, what: str, fn):
        from huggingface_hub import errors as hf_errors

        from awqforge.resolve import hub_call_with_backoff

        try:
            return hub_call_with_backoff(
                fn, what=what, attempts=self.attempts, backoff_s=settings.PUBLISH_BACKOFF_S
            )
        except hf_errors.HfHubHTTPError as exc:
            status = _status(exc)
            if status in (401, 403):
                why = (
                    "the token cannot write there"
                    if self.api.token
                    else "no token: give publish.token (this tenant may not use the service's)"
                )
                raise PublishRefused(f"the hub refused {what} ({status}): {why}") from exc
            raise

    def publish(self, folders: dict[str, Path], repo_id: str, *, private: bool, tenant: str) -> Published:
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub import errors as hf_errors

        try:
            info = self._with_retries("reading the repo", lambda: self.api.repo_info(repo_id))
        except hf_errors.RepositoryNotFoundError:
            info = None
        if info is None:
            try:
                self._with_retries(
                    "creating the repo",
                    lambda: self.api.create_repo(repo_id, private=private, repo_type="model"),
                )
            except hf_errors.HfHubHTTPError as exc:
                if _status(exc) == 409:
                    raise PublishRefused(
                        f"hub repo {repo_id} exists but this token cannot see it; publish somewhere else"
                    ) from exc
                raise
        elif bool(info.private) != private:
            raise PublishRefused(
                f"hub repo {repo_id} exists as {'private' if info.private else 'public'}; it is not changed "
                f"to {'private' if private else 'public'} (set publish.private to match, or choose another repo)"
            )
        before = getattr(info, "sha", None)
        ops = [
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in _files(folders).items()
        ]
        commit = self._with_retries(
            "the commit",
            lambda: self.api.create_commit(repo_id, operations=ops, commit_message=COMMIT_MESSAGE),
        )
        return Published(
            location=f"{self.api.endpoint}/{repo_id}",
            revision=commit.oid,
            commit_url=commit.commit_url,
            committed=commit.oid != before,
        )


def choose_backend(token: str | None) -> str:
    """PUBLISH_BACKEND, or in auto mode: a job token or a configured HF_ENDPOINT/HF_TOKEN selects the
    Hugging Face Hub ("huggingface"); else the local folder ("local"). Chosen once per job, at its first
    publish (worker.runner._publish_destination)."""
    backend = settings.PUBLISH_BACKEND
    if backend == "huggingface" or (
        backend == "auto" and (token or settings.HF_ENDPOINT or settings.HF_TOKEN)
    ):
        return "huggingface"
    return "local"


def hub_for(token: str | None, backend: str | None = None) -> Hub:
    """The hub the job publishes to: `backend` as recorded for the job (None: chosen now). `token` is the
    job's, or the service's only when the tenant may use it: a tenant without either publishes anonymously
    (and the hub refuses it)."""
    if (backend or choose_backend(token)) == "huggingface":
        return HuggingFaceHub(token, settings.HF_ENDPOINT)
    return LocalHub(settings.HUB_DIR)
