"""The reconciler (app.services.jobs.reconcile_queued) against the package's real worker and Redis: a queued job
whose message was consumed without a claim is sent again; one whose message is still in flight is not."""

from __future__ import annotations

from datetime import timedelta

from .conftest import wait_for_status

TERMINAL = ("succeeded", "failed", "cancelled")


def test_consumed_but_never_started_job_is_sent_again(service, make_key):
    from app.core.config import settings
    from app.core.db import session_scope
    from app.models import Job, utcnow
    from app.services.jobs import reconcile_queued

    with service.client(make_key()) as c:
        job_id = c.post("/v1/jobs", json=service.job_body()).json()["id"]
        assert wait_for_status(c, job_id, TERMINAL)["status"] == "succeeded"
        # Back to the state a consumed message leaves when the claim never happened: queued, sent long ago,
        # no message left in the broker.
        with session_scope() as s:
            job = s.get(Job, job_id)
            job.status, job.attempts, job.finished_at, job.started_at = "queued", 0, None, None
            job.stage, job.progress = None, 0.0
            job.dispatched_at = utcnow() - timedelta(seconds=settings.REDISPATCH_AFTER_S + 5)
            dispatches = job.dispatches
        with session_scope() as s:
            assert job_id in reconcile_queued(s)
        with session_scope() as s:
            # Sent, so not again on the next pass: its message is in flight now.
            assert job_id not in reconcile_queued(s)
            assert s.get(Job, job_id).dispatches == dispatches + 1
        job = wait_for_status(c, job_id, TERMINAL)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job


def test_never_sent_job_is_sent_and_backoff_doubles(service, make_key):
    from app.core.config import settings
    from app.core.db import session_scope
    from app.models import Job, utcnow
    from app.services.jobs import _redispatch_due, reconcile_queued

    now = utcnow()
    wait = timedelta(seconds=settings.REDISPATCH_AFTER_S)
    assert _redispatch_due(now - wait * 1.1, 1, now) and not _redispatch_due(now - wait * 1.1, 2, now)
    assert _redispatch_due(now - wait * 2.1, 2, now) and not _redispatch_due(now - wait * 15, 9, now)

    with service.client(make_key()) as c:
        job_id = c.post("/v1/jobs", json=service.job_body()).json()["id"]
        assert wait_for_status(c, job_id, TERMINAL)["status"] == "succeeded"
        with session_scope() as s:  # as the API leaves a job it could not send (broker down)
            job = s.get(Job, job_id)
            job.status, job.attempts, job.finished_at, job.dispatched_at = "queued", 0, None, None
        with session_scope() as s:
            assert job_id in reconcile_queued(s)
        job = wait_for_status(c, job_id, TERMINAL)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job


def test_requeue_resets_stage_and_attempts_match_the_message(service, make_key):
    from app.core.config import settings
    from app.core.db import session_scope
    from app.models import Job, utcnow
    from app.services.jobs import reap_stale_jobs

    with service.client(make_key()) as c:
        ids = [c.post("/v1/jobs", json=service.job_body(seed=s)).json()["id"] for s in (1, 2)]
        for job_id in ids:
            assert wait_for_status(c, job_id, TERMINAL)["status"] == "succeeded"
        # Both lost mid-quantization: one with attempts left, one at the limit.
        with session_scope() as s:
            for job_id, attempts in zip(ids, (1, settings.MAX_ATTEMPTS), strict=True):
                job = s.get(Job, job_id)
                job.status, job.attempts, job.worker = "running", attempts, "gone@host"
                job.stage, job.progress, job.finished_at = "quantize", 0.5, None
                job.heartbeat_at = utcnow() - timedelta(minutes=10)
        with session_scope() as s:
            assert ids[0] in reap_stale_jobs(s)
        with session_scope() as s:
            requeued = s.get(Job, ids[0])
            assert requeued.status in ("queued", "running", "succeeded")
            if requeued.status == "queued":  # not yet claimed again: a fresh start in the listing
                assert (requeued.stage, requeued.progress) == (None, 0.0)
        failed = c.get(f"/v1/jobs/{ids[1]}").json()
        assert failed["status"] == "failed"
        assert f"after {failed['attempts']} attempt(s)" in failed["error"], failed
        again = wait_for_status(c, ids[0], TERMINAL)
        assert again["status"] == "succeeded" and again["attempts"] == 2
