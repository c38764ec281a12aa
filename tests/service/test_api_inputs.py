"""Bad input never gives a 500: each value the API could not hold or should not trust gets a 4xx with a reason,
and what can only fail late (repo id, seed, paths, upload content) is refused at submit."""

from __future__ import annotations

import io
import json
import os

import pytest

pytestmark = pytest.mark.services


def _reasons(resp, status: int = 422) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, list), detail
    return {e["field"]: e["reason"] for e in detail}


def _raw_post(client, body: str):
    """A JSON body as raw text, so that escapes such as a lone surrogate reach the server as written."""
    return client.post("/v1/jobs", content=body.encode(), headers={"Content-Type": "application/json"})


BAD_BODIES = {
    "revision over 200 characters": ({"revision": "r" * 201}, "revision"),
    "model path over 500 characters": ({"model": "/" + "a/" * 260}, "model"),
    "model path with a 300-character part": ({"model": "/models/" + "a" * 300}, "model"),
    "NUL in a model path": ({"model": "/models/a\x00b"}, "model"),
    "NUL in a hub id": ({"model": "org/na\x00me"}, "model"),
    "NUL in the revision": ({"revision": "main\x00"}, "revision"),
    "NUL in a calibration file path": ({"calibration": {"source": "file:/tmp/a\x00b"}}, "calibration.source"),
    "NUL in eval text": ({"eval": {"text": "file:/tmp/\x00"}}, "eval.text"),
    "NUL in a module pattern": ({"modules_to_not_convert": ["mlp\x00"]}, "modules_to_not_convert.0"),
    "seed 2**64": ({"seed": 2**64}, "seed"),
    "negative seed": ({"seed": -1}, "seed"),
    "repo id ../../escape": ({"publish": {"repo_id": "../../escape"}}, "publish.repo_id"),
    "repo id ./a/b": ({"publish": {"repo_id": "./a/b"}}, "publish.repo_id"),
    "repo id /abs/path": ({"publish": {"repo_id": "/tmp/x"}}, "publish.repo_id"),
    "too many module patterns": ({"modules_to_not_convert": ["x"] * 300}, "modules_to_not_convert"),
    "eval text a bare absolute path": ({"eval": {"text": "/etc/passwd"}}, "eval.text"),
    "eval text a relative path": ({"eval": {"text": "../../../../etc/passwd"}}, "eval.text"),
    "eval text file: outside the roots": ({"eval": {"text": "file:/etc/passwd"}}, "eval.text"),
    "eval text file: .. escaping the roots": (
        {"eval": {"text": "file:../../../../../../../../etc/passwd"}},
        "eval.text",
    ),
    "max_seqs huge": ({"eval": {"max_seqs": 10**12}}, "eval.max_seqs"),
    "negative search_screen": ({"search_screen": -1}, "search_screen"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_job_fields_are_422_with_the_field(service, make_key, case):
    overrides, field = BAD_BODIES[case]
    with service.client(make_key()) as c:
        reasons = _reasons(c.post("/v1/jobs", json=service.job_body(**overrides)))
        assert field in reasons, reasons
        assert reasons[field]


def test_lone_surrogates_are_422(service, make_key):
    with service.client(make_key()) as c:
        base = service.job_body()
        for field, raw in (("model", '"org/\\ud800x"'), ("revision", '"\\udfff"')):
            text = json.dumps({**base, field: "PLACEHOLDER"}).replace('"PLACEHOLDER"', raw)
            reasons = _reasons(_raw_post(c, text))
            assert "unicode" in reasons[field].lower(), reasons
        text = json.dumps({**base, "publish": {"repo_id": "PLACEHOLDER"}}).replace(
            '"PLACEHOLDER"', '"a/\\ud800"'
        )
        assert "publish.repo_id" in _reasons(_raw_post(c, text))


def test_nul_and_bad_ids_in_paths_headers_and_queries(service, make_key):
    with service.client(make_key()) as c:
        for path in ("/v1/jobs/%00", "/v1/jobs/a%00b/logs", "/v1/jobs/" + "x" * 300, "/v1/jobs/%00/events"):
            r = c.get(path)
            assert r.status_code == 422, (path, r.text)
            assert r.json()["detail"][0]["field"] == "job_id"
        assert c.post("/v1/jobs/%00/cancel").status_code == 422
        assert c.get("/v1/jobs/job_x/artifacts/%00/files/a").status_code == 422
        assert c.get("/v1/jobs", params={"model": "a\x00b"}).status_code == 422
        assert c.get("/v1/jobs", params={"cursor": "x" * 500}).status_code == 422
        import base64

        nul_cursor = base64.urlsafe_b64encode(b"2024-01-01T00:00:00|job\x00").decode()
        assert c.get("/v1/jobs", params={"cursor": nul_cursor}).status_code == 422
        r = c.post("/v1/jobs", json=service.job_body(), headers={"Idempotency-Key": "k" * 201})
        assert "Idempotency-Key" in _reasons(r)


def test_last_event_id_out_of_range_is_422(service, make_key):
    key = make_key()
    with service.client(key) as c:
        job = c.post("/v1/jobs", json=service.job_body(model="someorg/events")).json()
        c.post(f"/v1/jobs/{job['id']}/cancel")
        for bad in ("99999999999999999999999", "9223372036854775808", "-1", "abc"):
            r = c.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": bad})
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["detail"][0]["field"] == "Last-Event-ID"
        # the largest id the table can hold is fine: the (cancelled) job's stream just ends
        r = c.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": str(2**63 - 1)})
        assert r.status_code == 200 and "event: end" in r.text


def test_huge_values_are_not_echoed_back(service, make_key):
    with service.client(make_key()) as c:
        r = c.post("/v1/jobs", json=service.job_body(model="m" * 1_000_000))
        assert r.status_code == 422
        assert len(r.content) < 2000, len(r.content)
        r = c.post("/v1/jobs", json=service.job_body(model="o/" + "m" * 400))
        assert r.status_code == 422 and len(r.content) < 2000
        r = c.post("/v1/jobs", json=service.job_body(calibration={"source": "nonsense" * 100}))
        assert r.status_code == 422 and len(r.content) < 2000


def test_request_body_limit_is_413(service, make_key):
    with service.client(make_key()) as c:
        body = service.job_body(modules_to_not_convert=[f"layer.{i}" for i in range(100_000)])
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced on the streamed body
            yield b'{"model": "' + b"a" * (900 * 1024)
            yield b"b" * (900 * 1024) + b'"}'

        r = c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text


def test_hub_id_shaped_model_is_never_looked_up_on_disk(service, make_key, tmp_path, monkeypatch):
    """'tests/service' is a folder relative to the test's working directory, and a well-formed hub id:
    it is sent as a hub id, so that the worker would ask the hub, never read its own disk."""
    from awqforge.resolve import is_local_reference

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert os.path.isdir("tests/service") and not is_local_reference("tests/service")
    with service.client(make_key()) as c:
        r = c.post("/v1/jobs", json=service.job_body(model="tests/service"))
        assert r.status_code == 202, r.text
        assert r.json()["spec"]["model"] == "tests/service"
        c.post(f"/v1/jobs/{r.json()['id']}/cancel")


def test_symlink_out_of_the_roots_is_refused(service, make_key, tmp_path):
    link = service.home / "models" / "escape-link"
    if not link.exists():
        link.symlink_to("/etc")
    with service.client(make_key()) as c:
        for body in (
            service.job_body(model=str(link)),
            service.job_body(calibration={"source": f"file:{link}/passwd"}),
            service.job_body(eval={"text": f"file:{service.home}/models/../../../etc/passwd"}),
        ):
            reasons = _reasons(c.post("/v1/jobs", json=body))
            (reason,) = reasons.values()
            assert "not allowed" in reason and "/etc" not in reason


def test_uploads_random_bytes_and_empty_parquet_are_422(service, make_key):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rnd = bytes(range(256)) * 40 + os.urandom(4096)
    with service.client(make_key()) as c:
        for name in ("r.jsonl", "r.txt", "r.parquet"):
            r = c.post("/v1/calibration-sets", files={"file": (name, rnd)})
            assert r.status_code == 422, (name, r.text)
            assert isinstance(r.json()["detail"], str)
        for table in (
            pa.table({"text": pa.array([None, None, None], type=pa.string())}),
            pa.table({"text": ["", "  ", None]}),
        ):
            buf = io.BytesIO()
            pq.write_table(table, buf)
            r = c.post("/v1/calibration-sets", files={"file": ("null.parquet", buf.getvalue())})
            assert r.status_code == 422 and "no text" in r.json()["detail"], r.text
        # a name with NUL and control characters is stored, cleaned
        r = c.post("/v1/calibration-sets", files={"file": ("a\x00b\x07.txt", b"some text\n")})
        assert r.status_code == 201 and r.json()["filename"].endswith(".txt"), r.text
        assert "\x00" not in r.json()["filename"]
    from app.services.uploads import _safe_filename

    assert _safe_filename("../x/a\x00b\x07\ud800.txt") == "ab?.txt"


def test_openapi_documents_limits_and_errors(service):
    with service.client(None) as c:
        doc = c.get("/v1/openapi.json").json()
    comp = doc["components"]["schemas"]
    job = comp["JobCreate"]["properties"]
    assert job["model"]["maxLength"] == 500
    assert job["revision"]["anyOf"][0]["maxLength"] == 200
    assert job["seed"]["anyOf"][0]["maximum"] == 2**32 - 1
    assert job["modules_to_not_convert"]["maxItems"] == 256
    assert job["bits"]["enum"] == [2, 3, 4, 8]
    assert comp["PublishSpec"]["properties"]["repo_id"]["maxLength"] == 193
    for path, ops in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in ops.items():
            for code in ("413", "422", "503"):
                assert code in op["responses"], (method, path, code)
            assert "HTTPValidationError" not in json.dumps(op["responses"]), (method, path)
    # the same limits as the engine's JobSpec: one declaration
    from awqforge.spec import JobSpec

    engine = JobSpec.model_json_schema()
    assert engine["properties"]["model"]["maxLength"] == job["model"]["maxLength"]


def test_worker_refuses_paths_outside_the_roots(service, make_key, db_session):
    """A spec that reached the database without the API's checks (an old row, a direct insert) is refused
    by the worker through the same resolver, with a message that shows nothing of its disk."""
    from app.core.db import session_scope
    from app.models import ApiKey, Job
    from app.services.jobs import send_job
    from tests.service.conftest import wait_for_status

    key = make_key()
    tenant_id = db_session.get(ApiKey, key.split("_")[1]).tenant_id
    base = {
        "model": str(service.model_dir),
        "quant": {"bits": 4, "group_size": 32},
        "calibration": {"source": f"file:{service.calib_file}", "n_samples": 4, "seq_len": 32},
        "eval": {"seq_len": 32, "max_seqs": 2},
        "n_grid": 4,
        "device": "cpu",
    }
    specs = [
        {**base, "eval": {"text": "file:/etc/passwd", "seq_len": 32}},
        {**base, "calibration": {"source": "file:/etc/hostname", "n_samples": 4, "seq_len": 32}},
        {**base, "model": f"{service.home}/../../../usr"},
    ]
    ids = []
    with session_scope() as s:
        for spec in specs:
            job = Job(
                tenant_id=tenant_id,
                model=spec["model"],
                method="awq",
                bits=4,
                group_size=32,
                spec=spec,
                queue="cpu",
                status="queued",
                progress=0.0,
                attempts=0,
                cancel_requested=False,
            )
            s.add(job)
            s.flush()
            ids.append(job.id)
    with session_scope() as s:
        for job_id in ids:
            send_job(s.get(Job, job_id))
    with service.client(key) as c:
        for job_id in ids:
            job = wait_for_status(c, job_id, ("failed", "succeeded"), timeout=120)
            assert job["status"] == "failed" and "not allowed" in job["error"], job
            for leak in ("/etc", "/usr", "passwd", "hostname"):
                assert leak not in job["error"], job["error"]


# -- modules_to_not_convert against the checkpoint's tensor names, at submit ---------------------------------


def _accepted(c, body) -> dict:
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    c.post(f"/v1/jobs/{r.json()['id']}/cancel")
    return r.json()


def test_module_pattern_matching_no_module_is_422_for_a_local_checkpoint(service, make_key):
    with service.client(make_key()) as c:
        reasons = _reasons(
            c.post("/v1/jobs", json=service.job_body(modules_to_not_convert=["mlp.down_projj"]))
        )
        assert "'mlp.down_projj' matches no module" in reasons["modules_to_not_convert"], reasons
        reasons = _reasons(
            c.post("/v1/jobs", json=service.job_body(modules_to_not_convert=["lm_head", "model.layers.7.*"]))
        )
        assert reasons["modules_to_not_convert"].startswith("'model.layers.7.*' matches no module"), reasons
        for patterns in (
            ["model.layers.0.mlp.down_proj"],
            ["mlp.down_proj"],
            ["model.layers.1.*", "lm_head"],
        ):
            job = _accepted(c, service.job_body(modules_to_not_convert=patterns))
            assert job["spec"]["quant"]["modules_to_not_convert"] == patterns


@pytest.fixture
def hub_models(service, monkeypatch):
    """The tiny checkpoint on a local Hub server (tests/service/hub_server.py) as one file (its header read by
    HTTP Range) and as an index with one shard; the API pointed at it."""
    import uuid

    from app.core.config import settings

    from .hub_server import HubServer

    hub = HubServer().start()
    files = {p.name: p.read_bytes() for p in service.model_dir.iterdir() if p.is_file()}
    tag = uuid.uuid4().hex[:8]  # the API caches names per model id
    single, sharded = f"acme/tiny-{tag}", f"acme/tiny-sharded-{tag}"
    hub.add_repo(single, files)
    from safetensors import safe_open

    with safe_open(str(service.model_dir / "model.safetensors"), "np") as h:
        index = {"metadata": {}, "weight_map": dict.fromkeys(h.keys(), "model-00001-of-00001.safetensors")}
    shard_files = {k: v for k, v in files.items() if k != "model.safetensors"}
    shard_files["model-00001-of-00001.safetensors"] = files["model.safetensors"]
    shard_files["model.safetensors.index.json"] = json.dumps(index).encode()
    hub.add_repo(sharded, shard_files)
    monkeypatch.setattr(settings, "HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    try:
        yield hub, single, sharded
    finally:
        hub.stop()


def test_module_pattern_matching_no_module_is_422_for_a_hub_model(service, make_key, hub_models):
    hub, single, sharded = hub_models
    with service.client(make_key()) as c:
        for repo in (single, sharded):
            body = service.job_body(model=repo, modules_to_not_convert=["self_attn.qq_proj"])
            reasons = _reasons(c.post("/v1/jobs", json=body))
            assert "'self_attn.qq_proj' matches no module" in reasons["modules_to_not_convert"], (
                repo,
                reasons,
            )
            for patterns in (["model.layers.1.self_attn.q_proj"], ["self_attn.q_proj"]):
                _accepted(c, service.job_body(model=repo, modules_to_not_convert=patterns))
        # the single file's header came by Range, never the whole file
        assert hub.count("GET", rf"^/{single}/resolve/main/model\.safetensors$", 206) >= 1
        assert hub.count("GET", rf"^/{single}/resolve/main/model\.safetensors$", 200) == 0
        # names that cannot be had (no such repo here): accepted, the engine checks before any work
        _accepted(c, service.job_body(model="acme/not-on-this-hub", modules_to_not_convert=["anything"]))


def test_times_cursors_and_ids_at_their_edges_are_422(service, make_key):
    """Values that once reached arithmetic or the database unchecked (500) get a 422 naming the field."""
    import base64

    with service.client(make_key()) as c:
        for since in (
            "999999999d",
            "1000000w",
            "9" * 30 + "h",
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59-14:00",
        ):
            r = c.get("/v1/metrics/summary", params={"since": since})
            assert "since" in _reasons(r), since
        assert c.get("/v1/metrics/summary", params={"since": "36600d"}).status_code == 200
        for text in ("0001-01-01T00:00:00+14:00|x", "9999-12-31T23:59:59-14:00|x", "2024-01-01T00:00:00|a b"):
            cursor = base64.urlsafe_b64encode(text.encode()).decode()
            assert _reasons(c.get("/v1/jobs", params={"cursor": cursor}))["cursor"] == (
                "not a cursor returned by this API"
            )
        for path in ("/v1/jobs/a%20b/metrics", "/v1/jobs/" + "x" * 65 + "/metrics"):
            assert "job_id" in _reasons(c.get(path)), path
        for path in ("/v1/jobs/a%20b/publish", "/v1/jobs/%00/publish"):
            assert "job_id" in _reasons(c.post(path)), path
        # a well-formed id that is not there stays a 404, as on every other route
        assert c.get("/v1/jobs/job_missing/metrics").status_code == 404
        assert c.post("/v1/jobs/job_missing/publish").status_code == 404
