"""Submit-time checks of eval.tasks: lm-eval must be installed, and every task must be a name its registry
knows, a bundled local task, or a path under the allowed roots (422 naming the field otherwise).

The registry's names come from lm-eval's TaskManager, which reads task YAML only and imports no torch (the
API process never does); it is built once per process, on the first job that names a registry task.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from app.schemas import FieldError


@functools.lru_cache(maxsize=1)
def _registry_names() -> frozenset[str]:
    from awqforge.tasks_eval import known_task_names

    return frozenset(known_task_names())


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
        if name not in _registry_names():
            errors.append(
                FieldError(
                    field=field,
                    reason=f"{name!r} is not an lm-eval task, group or tag, a bundled task "
                    f"({', '.join(BUILTIN_TASKS)}) or a path to task definitions under the allowed folders",
                )
            )
    return errors


def _exists(name: str) -> bool:
    from pathlib import Path

    try:
        return Path(name).expanduser().exists()
    except (OSError, RuntimeError):  # a name too long for the file system, an unknown ~user
        return False
