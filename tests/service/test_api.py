"""API behaviour that does not need a job to run: validation, auth, tenants, idempotency, limits, uploads."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.services


@pytest.fixture
def unserved_queue(monkeypatch) -> dict:
    """Job-body overrides that send a job to a queue class no worker consumes, so that it stays queued until
    the test cancels it: the package's worker was started on the configured classes, and while this fixture
    holds, the API knows one class only, `held`, that no worker listens on. No timing between processes."""
    from app.core.config import settings

    monkeypatch.setattr(settings, "QUEUE_CLASSES", "held=1TiB")
    monkeypatch.setattr(settings, "DEFAULT_QUEUE", "held")
    return {"device": "auto"}


def _fields(resp) -> dict[str, str]:
    assert resp.status_code == 422, resp.text
    return {e["field"]: e["reason"] for e in resp.json()["detail"]}


def test_health_and_ready(service):
    with service.client(None) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        icon = c.get("/favicon.ico")  # browsers ask every site for it: an icon, not a 404
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
        assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"database": "ok", "broker": "ok"}
        spec = c.get("/v1/openapi.json").json()
        body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
        assert body["examples"], "POST /v1/jobs has examples"
        upload = spec["paths"]["/v1/calibration-sets"]["post"]["requestBody"]["content"][
            "multipart/form-data"
        ]
        assert upload["examples"]


def test_readyz_is_503_when_a_dependency_is_down(service, monkeypatch):
    from app.api.routes import health

    def down() -> None:
        raise ConnectionError("refused")

    monkeypatch.setattr(health, "check_broker", down)
    with service.client(None) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"] == {
            "database": "ok",
            "broker": "unreachable: ConnectionError",
        }
        assert c.get("/healthz").status_code == 200


def test_auth_required_and_revoked_keys(service, make_key):
    from app.cli import keys_command
    from app.core.config import settings

    with service.client(None) as c:
        assert c.get("/v1/jobs").status_code == 401
    with service.client("awqf_nope_nope") as c:
        assert c.get("/v1/jobs").status_code == 401
    key = make_key()
    with service.client(key) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert c.get("/v1/jobs").status_code == 200  # answered from the key cache
        assert keys_command(["revoke", key.split("_")[1]]) == 0  # the database only, as another process would
        # A revoked key changes nothing at once: every method but GET/HEAD asks the database.
        r = c.post("/v1/jobs", json=service.job_body())
        assert r.status_code == 401 and "revoked" in r.text
        # A read may be answered from the key cache for at most API_KEY_CACHE_S after the revocation.
        time.sleep(settings.API_KEY_CACHE_S)
        assert c.get("/v1/jobs").status_code == 401
        assert c.get("/v1/jobs").status_code == 401


def test_key_cache_answers_only_what_the_database_accepted(service, make_key, db_session):
    """The cache keeps a key's tenant only after the database accepted that very key: a wrong secret with a
    cached key's id is refused, and a revoked key is forgotten when it is next checked."""
    from app.api.deps import cached_tenant, tenant_for_key
    from app.models import ApiKey, utcnow

    key = make_key()
    wrong = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")
    assert cached_tenant(key) is None
    with service.client(key) as c:
        assert c.get("/v1/jobs").status_code == 200
    cached = cached_tenant(key)
    assert cached is not None and cached.id == tenant_for_key(db_session, key).id
    assert cached_tenant(wrong) is None
    with service.client(wrong) as c:
        assert c.get("/v1/jobs").status_code == 401
    db_session.get(ApiKey, key.split("_")[1]).revoked_at = utcnow()
    db_session.commit()
    assert tenant_for_key(db_session, key) is None
    assert cached_tenant(key) is None  # the refusal dropped it: no read is answered from it any more
    with service.client(key) as c:
        assert c.get("/v1/jobs").status_code == 401


def test_validation_errors_name_field_and_reason(service, make_key):
    with service.client(make_key()) as c:
        f = _fields(c.post("/v1/jobs", json=service.job_body(bits=5, group_size=48)))
        assert "bits must be one of" in f["bits"] and "group_size must be one of" in f["group_size"]
        f = _fields(c.post("/v1/jobs", json=service.job_body(bits=3)))
        assert "4-bit only" in f["formats"]
        f = _fields(c.post("/v1/jobs", json=service.job_body(model="not a model id!")))
        assert "not a valid Hugging Face model id" in f["model"]
        f = _fields(c.post("/v1/jobs", json=service.job_body(model="/etc")))
        assert "local paths are not allowed" in f["model"]
        f = _fields(c.post("/v1/jobs", json=service.job_body(calibration={"source": "file:/etc/passwd"})))
        assert "local paths are not allowed" in f["calibration.source"]
        f = _fields(
            c.post("/v1/jobs", json=service.job_body(calibration={"source": "nonsense", "n_samples": 0}))
        )
        assert "not understood" in f["calibration.source"] and "calibration.n_samples" in f
        f = _fields(c.post("/v1/jobs", json=service.job_body(calibration={"upload_id": "cal_missing"})))
        assert "not found" in f["calibration.upload_id"]
        f = _fields(c.post("/v1/jobs", json={**service.job_body(), "method": "gptq", "surprise": 1}))
        assert "awq" in f["method"] and "surprise" in f
        f = _fields(c.post("/v1/jobs", json=service.job_body(rounding="stochastic")))
        assert "nearest" in f["rounding"] and "gptq" in f["rounding"]
        f = _fields(c.post("/v1/jobs", json=service.job_body(publish={"repo_id": "noslash"})))
        assert "owner/name" in f["publish.repo_id"]


def test_tenant_isolation(service, make_key, db_session, unserved_queue):
    from app.models import Job

    a, b = make_key(), make_key()
    with service.client(a) as ca, service.client(b) as cb:
        up = ca.post("/v1/calibration-sets", files={"file": ("c.txt", b"some text\n\nmore text\n")})
        assert up.status_code == 201, up.text
        # A job no worker can take, cancelled at once; the row is what matters here.
        job = ca.post(
            "/v1/jobs",
            json=service.job_body(
                model="someorg/somemodel", calibration={"upload_id": up.json()["id"]}, **unserved_queue
            ),
        )
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        ca.post(f"/v1/jobs/{job_id}/cancel")
        for path in (
            f"/v1/jobs/{job_id}",
            f"/v1/jobs/{job_id}/logs",
            f"/v1/jobs/{job_id}/artifacts",
            f"/v1/jobs/{job_id}/events",
            f"/v1/jobs/{job_id}/layers",
            f"/v1/jobs/{job_id}/artifacts/art_x/files/config.json",
        ):
            assert cb.get(path).status_code == 404, path
        assert cb.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert cb.post(f"/v1/jobs/{job_id}/retry").status_code == 404
        assert job_id not in [j["id"] for j in cb.get("/v1/jobs").json()["data"]]
        assert job_id in [j["id"] for j in ca.get("/v1/jobs").json()["data"]]
        # B cannot use A's upload either.
        f = _fields(cb.post("/v1/jobs", json=service.job_body(calibration={"upload_id": up.json()["id"]})))
        assert "not found" in f["calibration.upload_id"]
    assert db_session.get(Job, job_id).tenant_id is not None


def test_idempotency_key(service, make_key, db_session, unserved_queue):
    from app.models import IdempotencyKey

    with service.client(make_key()) as c:
        body = service.job_body(model="someorg/idem", **unserved_queue)
        r1 = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
        r2 = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
        assert r1.status_code == r2.status_code == 202
        assert r1.json()["id"] == r2.json()["id"] and r2.headers["Idempotent-Replayed"] == "true"
        assert r1.headers["Location"] == f"/v1/jobs/{r1.json()['id']}"
        f = _fields(
            c.post(
                "/v1/jobs",
                json={**body, "bits": 8, "formats": ["compressed-tensors"]},
                headers={"Idempotency-Key": "abc-1"},
            )
        )
        assert "different request body" in f["Idempotency-Key"]
        r3 = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-2"})
        assert r3.json()["id"] != r1.json()["id"]
        for r in (r1, r3):
            c.post(f"/v1/jobs/{r.json()['id']}/cancel")
    row = db_session.query(IdempotencyKey).filter_by(key="abc-1").one()
    assert (row.expires_at - row.created_at).total_seconds() >= 24 * 3600


def test_per_tenant_queue_limit(service, make_key, db_session):
    from app.core.db import session_scope
    from app.models import ApiKey, Job

    key = make_key(max_queued=2)
    tenant_id = db_session.get(ApiKey, key.split("_")[1]).tenant_id
    with session_scope() as s:  # two unfinished jobs that no worker will see
        for _ in range(2):
            s.add(
                Job(
                    tenant_id=tenant_id,
                    model="x/y",
                    method="awq",
                    bits=4,
                    group_size=128,
                    spec={},
                    queue="cpu",
                    status="queued",
                    progress=0.0,
                    attempts=0,
                    cancel_requested=False,
                )
            )
    with service.client(key) as c:
        r = c.post("/v1/jobs", json=service.job_body())
        assert r.status_code == 429, r.text
        assert "limit is 2" in r.json()["detail"]


def test_list_filters_and_cursor_pagination(service, make_key, unserved_queue):
    with service.client(make_key()) as c:
        ids = []
        for i in range(5):
            r = c.post("/v1/jobs", json=service.job_body(model=f"someorg/m{i % 2}", **unserved_queue))
            assert r.status_code == 202 and r.json()["queue"] == "held", r.text
            ids.append(r.json()["id"])
            # no worker consumes `held`: the job is still queued, and the cancel ends it at once
            assert c.post(f"/v1/jobs/{ids[-1]}/cancel").json()["status"] == "cancelled"
        seen, cursor = [], None
        while True:
            page = c.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [j["id"] for j in page["data"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == list(reversed(ids))
        only = c.get("/v1/jobs", params={"model": "someorg/m1"}).json()["data"]
        assert {j["model"] for j in only} == {"someorg/m1"} and len(only) == 2
        assert len(c.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]) == 5
        assert c.get("/v1/jobs", params={"status": "running"}).json()["data"] == []
        assert c.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
        assert c.get("/v1/jobs", params={"cursor": "!!"}).status_code == 422


def test_calibration_upload_validation(service, make_key):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    with service.client(make_key()) as c:
        ok = c.post(
            "/v1/calibration-sets", files={"file": ("a.jsonl", b'{"text": "one"}\n{"text": "two"}\n')}
        )
        assert ok.status_code == 201 and ok.json()["n_records"] == 2
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": ["a", "b", "c"]}), buf)
        pqr = c.post("/v1/calibration-sets", files={"file": ("a.parquet", buf.getvalue())})
        assert pqr.status_code == 201 and pqr.json()["n_records"] == 3
        bad = c.post("/v1/calibration-sets", files={"file": ("a.jsonl", b'{"txt": 1}\n')})
        assert bad.status_code == 422 and '"text"' in bad.json()["detail"]
        assert c.post("/v1/calibration-sets", files={"file": ("a.exe", b"MZ")}).status_code == 422
        assert c.post("/v1/calibration-sets", files={"file": ("a.txt", b"\xff\xfe\x00")}).status_code == 422
        big = c.post("/v1/calibration-sets", files={"file": ("big.txt", b"x" * (300 * 1024))})
        assert big.status_code == 413
        assert (
            c.post("/v1/calibration-sets", files={"file": ("../../evil.txt", b"hi")}).json()["filename"]
            == "evil.txt"
        )


def test_demo_follow_says_still_working_at_its_stated_interval(capsys):
    """The demo's follower prints "still working" every quiet_s seconds of silence from a timer, not when the
    stream's next keep-alive happens to arrive (those come every 15 s: a 20 s interval became 30 s)."""
    import httpx

    from app.demo import _follow

    def body():
        yield b'event: progress\ndata: {"stage": "evaluate", "progress": 0.5, "message": "FP pass"}\n\n'
        time.sleep(2.6)  # a quiet step: nothing, not even a keep-alive
        yield b"event: end\ndata: {}\n\n"

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body()))
    with httpx.Client(transport=transport, base_url="http://demo") as client:
        _follow(client, "job_x", quiet_s=1.0)
    lines = capsys.readouterr().out.splitlines()
    quiet = [line for line in lines if "still working" in line]
    assert lines[0].startswith("[ 50.0%] evaluate  FP pass") and 2 <= len(quiet) <= 3, lines
    assert all("(1 s since the last step)" in line for line in quiet), quiet
