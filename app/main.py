"""The FastAPI application: `create_app()`; `app` for `uvicorn app.main:app`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import delete
from starlette.concurrency import run_in_threadpool

from app.api.main import api_router
from app.api.routes import dashboard, health, metrics
from app.core.config import settings
from app.core.db import session_scope
from app.models import IdempotencyKey, utcnow
from app.services.jobs import ServiceError, SpecError, reap_stale_jobs

log = logging.getLogger("awqforge.api")

DESCRIPTION = """Quantization as a service: submit an AWQ/RTN job, follow it, download the result.

Authenticate with `Authorization: Bearer <key>` (keys from `awqforge keys create --tenant NAME`).
Everything a tenant creates is invisible (404) to other tenants."""


def _reap_once() -> None:
    """Periodic housekeeping: requeue jobs whose worker died; drop expired idempotency keys."""
    with session_scope() as s:
        requeued = reap_stale_jobs(s)
        s.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < utcnow()))
    if requeued:
        log.warning("requeued jobs whose worker died: %s", ", ".join(requeued))


async def _reaper_loop() -> None:
    while True:
        await asyncio.sleep(settings.REAPER_INTERVAL_S)
        try:
            await run_in_threadpool(_reap_once)
        except Exception:
            log.exception("reaper pass failed")


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def create_app(*, run_reaper: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        task = asyncio.create_task(_reaper_loop()) if run_reaper else None
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
        detail = [
            {
                "field": _field_of(tuple(e.get("loc", ()))),
                "reason": str(e.get("msg", "")).removeprefix("Value error, "),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(SpecError)
    async def _spec(_req: Request, exc: SpecError) -> JSONResponse:
        return JSONResponse({"detail": [e.model_dump() for e in exc.errors]}, status_code=422)

    @app.exception_handler(ServiceError)
    async def _service(_req: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    app.include_router(api_router, prefix=settings.API_V1_STR)
    app.include_router(health.router)
    app.include_router(metrics.prometheus_router)
    app.include_router(dashboard.router)
    app.mount("/dashboard/static", StaticFiles(directory=dashboard.STATIC_DIR), name="dashboard-static")
    return app


app = create_app()
