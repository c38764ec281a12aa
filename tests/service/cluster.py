"""A deployment in processes: an API server and workers on chosen queues, each as if on its own machine
(own AWQFORGE_HOME), sharing the test run's Postgres and Redis under a queue prefix of their own; and a
moto S3 server on loopback. Used by the scale-out and storage tests and by bench/bench_scaleout.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


class MotoServer:
    """moto's standalone S3-compatible server on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url, timeout=1)
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start: " + self.log.read_text()[-2000:]) from None
                time.sleep(0.2)

    def env(self, bucket: str) -> dict[str, str]:
        return {
            "ARTIFACT_STORE": "s3",
            "S3_ENDPOINT_URL": self.url,
            "S3_BUCKET": bucket,
            "S3_ACCESS_KEY_ID": "test",
            "S3_SECRET_ACCESS_KEY": "test-secret-never-shown",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test-secret-never-shown",
        )

    def stop(self) -> None:
        _stop(self.proc)
        self.log.unlink(missing_ok=True)


class Cluster:
    """`api_env` / worker envs on top of the service tests' database and broker, under a fresh queue prefix."""

    def __init__(self, base_env: dict[str, str], *, models_root: Path, api_env: dict | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="awqf-cluster-"))
        self.prefix = f"awqf-cl-{uuid.uuid4().hex[:8]}-"
        self.env = {
            **os.environ,
            **base_env,
            "CELERY_QUEUE_PREFIX": self.prefix,
            "ALLOWED_LOCAL_ROOTS": str(models_root),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "LIVE_WORKERS_CACHE_S": "0",
        }
        self.workers: dict[str, subprocess.Popen] = {}
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "app.main:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            api_env or {},
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.api.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("API did not start: " + self.log("api")[-3000:])
            time.sleep(0.2)

    def home(self, name: str) -> Path:
        return self.root / name / "home"

    def log(self, name: str) -> str:
        p = self.root / name / "log"
        return p.read_text(errors="replace") if p.exists() else ""

    def _spawn(self, name: str, cmd: list[str], extra: dict) -> subprocess.Popen:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "AWQFORGE_HOME": str(self.home(name)), **extra}
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=(d / "log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(d),
        )

    def start_worker(self, name: str, queues: list[str], env: dict | None = None, wait: bool = True):
        proc = self._spawn(
            name,
            [sys.executable, "-m", "awqforge", "worker", "--queues", ",".join(queues), "--name", name],
            env or {},
        )
        self.workers[name] = proc
        if wait:
            deadline = time.monotonic() + 90
            while "ready." not in self.log(name):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} did not start: " + self.log(name)[-3000:])
                time.sleep(0.2)
        return proc

    def stop_worker(self, name: str) -> None:
        _stop(self.workers.pop(name))

    def client(self, key: str):
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def close(self) -> None:
        for name in list(self.workers):
            self.stop_worker(name)
        _stop(self.api)
        shutil.rmtree(self.root, ignore_errors=True)
        import redis

        r = redis.Redis.from_url(self.env["REDIS_URL"])
        keys = list(r.scan_iter(f"{self.prefix}*", count=1000))
        if keys:
            r.delete(*keys)


def assert_bucket_matches_rows(moto: MotoServer, bucket: str, job_ids: list[str]) -> None:
    """The S3 twin of the fault tests' artifact folder check: under the jobs' prefixes the bucket holds
    exactly the files their artifact rows record, at their recorded sizes (no replaced run's set, no
    partial upload of a failed or killed run, nothing of a deleted job)."""
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import Artifact

    with session_scope() as s:
        rows = [(a.path, a.files) for a in s.scalars(select(Artifact).where(Artifact.job_id.in_(job_ids)))]
    recorded = {}
    for location, files in rows:
        where, _, prefix = location.removeprefix("s3://").partition("/")
        assert location.startswith("s3://") and where == bucket, location
        recorded.update({f"{prefix}/{f['path']}": f["size_bytes"] for f in files})
    stored = {
        o["Key"]: o["Size"]
        for page in moto.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
        if any(f"/{job_id}/" in o["Key"] for job_id in job_ids)
    }
    assert stored == recorded, {
        "stored, not recorded": sorted(set(stored) - set(recorded)),
        "recorded, not stored (or other size)": sorted(k for k in recorded if stored.get(k) != recorded[k]),
    }
