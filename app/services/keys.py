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


def _namespace_list(namespaces: list[str]) -> list[str]:
    from awqforge.spec import validate_model_ref

    out = []
    for ns in namespaces:
        ns = ns.strip()
        if not ns or "/" in ns:
            raise ValueError(f"namespace {ns!r}: give the owner part of 'owner/name' only")
        validate_model_ref(ns)  # the hub's characters
        out.append(ns)
    return list(dict.fromkeys(out))


def upsert_tenant(
    session: Session,
    *,
    name: str,
    create: bool,
    namespaces: list[str] | None = None,
    allow_service_token: bool | None = None,
    max_queued: int | None = None,
) -> Tenant:
    """Create (create=True, the name must be new) or update a tenant. `namespaces=None` leaves them as they
    are (a new tenant: its own name); a list replaces them."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if create and tenant is not None:
        raise ValueError(f"tenant {name!r} already exists (use update)")
    if not create and tenant is None:
        raise ValueError(f"no tenant {name!r}")
    if tenant is None:
        tenant = Tenant(name=name, allow_service_token=False)
        session.add(tenant)
    if namespaces is not None:
        tenant.hub_namespaces = _namespace_list(namespaces)
    if allow_service_token is not None:
        tenant.allow_service_token = allow_service_token
    if max_queued is not None:
        tenant.max_queued_jobs = max_queued
    session.flush()
    return tenant
