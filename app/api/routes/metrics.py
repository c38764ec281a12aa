"""GET /metrics (Prometheus), GET /v1/metrics/summary and GET /v1/jobs/{id}/metrics (per tenant)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlalchemy import func, select

from app.api.deps import CurrentTenant, JobId, SessionDep
from app.core.config import is_cpu_class, settings
from app.metrics import STAGES, render_metrics
from app.models import Job, JobMetrics, JobStatus, LayerMetric, TaskMetric, utcnow
from app.schemas import (
    DurationStats,
    ErrorResponse,
    JobMetricsDetail,
    LayerMetricPublic,
    MetricsSummary,
    PerplexityChange,
    RecoveryStats,
    TaskMetricPublic,
    TaskRecovery,
)
from app.services import jobs as job_service
from awqforge.parsing import parse_since
from awqforge.spec import JOB_STATUSES

prometheus_router = APIRouter(tags=["metrics"])
router = APIRouter(tags=["metrics"])

_ERRORS = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}
# FP checkpoint bytes -> size class (fp16: 1 GiB is about 0.5B parameters).
SIZE_CLASSES = ((2**30, "<1GiB"), (4 * 2**30, "1-4GiB"), (16 * 2**30, "4-16GiB"), (64 * 2**30, "16-64GiB"))


@prometheus_router.get("/metrics", include_in_schema=False)
def prometheus_metrics() -> Response:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)


def _quantile(sorted_vals: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_vals:
        return None
    pos = (len(sorted_vals) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _stats(vals: list[float]) -> DurationStats:
    v = sorted(vals)
    return DurationStats(n=len(v), median_s=_quantile(v, 0.5), p95_s=_quantile(v, 0.95))


def size_class(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "unknown"
    return next((name for bound, name in SIZE_CLASSES if size_bytes < bound), ">64GiB")


@router.get(
    "/metrics/summary",
    response_model=MetricsSummary,
    responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="This tenant's jobs since a time: counts, queue, durations, quality change, bytes saved, GPU-hours",
)
def metrics_summary(
    session: SessionDep,
    tenant: CurrentTenant,
    since: Annotated[
        str | None, Query(description="ISO 8601 time or 30m / 24h / 7d / 2w (default 7d)")
    ] = None,
) -> MetricsSummary:
    t0 = parse_since(since, now=utcnow(), default=timedelta(days=7))
    mine = (Job.tenant_id == tenant.id, Job.created_at >= t0)
    by_status = dict(
        session.execute(select(Job.status, func.count()).where(*mine).group_by(Job.status)).all()
    )
    depth = {q: {"queued": 0, "running": 0} for q in settings.queue_classes}
    for st, q, n in session.execute(
        select(Job.status, Job.queue, func.count())
        .where(Job.tenant_id == tenant.id, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
        .group_by(Job.status, Job.queue)
    ):
        depth.setdefault(q, {"queued": 0, "running": 0})[st] = n

    rows = session.execute(
        select(Job.queue, JobMetrics).join(JobMetrics).where(*mine, Job.status == JobStatus.SUCCEEDED)
    )
    stage_vals: dict[str, list[float]] = {s: [] for s in STAGES}
    by_class: dict[str, list[float]] = {}
    ppl: list[float] = []
    saved = 0
    gpu_s = cpu_s = 0.0
    for queue, m in rows:
        for s in STAGES:
            v = getattr(m, f"{s}_s")
            if v is not None:
                stage_vals[s].append(v)
        if m.total_s is not None:
            by_class.setdefault(size_class(m.size_before_bytes), []).append(m.total_s)
            if is_cpu_class(queue):
                cpu_s += m.total_s
            else:
                gpu_s += m.total_s
        if m.fp_perplexity and m.quant_perplexity is not None:
            ppl.append(100.0 * (m.quant_perplexity - m.fp_perplexity) / m.fp_perplexity)
        if m.size_before_bytes is not None and m.size_after_bytes is not None:
            saved += max(0, m.size_before_bytes - m.size_after_bytes)
    ppl.sort()
    return MetricsSummary(
        task_recovery=_task_recovery(session, mine),
        since=t0,
        jobs_by_status={s: by_status.get(s, 0) for s in JOB_STATUSES},
        queue_depth=depth,
        stage_durations={s: _stats(v) for s, v in stage_vals.items()},
        duration_by_size_class={k: _stats(v) for k, v in sorted(by_class.items())},
        perplexity_change=PerplexityChange(
            n=len(ppl), pct=ppl, median_pct=_quantile(ppl, 0.5), p95_pct=_quantile(ppl, 0.95)
        ),
        bytes_saved=saved,
        gpu_hours=gpu_s / 3600,
        cpu_hours=cpu_s / 3600,
    )


def _task_recovery(session, mine) -> TaskRecovery:
    """Recovery of every task of this tenant's jobs in the window, whatever the job's outcome (a job below
    its gate is part of the distribution)."""
    rows = session.execute(
        select(TaskMetric.task, TaskMetric.recovery)
        .join(Job, Job.id == TaskMetric.job_id)
        .where(*mine, TaskMetric.recovery.is_not(None))
    ).all()
    by_task: dict[str, list[float]] = {}
    for task, rec in rows:
        by_task.setdefault(task, []).append(rec)
    every = sorted(r for _, r in rows)
    return TaskRecovery(
        n=len(every),
        recovery=every,
        median=_quantile(every, 0.5),
        p05=_quantile(every, 0.05),
        by_task={
            t: RecoveryStats(
                n=len(v), median=_quantile(sorted(v), 0.5), p05=_quantile(sorted(v), 0.05), min=min(v)
            )
            for t, v in sorted(by_task.items())
        },
    )


@router.get(
    "/jobs/{job_id}/metrics",
    response_model=JobMetricsDetail,
    responses=_ERRORS,
    tags=["jobs"],
    summary="Stage timings, peak memory, perplexity and per-layer error, scale exponents and clip ratios",
)
def job_metrics(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> JobMetricsDetail:
    job = job_service.get_job(session, job_id=job_id, tenant_id=tenant.id)
    m = job.metrics
    layers = session.scalars(
        select(LayerMetric).where(LayerMetric.job_id == job.id).order_by(LayerMetric.block, LayerMetric.id)
    )
    return JobMetricsDetail(
        job_id=job.id,
        status=job.status,
        stage_timings_s={s: v for s in STAGES if m is not None and (v := getattr(m, f"{s}_s")) is not None},
        total_s=m.total_s if m else None,
        peak_rss_bytes=m.peak_rss_bytes if m else None,
        peak_gpu_bytes=m.peak_gpu_bytes if m else None,
        fp_perplexity=m.fp_perplexity if m else None,
        quant_perplexity=m.quant_perplexity if m else None,
        size_before_bytes=m.size_before_bytes if m else None,
        size_after_bytes=m.size_after_bytes if m else None,
        layers=[LayerMetricPublic.model_validate(r) for r in layers],
        tasks=[
            TaskMetricPublic.model_validate(r, from_attributes=True)
            for r in session.scalars(
                select(TaskMetric).where(TaskMetric.job_id == job.id).order_by(TaskMetric.id)
            )
        ],
    )
