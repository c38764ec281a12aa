"""Print `name==floor` for the engine's runtime dependencies in pyproject.toml (scripts/test_floor.sh installs them).

The service's dependencies, triton (GPU only) and torch (installed first, from the local wheel) are left out.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

ENGINE = (
    "transformers",
    "safetensors",
    "huggingface-hub",
    "pydantic",
    "numpy",
    "tqdm",
    "pyarrow",
    "gguf",
    "zstandard",
    "ninja",
)


def floors(pyproject: Path) -> dict[str, str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9][^,;\s]*)", dep)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    found = floors(root / "pyproject.toml")
    missing = [name for name in ENGINE + ("torch",) if name not in found]
    if missing:
        sys.exit(f"no >= floor in pyproject.toml for {missing}")
    which = sys.argv[1:] or list(ENGINE)
    print(" ".join(f"{name}=={found[name]}" for name in which))
