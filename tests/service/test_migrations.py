"""Alembic on a real Postgres: upgrade from empty, the schema matches the models, downgrade to base."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, inspect

from .conftest import PG_ADMIN_URL, services_available

pytestmark = pytest.mark.services

TABLES = {
    "tenants",
    "api_keys",
    "jobs",
    "job_events",
    "job_metrics",
    "layer_metrics",
    "artifacts",
    "idempotency_keys",
    "calibration_sets",
}


@pytest.fixture
def empty_database():
    if not services_available():
        pytest.skip("Postgres is needed")
    import psycopg

    name = f"awqf_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_upgrade_from_empty_then_downgrade_to_base(empty_database):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.core.db import alembic_config
    from app.models import Base

    cfg = alembic_config(empty_database)
    engine = create_engine(empty_database)
    try:
        command.upgrade(cfg, "head")
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:  # no drift between the models and the migrations
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        command.downgrade(cfg, "base")
        inspect(engine).clear_cache()
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        command.upgrade(cfg, "head")  # and back up again
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
