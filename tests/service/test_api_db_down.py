"""The database down gives 503 with Retry-After on every route, and the API recovers when it returns.

The shared Postgres is never stopped: a TCP proxy in front of it (this test's own) is cut and restored, and a
separate uvicorn process reaches the database only through that proxy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from urllib.parse import urlparse

import pytest

from tests.service.conftest import free_port
from tests.service.tcp_proxy import TcpProxy

pytestmark = pytest.mark.services
PING_IDLE_S = 1.0


@pytest.fixture
def api_behind_proxy(service):
    db_url = os.environ["DATABASE_URL"]  # this run's database (set by the package's service_env fixture)
    pg = urlparse(db_url)
    proxy = TcpProxy((pg.hostname or "127.0.0.1", pg.port or 5432))
    proxy.restore()
    url = db_url.replace(pg.netloc, f"{pg.username + '@' if pg.username else ''}127.0.0.1:{proxy.port}")
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "DB_RETRY_AFTER_S": "7"}
    log = service.home / f"api-proxy-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", proxy
    finally:
        proxy.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_database_down_is_503_with_retry_after_everywhere(service, make_key, api_behind_proxy):
    import httpx

    url, proxy = api_behind_proxy
    key = make_key()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        job = c.post("/v1/jobs", json=service.job_body(model="someorg/dbdown"))
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        c.post(f"/v1/jobs/{job_id}/cancel")  # the test's worker may have taken (and failed) it already
        assert c.get("/readyz").status_code == 200

        proxy.cut()
        requests = [
            ("GET", "/v1/jobs", {}),
            ("POST", "/v1/jobs", {"json": service.job_body(model="someorg/dbdown2")}),
            ("GET", f"/v1/jobs/{job_id}", {}),
            ("GET", f"/v1/jobs/{job_id}/logs", {}),
            ("GET", f"/v1/jobs/{job_id}/layers", {}),
            ("GET", f"/v1/jobs/{job_id}/events", {}),
            ("GET", f"/v1/jobs/{job_id}/artifacts", {}),
            ("GET", f"/v1/jobs/{job_id}/artifacts/art_x/files/config.json", {}),
            ("POST", f"/v1/jobs/{job_id}/cancel", {}),
            ("POST", f"/v1/jobs/{job_id}/retry", {}),
            ("POST", "/v1/calibration-sets", {"files": {"file": ("a.txt", b"some text\n")}}),
            ("GET", "/v1/metrics/summary", {}),
            ("GET", f"/v1/jobs/{job_id}/metrics", {}),
            # the dashboard's sign-in needs the database (its page alone does not)
            ("POST", "/dashboard/login", {"data": {"key": key}, "headers": {"Origin": url}}),
        ]
        for method, path, kw in requests:
            r = c.request(method, path, **kw)
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            assert r.headers["Retry-After"] == "7", (method, path)
            assert "database" in r.json()["detail"], (method, path)
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"] == "7"
        assert ready.json()["checks"]["database"].startswith("unreachable")
        assert c.get("/healthz").status_code == 200  # the process itself is alive

        proxy.restore()
        deadline = time.monotonic() + 30
        while (r := c.get(f"/v1/jobs/{job_id}")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert r.status_code == 200 and r.json()["id"] == job_id, r.text
        assert c.get("/readyz").status_code == 200


@pytest.mark.parametrize("idle_s", [PING_IDLE_S, 3600.0])
def test_connections_broken_while_idle_are_replaced_before_use(service, idle_s):
    """Pooled connections are not pinged while in steady use (DB_PING_IDLE_S), but one that broke while idle
    for longer (the database restarted, the network cut it) is checked and replaced before use. The second
    case shows what the check is for: a connection used again within the bound is not checked."""
    from sqlalchemy import exc, text

    from app.core.db import make_engine

    db_url = os.environ["DATABASE_URL"]
    pg = urlparse(db_url)
    proxy = TcpProxy((pg.hostname or "127.0.0.1", pg.port or 5432))
    engine = make_engine(
        db_url.replace(pg.netloc, f"{pg.username + '@' if pg.username else ''}127.0.0.1:{proxy.port}"),
        ping_idle_s=idle_s,
    )
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        proxy.cut()  # the pooled connection breaks
        proxy.restore()  # and the database is back at once
        time.sleep(PING_IDLE_S + 0.5)
        if idle_s == PING_IDLE_S:  # idle for longer than the bound: replaced before use
            with engine.connect() as conn:
                assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != first
        else:  # within the bound: used as it is, and its failure says the connection is gone
            with pytest.raises(exc.OperationalError), engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
        proxy.close()
