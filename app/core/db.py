"""Engine, sessions and migrations. Schema changes happen only through Alembic (migrations/)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
log = logging.getLogger("awqforge.db")
T = TypeVar("T")


def make_engine(url: str, *, ping_idle_s: float | None = None, **kwargs) -> Engine:
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # API and worker processes share the file
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if "poolclass" in kwargs:
        return create_engine(url, **kwargs)
    engine = create_engine(url, pool_size=settings.DB_POOL_SIZE, max_overflow=10, **kwargs)
    _ping_when_idle(engine, settings.DB_PING_IDLE_S if ping_idle_s is None else ping_idle_s)
    return engine


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """pool_pre_ping, but only for a connection unused for more than idle_s: a ping is a round trip on
    every checkout, the largest share of a short request's. A connection that died since its last use
    (database restarted, network cut) is replaced before use; one checked in less than idle_s ago is used
    as it is (if it died meanwhile, that request fails as the database being unavailable, and the pool
    drops its other connections)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn, record) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy) -> None:
        last = record.info.get("checked_in_at")
        if last is None or time.monotonic() - last <= idle_s:
            return  # new, or in steady use
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            if not engine.dialect.is_disconnect(exc, dbapi_conn, None):
                raise
            raise DisconnectionError("connection lost while idle") from exc  # the pool takes a new one


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    return make_engine(settings.database_url)


def _forget_parent_connections() -> None:
    """In a forked child: never reuse the parent's pooled connections (their server-side state, such as
    psycopg's prepared statements, belongs to another process). close=False leaves the parent's
    sockets alone; the child opens its own on first use."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)


# A Celery prefork child (and any other fork) gets a fresh pool, whatever the parent touched.
os.register_at_fork(after_in_child=_forget_parent_connections)


@lru_cache(maxsize=1)
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def new_session() -> Session:
    """A session; it takes a pooled connection at its first statement, not before."""
    return _session_factory()()


def get_db() -> Iterator[Session]:
    with new_session() as session:
        yield session


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error (worker and CLI use)."""
    with _session_factory()() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def is_connection_error(exc: BaseException) -> bool:
    """The database is unreachable (restart, failover, network), as opposed to a bad statement."""
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def in_session_retrying(work: Callable[[Session], T], *, retry_for_s: float, what: str = "write") -> T:
    """session_scope() around work(session), run again while the database is unreachable, for up to
    retry_for_s seconds (then the last error is raised). `work` must be safe to repeat: each try is its
    own transaction, rolled back when it fails."""
    deadline = time.monotonic() + retry_for_s
    delay = 0.2
    while True:
        try:
            with session_scope() as s:
                return work(s)
        except Exception as exc:
            if not is_connection_error(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning(
                "database unreachable during %s (%s); retrying in %.1f s", what, type(exc).__name__, delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def alembic_config(url: str | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", (url or settings.database_url).replace("%", "%%"))
    return cfg


def run_migrations(url: str | None = None, revision: str = "head") -> None:
    """`alembic upgrade head` (the prestart step of `awqforge serve`)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def check_database() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))
