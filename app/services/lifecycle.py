"""A job's life in one module: every state change is a compare-and-set on the row (`UPDATE ... WHERE status
= :expected`), and every ending goes through finish().

    queued --claim--> running --finish--> succeeded | failed | cancelled
    queued --cancel (finish)--> cancelled            running --reap--> queued, or finish (gave up)
    running --requeue (worker shutting down)--> queued

finish() clears the job's secrets (both token columns), removes its scratch space (block checkpoints, publish
staging, and whatever its runs stored that no artifact row names) and says whether this call ended the job, so
that whoever counts endings counts each one once (a redelivered message for an ended job ends nothing).
No torch here: the API process (cancel, reaper) and the worker both use it.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from app.core.config import settings
from app.models import PUBLISH_STAGE, Artifact, Job, JobStatus, utcnow
from app.services.events import add_event
from app.services.storage import job_stores, store_for

log = logging.getLogger("awqforge.lifecycle")

ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
ENDINGS = ("succeeded", "failed", "cancelled", "gave up")  # run outcomes that mean "this run ended the job"


def claimable(worker_name: str, now: datetime) -> ColumnElement[bool]:
    """The one claim condition (a whole run or a publish): queued, or running with no or a stale heartbeat,
    or running on this same worker (a redelivery after this worker's child died)."""
    stale = now - timedelta(seconds=settings.HEARTBEAT_STALE_S)
    return or_(
        Job.status == JobStatus.QUEUED.value,
        (Job.status == JobStatus.RUNNING.value)
        & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale, Job.worker == worker_name),
    )


def at_publish(publish: bool) -> ColumnElement[bool]:
    """Jobs at the publish stage (their artifact set is recorded: they only publish), or the others."""
    return Job.stage == PUBLISH_STAGE if publish else or_(Job.stage.is_(None), Job.stage != PUBLISH_STAGE)


def job_output_dir(tenant_id: int, job_id: str) -> Path:
    return settings.ARTIFACT_DIR / f"tenant-{tenant_id}" / job_id


def job_work_dir(tenant_id: int, job_id: str) -> Path:
    """Block checkpoints of the job's runs: kept while it may run again, removed once it has ended."""
    return settings.ARTIFACT_DIR / f"tenant-{tenant_id}" / f".{job_id}.work"


def run_staging_dir(tenant_id: int, job_id: str) -> Path:
    """Where a run writes its output; it becomes the job's output folder once recorded (local store)."""
    return settings.ARTIFACT_DIR / f"tenant-{tenant_id}" / f".{job_id}.out"


def publish_staging_dir(job_id: str) -> Path:
    """Where a publish from an object store downloads the artifact set (one folder per job)."""
    return settings.ARTIFACT_DIR / ".publish" / job_id


def finish(
    s: Session,
    job_id: str,
    status: JobStatus,
    *,
    error: str | None = None,
    message: str | None = None,
    expected: tuple[str, ...] = ACTIVE_STATUSES,
    where: tuple[ColumnElement[bool], ...] = (),
    **values,
) -> bool:
    """End the job (compare-and-set from `expected`, plus `where`): status, time, error, secrets cleared,
    one status event, scratch folders removed. False (and nothing done) when the job had already ended or
    does not match; the caller's counting then skips it."""
    now = utcnow()
    if status == JobStatus.SUCCEEDED:
        values.setdefault("progress", 1.0)
    row = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(expected), *where)
        .values(
            status=status.value,
            finished_at=now,
            updated_at=now,
            error=error,
            eta_s=None,
            # Tokens live only while the job may run: a retry or another publish takes them anew.
            publish_token_enc=None,
            source_token_enc=None,
            **values,
        )
        .returning(Job.tenant_id, Job.stage, Job.progress)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    if row is None:
        return False
    tenant_id, stage, progress = row
    add_event(
        s,
        job_id=job_id,
        kind="status",
        message=message or error or status.value,
        stage=stage,
        progress=progress,
    )
    shutil.rmtree(job_work_dir(tenant_id, job_id), ignore_errors=True)
    shutil.rmtree(publish_staging_dir(job_id), ignore_errors=True)
    shutil.rmtree(run_staging_dir(tenant_id, job_id), ignore_errors=True)
    # what a run uploaded before it failed or was killed, or a replaced run's set, is named by no row
    _remove_stored(tenant_id, job_id, keep=_recorded(s, job_id))
    s.expire_all()  # loaded rows show the ending
    return True


def requeue(s: Session, job_id: str, *, message: str, where: tuple = (), **values) -> bool:
    """running -> queued (worker lost or shutting down); its checkpoints stay for the next run."""
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, *where)
        .values(status=JobStatus.QUEUED.value, worker=None, updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return False
    add_event(
        s,
        job_id=job_id,
        kind="status",
        message=message,
        stage=values.get("stage"),
        progress=values.get("progress"),
    )
    return True


def restart(
    s: Session, job_id: str, *, expected: tuple[str, ...], message: str, stage=None, **values
) -> bool:
    """An ended job queued again (retry: the whole run; publish again: stage "publish"); its recorded rows
    and artifacts stay until the new run replaces them."""
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(expected))
        .values(
            status=JobStatus.QUEUED.value,
            stage=stage,
            error=None,
            eta_s=None,
            cancel_requested=False,
            attempts=0,  # counts the runs from here
            worker=None,
            finished_at=None,
            heartbeat_at=None,
            dispatched_at=now,
            dispatches=Job.dispatches + 1,
            updated_at=now,
            **values,
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return False
    add_event(s, job_id=job_id, kind="status", message=message, stage=stage, progress=values.get("progress"))
    s.expire_all()
    return True


def cancel(s: Session, job: Job) -> str:
    """queued -> cancelled at once; running -> cancel requested (the worker stops at the next block and
    finishes it). Returns what happened: "ended", "requested", or the status it already had."""
    if finish(
        s,
        job.id,
        JobStatus.CANCELLED,
        message="cancelled before it started",
        expected=(JobStatus.QUEUED.value,),
        cancel_requested=True,
    ):
        return "ended"
    res = s.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.RUNNING.value, Job.cancel_requested.is_(False))
        .values(cancel_requested=True, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        add_event(
            s,
            job_id=job.id,
            kind="log",
            stage=job.stage,
            message="cancel requested; stopping at the next block",
        )
        return "requested"
    s.refresh(job)
    return job.status


def reap(s: Session, job: Job, stale_before: datetime) -> str | None:
    """A running job whose heartbeat went stale (its worker died): queued again, or ended after MAX_ATTEMPTS
    (failed) or when a cancel was asked (cancelled). Returns "requeued", "ended" or None (it moved on)."""
    still_stale = (Job.heartbeat_at < stale_before,)
    publishing = job.stage == PUBLISH_STAGE
    if job.cancel_requested or job.attempts >= settings.MAX_ATTEMPTS:
        cancelled = job.cancel_requested
        ended = finish(
            s,
            job.id,
            JobStatus.CANCELLED if cancelled else JobStatus.FAILED,
            error=None
            if cancelled
            else f"worker lost: no heartbeat for {int(settings.HEARTBEAT_STALE_S)} s after {job.attempts} "
            "attempt(s)",
            message="worker lost (heartbeat stale): " + ("cancelled" if cancelled else "failed"),
            expected=(JobStatus.RUNNING.value,),
            where=still_stale,
            worker=None,
        )
        return "ended" if ended else None
    # A requeued job starts over in the listing (it resumes from its checkpoints); one lost while publishing
    # keeps its stage: its artifact set is recorded, it is sent to publish only.
    requeued = requeue(
        s,
        job.id,
        message="worker lost (heartbeat stale): " + ("requeued to publish" if publishing else "requeued"),
        where=still_stale,
        **({"stage": PUBLISH_STAGE} if publishing else {"stage": None, "progress": 0.0, "eta_s": None}),
        dispatched_at=utcnow(),
        dispatches=Job.dispatches + 1,
    )
    return "requeued" if requeued else None


def _recorded(s: Session, job_id: str) -> list[str]:
    return list(s.scalars(select(Artifact.path).where(Artifact.job_id == job_id)))


def _remove_stored(tenant_id: int, job_id: str, *, keep: list[str], gone: tuple[str, ...] = ()) -> None:
    """Remove the `gone` locations, and whatever the stores hold for the job outside the `keep` locations."""
    targets = [(store_for(loc), loc) for loc in gone]
    targets += [(store, store.job_location(tenant_id, job_id)) for store in job_stores()]
    for store, location in targets:
        try:
            store.delete(location, keep=keep)
        except Exception as exc:  # an unreachable object store: logged (by type only), retried by retention
            log.warning("could not delete the stored files of %s: %s", job_id, type(exc).__name__)


def prune_unrecorded(s: Session, job_id: str) -> None:
    """Remove what the job's runs stored that no artifact row names (a replaced run's set, a killed run's
    partial upload). Under a key-share lock on the job row: a run recording its set (FOR UPDATE first)
    waits, the heartbeat (which changes no key) does not, however slow the store is."""
    tenant_id = s.scalar(
        select(Job.tenant_id).where(Job.id == job_id).with_for_update(read=True, key_share=True)
    )
    if tenant_id is not None:
        _remove_stored(tenant_id, job_id, keep=_recorded(s, job_id))


def delete_artifacts(s: Session, job: Job, *, message: str) -> int:
    """An ended job's artifacts removed from their store (files or objects) and their rows dropped; the job
    row stays (with its metrics and events). Returns how many artifacts went."""
    arts = list(s.scalars(select(Artifact).where(Artifact.job_id == job.id)))
    _remove_stored(job.tenant_id, job.id, keep=[], gone=tuple(a.path for a in arts))
    for a in arts:
        s.delete(a)
    if arts:
        add_event(s, job_id=job.id, kind="status", message=message, stage=job.stage)
    return len(arts)


def delete(s: Session, job: Job) -> bool:
    """An ended job removed for good: its stored files and objects, then its row (events, metrics and
    artifact rows go with it). False when the job has not ended (cancel it first)."""
    if job.status in ACTIVE_STATUSES:
        return False
    delete_artifacts(s, job, message="deleted")
    for d in (job_work_dir(job.tenant_id, job.id), run_staging_dir(job.tenant_id, job.id)):
        shutil.rmtree(d, ignore_errors=True)
    s.delete(job)
    return True


def expire_artifacts(s: Session, *, days: float) -> list[str]:
    """ARTIFACT_RETENTION_DAYS: the artifacts of jobs that ended more than `days` ago are deleted (the job's
    row, metrics and events stay). Returns the ids of the jobs whose artifacts went."""
    cutoff = utcnow() - timedelta(days=days)
    jobs = list(
        s.scalars(
            select(Job)
            .where(Job.status.not_in(ACTIVE_STATUSES), Job.finished_at < cutoff)
            .where(Job.id.in_(select(Artifact.job_id)))
        )
    )
    for job in jobs:
        delete_artifacts(s, job, message=f"artifacts expired ({days:g} days after the job ended)")
        s.commit()
    return [j.id for j in jobs]
