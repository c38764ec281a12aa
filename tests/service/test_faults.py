"""Faults against real processes: every job ends succeeded exactly once, or failed with a reason, and no
tenant slot is left taken.

This module builds its own stack so that it may break it: a private redis-server on a free port (killed and
restarted empty), a TCP proxy in front of the shared Postgres (cut and restored; the server itself is never
touched), a fresh database, the API as a subprocess (`awqforge serve --no-worker`, whose periodic loop runs the
reaper and the reconciler) and workers started with `awqforge worker` (whose main process opens a database
connection before it forks its pool child).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import HOME, PG_ADMIN_URL, free_port, services_available
from .hub_server import HubServer
from .tcp_proxy import TcpProxy

TERMINAL = ("succeeded", "failed", "cancelled")
RUN = uuid.uuid4().hex[:8]


class PrivateRedis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """A crash: nothing saved, so the restarted server is empty (its queues flushed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stack:
    env: dict
    home: Path
    api_url: str
    db_url_direct: str
    redis: PrivateRedis
    proxy: TcpProxy
    key: str = ""
    workers: list[subprocess.Popen] = field(default_factory=list)
    shared: subprocess.Popen | None = None  # the worker most tests share (its pool child imports torch once)
    n_shared: int = 0

    def worker(self) -> subprocess.Popen:
        """The shared worker, started anew if a test killed it."""
        if self.shared is None or self.shared.poll() is not None:
            self.n_shared += 1
            self.shared = self.start_worker(f"shared{self.n_shared}-{RUN}")
        return self.shared

    def worker_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.home.glob("worker-*.log")))

    def client(self):
        import httpx

        return httpx.Client(
            base_url=self.api_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30
        )

    def start_worker(self, name: str, *, preexec_fn=None, env: dict | None = None) -> subprocess.Popen:
        log_path = self.home / f"worker-{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--queues", "cpu", "--name", name],
            env={**self.env, **(env or {})},
            stdout=open(log_path, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
        self.workers.append(proc)
        deadline = time.monotonic() + 90
        while b"ready." not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker {name} did not start:\n{log_path.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.2)
        return proc

    def stop_worker(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group: the main process and its child
        proc.wait()

    def sql(self, query: str, *args):
        import psycopg

        with psycopg.connect(self.db_url_direct, autocommit=True) as conn:
            return conn.execute(query, args).fetchall()


def pool_children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_until(cond, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def wait_terminal(stack: Stack, client, job_id: str, timeout: float = 180) -> dict:
    def done():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    return wait_until(done, timeout, f"job {job_id} to finish")


def blocks_done(stack: Stack, job_id: str) -> int:
    rows = stack.sql(
        "SELECT message FROM job_events WHERE job_id = %s AND kind = 'progress' AND message LIKE 'block %%' "
        "ORDER BY id DESC LIMIT 1",
        job_id,
    )
    return int(rows[0][0].split()[1].split("/")[0]) if rows else 0


def assert_no_slot_leaked(stack: Stack) -> None:
    active = stack.sql("SELECT id, status FROM jobs WHERE status IN ('queued', 'running')")
    assert active == [], f"jobs still holding tenant slots: {active}"
    assert_store_matches_rows(stack)


def assert_store_matches_rows(stack: Stack) -> None:
    """Once every job has ended, the artifact folder holds exactly what the artifact rows name: each row's
    files, and no job's checkpoint, staging or unrecorded output folder (a replaced or killed run's)."""
    rows = stack.sql("SELECT path, files FROM artifacts")
    recorded = {Path(path).resolve() for path, _ in rows}
    for path, files in rows:
        for f in files or []:
            assert (Path(path) / f["path"]).is_file(), f"{path}: {f['path']} recorded, not stored"
    root = stack.home / "artifacts"
    left = []
    for tenant in root.glob("tenant-*") if root.is_dir() else []:
        for p in tenant.rglob("*"):
            r = p.resolve()
            # a recorded artifact, a file in one, or a folder that holds one (the job's, its run's)
            if not any(r.is_relative_to(k) or k.is_relative_to(r) for k in recorded):
                left.append(p)
    assert left == [], f"stored but not recorded (or scratch left behind): {sorted(left)[:10]}"


def succeeded_events(stack: Stack, job_id: str) -> int:
    return stack.sql(
        "SELECT count(*) FROM job_events WHERE job_id = %s AND kind = 'status' AND message = 'succeeded'",
        job_id,
    )[0][0]


def artifact_sha(stack: Stack, job_id: str) -> str:
    (path,) = stack.sql("SELECT path FROM artifacts WHERE job_id = %s AND format = 'awq'", job_id)[0]
    return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stack(tiny_models):
    if not services_available():
        pytest.skip("Postgres is needed (AWQFORGE_TEST_DATABASE_URL)")
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is needed")
    from urllib.parse import urlparse

    import psycopg

    home = HOME / f"faults-{RUN}"
    home.mkdir(parents=True)
    pg = urlparse(PG_ADMIN_URL)
    db = f"awqf_faults_{RUN}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    proxy = TcpProxy((pg.hostname or "127.0.0.1", pg.port or 5432))
    redis = PrivateRedis(home)
    redis.start()
    user = f"{pg.username}@" if pg.username else ""
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in ("BROKER_URL", "SECRET_KEY", "HF_TOKEN", "HF_ENDPOINT")
        },
        "AWQFORGE_HOME": str(home),
        "DATABASE_URL": f"postgresql+psycopg://{user}127.0.0.1:{proxy.port}/{db}",
        "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
        "CELERY_QUEUE_PREFIX": f"faults-{RUN}-",
        "ALLOWED_LOCAL_ROOTS": str(HOME),
        "HEARTBEAT_INTERVAL_S": "1",
        "HEARTBEAT_STALE_S": "10",
        "REAPER_INTERVAL_S": "1",
        "REDISPATCH_AFTER_S": "3",
        "TENANT_MAX_QUEUED_JOBS": "20",
        "PUBLISH_BACKEND": "local",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    api_port = free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--no-worker", "--port", str(api_port)],
        env=env,
        stdout=open(home / "api.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    s = Stack(
        env=env,
        home=home,
        api_url=f"http://127.0.0.1:{api_port}",
        db_url_direct=f"{PG_ADMIN_URL.rpartition('/')[0]}/{db}",
        redis=redis,
        proxy=proxy,
    )
    try:
        import httpx

        wait_until(
            lambda: api.poll() is None and _ok(httpx, f"{s.api_url}/healthz"),
            60,
            "the API to start:\n" + (home / "api.log").read_text(errors="replace")[-2000:],
        )
        s.key = subprocess.run(
            [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "faults"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        yield s
    finally:
        for w in s.workers:
            s.stop_worker(w)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(api.pid, signal.SIGKILL)
        api.wait()
        redis.kill()
        proxy.close()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _ok(httpx, url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def body(tiny_models, model: Path | None = None, **overrides) -> dict:
    b = {
        "model": str(model or tiny_models.tiny),
        "method": "awq",
        "bits": 4,
        "group_size": 32,
        "calibration": {"source": f"file:{tiny_models.calib}", "n_samples": 4, "seq_len": 32},
        "formats": ["awq"],
        "eval": {"enabled": False},
        "n_grid": 4,
        "device": "cpu",
    }
    b.update(overrides)
    return b


def test_replaced_pool_child_keeps_working(stack, tiny_models):
    """kill -9 of the idle pool child: the new child opens its own connections (no DuplicatePreparedStatement)."""
    w = stack.worker()
    with stack.client() as c:
        first = c.post("/v1/jobs", json=body(tiny_models)).json()["id"]
        assert wait_terminal(stack, c, first)["status"] == "succeeded"
        (child,) = wait_until(lambda: pool_children(w.pid), 30, "the pool child")
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: pool_children(w.pid) not in ([], [child]), 30, "a new pool child")
        later = [c.post("/v1/jobs", json=body(tiny_models, seed=i)).json()["id"] for i in (1, 2)]
        for job_id in later:
            job = wait_terminal(stack, c, job_id)
            assert job["status"] == "succeeded", job
            assert job["attempts"] == 1
    assert "DuplicatePreparedStatement" not in stack.worker_log()
    assert_no_slot_leaked(stack)


def test_child_killed_mid_job_resumes_with_same_bytes(stack, tiny_models):
    """kill -9 of the pool child at block k: the redelivered job resumes at block k, same artifact bytes."""
    w = stack.worker()
    deep = body(tiny_models, tiny_models.deep)
    with stack.client() as c:
        reference = c.post("/v1/jobs", json=deep).json()["id"]
        assert wait_terminal(stack, c, reference)["status"] == "succeeded"
        victim = c.post("/v1/jobs", json=deep).json()["id"]
        wait_until(lambda: blocks_done(stack, victim) >= 4, 120, "block 4 of the job")
        (child,) = pool_children(w.pid)
        os.kill(child, signal.SIGKILL)
        job = wait_terminal(stack, c, victim)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2 and job["stage"] == "package" and job["progress"] == 1.0
        resumed = stack.sql(
            "SELECT message FROM job_events WHERE job_id = %s AND message LIKE 'resuming at block %%'", victim
        )
        assert resumed and int(resumed[0][0].split()[3].split("/")[0]) >= 4, resumed
        assert artifact_sha(stack, victim) == artifact_sha(stack, reference)
        assert succeeded_events(stack, victim) == 1
        assert c.get(f"/v1/jobs/{victim}/artifacts").json()["count"] == 1
    work = Path(stack.sql("SELECT output_dir FROM jobs WHERE id = %s", victim)[0][0])
    assert not work.with_name(f".{victim}.work").exists(), "checkpoints removed once the job succeeded"
    assert_no_slot_leaked(stack)


def test_worker_main_process_killed_mid_job(stack, tiny_models):
    """SIGKILL of the worker's main process mid-job: its pool child goes with it (or finishes alone); the job
    ends exactly once, resumed by a new worker from its checkpoints once the reaper requeues it."""
    w = stack.worker()
    with stack.client() as c:
        victim = c.post("/v1/jobs", json=body(tiny_models, tiny_models.deep)).json()["id"]
        wait_until(lambda: blocks_done(stack, victim) >= 3, 120, "block 3 of the job")
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
        stack.worker()  # a new worker (another machine): it takes the job over once the reaper requeues it
        job = wait_terminal(stack, c, victim)
        assert job["status"] == "succeeded", job
        assert succeeded_events(stack, victim) == 1
        resumed = stack.sql(
            "SELECT count(*) FROM job_events WHERE job_id = %s AND message LIKE 'resuming at block%%'", victim
        )[0][0]
        assert (job["attempts"], resumed) in ((2, 1), (1, 0)), (job["attempts"], resumed)
    assert_no_slot_leaked(stack)


def test_broker_down_at_submit_then_redis_flushed(stack, tiny_models):
    """Redis dies: a submit still stores the job (202, queued, its id) and an Idempotency-Key retry returns it;
    Redis comes back empty (every queued message lost): the reconciler sends them all again."""
    stack.worker()
    with stack.client() as c:
        busy = c.post("/v1/jobs", json=body(tiny_models, tiny_models.deep)).json()["id"]
        queued = [c.post("/v1/jobs", json=body(tiny_models, seed=i)).json()["id"] for i in (11, 12)]
        wait_until(lambda: blocks_done(stack, busy) >= 1, 120, "the first job to run")
        stack.redis.kill()
        r = c.post("/v1/jobs", json=body(tiny_models, seed=13), headers={"Idempotency-Key": "during-outage"})
        assert r.status_code == 202, r.text
        offline = r.json()
        assert offline["status"] == "queued" and offline["error"] is None
        again = c.post(
            "/v1/jobs", json=body(tiny_models, seed=13), headers={"Idempotency-Key": "during-outage"}
        )
        assert again.status_code in (200, 202) and again.json()["id"] == offline["id"]
        time.sleep(2)
        stack.redis.start()  # empty: the two queued jobs' messages are gone
        for job_id in [busy, *queued, offline["id"]]:
            job = wait_terminal(stack, c, job_id)
            assert job["status"] == "succeeded", job
            assert job["attempts"] == 1 and succeeded_events(stack, job_id) == 1
    assert_no_slot_leaked(stack)


def test_postgres_cut_mid_job(stack, tiny_models):
    """The database goes away for a few seconds mid-quantization: progress writes are retried, the job finishes."""
    stack.worker()
    with stack.client() as c:
        victim = c.post("/v1/jobs", json=body(tiny_models, tiny_models.deep)).json()["id"]
        wait_until(lambda: blocks_done(stack, victim) >= 2, 120, "block 2 of the job")
        before = blocks_done(stack, victim)
        stack.proxy.cut()
        time.sleep(4)
        stack.proxy.restore()
        job = wait_terminal(stack, c, victim)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1 and blocks_done(stack, victim) == 24 > before
    assert "database unreachable during" in stack.worker_log()
    assert_no_slot_leaked(stack)


def test_postgres_outage_longer_than_the_lease(stack, tiny_models):
    """The database goes away for longer than the worker retries a write (HEARTBEAT_STALE_S): the job is not
    failed; the worker queues it again once the database answers and the next run resumes at its last block.
    What the tenant reads names no server address."""
    stack.worker()
    with stack.client() as c:
        victim = c.post("/v1/jobs", json=body(tiny_models, tiny_models.deep)).json()["id"]
        wait_until(lambda: blocks_done(stack, victim) >= 2, 120, "block 2 of the job")
        stack.proxy.cut()
        time.sleep(15)  # HEARTBEAT_STALE_S is 10: the worker's write gives up
        stack.proxy.restore()
        job = wait_terminal(stack, c, victim)
        assert job["status"] == "succeeded" and job["error"] is None, job
        assert job["attempts"] == 2 and blocks_done(stack, victim) == 24
        logs = c.get(f"/v1/jobs/{victim}/logs").text
        assert "database unreachable mid-job: requeued" in logs
        assert "resuming at block" in logs and "<job checkpoints>" in logs  # its checkpoints were kept
        assert str(stack.proxy.port) not in logs and "127.0.0.1" not in logs
    assert_no_slot_leaked(stack)


def test_hub_failure_at_publish_then_retry(stack, tiny_models):
    """The hub folder cannot be written: the job fails naming the publish step and keeps its artifacts; a
    publish retry after the hub is repaired publishes exactly once."""
    blocker = stack.home / "hub" / "faults"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")  # the repo's owner folder cannot be created
    stack.worker()
    with stack.client() as c:
        b = body(tiny_models, publish={"repo_id": "faults/tiny-awq", "private": True})
        job_id = c.post("/v1/jobs", json=b).json()["id"]
        job = wait_terminal(stack, c, job_id)
        assert job["status"] == "failed" and job["error"].startswith("publish failed"), job
        assert [a["format"] for a in job["artifacts"] if a["format"] != "report"] == ["awq"]
        assert all(a["published_to"] is None for a in job["artifacts"])
        blocker.unlink()
        r = c.post(f"/v1/jobs/{job_id}/publish")
        assert r.status_code == 202, r.text
        job = wait_terminal(stack, c, job_id)
        assert job["status"] == "succeeded", job
        assert [a["published_to"] for a in job["artifacts"] if a["format"] == "awq"] == [
            "local:faults/tiny-awq"
        ]
        assert sorted(p.name for p in (stack.home / "hub" / "faults").iterdir()) == ["tiny-awq"]
    assert_no_slot_leaked(stack)


def _small_files():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # Python ignores SIGXFSZ: writes get EFBIG


def test_disk_full_while_writing_artifacts(stack, tiny_models):
    """Writes past a file size limit fail (EFBIG, as ENOSPC would): a clear failure and nothing half-written."""
    if stack.shared is not None:
        stack.stop_worker(stack.shared)  # the only worker on the queue is the one with the limit
    w = stack.start_worker(f"disk-{RUN}", preexec_fn=_small_files)
    with stack.client() as c:
        job_id = c.post("/v1/jobs", json=body(tiny_models)).json()["id"]
        job = wait_terminal(stack, c, job_id)
        assert job["status"] == "failed", job
        assert "File too large" in job["error"], job["error"]
        assert job["artifacts"] == []
        tenant_dir = next((stack.home / "artifacts").glob("tenant-*"))
        assert sorted(p.name for p in tenant_dir.iterdir() if job_id in p.name) == [], "no partial output"
    stack.stop_worker(w)
    assert_no_slot_leaked(stack)


def test_killed_between_the_hub_commit_and_recording_it(stack, tiny_models):
    """The worker dies after the hub stored its commit and before the database learnt of it (the database
    is cut as the hub answers, so the worker is stuck retrying its write when it is killed). The requeued
    job, at its publish stage, goes to a new worker that publishes the recorded artifact set again (the same
    bytes, so the hub client finds nothing to commit): no second commit, one artifact set, no rerun."""
    hub = HubServer().start()
    token = "hf_faults_SECRET"
    hub.add_user(token, "faults")  # the tenant's own namespace
    committed = threading.Event()

    def cut_the_database(_repo_id: str) -> None:
        stack.proxy.cut()
        committed.set()

    hub.on_commit = cut_the_database
    hub_env = {
        "PUBLISH_BACKEND": "huggingface",
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(stack.home / "hf-home"),
        "PUBLISH_ATTEMPTS": "1",
    }
    if stack.shared is not None:
        stack.stop_worker(stack.shared)  # the only workers on the queue are this test's
    first = stack.start_worker(f"hub1-{RUN}", env=hub_env)
    try:
        with stack.client() as c:
            b = body(tiny_models, publish={"repo_id": "faults/crash-awq", "private": True, "token": token})
            job_id = c.post("/v1/jobs", json=b).json()["id"]
            assert committed.wait(300), "the worker never committed:\n" + stack.worker_log()[-3000:]
            hub.on_commit = None
            log = stack.home / f"worker-hub1-{RUN}.log"
            wait_until(lambda: b"database unreachable during" in log.read_bytes(), 60, "the worker to retry")
            stack.stop_worker(first)  # SIGKILL: nothing after the commit reached the database
            stack.proxy.restore()
            assert stack.sql("SELECT status, attempts FROM jobs WHERE id = %s", job_id)[0] in (
                ("running", 1),
                ("queued", 1),  # the reaper may already have found its heartbeat stale
            )
            stack.start_worker(f"hub2-{RUN}", env=hub_env)  # takes the job once the reaper requeues it
            job = wait_terminal(stack, c, job_id, timeout=300)
            assert job["status"] == "succeeded", job
            # the requeued job is at its publish stage: it publishes the recorded artifact set, nothing reruns
            finished = stack.sql(
                "SELECT message FROM job_events WHERE job_id = %s AND kind = 'status' "
                "AND message IN ('succeeded', 'published')",
                job_id,
            )
            assert job["attempts"] == 2 and finished == [("published",)], finished
            repo = hub.repos["faults/crash-awq"]
            (_, ours), *again = repo.commits[1:]
            changed = {n for _, files in again for n in set(files) | set(ours) if files.get(n) != ours.get(n)}
            assert len(repo.commits) == 2, f"a second commit; files that differ: {sorted(changed)}"
            assert hub.count("POST", r"/commit/main$", 200) == 1
            awq = [a for a in job["artifacts"] if a["format"] == "awq"]
            assert len(awq) == 1 and awq[0]["hub_revision"] == repo.commits[-1][0], job["artifacts"]
            assert stack.sql("SELECT count(*) FROM artifacts WHERE job_id = %s", job_id)[0][0] == len(
                job["artifacts"]
            )
            assert sorted(a["format"] for a in job["artifacts"]) == sorted(
                set(a["format"] for a in job["artifacts"])
            )
            rows = stack.sql("SELECT format, path FROM artifacts WHERE job_id = %s", job_id)
            out_dir = Path(stack.sql("SELECT output_dir FROM jobs WHERE id = %s", job_id)[0][0])
            assert all(Path(path).exists() and Path(path).is_relative_to(out_dir) for _, path in rows), rows
            assert not out_dir.with_name(f".{job_id}.work").exists()
    finally:
        hub.on_commit = None
        stack.proxy.restore()
        for w in stack.workers[-2:]:
            stack.stop_worker(w)
        hub.stop()
    assert_no_slot_leaked(stack)
