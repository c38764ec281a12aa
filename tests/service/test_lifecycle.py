"""The job lifecycle as a table: every state a job row can be in x every event that moves jobs, against the
real Postgres (rows on a queue no worker serves, events called as the API, the reaper and the worker call
them). Each cell gives the status after, whether the event ended the job (counted once), and so whether the
tokens and the scratch folders went."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest

from .conftest import wait_for_status

pytestmark = pytest.mark.services

ME, OTHER = "w-me@host", "w-other@host"

# state: (status, stage, worker, heartbeat age in s (None: none), attempts)
STATES = {
    "queued": ("queued", None, None, None, 0),
    "running": ("running", "quantize", OTHER, 0, 1),
    "running_here": ("running", "quantize", ME, 0, 1),  # redelivered to the worker that runs it
    "running_stale": ("running", "quantize", OTHER, 600, 1),
    "running_stale_spent": ("running", "quantize", OTHER, 600, 3),
    "publish_queued": ("queued", "publish", None, None, 0),
    "publish_stale": ("running", "publish", OTHER, 600, 1),
    "succeeded": ("succeeded", "package", None, None, 1),
    "failed": ("failed", "resolve", None, None, 1),
    "cancelled": ("cancelled", None, None, None, 0),
}

# event -> {state: status after}; a status in capitals: the event ended the job (finish() ran once)
TABLE = {
    "claim": {
        "queued": "running",
        "running": "running",
        "running_here": "running",
        "running_stale": "running",
        "running_stale_spent": "FAILED",  # gave up: redelivered after MAX_ATTEMPTS lost runs
        "publish_queued": "queued",  # only a publish claim takes it
        "publish_stale": "running",
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "cancelled",
    },
    "claim_publish": {
        "queued": "queued",
        "running": "running",
        "running_here": "running",
        "running_stale": "running",
        "running_stale_spent": "running",
        "publish_queued": "running",
        "publish_stale": "running",
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "cancelled",
    },
    "cancel": {
        "queued": "CANCELLED",
        "running": "running",  # cancel requested: the worker stops at the next block
        "running_here": "running",
        "running_stale": "running",
        "running_stale_spent": "running",
        "publish_queued": "CANCELLED",
        "publish_stale": "running",
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "cancelled",
    },
    "reap": {
        "queued": "queued",
        "running": "running",
        "running_here": "running",
        "running_stale": "queued",
        "running_stale_spent": "FAILED",
        "publish_queued": "queued",
        "publish_stale": "queued",
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "cancelled",
    },
    "fail": {  # the worker's (or anyone's) finish(failed)
        "queued": "FAILED",
        "running": "FAILED",
        "running_here": "FAILED",
        "running_stale": "FAILED",
        "running_stale_spent": "FAILED",
        "publish_queued": "FAILED",
        "publish_stale": "FAILED",
        "succeeded": "succeeded",  # an ended job is never ended twice
        "failed": "failed",
        "cancelled": "cancelled",
    },
    "retry": {  # POST /retry (and, to the publish stage, POST /publish): an ended job queued again
        "queued": "queued",
        "running": "running",
        "running_here": "running",
        "running_stale": "running",
        "running_stale_spent": "running",
        "publish_queued": "queued",
        "publish_stale": "running",
        "succeeded": "succeeded",
        "failed": "queued",
        "cancelled": "queued",
    },
    "requeue": {  # a worker shutting down mid-job
        "queued": "queued",
        "running": "queued",
        "running_here": "queued",
        "running_stale": "queued",
        "running_stale_spent": "queued",
        "publish_queued": "queued",
        "publish_stale": "queued",
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "cancelled",
    },
}


def _event(name: str, job_id: str):
    from app.core.config import settings
    from app.core.db import session_scope
    from app.models import Job, JobStatus, utcnow
    from app.services import lifecycle
    from worker.runner import claim_job, claim_publish

    if name == "claim":
        return claim_job(job_id, ME)[0] in lifecycle.ENDINGS
    if name == "claim_publish":
        return claim_publish(job_id, ME)[0] in lifecycle.ENDINGS
    with session_scope() as s:
        if name == "cancel":
            return lifecycle.cancel(s, s.get(Job, job_id)) == "ended"
        if name == "reap":
            stale_before = utcnow() - timedelta(seconds=settings.HEARTBEAT_STALE_S)
            return lifecycle.reap(s, s.get(Job, job_id), stale_before) == "ended"
        if name == "fail":
            return lifecycle.finish(s, job_id, JobStatus.FAILED, error="boom")
        if name == "retry":
            ended = (JobStatus.FAILED.value, JobStatus.CANCELLED.value)
            lifecycle.restart(s, job_id, expected=ended, message="retried")
            return False
        if name == "requeue":
            lifecycle.requeue(s, job_id, message="shutting down")
            return False
    raise AssertionError(name)


@pytest.fixture(scope="module")
def tenant_id(service):
    from app.core.db import session_scope
    from app.services.keys import upsert_tenant

    with session_scope() as s:
        tenant = upsert_tenant(s, name=f"lc-{uuid.uuid4().hex[:6]}", create=True)
        s.flush()
        return tenant.id


@pytest.mark.parametrize("event", list(TABLE))
def test_state_x_event(service, tenant_id, event):
    from app.core.db import session_scope
    from app.core.security import encrypt_secret
    from app.models import Job, utcnow
    from app.services import lifecycle

    for state, (status, stage, worker, age, attempts) in STATES.items():
        now = utcnow()
        with session_scope() as s:
            job = Job(
                tenant_id=tenant_id,
                model="x/y",
                method="awq",
                bits=4,
                group_size=128,
                spec={},
                queue="cpu",  # no worker serves it: nothing but the event moves the row
                status=status,
                stage=stage,
                worker=worker,
                heartbeat_at=None if age is None else now - timedelta(seconds=age),
                attempts=attempts,
                cancel_requested=False,
                source_token_enc=encrypt_secret("hf_source"),
                publish_token_enc=encrypt_secret("hf_publish"),
            )
            s.add(job)
            s.flush()
            job_id = job.id
        work = lifecycle.job_work_dir(tenant_id, job_id)
        staging = lifecycle.publish_staging_dir(job_id)
        for d in (work, staging):
            d.mkdir(parents=True, exist_ok=True)
            (d / "block.safetensors").write_bytes(b"x")

        ended = _event(event, job_id)
        expected = TABLE[event][state]
        with session_scope() as s:
            row = s.get(Job, job_id)
            cell = f"{state} x {event}"
            assert row.status == expected.lower(), cell
            assert ended == expected.isupper(), cell  # counted exactly when this event ended it
            if expected.isupper():
                assert row.finished_at is not None, cell
            if row.status in ("succeeded", "failed", "cancelled") and status not in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                assert row.source_token_enc is None and row.publish_token_enc is None, cell
                assert not work.exists() and not staging.exists(), cell
            elif status in ("queued", "running"):
                assert row.source_token_enc and row.publish_token_enc, cell  # a live job keeps them
                assert work.exists(), cell  # and its checkpoints
            if event == "cancel" and state.startswith(("running", "publish_stale")):
                assert row.cancel_requested, cell
            if event == "claim" and state in ("queued", "running_here", "running_stale", "publish_stale"):
                assert row.worker == ME or state == "publish_stale", cell
        # a second ending event finds nothing to end: counted once
        with session_scope() as s:
            from app.models import JobStatus

            assert not lifecycle.finish(s, job_id, JobStatus.FAILED) or not expected.isupper(), cell


def test_redelivered_message_for_an_ended_job_is_not_counted(service, make_key):
    """The worker's awqforge_worker_jobs_total and duration histogram count a job once: a message sent again
    for a job that already ended ("not run: already failed") is not counted a second time."""
    from app.core.db import session_scope
    from app.models import Job
    from app.services.jobs import send_job

    from .test_metrics import scrape, value

    with service.client(make_key()) as c:
        body = service.job_body(model=str(service.home / "models" / "redelivered-missing"))
        job = wait_for_status(c, c.post("/v1/jobs", json=body).json()["id"], ("failed",), 300)
    labels = {"queue": job["queue"], "status": "failed"}
    deadline = time.monotonic() + 30
    while True:  # the task counts after the run returns: wait for it
        before = scrape(service.worker_metrics_url)
        if value(before, "awqforge_worker_jobs_total", **labels) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    with session_scope() as s:
        send_job(s.get(Job, job["id"]))  # the broker delivers it again
    log = service.worker_log
    deadline = time.monotonic() + 60
    while log.read_text(errors="replace").count(f"job {job['id']} not run: already failed") < 1:
        assert time.monotonic() < deadline, "the worker never saw the resent message"
        time.sleep(0.2)
    time.sleep(1)
    after = scrape(service.worker_metrics_url)
    for name in ("awqforge_worker_jobs_total", "awqforge_worker_job_duration_seconds_count"):
        assert value(after, name, **labels) == value(before, name, **labels), name
