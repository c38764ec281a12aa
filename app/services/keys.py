"""Tenants and their API keys."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.security import NewApiKey, generate_api_key
from app.models import ApiKey, Tenant


def create_api_key(session: Session, *, tenant_name: str, max_queued: int | None = None) -> NewApiKey:
    """A new key for `tenant_name` (created if new). Only the hash is stored."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
    if max_queued is not None:
        tenant.max_queued_jobs = max_queued
    session.flush()
    key = generate_api_key()
    session.add(ApiKey(id=key.key_id, tenant_id=tenant.id, key_hash=key.key_hash))
    session.flush()
    return key
