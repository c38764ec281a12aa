"""Typed dependencies: route signatures read `session: SessionDep, tenant: CurrentTenant`."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, joinedload

from awqforge.app.core.db import get_db
from awqforge.app.core.security import key_matches, parse_key_id
from awqforge.app.models import ApiKey, DashboardSession, Tenant, utcnow
from awqforge.app.services.sessions import CSRF_HEADER, SESSION_COOKIE, find_session

bearer = HTTPBearer(auto_error=False, description="API key from `awqforge keys create --tenant NAME`")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


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
    request: Request,
    session: SessionDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant:
    if creds is not None:
        tenant = tenant_for_key(session, creds.credentials)
    else:
        # The dashboard's browser calls the same API with its session cookie; a cookie alone
        # must not be able to change anything (CSRF), so unsafe methods also need the session's token.
        row = find_session(session, request.cookies.get(SESSION_COOKIE))
        tenant = row.tenant if row is not None else None
        if row is not None and request.method not in _SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), row.csrf_token.encode()):
                raise HTTPException(status_code=403, detail=f"missing or wrong {CSRF_HEADER} header")
    if tenant is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing, unknown or revoked API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


def get_dashboard_session(request: Request, session: SessionDep) -> DashboardSession | None:
    return find_session(session, request.cookies.get(SESSION_COOKIE))


DashboardSessionDep = Annotated[DashboardSession | None, Depends(get_dashboard_session)]
