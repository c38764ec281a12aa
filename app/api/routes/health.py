"""/healthz (process up) and /readyz (database and broker reachable)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.core.config import settings
from app.core.db import check_database
from app.schemas import Health

router = APIRouter(tags=["health"])


def check_broker() -> None:
    if settings.broker_is_filesystem:
        folder = settings.broker_dir / "queue"
        if not folder.is_dir():
            raise OSError(f"broker folder {folder} is missing")
        return
    from worker.celery_app import celery_app

    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={
        503: {
            "model": Health,
            "description": "The database or the broker is unreachable",
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
        }
    },
)
def readyz() -> JSONResponse:
    checks: dict[str, str] = {}
    for name, check in (("database", check_database), ("broker", check_broker)):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unreachable: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        Health(status="ok" if ok else "unavailable", checks=checks).model_dump(),
        status_code=200 if ok else 503,
        headers=None if ok else {"Retry-After": str(settings.DB_RETRY_AFTER_S)},
    )
