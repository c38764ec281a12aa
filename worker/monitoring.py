"""Worker-side metrics and heartbeats (Celery signal hooks).

- Every worker node upserts a `worker_heartbeats` row every HEARTBEAT_INTERVAL_S (the API's /metrics
  reports workers per queue and each one's last-seen age from it).
- With WORKER_METRICS_PORT set, the node serves Prometheus metrics on that port (one port per worker).
  The job runs in a forked pool child, so prometheus-client's multiprocess mode is used: the directory
  (PROMETHEUS_MULTIPROC_DIR, or a fresh temporary one) must be chosen before prometheus_client is
  imported, which is why it is imported only inside the functions below.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from typing import Any

from celery import signals

from app.core.config import settings

log = logging.getLogger("awqforge.worker.monitoring")

_state: dict[str, Any] = {}


def _metrics() -> dict[str, Any] | None:
    """The worker's metric objects (created once per process), or None when metrics are off."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    if "metrics" not in _state:
        from prometheus_client import Counter, Gauge, Histogram

        from app.metrics import DURATION_BUCKETS

        _state["metrics"] = {
            "jobs": Counter(
                "awqforge_worker_jobs", "Jobs this worker ran to an end, by status", ["queue", "status"]
            ),
            "job_s": Histogram(
                "awqforge_worker_job_duration_seconds",
                "Wall time of a job on the worker, claim to end",
                ["queue", "status"],
                buckets=DURATION_BUCKETS,
            ),
            "stage_s": Histogram(
                "awqforge_worker_stage_duration_seconds",
                "Wall time of each stage of a succeeded job",
                ["stage"],
                buckets=DURATION_BUCKETS,
            ),
            "publish_failures": Counter(
                "awqforge_worker_publish_failures", "Jobs whose publish to the hub failed"
            ),
            "heartbeats": Counter("awqforge_worker_heartbeats", "Heartbeats this worker node sent"),
            "last_heartbeat": Gauge(
                "awqforge_worker_last_heartbeat_timestamp_seconds",
                "Unix time of this worker node's last heartbeat",
                multiprocess_mode="max",
            ),
        }
    return _state["metrics"]


def record_job(job_id: str) -> None:
    """Count a job that this process just ran (called by the task after worker.runner.run_job)."""
    m = _metrics()
    if m is None:
        return
    from app.core.db import session_scope
    from app.metrics import STAGES
    from app.models import TERMINAL_STATUSES, Job

    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.status not in TERMINAL_STATUSES:
            return  # not ours to count (duplicate delivery, or still running elsewhere)
        m["jobs"].labels(job.queue, job.status).inc()
        if job.started_at and job.finished_at:
            m["job_s"].labels(job.queue, job.status).observe(
                (job.finished_at - job.started_at).total_seconds()
            )
        if job.status == "failed" and job.stage == "publish":
            m["publish_failures"].inc()
        if job.status == "succeeded" and job.metrics is not None:
            for stage in STAGES:
                v = getattr(job.metrics, f"{stage}_s", None)
                if v is not None:
                    m["stage_s"].labels(stage).observe(v)


def _beat(name: str, queues: str) -> None:
    from app.core.db import session_scope
    from app.models import WorkerHeartbeat, utcnow

    now = utcnow()
    with session_scope() as s:
        row = s.get(WorkerHeartbeat, name)
        if row is None:
            s.add(WorkerHeartbeat(name=name, queues=queues, started_at=now, last_seen_at=now))
        else:
            row.queues, row.last_seen_at = queues, now
    m = _metrics()
    if m is not None:
        m["heartbeats"].inc()
        m["last_heartbeat"].set(now.timestamp())


def _queue_classes(consumer: Any) -> str:
    names = [q.name for q in getattr(getattr(consumer, "task_consumer", None), "queues", []) or []]
    p = settings.CELERY_QUEUE_PREFIX
    return ",".join(sorted(n[len(p) :] if p and n.startswith(p) else n for n in names))


@signals.worker_init.connect
def _start_metrics_server(**_kw: Any) -> None:
    if not settings.WORKER_METRICS_PORT:
        return
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        d = tempfile.mkdtemp(prefix="awqforge-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = d  # inherited by the pool child forked later
        _state["own_dir"] = d
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(
        settings.WORKER_METRICS_PORT,
        addr="127.0.0.1" if settings.ENVIRONMENT == "local" else "0.0.0.0",
        registry=registry,
    )
    log.info("worker metrics on port %d", settings.WORKER_METRICS_PORT)


@signals.worker_ready.connect
def _start_heartbeats(sender: Any = None, **_kw: Any) -> None:
    name = getattr(sender, "hostname", None) or "worker"
    queues = _queue_classes(sender)
    stop = threading.Event()
    _state["stop"], _state["name"] = stop, name

    def loop() -> None:
        while True:
            try:
                _beat(name, queues)
            except Exception:
                log.exception("worker heartbeat failed")
            if stop.wait(settings.HEARTBEAT_INTERVAL_S):
                return

    threading.Thread(target=loop, name="worker-heartbeat", daemon=True).start()


@signals.worker_shutdown.connect
def _stop_heartbeats(**_kw: Any) -> None:
    if "stop" in _state:
        _state["stop"].set()
        try:
            from sqlalchemy import delete

            from app.core.db import session_scope
            from app.models import WorkerHeartbeat

            with session_scope() as s:  # a clean exit is not a silent worker
                s.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == _state["name"]))
        except Exception:
            log.exception("could not remove the heartbeat row")
    if "own_dir" in _state:
        shutil.rmtree(_state["own_dir"], ignore_errors=True)
