"""Celery tasks: thin wrappers that hand a job id to worker.runner."""

from __future__ import annotations

from worker import monitoring, startup  # noqa: F401  (start-up hooks)
from worker.celery_app import TASK_PUBLISH_JOB, TASK_RUN_JOB, celery_app


@celery_app.task(name=TASK_RUN_JOB, bind=True)
def run_job_task(self, job_id: str) -> str:
    from app.services.lifecycle import ENDINGS
    from worker.runner import run_job  # torch is imported here, in the forked child

    outcome = run_job(job_id, worker_name=self.request.hostname or "worker")
    if outcome in ENDINGS:  # this run ended the job: a redelivery for an ended one is not counted again
        monitoring.record_job(job_id)
    return outcome


@celery_app.task(name=TASK_PUBLISH_JOB, bind=True)
def publish_job_task(self, job_id: str) -> str:
    from worker.runner import run_publish

    return run_publish(job_id, worker_name=self.request.hostname or "worker")
