"""Dashboard sessions: an API key is exchanged once for an opaque random token (stored as its sha256)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from app.core.config import settings
from app.core.security import hash_key, parse_key_id
from app.models import DashboardSession, utcnow

SESSION_COOKIE = "awqforge_session"
CSRF_HEADER = "X-CSRF-Token"


@dataclass(frozen=True)
class NewSession:
    token: str  # goes into the cookie, never stored
    row: DashboardSession


def create_session(session: Session, *, key: str, tenant_id: int) -> NewSession:
    token = secrets.token_urlsafe(32)
    now = utcnow()
    row = DashboardSession(
        token_hash=hash_key(token),
        tenant_id=tenant_id,
        api_key_id=parse_key_id(key),
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + timedelta(hours=settings.DASHBOARD_SESSION_HOURS),
    )
    session.add(row)
    # Sign-in is a good moment to forget expired sessions.
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at < now))
    session.commit()
    return NewSession(token=token, row=row)


def find_session(session: Session, token: str | None) -> DashboardSession | None:
    """The live session for a cookie value: unexpired, and its API key not revoked."""
    if not token or len(token) > 200:
        return None
    row = session.get(DashboardSession, hash_key(token))
    if row is None or row.expires_at < utcnow() or row.api_key.revoked_at is not None:
        return None
    return row


def delete_session(session: Session, token: str | None) -> None:
    if token and len(token) <= 200:
        session.execute(delete(DashboardSession).where(DashboardSession.token_hash == hash_key(token)))
        session.commit()
