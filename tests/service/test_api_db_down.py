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
    env = {**os.environ, "DATABASE_URL": url, "DB_RETRY_AFTER_S": "7", "DB_PING_IDLE_S": str(PING_IDLE_S)}
    log = service.home / f"api-proxy-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
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


def test_connections_broken_while_idle_are_replaced_before_use(service, make_key, api_behind_proxy):
    """Pooled connections are not pinged while in steady use (DB_PING_IDLE_S), but one that broke while idle
    (the database restarted, the network cut them) is checked and replaced: no request fails for it."""
    import httpx

    url, proxy = api_behind_proxy
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {make_key()}"}, timeout=30) as c:
        for _ in range(3):
            assert c.get("/v1/jobs").status_code == 200  # the pool holds connections now
        proxy.cut()  # every open connection breaks
        proxy.restore()  # and the database is back at once
        time.sleep(PING_IDLE_S + 0.5)  # idle for longer than the bound: checked before use
        for path in ("/v1/jobs", "/v1/jobs?limit=5", "/v1/metrics/summary"):
            r = c.get(path)
            assert r.status_code == 200, (path, r.status_code, r.text)
        r = c.post("/v1/jobs", json=service.job_body(model="someorg/idle"))
        assert r.status_code == 202, r.text
