"""/v1/jobs: submit, inspect, list, cancel, retry, follow (SSE), logs, artifacts."""

from __future__ import annotations

import asyncio
import json
import mimetypes
import tarfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import PurePosixPath
from typing import Annotated, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import ArtifactId, CurrentTenant, JobId, SessionDep
from app.core.db import session_scope
from app.models import TERMINAL_STATUSES, Artifact, Job, JobEvent, LayerMetric
from app.schemas import (
    ArtifactsPublic,
    ErrorResponse,
    FieldError,
    JobCreate,
    JobLayersPublic,
    JobPublic,
    JobsPublic,
    JobStatusName,
    LayerMetricPublic,
)
from app.services import jobs as job_service
from app.services.jobs import ServiceError, SpecError
from app.services.storage import store_for
from awqforge.spec import SECRET, HubToken, SourceSpec

router = APIRouter(prefix="/jobs", tags=["jobs"])
T = TypeVar("T")

MAX_EVENT_ID = 2**63 - 1  # the events table's bigint key
EventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        max_length=19,
        pattern=r"^[0-9]+$",
        description="resume after this event id (sent back by EventSource on reconnect)",
    ),
]

_ERRORS = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}
# Routes whose success is not JSON still answer errors in JSON: say so (FastAPI would document the route's type).
_JSON_ERRORS = {
    code: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for code in (400, 401, 404, 413, 422, 503)
}

JOB_EXAMPLES = {
    "awq-w4-g64": {
        "summary": "AWQ W4 g64 on a hub model",
        "value": {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "method": "awq",
            "bits": 4,
            "group_size": 64,
            "calibration": {"source": "pileval", "n_samples": 64, "seq_len": 512},
            "formats": ["awq", "compressed-tensors"],
            "eval": {"seq_len": 1024},
        },
    },
    "uploaded-calibration": {
        "summary": "Own calibration data (from POST /v1/calibration-sets), W8 compressed-tensors",
        "value": {
            "model": "Qwen/Qwen2.5-0.5B-Instruct",
            "bits": 8,
            "group_size": 128,
            "calibration": {"upload_id": "cal_0123456789abcdef01234567", "n_samples": 128, "seq_len": 512},
            "formats": ["compressed-tensors"],
        },
    },
    "publish": {
        "summary": "A gated model, published to the hub (tokens encrypted, deleted when the job ends, never returned)",
        "value": {
            "model": "meta-llama/Llama-3.2-1B-Instruct",
            "bits": 4,
            "group_size": 128,
            "source": {"token": "hf_read..."},
            "publish": {"repo_id": "my-org/Llama-3.2-1B-Instruct-AWQ", "private": True, "token": "hf_..."},
        },
    },
}


def _get(session, job_id: str, tenant) -> Job:
    return job_service.get_job(session, job_id=job_id, tenant_id=tenant.id)


async def _in_thread(session: Session, work: Callable[[], T]) -> T:
    """`work` and the session's close in one trip to the thread pool. A sync route takes three (the handler,
    the validation of its answer, the session's close), each a hand-off between the event loop and a thread
    that costs about as much CPU as a short query; the routes polled most use this instead."""

    def call() -> T:
        with session:  # the connection goes back to the pool here, before the answer is sent
            return work()

    return await run_in_threadpool(call)


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={
        **_ERRORS,
        422: {"model": ErrorResponse},
        429: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
    summary="Submit a quantization job",
)
async def create_job(
    session: SessionDep,
    tenant: CurrentTenant,
    response: Response,
    body: Annotated[JobCreate, Body(openapi_examples=JOB_EXAMPLES)],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            pattern=r"^[\x21-\x7e]+$",
            description="same key + same body = same job (24 h); printable ASCII, at most 200 characters",
        ),
    ] = None,
) -> JobPublic:
    def work() -> tuple[JobPublic, bool]:
        created = job_service.create_job(session, body=body, tenant=tenant, idempotency_key=idempotency_key)
        return job_service.job_public(created.job), created.replayed

    job, replayed = await _in_thread(session, work)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.get("", response_model=JobsPublic, responses=_ERRORS, summary="List jobs (newest first)")
async def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    status: JobStatusName | None = None,
    model: Annotated[str | None, Query(max_length=500, pattern=r"^[^\x00]+$")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobsPublic:
    def work() -> JobsPublic:
        rows, next_cursor = job_service.list_jobs(
            session, tenant_id=tenant.id, status=status, model=model, cursor=cursor, limit=limit
        )
        return JobsPublic(
            data=[job_service.job_public(j, with_files=False) for j in rows],
            count=len(rows),
            next_cursor=next_cursor,
        )

    return await _in_thread(session, work)


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    responses=_ERRORS,
    summary="Status, progress, metrics and artifacts",
)
async def read_job(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> JobPublic:
    return await _in_thread(session, lambda: job_service.job_public(_get(session, job_id, tenant)))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    responses={**_ERRORS, 409: {"model": ErrorResponse}},
    summary="Cancel: a queued job never starts; a running one stops at the next block",
)
def cancel_job(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> JobPublic:
    return job_service.job_public(job_service.cancel_job(session, job=_get(session, job_id, tenant)))


@router.delete(
    "/{job_id}",
    status_code=204,
    responses={**_ERRORS, 409: {"model": ErrorResponse}},
    summary="Delete a finished job with its artifacts (files or objects); a queued or running one: 409",
)
def delete_job(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> Response:
    job_service.delete_job(session, job=_get(session, job_id, tenant))
    return Response(status_code=204)


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: HubToken | None = Field(None, json_schema_extra=SECRET)


class RetryIn(BaseModel):
    """The job's tokens, given again: a job's tokens are deleted when it ends (encrypted until the new run ends)."""

    model_config = ConfigDict(extra="forbid")

    source: SourceSpec = Field(default_factory=SourceSpec, description="source.token: the hub read token")
    publish: TokenIn | None = Field(None, description="publish.token: the hub write token")


@router.post(
    "/{job_id}/retry",
    status_code=202,
    response_model=JobPublic,
    responses={**_ERRORS, 409: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
    summary="Queue a failed or cancelled job again",
)
def retry_job(
    session: SessionDep, tenant: CurrentTenant, job_id: JobId, response: Response, body: RetryIn | None = None
) -> JobPublic:
    job = job_service.retry_job(
        session,
        job=_get(session, job_id, tenant),
        tenant=tenant,
        source_token=body.source.token if body else None,
        publish_token=body.publish.token if body and body.publish else None,
    )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_service.job_public(job)


class PublishAgainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: HubToken | None = Field(None, json_schema_extra=SECRET)  # the job's own was deleted when it ended
    override_gate: bool = Field(
        False, description="publish a job that failed its quality gate (eval.gate) anyway; its card says so"
    )


@router.post(
    "/{job_id}/publish",
    status_code=202,
    response_model=JobPublic,
    responses={**_ERRORS, 409: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
    summary="Publish a finished job's artifacts again (after a failed publish); no new commit if unchanged",
)
def publish_job(
    session: SessionDep, tenant: CurrentTenant, job_id: JobId, body: PublishAgainIn | None = None
) -> JobPublic:
    job = job_service.publish_again(
        session,
        job=_get(session, job_id, tenant),
        tenant=tenant,
        token=body.token if body else None,
        override_gate=bool(body and body.override_gate),
    )
    return job_service.job_public(job)


@router.get(
    "/{job_id}/layers",
    response_model=JobLayersPublic,
    responses=_ERRORS,
    summary="Per-layer quantization metrics",
)
def read_layers(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> JobLayersPublic:
    job = _get(session, job_id, tenant)
    rows = session.scalars(
        select(LayerMetric).where(LayerMetric.job_id == job.id).order_by(LayerMetric.block, LayerMetric.name)
    )
    data = [LayerMetricPublic.model_validate(r) for r in rows]
    return JobLayersPublic(data=data, count=len(data))


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    responses=_JSON_ERRORS,
    summary="The job's log lines as text",
)
def read_logs(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> str:
    job = _get(session, job_id, tenant)
    rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id))
    lines = []
    for e in rows:
        if e.kind == "progress" and not e.message:
            continue
        lines.append(f"{e.created_at:%Y-%m-%dT%H:%M:%S}Z [{e.kind}] {e.stage or '-'}: {e.message or ''}")
    return "\n".join(lines) + ("\n" if lines else "")


def _event_payload(e: JobEvent) -> str:
    data = {
        "kind": e.kind,
        "stage": e.stage,
        "progress": e.progress,
        "message": e.message,
        "created_at": e.created_at.isoformat(),
    }
    return f"id: {e.id}\nevent: {e.kind}\ndata: {json.dumps(data)}\n\n"


def _poll(job_id: str, after: int) -> tuple[list[str], str, str]:
    with session_scope() as s:
        rows = list(
            s.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.id > after)
                .order_by(JobEvent.id)
                .limit(500)
            )
        )
        status = s.scalar(select(Job.status).where(Job.id == job_id)) or "cancelled"
        return [_event_payload(e) for e in rows], (f"{rows[-1].id}" if rows else str(after)), status


@router.get(
    "/{job_id}/events",
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
    summary="Follow stage, progress and log lines (SSE); resumable with Last-Event-ID; ends when the job ends",
)
def follow_events(
    session: SessionDep,
    tenant: CurrentTenant,
    request: Request,
    job_id: JobId,
    last_event_id: EventId = None,
    last_event_id_query: Annotated[
        str | None, Query(alias="last_event_id", max_length=19, pattern=r"^[0-9]+$")
    ] = None,
) -> StreamingResponse:
    start = int(last_event_id or last_event_id_query or 0)
    if start > MAX_EVENT_ID:
        raise SpecError([FieldError(field="Last-Event-ID", reason=f"at most {MAX_EVENT_ID}")])
    jid = _get(session, job_id, tenant).id  # the stream below opens its own sessions
    session.close()  # and this one's connection goes back to the pool now, not when the stream ends

    async def stream():
        after = start
        last_sent = time.monotonic()
        yield "retry: 2000\n\n"
        while True:
            chunks, after_s, status = await run_in_threadpool(_poll, jid, after)
            after = int(after_s)
            for c in chunks:
                yield c
            if chunks:
                last_sent = time.monotonic()
            elif status in TERMINAL_STATUSES:
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                return
            elif time.monotonic() - last_sent > 15:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            if await request.is_disconnected():
                return
            if not chunks:
                await asyncio.sleep(0.5)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{job_id}/artifacts",
    response_model=ArtifactsPublic,
    responses=_ERRORS,
    summary="Artifacts and their files",
)
def list_artifacts(session: SessionDep, tenant: CurrentTenant, job_id: JobId) -> ArtifactsPublic:
    job = _get(session, job_id, tenant)
    data = [job_service.artifact_public(job, a, with_files=True) for a in job.artifacts]
    return ArtifactsPublic(data=data, count=len(data))


def _artifact(session, tenant, job_id: str, artifact_id: str) -> Artifact:
    job = _get(session, job_id, tenant)
    artifact = session.get(Artifact, artifact_id)
    if artifact is None or artifact.job_id != job.id:
        raise ServiceError(404, "artifact not found")
    return artifact


@router.get(
    "/{job_id}/artifacts/{artifact_id}.tar",
    response_class=StreamingResponse,
    responses={**_ERRORS, 200: {"content": {"application/x-tar": {}}}},
    summary="The whole artifact as a tar stream (built while it is sent, never on disk)",
)
def download_artifact_tar(
    session: SessionDep, tenant: CurrentTenant, job_id: JobId, artifact_id: ArtifactId
) -> StreamingResponse:
    artifact = _artifact(session, tenant, job_id, artifact_id)
    store = store_for(artifact.path)
    files = [
        (
            f"{artifact.format}/{f.path}",
            f.size_bytes,
            int(f.mtime),
            partial(store.stream, artifact.path, f.path),
        )
        for f in store.list_files(artifact.path)
    ]
    if not files:
        raise ServiceError(404, "artifact files are gone")
    entries = []
    for name, size, mtime, chunks in files:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, mtime, 0o644
        entries.append((info.tobuf(format=tarfile.PAX_FORMAT), name, size, chunks))
    length = sum(len(h) + -(-n // 512) * 512 for h, _, n, _ in entries) + 1024

    def stream():
        for header, name, size, chunks in entries:
            yield header
            sent, source = 0, chunks()
            try:
                for chunk in source:
                    chunk = chunk[: size - sent]
                    sent += len(chunk)
                    yield chunk
                    if sent >= size:
                        break
            finally:
                source.close()
            if sent != size:
                raise OSError(f"{PurePosixPath(name).name} changed while it was sent")
            yield b"\0" * (-size % 512)
        yield b"\0" * 1024

    return StreamingResponse(
        stream(),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(length),
            "Content-Disposition": f'attachment; filename="{job_id}-{artifact.format}.tar"',
        },
    )


class _Unsatisfiable(Exception):
    """The Range starts past the end of the file (416)."""


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The one range of a `Range: bytes=...` header as (first, last) byte; None for several ranges (the whole
    file is sent, as RFC 9110 allows). 400 when malformed; _Unsatisfiable when it starts past the end."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() == "bytes" and "," in spec:
        return None
    first, dash, last = (p.strip() for p in spec.partition("-"))
    if unit.strip().lower() != "bytes" or not dash or not (first + last).isdigit():
        raise ServiceError(
            400, "Range: only 'bytes=first-last', 'bytes=first-' or 'bytes=-count' is understood"
        )
    if not first:  # the last `count` bytes
        if not int(last) or not size:
            raise _Unsatisfiable
        return max(size - int(last), 0), size - 1
    start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size:
        raise _Unsatisfiable
    if end < start:
        raise ServiceError(400, "Range: the last byte comes before the first")
    return start, end


def _attachment(name: str) -> str:
    """Content-Disposition for a file name (headers are Latin-1: other names go percent-encoded, RFC 6266)."""
    if name.isascii():
        return 'attachment; filename="{}"'.format(name.replace('"', ""))
    return f"attachment; filename*=utf-8''{quote(name)}"


@router.get(
    "/{job_id}/artifacts/{artifact_id}/files/{file_path:path}",
    response_class=StreamingResponse,
    responses={
        **_JSON_ERRORS,
        206: {"description": "the requested Range"},
        307: {"description": "redirect=1 on a store that presigns: its URL"},
        416: {"description": "the Range starts past the end of the file"},
        304: {"description": "ETag matched"},
    },
    summary="Download one artifact file (Range, ETag and If-None-Match supported)",
)
def download_artifact_file(
    session: SessionDep,
    tenant: CurrentTenant,
    job_id: JobId,
    artifact_id: ArtifactId,
    file_path: Annotated[str, PathParam(max_length=1000)],
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
    range_: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
    if_range: Annotated[str | None, Header(alias="If-Range", max_length=200)] = None,
    redirect: Annotated[
        bool, Query(description="307 to a presigned URL, where the store makes them")
    ] = False,
) -> Response:
    artifact = _artifact(session, tenant, job_id, artifact_id)
    store = store_for(artifact.path)
    head = store.head(artifact.path, file_path)
    if head is None:
        raise ServiceError(404, "file not found")
    if redirect and (url := store.presign(artifact.path, file_path)):
        return RedirectResponse(url, status_code=307)
    if if_none_match and (
        if_none_match.strip() == "*" or head.etag in [t.strip() for t in if_none_match.split(",")]
    ):
        return Response(status_code=304, headers={"ETag": head.etag})
    name = PurePosixPath(file_path).name
    headers = {"ETag": head.etag, "Accept-Ranges": "bytes", "Content-Disposition": _attachment(name)}
    try:  # If-Range: the range only of the file the client holds part of, else the whole file
        span = _byte_range(range_, head.size_bytes) if range_ and if_range in (None, head.etag) else None
    except _Unsatisfiable:
        return JSONResponse(
            {"detail": "Range: starts past the end of the file"},
            status_code=416,
            headers={"Content-Range": f"bytes */{head.size_bytes}"},
        )
    if span is None:
        start, end, status = 0, head.size_bytes - 1, 200
    else:
        (start, end), status = span, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{head.size_bytes}"
    headers["Content-Length"] = str(end - start + 1)
    chunks = store.stream(artifact.path, file_path, start, end) if end >= start else iter(())
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return StreamingResponse(chunks, status_code=status, media_type=media_type, headers=headers)
