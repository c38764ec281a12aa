"""Submit-time checks of eval.tasks: lm-eval must be installed, and every task must be a name its registry
knows, a bundled local task, or a path under the allowed roots (422 naming the field otherwise).

A name is looked up in the names lm-eval's task YAML declare (a quick scan), then in its TaskManager's full index
(built once per lm-eval version, kept in a file); both read task YAML only and import no torch (the API process
never does).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from app.schemas import FieldError

_DECLARED = re.compile(r"^(?:task|group|tag):\s*['\"]?([A-Za-z0-9_.\-]+)", re.M)


@functools.lru_cache(maxsize=1)
def _declared_names() -> frozenset[str]:
    """Names written out in lm-eval's task YAML (`task:`, `group:`, `tag:` lines): most of the registry, read
    in seconds; a name found here is accepted (the worker resolves it for real and fails readably if not)."""
    spec = importlib.util.find_spec("lm_eval")
    names: set[str] = set()
    for folder in spec.submodule_search_locations or []:
        for f in (Path(folder) / "tasks").rglob("*.y*ml"):
            try:
                names.update(_DECLARED.findall(f.read_text(errors="ignore")))
            except OSError:
                continue
    return frozenset(names)


@functools.lru_cache(maxsize=1)
def _registry_names() -> frozenset[str]:
    """Every name lm-eval's TaskManager indexes (also those made by includes and templates). Building the index
    takes seconds to a minute, so it is done once per lm-eval version and kept in a file for every process."""
    import json
    import tempfile

    import lm_eval

    cache = Path(tempfile.gettempdir()) / f"awqforge-lm-eval-{lm_eval.__version__}-tasks.json"
    try:
        return frozenset(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    from awqforge.tasks_eval import known_task_names

    names = sorted(known_task_names())
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(names))
        tmp.replace(cache)
    except OSError:
        pass
    return frozenset(names)


def _known(name: str) -> bool:
    return name in _declared_names() or name in _registry_names()


def check_eval_tasks(
    tasks: Sequence, check_local: Callable[[str, str], FieldError | None]
) -> list[FieldError]:
    """Why each task cannot run (empty: all can). `check_local(field, path)` is the allowed-roots check."""
    from awqforge.tasks_eval import BUILTIN_TASKS, is_task_path, lm_eval_available

    if not tasks:
        return []
    try:
        available = lm_eval_available()
    except (ImportError, ValueError):  # a broken or blocked installation
        available = False
    if not available:
        return [
            FieldError(
                field="eval.tasks",
                reason="task evaluation needs lm-evaluation-harness, which this server does not have "
                "(install awqforge[eval])",
            )
        ]
    errors = []
    for i, task in enumerate(tasks):
        field = f"eval.tasks.{i}.name"
        name = task.name
        if name in BUILTIN_TASKS:
            continue
        if is_task_path(name):
            if (e := check_local(field, name)) is not None:
                errors.append(e)
            elif not _exists(name):
                errors.append(FieldError(field=field, reason=f"task path {name} does not exist"))
            continue
        if not _known(name):
            errors.append(
                FieldError(
                    field=field,
                    reason=f"{name!r} is not an lm-eval task, group or tag, a bundled task "
                    f"({', '.join(BUILTIN_TASKS)}) or a path to task definitions under the allowed folders",
                )
            )
    return errors


def _exists(name: str) -> bool:
    try:
        return Path(name).expanduser().exists()
    except (OSError, RuntimeError):  # a name too long for the file system, an unknown ~user
        return False
