"""Typed dependencies: route signatures read `session: SessionDep, tenant: CurrentTenant`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, joinedload

from app.core.db import get_db
from app.core.security import key_matches, parse_key_id
from app.models import ApiKey, Tenant, utcnow

bearer = HTTPBearer(auto_error=False, description="API key from `awqforge keys create --tenant NAME`")
DASHBOARD_COOKIE = "awqforge_key"


def _session() -> Iterator[Session]:
    yield from get_db()


SessionDep = Annotated[Session, Depends(_session)]


def tenant_for_key(session: Session, key: str | None) -> Tenant | None:
    key_id = parse_key_id(key or "")
    if key_id is None:
        return None
    row = session.get(ApiKey, key_id, options=[joinedload(ApiKey.tenant)])  # one round trip
    if row is None or row.revoked_at is not None or not key_matches(key or "", row.key_hash):
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=5):
        row.last_used_at = now
        session.commit()
    return row.tenant


def get_current_tenant(
    session: SessionDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Tenant:
    tenant = tenant_for_key(session, creds.credentials if creds else None)
    if tenant is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing, unknown or revoked API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


def get_dashboard_tenant(request: Request, session: SessionDep) -> Tenant | None:
    header = request.headers.get("authorization", "")
    key = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(DASHBOARD_COOKIE)
    return tenant_for_key(session, key)


DashboardTenant = Annotated[Tenant | None, Depends(get_dashboard_tenant)]
