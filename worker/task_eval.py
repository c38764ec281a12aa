"""The worker's side of task evaluation (eval.tasks): the FP score cache in Postgres and the task rows.

An FP score is kept under the engine's cache key (model revision, task definition, settings) and a scope:
"public" for a hub model read without a token (any tenant's later job on the same revision reuses it), else
"tenant:<id>" (a private or gated hub model, or a local folder: only that tenant's jobs see it).
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.core.db import session_scope
from app.models import TaskFPScore, TaskMetric
from awqforge.spec import is_local_path


class PostgresFPScoreCache:
    """awqforge.tasks_eval's FP score cache (get/put) over the task_fp_scores table."""

    def __init__(self, *, tenant_id: int, public: bool) -> None:
        self.own = f"tenant:{tenant_id}"
        self.scope = "public" if public else self.own
        self.readable = ("public", self.own) if public else (self.own,)

    def get(self, key: str) -> dict | None:
        with session_scope() as s:
            return s.scalar(
                select(TaskFPScore.score).where(TaskFPScore.key == key, TaskFPScore.scope.in_(self.readable))
            )

    def put(self, key: str, score: dict) -> None:
        try:
            with session_scope() as s:
                s.add(TaskFPScore(key=key, scope=self.scope, task=str(score.get("task"))[:200], score=score))
        except IntegrityError:  # another job stored the same score first: it is the same score
            pass


def fp_cache_for(tenant_id: int, spec) -> PostgresFPScoreCache | None:
    if not spec.eval.tasks:
        return None
    public = not is_local_path(spec.model) and spec.source.token is None
    return PostgresFPScoreCache(tenant_id=tenant_id, public=public)


def task_metric_rows(job_id: str, report: str | Path | dict | None) -> list[TaskMetric]:
    """One row per task of the report's evaluation.tasks (the report as a path or as read)."""
    if isinstance(report, dict):
        evaluation = report.get("evaluation") or {}
    elif not report or not Path(report).is_file():
        return []
    else:
        evaluation = json.loads(Path(report).read_text()).get("evaluation") or {}
    rows = []
    for r in evaluation.get("tasks") or []:
        time_s, tokens = r.get("time_s") or {}, r.get("tokens") or {}
        rows.append(
            TaskMetric(
                job_id=job_id,
                task=str(r["task"])[:200],
                metric=str(r["metric"])[:64],
                fp=r.get("fp"),
                quantized=r.get("quantized"),
                stderr=r.get("stderr"),
                fp_stderr=r.get("fp_stderr"),
                recovery=r.get("recovery"),
                n_samples=r.get("n_samples"),
                fp_cached=bool(r.get("fp_cached")),
                fp_s=time_s.get("fp"),
                quantized_s=time_s.get("quantized"),
                tokens=(tokens.get("quantized") or 0) + (tokens.get("fp") or 0),
            )
        )
    return rows
