"""Where the built CPU kernel lives, computed without importing torch (a worker's main process checks it
before it forks the process that runs jobs). See kernels/cpu.py for the build and the key."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "w4_cpu.cpp"
EXT_NAME = "awqforge_w4_cpu"
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast"]
LDFLAGS = ["-fopenmp"]


def cache_root() -> Path:
    """$AWQFORGE_EXTENSIONS_DIR, else $AWQFORGE_HOME/kernels (default ~/.awqforge/kernels)."""
    if os.environ.get("AWQFORGE_EXTENSIONS_DIR"):
        return Path(os.environ["AWQFORGE_EXTENSIONS_DIR"]).expanduser()
    return Path(os.environ.get("AWQFORGE_HOME", "~/.awqforge")).expanduser() / "kernels"


def source_hash(source: Path = SOURCE, flags: list[str] | None = None) -> str:
    h = hashlib.sha256(source.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS if flags is None else flags).encode())
    return h.hexdigest()[:12]


def build_dir(torch_version: str, source: Path = SOURCE, ext_name: str = EXT_NAME, flags=None) -> Path:
    """The folder of the binary for this torch version, machine and kernel source."""
    tag = torch_version.replace("+", "_")
    return cache_root() / f"torch{tag}-{platform.machine()}" / f"{ext_name}-{source_hash(source, flags)}"


def built_binary(
    torch_version: str, source: Path = SOURCE, ext_name: str = EXT_NAME, flags=None
) -> Path | None:
    directory = build_dir(torch_version, source, ext_name, flags)
    if not directory.is_dir():
        return None
    return next(iter(sorted(directory.glob(f"{ext_name}*.so"))), None)


def installed_binary() -> Path | None:
    """The built binary for the installed torch (read from its package metadata, not imported), or None."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    return built_binary(version)
