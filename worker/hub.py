"""Publish backends: a local folder laid out like a hub (default) or the Hugging Face Hub."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

from app.core.config import settings


class Hub(Protocol):
    def publish(self, folder: Path, repo_id: str, *, private: bool, path_in_repo: str | None = None) -> str:
        """Upload `folder` to `repo_id` (optionally under a sub folder); return where it went."""
        ...


class LocalHub:
    """`HUB_DIR/<owner>/<name>[/<path_in_repo>]`, replaced atomically per upload."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def publish(self, folder: Path, repo_id: str, *, private: bool, path_in_repo: str | None = None) -> str:
        dest = (self.root / repo_id / (path_in_repo or "")).resolve()
        if not dest.is_relative_to(self.root) or dest == self.root:
            raise ValueError(f"repo id {repo_id!r} escapes the hub folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.with_name(f".{dest.name}.uploading")
        shutil.rmtree(staging, ignore_errors=True)
        if folder.is_dir():
            shutil.copytree(folder, staging)
        else:
            staging.mkdir()
            shutil.copy2(folder, staging / folder.name)
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        return str(dest)


class HuggingFaceHub:
    """huggingface_hub.HfApi: creates the repo if needed and uploads the folder in one commit."""

    def __init__(self, token: str | None, endpoint: str | None = None):
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=endpoint, token=token)

    def publish(self, folder: Path, repo_id: str, *, private: bool, path_in_repo: str | None = None) -> str:
        self.api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = self.api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            path_in_repo=path_in_repo,
            repo_type="model",
            commit_message="Upload quantized model (AWQForge)",
        )
        return str(getattr(info, "commit_url", None) or f"{self.api.endpoint}/{repo_id}")


def hub_for(token: str | None) -> Hub:
    """PUBLISH_BACKEND, or in auto mode: a per-job token or a configured endpoint/token selects the
    Hugging Face Hub; else the local folder."""
    backend = settings.PUBLISH_BACKEND
    if backend == "huggingface" or (
        backend == "auto" and (token or settings.HF_ENDPOINT or settings.HF_TOKEN)
    ):
        return HuggingFaceHub(token or settings.HF_TOKEN, settings.HF_ENDPOINT)
    return LocalHub(settings.HUB_DIR)
