"""Prometheus metrics. The API's /metrics reads Postgres and the broker at scrape time (so every API
process reports the same numbers); workers count what they do themselves (worker/monitoring.py).

Label values come from small fixed sets only (status, queue class, stage, worker node name): never a
job, model or tenant id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.core.config import settings
from app.core.db import session_scope
from app.models import TERMINAL_STATUSES, Job, WorkerHeartbeat, utcnow
from awqforge.spec import JOB_STAGES

log = logging.getLogger("awqforge.metrics")

# Jobs run from seconds (tiny models) to hours (70B on one GPU): buckets up to 12 h.
DURATION_BUCKETS = (
    1,
    5,
    15,
    30,
    60,
    120,
    300,
    600,
    1200,
    1800,
    3600,
    2 * 3600,
    4 * 3600,
    8 * 3600,
    12 * 3600,
)
STAGES = JOB_STAGES


def broker_queue_depths() -> dict[str, int] | None:
    """Messages waiting in each queue class's broker queue; None when the broker cannot be reached."""
    from worker.celery_app import celery_app  # torch-free

    depths: dict[str, int] = {}
    try:
        with celery_app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            channel = conn.default_channel
            for q in settings.queue_classes:
                name = settings.queue_name(q)
                if hasattr(channel, "_size"):
                    # kombu's virtual transports (Redis, filesystem): a passive declare there only
                    # finds queues bound in this process, so ask for the list length directly.
                    count = channel._size(name)
                else:
                    try:
                        _, count, _ = channel.queue_declare(queue=name, passive=True)
                    except Exception:  # never declared: no worker or message has used it yet
                        count = 0
                        channel = conn.channel()  # a failed passive declare closes the channel
                depths[q] = int(count)
    except Exception as exc:
        log.warning("broker unreachable for queue depth: %s", exc)
        return None
    return depths


class ServiceCollector(Collector):
    """Job counts from Postgres, queue depth from the broker, worker last-seen ages."""

    def collect(self) -> Iterator[Metric]:
        with session_scope() as s:
            by_status_queue = s.execute(
                select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue)
            )
            rows = [(st, q, n) for st, q, n in by_status_queue]
            workers = list(s.scalars(select(WorkerHeartbeat)))

        submitted = CounterMetricFamily("awqforge_jobs_submitted", "Jobs submitted (all time)")
        submitted.add_metric([], sum(n for _, _, n in rows))
        yield submitted

        finished = CounterMetricFamily(
            "awqforge_jobs_finished", "Jobs that ended, by status", labels=["status"]
        )
        for status in TERMINAL_STATUSES:
            finished.add_metric([status], sum(n for st, _, n in rows if st == status))
        yield finished

        for status, help_ in (("queued", "Jobs waiting for a worker"), ("running", "Jobs running now")):
            g = GaugeMetricFamily(f"awqforge_jobs_{status}", help_, labels=["queue"])
            for q in settings.queue_classes:
                g.add_metric([q], sum(n for st, qq, n in rows if st == status and qq == q))
            yield g

        depths = broker_queue_depths()
        up = GaugeMetricFamily("awqforge_broker_up", "1 when the broker answered this scrape")
        up.add_metric([], 0 if depths is None else 1)
        yield up
        depth = GaugeMetricFamily(
            "awqforge_queue_depth", "Messages waiting in the broker queue", labels=["queue"]
        )
        for q, n in (depths or {}).items():
            depth.add_metric([q], n)
        yield depth

        now = utcnow()
        fresh_after = now - timedelta(seconds=settings.HEARTBEAT_STALE_S)
        alive = GaugeMetricFamily(
            "awqforge_workers", "Workers whose heartbeat is fresh, by queue they consume", labels=["queue"]
        )
        for q in settings.queue_classes:
            alive.add_metric(
                [q], sum(1 for w in workers if w.last_seen_at >= fresh_after and q in w.queues.split(","))
            )
        yield alive
        age = GaugeMetricFamily(
            "awqforge_worker_last_seen_age_seconds",
            "Seconds since each worker's last heartbeat",
            labels=["worker"],
        )
        for w in workers:
            age.add_metric([w.name], max(0.0, (now - w.last_seen_at).total_seconds()))
        yield age


_registry: CollectorRegistry | None = None


def render_metrics() -> tuple[bytes, str]:
    """The text exposition for GET /metrics."""
    global _registry
    if _registry is None:
        _registry = CollectorRegistry(auto_describe=False)
        _registry.register(ServiceCollector())
    return generate_latest(_registry), CONTENT_TYPE_LATEST
