"""The FastAPI application: `create_app()`; `app` for `uvicorn app.main:app`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator

import anyio.to_thread
from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import delete
from sqlalchemy import exc as sa_exc
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.main import api_router
from app.api.routes import dashboard, health, metrics
from app.core.config import settings
from app.core.db import is_connection_error, session_scope
from app.models import IdempotencyKey, utcnow
from app.services import lifecycle
from app.services.jobs import ServiceError, SpecError, reap_stale_jobs, reconcile_queued
from app.services.storage import StoreUnavailable
from awqforge.parsing import ParseError

log = logging.getLogger("awqforge.api")

DESCRIPTION = """Quantization as a service: submit an AWQ/RTN job, follow it, download the result.

Authenticate with `Authorization: Bearer <key>` (keys from `awqforge keys create --tenant NAME`).
Everything a tenant creates is invisible (404) to other tenants."""


# When the reaper last found the database unreachable. Heartbeats could not be written meanwhile: a job is
# judged lost only after a full HEARTBEAT_STALE_S of database availability, so a worker that is alive is
# never robbed of its job by an outage (it requeues the job itself if its own writes gave up).
_db_lost_at = [float("-inf")]


def _reap_once() -> None:
    """Periodic housekeeping: requeue jobs whose worker died; send queued jobs that have no message in
    flight (the reconciler: Postgres says what must run, the broker only carries it); drop expired
    idempotency keys."""
    with session_scope() as s:
        db_settled = time.monotonic() - _db_lost_at[0] > settings.HEARTBEAT_STALE_S
        requeued = reap_stale_jobs(s) if db_settled else []
        sent = reconcile_queued(s)
        s.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < utcnow()))
        expired = (
            lifecycle.expire_artifacts(s, days=settings.ARTIFACT_RETENTION_DAYS)
            if settings.ARTIFACT_RETENTION_DAYS
            else []
        )
    if expired:
        log.info("artifacts expired (ARTIFACT_RETENTION_DAYS): %s", ", ".join(expired))
    if requeued:
        log.warning("requeued jobs whose worker died: %s", ", ".join(requeued))
    if sent:
        log.warning("reconciler sent queued jobs without a message in flight: %s", ", ".join(sent))


async def _reaper_loop() -> None:
    while True:
        await asyncio.sleep(settings.REAPER_INTERVAL_S)
        try:
            await run_in_threadpool(_reap_once)
        except Exception as exc:
            if is_connection_error(exc):
                _db_lost_at[0] = time.monotonic()
            log.exception("reaper pass failed")


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)[:200] or "body"


MAX_REASON_CHARS = 300  # an error never echoes a huge input back


def _reason(msg: object) -> str:
    text = str(msg).removeprefix("Value error, ")
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


class BodySizeLimit:
    """413 for a request body over its limit: at once when Content-Length says so, else as soon as the
    streamed body passes it (nothing beyond the limit is read). Uploads have MAX_UPLOAD_BYTES (plus the
    multipart envelope), every other route MAX_REQUEST_BYTES."""

    class TooLarge(StarletteHTTPException):
        """Raised from receive(); an HTTPException so that FastAPI's body parsing passes it on as it is."""

        def __init__(self, limit: int) -> None:
            super().__init__(413, f"request body over the limit of {limit} bytes")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def limit_for(path: str) -> int:
        if path.rstrip("/") == f"{settings.API_V1_STR}/calibration-sets":
            return settings.MAX_UPLOAD_BYTES + 64 * 1024
        return settings.MAX_REQUEST_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._refuse(send, limit)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodySizeLimit.TooLarge(limit)
            return message

        async def watch_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watch_send)
        except BodySizeLimit.TooLarge:
            if not started:
                await self._refuse(send, limit)

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        await JSONResponse({"detail": f"request body over the limit of {limit} bytes"}, status_code=413)(
            {"type": "http"}, _no_receive, send
        )


class DatabaseAdmission:
    """At most DB_POOL_SIZE requests at once past this point; the others wait here, in the event loop.

    A sync route takes several trips through the thread pool (session, key lookup, handler, cleanup) and holds
    its pooled connection between them. Without a bound, requests that hold connections wait for threads
    while every thread waits for a connection: under load the pool's 30 s timeout is what ends the wait.
    With fewer requests admitted than there are connections (and threads), no request ever waits for one.
    Event streams are not counted: they give their connection back after the first check."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/healthz",) or scope["path"].endswith("/events"):
            await self.app(scope, receive, send)
            return
        if self._slots is None:  # created in the running loop
            self._slots = asyncio.Semaphore(settings.DB_POOL_SIZE)
        async with self._slots:
            await self.app(scope, receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _database_down(exc: BaseException) -> bool:
    """Errors that mean the database cannot be reached (not that a statement was wrong)."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


def database_unavailable() -> JSONResponse:
    return JSONResponse(
        {"detail": "the database is unavailable; retry later"},
        status_code=503,
        headers={"Retry-After": str(settings.DB_RETRY_AFTER_S)},
    )


def create_app(*, run_reaper: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        # more threads than admitted requests, so that an admitted request always finds one
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.DB_POOL_SIZE + 20)
        task = asyncio.create_task(_reaper_loop()) if run_reaper else None
        # The garbage collector, not the handlers, made the latency tail under load: with Python's default
        # gen-0 threshold (700) a full pass over the imported modules' objects ran every few hundred requests.
        # What exists at start-up lives as long as the process, so it leaves the collector's generations, and
        # the young generation is collected less often (reference counting frees almost everything anyway).
        # bench/bench_api_load.py: status p99 with 20 in flight 120 ms -> 47 ms, 676 -> 797 requests/s.
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        yield
        if task:
            task.cancel()

    app = FastAPI(
        title=settings.PROJECT_NAME,
        description=DESCRIPTION,
        version="1.0.0",
        openapi_url=f"{settings.API_V1_STR}/openapi.json",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        # field and reason only: pydantic's "input" (which may be megabytes, or not even valid Unicode)
        # is never sent back
        detail = [
            {"field": _field_of(tuple(e.get("loc", ()))), "reason": _reason(e.get("msg", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(sa_exc.DBAPIError)
    async def _database(_req: Request, exc: sa_exc.DBAPIError) -> JSONResponse:
        if _database_down(exc):
            log.warning("database unavailable: %s", str(exc.orig or exc).splitlines()[0][:300])
            return database_unavailable()
        if isinstance(exc, sa_exc.DataError):  # a value no column can hold (checked at the edge; a last net)
            log.warning("refused a value the database cannot store: %s", type(exc.orig).__name__)
            return JSONResponse({"detail": "a value in the request cannot be stored"}, status_code=422)
        raise exc

    @app.exception_handler(ParseError)
    async def _parse(_req: Request, exc: ParseError) -> JSONResponse:
        return JSONResponse({"detail": [{"field": exc.field, "reason": exc.reason}]}, status_code=422)

    @app.exception_handler(SpecError)
    async def _spec(_req: Request, exc: SpecError) -> JSONResponse:
        return JSONResponse({"detail": [e.model_dump() for e in exc.errors]}, status_code=422)

    @app.exception_handler(StoreUnavailable)
    @app.exception_handler(BotoCoreError)
    @app.exception_handler(ClientError)
    async def _store(_req: Request, exc: Exception) -> JSONResponse:
        # an outage of the object store, not a bad request; boto's text names the endpoint: logged by type only
        log.warning("artifact store unavailable: %s", type(exc).__name__)
        return JSONResponse(
            {"detail": "the artifact store is unavailable; retry later"},
            status_code=503,
            headers={"Retry-After": str(settings.DB_RETRY_AFTER_S)},
        )

    @app.exception_handler(ServiceError)
    async def _service(_req: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    app.add_middleware(DatabaseAdmission)
    app.add_middleware(BodySizeLimit)
    app.include_router(api_router, prefix=settings.API_V1_STR)
    app.include_router(health.router)
    app.include_router(metrics.prometheus_router)
    app.include_router(dashboard.router)
    app.mount("/dashboard/static", StaticFiles(directory=dashboard.STATIC_DIR), name="dashboard-static")
    return app


app = create_app()
