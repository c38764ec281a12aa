"""Alembic migrations of the service database, installed as migrations (see app/core/db.py)."""
