"""Typed dependencies: route signatures read `session: SessionDep, tenant: CurrentTenant`."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

import anyio
from fastapi import Depends, HTTPException, Request, status
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, joinedload
from starlette.concurrency import run_in_threadpool

from app.core.config import settings
from app.core.db import new_session
from app.core.security import hash_key, key_matches, parse_key_id
from app.models import ApiKey, DashboardSession, Tenant, utcnow
from app.services.sessions import CSRF_HEADER, SESSION_COOKIE, find_session
from awqforge.parsing import ID_PATTERN

bearer = HTTPBearer(auto_error=False, description="API key from `awqforge keys create --tenant NAME`")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


async def _session() -> AsyncIterator[Session]:
    # Made in the event loop (no connection is taken before the first statement); closed in a thread only
    # when it holds a connection (the rollback is a round trip). One thread hop fewer per request than a
    # sync dependency, whose opening also goes through the thread pool.
    session = new_session()
    try:
        yield session
    finally:
        if session.in_transaction():
            with anyio.CancelScope(shield=True):  # a client gone away still gives the connection back
                await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
        else:
            session.close()


SessionDep = Annotated[Session, Depends(_session)]
# Every id in a path is checked by the one id rule (awqforge.parsing) before it reaches the database: 422.
JobId = Annotated[str, PathParam(max_length=64, pattern=ID_PATTERN, description="a job id (job_...)")]
ArtifactId = Annotated[
    str, PathParam(max_length=64, pattern=ID_PATTERN, description="an artifact id (art_...)")
]


@dataclass(frozen=True)
class TenantRef:
    """What a read needs of a tenant, kept between requests (an ORM row belongs to one session)."""

    id: int
    name: str
    max_queued_jobs: int | None
    hub_namespaces: tuple[str, ...] | None
    allow_service_token: bool


# sha256 of a whole key -> (time.monotonic() of the database's answer, its tenant). Only keys the database
# accepted are kept, so the size is bounded by the keys in use; API_KEY_CACHE_S bounds their age.
_key_cache: dict[str, tuple[float, TenantRef]] = {}
_KEY_CACHE_MAX = 10_000


def _remember_key(key: str, tenant: Tenant) -> None:
    if settings.API_KEY_CACHE_S <= 0:
        return
    if len(_key_cache) >= _KEY_CACHE_MAX:
        _key_cache.clear()
    ns = tuple(tenant.hub_namespaces) if tenant.hub_namespaces is not None else None
    ref = TenantRef(tenant.id, tenant.name, tenant.max_queued_jobs, ns, bool(tenant.allow_service_token))
    _key_cache[hash_key(key)] = (time.monotonic(), ref)


def cached_tenant(key: str) -> TenantRef | None:
    """The tenant of a key the database accepted less than API_KEY_CACHE_S ago, else None (ask it)."""
    hit = _key_cache.get(hash_key(key))
    if hit is None or time.monotonic() - hit[0] >= settings.API_KEY_CACHE_S:
        return None
    return hit[1]


def tenant_for_key(session: Session, key: str | None) -> Tenant | None:
    key_id = parse_key_id(key or "")
    if key_id is None:
        return None
    row = session.get(ApiKey, key_id, options=[joinedload(ApiKey.tenant)])  # one round trip
    if row is None or row.revoked_at is not None or not key_matches(key or "", row.key_hash):
        _key_cache.pop(hash_key(key or ""), None)
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=5):
        row.last_used_at = now
        session.commit()
    _remember_key(key or "", row.tenant)
    return row.tenant


def _tenant_for_cookie(session: Session, request: Request) -> Tenant | None:
    # The dashboard's browser calls the same API with its session cookie; a cookie alone
    # must not be able to change anything (CSRF), so unsafe methods also need the session's token.
    row = find_session(session, request.cookies.get(SESSION_COOKIE))
    if row is not None and request.method not in _SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), row.csrf_token.encode()):
            raise HTTPException(status_code=403, detail=f"missing or wrong {CSRF_HEADER} header")
    return row.tenant if row is not None else None


async def get_current_tenant(
    request: Request,
    session: SessionDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant | TenantRef:
    """The key's tenant. A read (GET/HEAD) may take it from this process's cache (API_KEY_CACHE_S, no
    database trip, no thread); every other method asks the database, so a revoked key changes nothing."""
    tenant: Tenant | TenantRef | None = None
    if creds is not None:
        if request.method in _SAFE_METHODS:
            tenant = cached_tenant(creds.credentials)
        if tenant is None:
            tenant = await run_in_threadpool(tenant_for_key, session, creds.credentials)
    else:
        tenant = await run_in_threadpool(_tenant_for_cookie, session, request)
    if tenant is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing, unknown or revoked API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]  # a TenantRef on cached reads


def get_dashboard_session(request: Request, session: SessionDep) -> DashboardSession | None:
    return find_session(session, request.cookies.get(SESSION_COOKIE))


DashboardSessionDep = Annotated[DashboardSession | None, Depends(get_dashboard_session)]
