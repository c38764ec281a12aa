"""Alembic migrations of the service database, installed as awqforge.migrations (see app/core/db.py)."""
