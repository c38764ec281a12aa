"""sha256 of files and the check of a folder against a list of files: the one helper the artifact writer
(manifest.json), the artifact store, the hub publisher and the download client use.

manifest.json: every file of an artifact with its size and sha256, so a download can be verified. Pure Python:
the API and the client import it without torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
_CHUNK = 8 * 1024 * 1024


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_matches(path: Path, *, size: int | None = None, sha256: str | None = None) -> bool:
    """Whether `path` is a file of that size and sha256 (each checked when given; the size first, cheaply)."""
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    return sha256 is None or sha256_file(path) == sha256


def tree_files(root: str | Path, *, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative posix path: {"size", "sha256"}} of every file under `root` (a folder, or one file)."""
    root = Path(root)
    if root.is_file():
        return {root.name: {"size": root.stat().st_size, "sha256": sha256_file(root)}}
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in skip:
            out[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def tree_problems(root: str | Path, expected: dict[str, dict], *, skip: tuple[str, ...] = ()) -> list[str]:
    """How the files under `root` differ from `expected` ({path: {"size"?, "sha256"}}): missing, extra,
    wrong size or hash; an empty list means they are exactly the expected files."""
    root = Path(root)
    if root.is_file():
        actual = {root.name}
    else:
        actual = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - set(skip)
    problems = [f"missing: {name}" for name in sorted(set(expected) - actual)]
    problems += [f"not in manifest: {name}" for name in sorted(actual - set(expected))]
    for name in sorted(set(expected) & actual):
        path = root if root.is_file() else root / name
        want = expected[name]
        if want.get("size") is not None and path.stat().st_size != want["size"]:
            problems.append(f"size mismatch: {name}")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"sha256 mismatch: {name}")
    return problems


def build_manifest(root: str | Path) -> dict:
    """{"files": {relative path: {"size", "sha256"}}, "total_size"} for every file under root but the manifest."""
    files = tree_files(root, skip=(MANIFEST_NAME,))
    return {"version": 1, "total_size": sum(f["size"] for f in files.values()), "files": files}


def write_manifest(root: str | Path) -> Path:
    path = Path(root) / MANIFEST_NAME
    path.write_text(json.dumps(build_manifest(root), indent=2) + "\n")
    return path


def read_manifest(data: str | bytes) -> dict[str, dict]:
    """The `files` of a manifest.json's text; ValueError when it is not one."""
    manifest = json.loads(data)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()
    ):
        raise ValueError("not an AWQForge manifest.json")
    return files


def verify_manifest(root: str | Path) -> list[str]:
    """Problems found (missing, extra, wrong size or hash); an empty list means the artifact is intact."""
    root = Path(root)
    return tree_problems(root, read_manifest((root / MANIFEST_NAME).read_text()), skip=(MANIFEST_NAME,))
