"""Engine-only install vs the full install: installed size of each dependency closure (from the installed
distributions' RECORD files) and the import time of the engine alone vs the engine with the service.

    python bench/engine_footprint.py        # prints JSON

Sizes are what `pip install awqforge` and `pip install awqforge[service,gpu]` would put in site-packages with
this interpreter's installed versions (torch as installed here: the CPU build on a CPU machine)."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _closure(roots: list[Requirement]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for r in dist.requires or ():
            r = Requirement(r)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r)
    return seen


def _size(names: set[str]) -> int:
    total = 0
    for n in names:
        dist = metadata.distribution(n)
        for f in dist.files or ():
            p = Path(dist.locate_file(f))
            if p.is_file():
                total += p.stat().st_size
    return total


def _import_s(code: str, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = [Requirement(r) for r in project["dependencies"]]
    extras = project["optional-dependencies"]
    full = core + [Requirement(r) for r in extras["service"] + extras["gpu"]]
    engine, everything = _closure(core), _closure(full)
    out = {
        "engine_only": {"distributions": len(engine), "size_bytes": _size(engine)},
        "full_service_gpu": {"distributions": len(everything), "size_bytes": _size(everything)},
        "only_in_full": sorted(everything - engine),
        "import_s_engine": _import_s("import awqforge.pipeline, awqforge.cli"),
        "import_s_full": _import_s(
            "import awqforge.pipeline, awqforge.cli, app.main, worker.celery_app, triton"
        ),
        "import_s_python": _import_s("pass"),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
