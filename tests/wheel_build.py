"""Building the project's wheel from its tracked files, for the install tests (tests/test_engine_only.py,
tests/service/test_packaging.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_checked(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    # The installed packages, not a PYTHONPATH pointing at the repository, must answer the imports.
    if "env" not in kw:
        kw["env"] = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def build_wheel(src: Path, out: Path) -> Path:
    """The wheel of the tracked files (copied into `src` first, so the build sees no untracked or built
    files), written into `out`."""
    for f in run_checked(["git", "ls-files", "-z"], cwd=REPO).stdout.split("\0"):
        if f and (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    run_checked([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)])
    (whl,) = out.glob("awqforge-*.whl")
    return whl
