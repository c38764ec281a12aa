"""Task evaluation through the service (real API, Celery worker, Postgres, Redis): a job with lm-eval tasks,
its rows and summary, the FP score cache across jobs and tenants, and a job failing its quality gate with its
artifacts kept, published only with an explicit override."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import wait_for_status

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.services

TASK_NAMES = ("awqforge_mc", "awqforge_cloze")
TASKS = [{"name": n, "limit": 8} for n in TASK_NAMES]


def test_job_with_tasks_gate_and_override(service, make_key, db_session):
    from app.models import Job, TaskFPScore, TaskMetric

    key = make_key("acme")
    eval_spec = {
        "seq_len": 32,
        "max_seqs": 2,
        "tasks": TASKS,
        "prompts": ["The License"],
        "max_new_tokens": 4,
    }
    with service.client(key) as c:
        r = c.post("/v1/jobs", json=service.job_body(eval=eval_spec))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job = wait_for_status(c, job_id, ("succeeded", "failed", "cancelled"), timeout=300)
        assert job["status"] == "succeeded", job["error"]

        detail = c.get(f"/v1/jobs/{job_id}/metrics").json()
        tasks = {t["task"]: t for t in detail["tasks"]}
        assert set(tasks) == {"awqforge_mc", "awqforge_cloze"}
        for t in tasks.values():
            assert t["metric"] == "acc" and t["n_samples"] == 8 and t["fp_cached"] is False
            assert t["fp"] is None or t["fp"] == 0 or t["recovery"] == pytest.approx(t["quantized"] / t["fp"])
        logs = c.get(f"/v1/jobs/{job_id}/logs").text
        assert "task awqforge_cloze: FP acc" in logs and "task awqforge_cloze: quantized acc" in logs

        # the report and the card carry the table and the generations
        arts = c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        awq = next(a for a in arts if a["format"] == "awq")
        report = c.get(next(f["url"] for f in awq["files"] if f["path"] == "quant_report.json")).json()
        assert [t["task"] for t in report["evaluation"]["tasks"]] == ["awqforge_mc", "awqforge_cloze"]
        assert report["evaluation"]["generations"][0]["prompt"] == "The License"
        card = c.get(next(f["url"] for f in awq["files"] if f["path"] == "README.md")).text
        assert "| task | metric | FP | quantized | recovery |" in card

        summary = c.get("/v1/metrics/summary").json()["task_recovery"]
        assert summary["n"] >= 1 and set(summary["by_task"]) >= {"awqforge_mc"}

    # The FP scores were stored (a local model: this tenant's scope only)...
    db_session.expire_all()
    stored = db_session.query(TaskFPScore).all()
    assert {s.task for s in stored} >= {"awqforge_mc", "awqforge_cloze"}
    assert all(s.scope.startswith("tenant:") for s in stored)

    # ... and a later job of the same tenant reuses them; its gate cannot be met: failed, artifacts kept.
    # Submitted with the client (`awqforge submit --eval-task ... --wait`): it ends with the task table.
    gated = {"seq_len": 32, "max_seqs": 2, "prompts": [], "gate": {"min_recovery": 5.0}}
    body = service.job_body()
    env = {**os.environ, "AWQFORGE_URL": service.url, "AWQFORGE_API_KEY": key}
    run = (
        "import sys; from awqforge.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'the client imported torch'; sys.exit(rc)"
    )
    r = subprocess.run(
        [sys.executable, "-c", run, "submit", body["model"], "--group-size", "32", "--format", "awq",
         "--calibration", body["calibration"]["source"], "--n-samples", "4", "--seq-len", "32",
         "--device", "cpu", f"--set=eval={json.dumps(gated)}", "--set=n_grid=4",
         '--set=publish={"repo_id": "acme/tiny-gated", "private": true}',
         "--eval-task", "awqforge_mc", "--eval-task", "awqforge_cloze", "--eval-limit", "8", "--wait"],
        capture_output=True, text=True, env=env, timeout=400,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    job_id2 = r.stdout.split()[0]
    table = r.stdout[r.stdout.index("task ") :].splitlines()
    assert table[0].split() == ["task", "metric", "FP", "quantized", "recovery"]
    assert [line.split()[0] for line in table[1:3]] == ["awqforge_mc", "awqforge_cloze"]
    assert "quality gate not met" in r.stderr
    with service.client(key) as c:
        job2 = c.get(f"/v1/jobs/{job_id2}").json()
        assert job2["status"] == "failed" and job2["stage"] == "gate"
        assert "quality gate not met: task awqforge_" in job2["error"] and "recovery" in job2["error"]
        assert "FP" in job2["error"] and "artifacts kept" in job2["error"]
        assert {a["format"] for a in job2["artifacts"]} >= {"awq"}
        arts = c.get(f"/v1/jobs/{job_id2}/artifacts").json()["data"]
        cfg = next(f for f in arts[0]["files"] if f["path"] == "config.json")
        assert c.get(cfg["url"]).status_code == 200  # downloadable
        detail = c.get(f"/v1/jobs/{job_id2}/metrics").json()
        assert detail["tasks"] and all(t["fp_cached"] for t in detail["tasks"])
        hub = service.home / "hub" / "acme" / "tiny-gated"
        assert not hub.exists()  # not published

        # publishing needs the explicit override; with it the job publishes and its card says so
        refused = c.post(f"/v1/jobs/{job_id2}/publish", json={})
        assert refused.status_code == 409 and "override_gate" in refused.json()["detail"]
        r = c.post(f"/v1/jobs/{job_id2}/publish", json={"override_gate": True})
        assert r.status_code == 202, r.text
        job2 = wait_for_status(c, job_id2, ("succeeded", "failed", "cancelled"), timeout=120)
        assert job2["status"] == "succeeded", job2["error"]
    published = next(hub.rglob("README.md")).read_text()
    assert "did not pass its quality gate" in published
    db_session.expire_all()
    assert db_session.query(TaskMetric).filter(TaskMetric.job_id == job_id2).count() == 2
    assert db_session.get(Job, job_id2).status == "succeeded"


def test_submit_checks_task_names(service, make_key):
    key = make_key()
    with service.client(key) as c:
        for name, field in (
            ("no_such_task_xyz", "eval.tasks.0.name"),
            ("/etc/awqforge-tasks", "eval.tasks.0.name"),  # outside the allowed folders
        ):
            # an unknown name is looked up in lm-eval's full task index: built once, slow on a loaded machine
            r = c.post("/v1/jobs", json=service.job_body(eval={"tasks": [{"name": name}]}), timeout=300)
            assert r.status_code == 422, r.text
            assert field in r.text, r.text
        r = c.post("/v1/jobs", json=service.job_body(eval={"tasks": [{"name": "awqforge_mc", "limit": 0}]}))
        assert r.status_code == 422 and "eval.tasks.0.limit" in r.text


def test_without_lm_eval_tasks_are_refused_and_the_api_imports_no_torch():
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"  # as if lm-eval were not installed
        "import app.main\n"
        "from app.services.eval_tasks import check_eval_tasks\n"
        "from awqforge.spec import EvalTaskSpec\n"
        "errs = check_eval_tasks([EvalTaskSpec(name='hellaswag')], lambda f, p: None)\n"
        "assert [e.field for e in errs] == ['eval.tasks'] and 'awqforge[eval]' in errs[0].reason, errs\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code = (
        "import sys\n"
        "import app.main\n"
        "from app.services.eval_tasks import check_eval_tasks\n"
        "from awqforge.spec import EvalTaskSpec\n"
        "errs = check_eval_tasks([EvalTaskSpec(name='hellaswag'), EvalTaskSpec(name='nope_x')], lambda f, p: None)\n"
        "assert [e.field for e in errs] == ['eval.tasks.1.name'], errs\n"
        "assert 'torch' not in sys.modules, 'the registry check imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fp_score_scopes(service):
    """A public revision's FP score serves every tenant; a private or local model's only its own tenant."""
    import uuid

    from awqforge.spec import JobSpec
    from worker.task_eval import PostgresFPScoreCache, fp_cache_for

    key = uuid.uuid4().hex
    score = {"task": "awqforge_mc", "metric": "acc", "score": 0.5}
    PostgresFPScoreCache(tenant_id=1, public=False).put(key, score)
    assert PostgresFPScoreCache(tenant_id=1, public=False).get(key) == score
    assert PostgresFPScoreCache(tenant_id=2, public=False).get(key) is None
    assert PostgresFPScoreCache(tenant_id=2, public=True).get(key) is None
    PostgresFPScoreCache(tenant_id=1, public=False).put(key, score)  # stored once: a second put is a no-op
    public_key = uuid.uuid4().hex
    PostgresFPScoreCache(tenant_id=3, public=True).put(public_key, score)
    assert PostgresFPScoreCache(tenant_id=4, public=True).get(public_key) == score
    assert PostgresFPScoreCache(tenant_id=4, public=False).get(public_key) is None  # a private model's job

    tasks = {"tasks": [{"name": "awqforge_mc"}]}
    hub = JobSpec(model="org/model", eval=tasks)
    assert fp_cache_for(7, hub).scope == "public"
    gated = JobSpec(model="org/model", source={"token": "hf_x"}, eval=tasks)
    assert fp_cache_for(7, gated).scope == "tenant:7"
    assert fp_cache_for(7, JobSpec(model="/models/m", eval=tasks)).scope == "tenant:7"
    assert fp_cache_for(7, JobSpec(model="org/model")) is None


CANCEL_BOUND_S = (
    10  # the engine checks before every lm-eval batch; the worker reads the flag 4 times a second
)


def test_cancel_inside_task_evaluation(service, make_key, db_session):
    """Cancelled while lm-eval runs (the FP pass of a long task): the job ends `cancelled` within
    CANCEL_BOUND_S of the request, in stage evaluate, with its tokens and scratch folders gone."""
    import time

    from app.models import Job
    from app.services import lifecycle

    body = service.job_body(
        model=str(service.deep_model_dir),
        # every example with five shots: far longer than the test waits before cancelling
        eval={"enabled": False, "prompts": [], "tasks": [{"name": n, "num_fewshot": 5} for n in TASK_NAMES]},
        source={"token": "hf_cancel_source_token"},
        publish={"repo_id": "canceller/never-published", "private": True, "token": "hf_cancel_publish_token"},
    )
    with service.client(make_key("canceller")) as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        with c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=300) as events:
            for line in events.iter_lines():
                if line.startswith("data: "):
                    e = json.loads(line[6:])
                    if e["stage"] == "evaluate" and "lm-evaluation-harness" in (e["message"] or ""):
                        break
            else:  # the stream ends with the job
                raise AssertionError("the job ended before its task evaluation began")
        time.sleep(2)  # into lm-eval's first pass
        r = c.post(f"/v1/jobs/{job_id}/cancel")
        asked = time.monotonic()
        assert r.status_code == 202 and r.json()["status"] in ("running", "cancelled"), r.text
        job = wait_for_status(c, job_id, ("succeeded", "failed", "cancelled"), timeout=CANCEL_BOUND_S)
        took = time.monotonic() - asked
        assert job["status"] == "cancelled" and job["stage"] == "evaluate", job
        logs = c.get(f"/v1/jobs/{job_id}/logs").text
        assert "cancelled during evaluate" in logs, logs[-2000:]
        assert "task awqforge_mc: FP" not in logs  # stopped inside the first task, not after it
        assert job["metrics"] is None and job["artifacts"] == []
    print(f"cancelled {took:.1f} s after the request")
    db_session.expire_all()
    row = db_session.get(Job, job_id)
    assert row.source_token_enc is None and row.publish_token_enc is None
    for folder in (
        lifecycle.job_work_dir(row.tenant_id, job_id),
        lifecycle.run_staging_dir(row.tenant_id, job_id),
        lifecycle.publish_staging_dir(job_id),
        lifecycle.job_output_dir(row.tenant_id, job_id),
    ):
        assert not folder.exists(), folder
