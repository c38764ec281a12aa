"""Job use cases: create (validate, idempotency, limits, routing), list, cancel, retry, reap."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import ValidationError
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload, selectinload

from app.core.config import settings
from app.core.security import encrypt_secret
from app.models import (
    GATE_STAGE,
    PUBLISH_STAGE,
    Artifact,
    CalibrationSet,
    IdempotencyKey,
    Job,
    JobStatus,
    Tenant,
    utcnow,
)
from app.schemas import ArtifactFile, ArtifactPublic, FieldError, JobCreate, JobPublic, MetricsPublic
from app.services import lifecycle
from app.services.eval_tasks import check_eval_tasks
from app.services.events import add_event
from app.services.routing import (
    RoutingError,
    model_config,
    model_tensor_shapes,
    route,
    waiting_reason,
)
from app.services.storage import store_for
from awqforge import parsing
from awqforge.spec import is_local_path, public_spec

log = logging.getLogger("awqforge.jobs")

ACTIVE_STATUSES = lifecycle.ACTIVE_STATUSES
# Where JobSpec fields live in the request body (the body is flatter than the spec).
_SPEC_TO_BODY = {
    ("quant", "bits"): "bits",
    ("quant", "group_size"): "group_size",
    ("quant", "zero_point"): "zero_point",
    ("quant", "modules_to_not_convert"): "modules_to_not_convert",
}


class SpecError(Exception):
    def __init__(self, errors: list[FieldError]):
        super().__init__("; ".join(f"{e.field}: {e.reason}" for e in errors))
        self.errors = errors


class ServiceError(Exception):
    """An error with an HTTP status the route passes through."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def _check_local(field: str, raw: str) -> FieldError | None:
    """Local paths must lie under the allowed roots (the engine's one resolver decides)."""
    from app.services.uploads import allowed_roots
    from awqforge.errors import InputError
    from awqforge.resolve import PathNotAllowed, resolve_local_path

    try:
        resolve_local_path(raw, allowed_roots(), what=field)
    except PathNotAllowed:
        return FieldError(
            field=field,
            reason="local paths are not allowed here (outside the server's allowed folders): use a hub id "
            "(or upload_id for calibration data)",
        )
    except InputError as exc:
        return FieldError(field=field, reason=str(exc).removeprefix(f"{field}: "))
    return None


def spec_from_request(session: Session, *, body: JobCreate, tenant_id: int):
    """JobCreate -> awqforge.spec.JobSpec, or SpecError listing each bad field and why."""
    from awqforge.spec import JobSpec

    errors: list[FieldError] = []
    cal = body.calibration
    if cal.upload_id and cal.source:
        errors.append(
            FieldError(
                field="calibration",
                reason="give either calibration.source or calibration.upload_id, not both",
            )
        )
    source = f"upload:{cal.upload_id}" if cal.upload_id else (cal.source or "pileval")
    if source.startswith("upload:"):
        owned = session.scalar(
            select(CalibrationSet.id).where(
                CalibrationSet.id == source[7:], CalibrationSet.tenant_id == tenant_id
            )
        )
        if owned is None:
            errors.append(
                FieldError(field="calibration.upload_id", reason=f"calibration set {source[7:]!r} not found")
            )
    elif source.startswith("file:") and (e := _check_local("calibration.source", source[5:])):
        errors.append(e)
    if is_local_path(body.model) and (e := _check_local("model", body.model)):
        errors.append(e)
    errors.extend(check_eval_tasks(body.eval.tasks, _check_local))
    if (
        body.eval.text
        and body.eval.text.startswith("file:")
        and (e := _check_local("eval.text", body.eval.text[5:]))
    ):
        errors.append(e)

    data: dict = {
        "model": body.model,
        "revision": body.revision,
        "source": body.source.model_dump(),
        "method": body.method,
        "quant": {
            "bits": body.bits,
            "group_size": body.group_size,
            "zero_point": body.zero_point,
            "modules_to_not_convert": body.modules_to_not_convert,
        },
        "calibration": {
            "source": source,
            "n_samples": cal.n_samples,
            "seq_len": cal.seq_len,
            "packing": cal.packing,
        },
        "formats": body.formats,
        "eval": body.eval.model_dump(),
        "publish": body.publish.model_dump() if body.publish else None,
        "device": body.device,
    }
    for name in (
        "scale_search",
        "n_grid",
        "clip_search",
        "refine_steps",
        "search_screen",
        "rounding",
        "gqa_fold",
        "seed",
        "mappings",
    ):
        if getattr(body, name) is not None:
            data[name] = getattr(body, name)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(str(x) for x in err["loc"])
            field = _SPEC_TO_BODY.get(loc[:2]) or (".".join(loc) if loc else "formats")
            reason = err["msg"].removeprefix("Value error, ")
            errors.append(FieldError(field=field, reason=reason))
    if errors:
        raise SpecError(errors)
    return spec


def check_module_patterns(spec) -> None:
    """modules_to_not_convert patterns that match no module of the checkpoint are refused now (422), from its
    tensor names (no torch here). When the names cannot be had (hub unreachable, no safetensors), the job is
    accepted: the engine checks the patterns against the model itself before any work. So is a model type whose
    tensors transformers may rename on load (see awqforge.weight_names)."""
    from awqforge.weight_names import unmatched, unmatched_message

    patterns = spec.quant.modules_to_not_convert
    if not patterns:
        return
    config = model_config(spec.model, spec.revision, spec.source.token) or {}  # cached: routing reads it next
    shapes = model_tensor_shapes(spec.model, spec.revision, spec.source.token) if config else None
    missing = unmatched(patterns, shapes, config.get("model_type"))
    if missing:
        raise SpecError([FieldError(field="modules_to_not_convert", reason=unmatched_message(missing))])


def check_publish_namespace(spec, tenant: Tenant) -> None:
    """A tenant publishes only into the hub namespaces an admin gave it (by default: its own name)."""
    from awqforge.spec import hub_namespace

    if spec.publish is None:
        return
    allowed = tenant_namespaces(tenant)
    if hub_namespace(spec.publish.repo_id) not in allowed:
        raise SpecError(
            [
                FieldError(
                    field="publish.repo_id",
                    reason=f"namespace {hub_namespace(spec.publish.repo_id)!r} is not one this tenant may "
                    f"publish to ({', '.join(allowed) or 'none'}); an admin adds namespaces with "
                    "`awqforge tenants update --namespace`",
                )
            ]
        )


def tenant_namespaces(tenant: Tenant) -> list[str]:
    return list(tenant.hub_namespaces) if tenant.hub_namespaces is not None else [tenant.name]


def request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _active_count(session: Session, tenant_id: int) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES))
        )
        or 0
    )


def _check_limit(session: Session, tenant: Tenant) -> None:
    # Serialise submissions per tenant so two concurrent requests cannot both pass the count.
    session.execute(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update())
    limit = tenant.max_queued_jobs or settings.TENANT_MAX_QUEUED_JOBS
    active = _active_count(session, tenant.id)
    if active >= limit:
        raise ServiceError(
            429, f"tenant has {active} unfinished jobs (queued or running); the limit is {limit}"
        )


def send_job(job: Job) -> None:
    """Send the job's task by name: the whole run, or only the publish of its recorded artifact set."""
    from worker.celery_app import celery_app, task_for

    celery_app.send_task(task_for(job.stage), args=[job.id], queue=settings.queue_name(job.queue))


def _dispatch(session: Session, job: Job) -> bool:
    """Send the task after the commit that recorded `dispatched_at`. Postgres is the source of truth:
    if the broker is unreachable the job stays queued with `dispatched_at` cleared, and the
    reconciler (reconcile_queued, in the reaper loop) sends it once the broker is back."""
    try:
        send_job(job)
        return True
    except Exception as exc:
        log.warning("broker unreachable while queueing %s (%s); the reconciler sends it later", job.id, exc)
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.QUEUED.value)
            .values(dispatched_at=None)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return False


def _redispatch_due(dispatched_at: datetime, dispatches: int, now: datetime) -> bool:
    # Doubling wait: a message may legitimately sit behind long jobs; each resend is harmless
    # (the worker's claim is idempotent) but need not pile up.
    wait = settings.REDISPATCH_AFTER_S * 2 ** min(max(dispatches - 1, 0), 4)
    return dispatched_at < now - timedelta(seconds=wait)


def reconcile_queued(session: Session) -> list[str]:
    """Send every queued job that has no message in flight: never sent (broker down at submit or at
    requeue), or sent long ago without starting (consumed but never claimed, or lost with the broker's
    data). Returns the ids sent; stops at the first broker failure (the next pass tries again)."""
    now = utcnow()
    rows = session.execute(
        select(Job.id, Job.dispatched_at, Job.dispatches).where(
            Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False)
        )
    ).all()
    sent: list[str] = []
    for job_id, dispatched_at, dispatches in rows:
        if dispatched_at is not None and not _redispatch_due(dispatched_at, dispatches or 0, now):
            continue
        # Compare-and-set on dispatched_at: two reconcilers (two API processes) never both send.
        res = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.QUEUED.value,
                Job.dispatched_at.is_(None) if dispatched_at is None else Job.dispatched_at == dispatched_at,
            )
            .values(dispatched_at=now, dispatches=Job.dispatches + 1)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if res.rowcount != 1:
            continue
        job = session.get(Job, job_id)
        if not _dispatch(session, job):
            break
        sent.append(job_id)
        log.info("reconciler sent %s (%s)", job_id, "first send" if dispatched_at is None else "resend")
    return sent


@dataclass
class Created:
    job: Job
    replayed: bool


def _find_idempotent(session: Session, tenant_id: int, key: str, body_hash: str) -> Job | None:
    row = session.get(IdempotencyKey, (tenant_id, key))
    if row is None:
        return None
    if row.expires_at < utcnow():
        session.delete(row)
        session.flush()
        return None
    if row.request_hash != body_hash:
        raise SpecError(
            [
                FieldError(
                    field="Idempotency-Key", reason="this key was already used with a different request body"
                )
            ]
        )
    return session.get(Job, row.job_id)


def create_job(session: Session, *, body: JobCreate, tenant: Tenant, idempotency_key: str | None) -> Created:
    body_hash = request_hash(body)
    if idempotency_key:
        if len(idempotency_key) > 200:
            raise SpecError([FieldError(field="Idempotency-Key", reason="at most 200 characters")])
        existing = _find_idempotent(session, tenant.id, idempotency_key, body_hash)
        if existing is not None:
            return Created(existing, True)
    spec = spec_from_request(session, body=body, tenant_id=tenant.id)
    check_publish_namespace(spec, tenant)
    check_module_patterns(spec)
    try:
        chosen = route(spec)
    except RoutingError as exc:
        raise SpecError([FieldError(field="model", reason=str(exc))]) from exc
    _check_limit(session, tenant)

    token = spec.publish.token if spec.publish else None
    source_token = spec.source.token
    stored = public_spec(spec)  # tokens live only encrypted in their own columns
    job = Job(
        tenant_id=tenant.id,
        model=spec.model,
        revision=spec.revision,
        method=spec.method.value,
        bits=spec.quant.bits,
        group_size=spec.quant.group_size,
        spec=stored,
        publish_token_enc=encrypt_secret(token) if token else None,
        source_token_enc=encrypt_secret(source_token) if source_token else None,
        queue=chosen.queue,
        status=JobStatus.QUEUED.value,
        progress=0.0,
        attempts=0,
        cancel_requested=False,
        dispatched_at=utcnow(),
        dispatches=1,
    )
    session.add(job)
    session.flush()
    add_event(session, job_id=job.id, kind="status", message=f"queued on {job.queue}", progress=0.0)
    if idempotency_key:
        now = utcnow()
        session.add(
            IdempotencyKey(
                tenant_id=tenant.id,
                key=idempotency_key,
                request_hash=body_hash,
                job_id=job.id,
                created_at=now,
                expires_at=now + timedelta(hours=settings.IDEMPOTENCY_TTL_HOURS),
            )
        )
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key won the race: answer with its job.
        session.rollback()
        existing = _find_idempotent(session, tenant.id, idempotency_key or "", body_hash)
        if existing is None:
            raise
        return Created(existing, True)
    _dispatch(session, job)
    return Created(job, False)


def get_job(session: Session, *, job_id: str, tenant_id: int) -> Job:
    # metrics and artifacts with the row: a status read is one round trip, not three
    job = session.get(Job, job_id, options=[joinedload(Job.metrics), joinedload(Job.artifacts)])
    if job is None or job.tenant_id != tenant_id:
        raise ServiceError(404, "job not found")
    return job


def encode_cursor(job: Job) -> str:
    return parsing.encode_cursor(job.created_at, job.id)


def list_jobs(
    session: Session, *, tenant_id: int, status: str | None, model: str | None, cursor: str | None, limit: int
) -> tuple[list[Job], str | None]:
    q = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        q = q.where(Job.status == status)
    if model:
        q = q.where(Job.model == model)
    if cursor:
        created, cid = parsing.decode_cursor(cursor)
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < cid)))
    q = q.options(joinedload(Job.metrics), selectinload(Job.artifacts))
    rows = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def cancel_job(session: Session, *, job: Job) -> Job:
    outcome = lifecycle.cancel(session, job)
    if outcome not in ("ended", "requested", JobStatus.CANCELLED.value, JobStatus.RUNNING.value):
        raise ServiceError(409, f"job already {outcome}")
    session.commit()
    session.refresh(job)
    return job


def delete_job(session: Session, *, job: Job) -> None:
    """A finished job and its stored artifacts (files or objects) removed for its tenant."""
    if not lifecycle.delete(session, job):
        raise ServiceError(409, f"job is {job.status}: cancel it first, then delete it")
    session.commit()


def _token_columns(job: Job, *, source_token: str | None, publish_token: str | None) -> dict:
    """Tokens given again for a new run: encrypted into their columns as at submit (finish() deletes them)."""
    if publish_token and not job.spec.get("publish"):
        raise SpecError([FieldError(field="publish.token", reason="this job has no publish settings")])
    return {
        "source_token_enc": encrypt_secret(source_token) if source_token else None,
        "publish_token_enc": encrypt_secret(publish_token) if publish_token else None,
    }


def retry_job(
    session: Session,
    *,
    job: Job,
    tenant: Tenant,
    source_token: str | None = None,
    publish_token: str | None = None,
) -> Job:
    """Run a failed or cancelled job again, with the tokens given now. Its publish destination stays the
    one its first publish chose; its recorded artifacts and metrics stay until the new run records its own."""
    ended = (JobStatus.FAILED.value, JobStatus.CANCELLED.value)
    if job.status not in ended:
        raise ServiceError(409, f"only failed or cancelled jobs can be retried; this one is {job.status}")
    tokens = _token_columns(job, source_token=source_token, publish_token=publish_token)
    _check_limit(session, tenant)
    if not lifecycle.restart(
        session,
        job.id,
        expected=ended,
        message=f"retried; queued on {job.queue}",
        progress=0.0,
        started_at=None,
        **tokens,
    ):
        session.rollback()
        raise ServiceError(409, "the job changed meanwhile; read it again")
    session.commit()
    session.refresh(job)
    _dispatch(session, job)
    return job


def publish_again(
    session: Session, *, job: Job, tenant: Tenant, token: str | None, override_gate: bool = False
) -> Job:
    """Queue a new publish of a finished job's recorded artifacts (after a failed publish or run, or to publish
    again: the hub makes no new commit when its files already match). The job stays at the publish stage until
    it ends: the reaper and the reconciler send it to the publish task only, never to a whole run. A job that
    failed its quality gate (eval.gate) publishes only with override_gate."""
    if not job.spec.get("publish"):
        raise ServiceError(409, "this job has no publish settings")
    below_gate = job.status == JobStatus.FAILED.value and job.stage == GATE_STAGE
    if below_gate and not override_gate:
        raise ServiceError(
            409,
            f"this job did not pass its quality gate ({job.error}); give override_gate=true to publish it anyway",
        )
    done = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)
    if job.status not in done or not job.artifacts:
        raise ServiceError(
            409,
            "only a succeeded job, or a failed one with its artifacts recorded, can publish; "
            f"this one is {job.status}" + ("" if job.artifacts else " with no artifacts"),
        )
    tokens = _token_columns(job, source_token=None, publish_token=token)
    _check_limit(session, tenant)
    message = "publish queued" + (" with the quality gate overridden" if below_gate else "")
    if not lifecycle.restart(session, job.id, expected=done, message=message, stage=PUBLISH_STAGE, **tokens):
        session.rollback()
        raise ServiceError(409, "the job changed meanwhile; read it again")
    session.commit()
    session.refresh(job)
    _dispatch(session, job)  # broker down: stays queued, the reconciler sends it (to the publish task)
    return job


def reap_stale_jobs(session: Session, *, all_running: bool = False) -> list[str]:
    """Running jobs whose heartbeat went stale (worker died): requeue (and send), or end after MAX_ATTEMPTS.

    `all_running`: every running job counts as orphaned (embedded start, where no other worker exists).
    """
    stale_before = utcnow() - timedelta(seconds=0 if all_running else settings.HEARTBEAT_STALE_S)
    stale = list(
        session.scalars(
            select(Job).where(Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < stale_before)
        )
    )
    requeued = []
    for job in stale:
        outcome = lifecycle.reap(session, job, stale_before)
        session.commit()
        if outcome == "requeued" and _dispatch(session, session.get(Job, job.id)):
            requeued.append(job.id)
    session.commit()
    return requeued


# -- presentation ---------------------------------------------------------------------------


def artifact_files(artifact: Artifact) -> list[tuple[str, int]]:
    return [(f.path, f.size_bytes) for f in store_for(artifact.path).list_files(artifact.path)]


def artifact_public(job: Job, artifact: Artifact, *, with_files: bool) -> ArtifactPublic:
    files = []
    if with_files:
        base = f"{settings.API_V1_STR}/jobs/{job.id}/artifacts/{artifact.id}/files/"
        store = store_for(artifact.path)
        digests = {f["path"]: f.get("sha256") for f in artifact.files or ()}
        files = [
            ArtifactFile(
                path=p,
                size_bytes=n,
                sha256=digests.get(p),
                url=base + p,
                download_url=store.presign(artifact.path, p),
            )
            for p, n in artifact_files(artifact)
        ]
    return ArtifactPublic(
        id=artifact.id,
        format=artifact.format,
        size_bytes=artifact.size_bytes,
        published_to=artifact.published_to,
        commit_url=artifact.commit_url,
        hub_revision=artifact.hub_revision,
        files=files,
    )


def job_public(job: Job, *, with_files: bool = True) -> JobPublic:
    return JobPublic(
        id=job.id,
        status=job.status,
        stage=job.stage,
        progress=min(max(job.progress or 0.0, 0.0), 1.0),
        eta_s=job.eta_s,
        error=job.error,
        model=job.model,
        revision=job.revision,
        source_sha=job.source_sha,
        method=job.method,
        bits=job.bits,
        group_size=job.group_size,
        queue=job.queue,
        waiting_reason=waiting_reason(job.queue) if job.status == JobStatus.QUEUED.value else None,
        attempts=job.attempts,
        spec=public_spec(job.spec),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        metrics=MetricsPublic.model_validate(job.metrics) if job.metrics else None,
        artifacts=[artifact_public(job, a, with_files=with_files) for a in job.artifacts],
    )
