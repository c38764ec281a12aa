"""The Celery application. Imported by the API (to send tasks by name) and by workers.

Nothing here imports torch: a prefork worker must fork its child before CUDA is initialised,
so torch is imported only inside the task body (worker/runner.py -> awqforge.pipeline).
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from app.core.config import settings

TASK_RUN_JOB = "awqforge.run_job"
TASK_PUBLISH_JOB = "awqforge.publish_job"  # publish a job's recorded artifacts (again)


def task_for(stage: str | None) -> str:
    """The task that carries a queued job on: one at the publish stage (its artifact set recorded) only
    publishes; any other runs (or resumes) the whole job."""
    from app.models import PUBLISH_STAGE

    return TASK_PUBLISH_JOB if stage == PUBLISH_STAGE else TASK_RUN_JOB


def _transport_options() -> dict:
    if settings.broker_is_filesystem:
        # Embedded mode: messages are files; producer and consumer share one folder.
        d = settings.broker_dir
        for sub in ("queue", "control", "processed"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(d / "queue"),
            "data_folder_out": str(d / "queue"),
            "control_folder": str(d / "control"),
            "processed_folder": str(d / "processed"),
        }
    opts: dict = {
        # Redis re-delivers an unacknowledged message after this long: it must exceed the longest job.
        "visibility_timeout": settings.JOB_HARD_TIME_LIMIT_S + 3600,
    }
    if settings.CELERY_QUEUE_PREFIX:
        opts["global_keyprefix"] = settings.CELERY_QUEUE_PREFIX
    return opts


def make_celery() -> Celery:
    app = Celery("awqforge", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Job state lives in the database; there is no result backend.
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,  # one job per worker process; run one worker per GPU
        task_soft_time_limit=settings.JOB_SOFT_TIME_LIMIT_S,
        task_time_limit=settings.JOB_HARD_TIME_LIMIT_S,
        broker_transport_options=_transport_options(),
        broker_connection_retry_on_startup=True,
        # One direct exchange and routing key per queue: a job goes to exactly one GPU class.
        task_queues=[
            Queue(n, Exchange(n, type="direct"), routing_key=n)
            for n in map(settings.queue_name, settings.queue_classes)
        ],
        task_default_queue=settings.queue_name(settings.DEFAULT_QUEUE),
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        # Task events on (Flower, `celery events`); the filesystem broker has no fanout for them.
        worker_send_task_events=not settings.broker_is_filesystem,
        task_send_sent_event=not settings.broker_is_filesystem,
        # The filesystem broker (embedded mode) has no use for broadcast control messages.
        worker_enable_remote_control=not settings.broker_is_filesystem,
    )
    return app


celery_app = make_celery()
