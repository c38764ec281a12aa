"""manifest.json: every file of an artifact with its size and sha256, so a download can be verified."""

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


def build_manifest(root: str | Path) -> dict:
    """{"files": {relative path: {"size", "sha256"}}, "total_size"} for every file under root but the manifest."""
    root = Path(root)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return {"version": 1, "total_size": sum(f["size"] for f in files.values()), "files": files}


def write_manifest(root: str | Path) -> Path:
    path = Path(root) / MANIFEST_NAME
    path.write_text(json.dumps(build_manifest(root), indent=2) + "\n")
    return path


def verify_manifest(root: str | Path) -> list[str]:
    """Problems found (missing, extra, wrong size or hash); an empty list means the artifact is intact."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    expected = manifest["files"]
    actual = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    problems = [f"missing: {name}" for name in sorted(set(expected) - actual)]
    problems += [f"not in manifest: {name}" for name in sorted(actual - set(expected))]
    for name in sorted(set(expected) & actual):
        path = root / name
        if path.stat().st_size != expected[name]["size"]:
            problems.append(f"size mismatch: {name}")
        elif sha256_file(path) != expected[name]["sha256"]:
            problems.append(f"sha256 mismatch: {name}")
    return problems
