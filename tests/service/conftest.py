"""Fixtures for the service tests: a fresh Postgres database, a Redis key prefix, a Celery worker
process and the API in a thread, all made for this run and removed after it.

Needs the real services (AWQFORGE_TEST_DATABASE_URL, AWQFORGE_TEST_REDIS_URL; defaults: local Postgres
with trust auth, database `test`, and local Redis). The environment is set by the package-scoped `service_env` fixture, before any `app` module is
imported (tests import `app` inside their bodies), because `app.core.config.settings` is read once.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# An existing database on the test server (new databases are created beside it) and a Redis URL.
PG_ADMIN_URL = (
    os.environ.get("AWQFORGE_TEST_DATABASE_URL")
    or os.environ.get("AWQFORGE_TEST_PG")
    or "postgresql://postgres@127.0.0.1:5432/test"
).replace("postgresql+psycopg://", "postgresql://", 1)
REDIS_URL = (
    os.environ.get("AWQFORGE_TEST_REDIS_URL")
    or os.environ.get("AWQFORGE_TEST_REDIS")
    or "redis://127.0.0.1:6379/0"
)
RUN_ID = uuid.uuid4().hex[:10]
DB_NAME = f"awqf_test_{RUN_ID}"
QUEUE_PREFIX = f"awqf-test-{RUN_ID}-"
HOME = Path(tempfile.mkdtemp(prefix=f"awqf-svc-{RUN_ID}-"))
atexit.register(shutil.rmtree, HOME, ignore_errors=True)
_base, _, _ = PG_ADMIN_URL.rpartition("/")
TEST_DB_URL = f"{_base}/{DB_NAME}"

SERVICE_ENV = {
    "AWQFORGE_HOME": str(HOME),
    # the machine's kernel cache (built at install or by the first test that needs it), not HOME's empty one:
    # a worker builds a missing kernel at start-up, which takes minutes
    "AWQFORGE_EXTENSIONS_DIR": os.environ.get("AWQFORGE_EXTENSIONS_DIR")
    or str(Path(os.environ.get("AWQFORGE_HOME", "~/.awqforge")).expanduser() / "kernels"),
    "DATABASE_URL": TEST_DB_URL,
    "REDIS_URL": REDIS_URL,
    "CELERY_QUEUE_PREFIX": QUEUE_PREFIX,
    "ALLOWED_LOCAL_ROOTS": str(HOME),
    "HEARTBEAT_INTERVAL_S": "1",
    "HEARTBEAT_STALE_S": "4",
    "REAPER_INTERVAL_S": "3600",  # tests call the reaper themselves
    "TENANT_MAX_QUEUED_JOBS": "20",
    "MAX_UPLOAD_BYTES": str(256 * 1024),
    "PUBLISH_BACKEND": "local",  # tokens still travel (and must stay hidden); uploads go to HUB_DIR
    "API_KEY_CACHE_S": "1",  # reads use the key cache; a revocation reaches them within 1 s
}
_CLEARED = ("BROKER_URL", "SECRET_KEY", "HF_ENDPOINT", "HF_TOKEN", "ENVIRONMENT")


@pytest.fixture(scope="package", autouse=True)
def service_env():
    """This package's environment, set before any `app` module is imported (settings are read once)
    and restored after the package's last test so that the rest of the suite never sees it."""
    mp = pytest.MonkeyPatch()
    for k in _CLEARED:
        mp.delenv(k, raising=False)
    for k, v in SERVICE_ENV.items():
        mp.setenv(k, v)
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield SERVICE_ENV
    mp.undo()


TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=512,
)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def services_available() -> bool:
    from urllib.parse import urlparse

    pg, rd = urlparse(PG_ADMIN_URL), urlparse(REDIS_URL)
    return _reachable(pg.hostname or "127.0.0.1", pg.port or 5432) and _reachable(
        rd.hostname or "127.0.0.1", rd.port or 6379
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_checkpoint(dest: Path, text_file: Path, **overrides) -> Path:
    """A random tiny Llama saved as safetensors with a small BPE tokenizer trained on `text_file`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        **{**TINY_LLAMA, **overrides},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_LLAMA["vocab_size"],
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(text_file)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(dest)
    return dest


@dataclass
class Service:
    url: str
    home: Path
    model_dir: Path
    deep_model_dir: Path
    calib_file: Path
    worker_log: Path
    worker_metrics_url: str = ""
    keys: dict = field(default_factory=dict)

    def client(self, key: str | None):
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def job_body(self, **overrides) -> dict:
        body = {
            "model": str(self.model_dir),
            "method": "awq",
            "bits": 4,
            "group_size": 32,
            "calibration": {"source": f"file:{self.calib_file}", "n_samples": 4, "seq_len": 32},
            "formats": ["awq"],
            "eval": {"seq_len": 32, "max_seqs": 2},
            "n_grid": 4,
            "device": "cpu",
        }
        body.update(overrides)
        return body


def wait_for_status(client, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} still {job['status']} ({job.get('stage')}) after {timeout}s: {job}"
            )
        time.sleep(0.2)


def _calibration_text() -> str:
    base = (
        "The quick brown fox jumps over the lazy dog. Quantization maps weights to a few bits. "
        "Activation aware scaling protects the salient channels of each linear layer. "
    )
    return "\n\n".join(f"Document {i}. " + base * 3 for i in range(200))


def _create_database() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')


def _drop_database(name: str = DB_NAME) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _clear_redis() -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{QUEUE_PREFIX}*", count=1000))
    if keys:
        r.delete(*keys)


@dataclass
class TinyModels:
    tiny: Path
    deep: Path
    calib: Path


@pytest.fixture(scope="package")
def tiny_models():
    """Two random Llama checkpoints (2 and 24 blocks) and a calibration text, made once per run."""
    # a second package run in this process (removed at the first's end)
    HOME.mkdir(parents=True, exist_ok=True)
    calib = HOME / "calib.txt"
    calib.write_text(_calibration_text())
    yield TinyModels(
        tiny=build_tiny_checkpoint(HOME / "models" / "tiny-llama", calib),
        deep=build_tiny_checkpoint(HOME / "models" / "deep-llama", calib, num_hidden_layers=24),
        calib=calib,
    )
    shutil.rmtree(HOME, ignore_errors=True)


@pytest.fixture(scope="package")
def service(tiny_models):
    if not services_available():
        pytest.skip("Postgres and Redis are needed (AWQFORGE_TEST_DATABASE_URL / AWQFORGE_TEST_REDIS_URL)")
    _create_database()
    worker = server = None
    try:
        from app.core.db import run_migrations

        run_migrations()
        calib, model_dir, deep_dir = tiny_models.calib, tiny_models.tiny, tiny_models.deep

        from app.embedded import ServerThread, start_worker_process, stop_process
        from app.main import create_app

        worker_log = HOME / "worker.log"
        metrics_port = free_port()  # the worker serves its own Prometheus metrics (test_metrics.py)
        worker = start_worker_process(
            name=f"test-{RUN_ID}",
            log_path=worker_log,
            env={"OMP_NUM_THREADS": "1", "WORKER_METRICS_PORT": str(metrics_port)},
        )
        server = ServerThread(create_app(run_reaper=False), port=free_port()).start()
        deadline = time.monotonic() + 60
        while b"ready." not in (worker_log.read_bytes() if worker_log.exists() else b""):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "celery worker did not start:\n" + worker_log.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.2)
        yield Service(
            url=server.url,
            home=HOME,
            model_dir=model_dir,
            deep_model_dir=deep_dir,
            calib_file=calib,
            worker_log=worker_log,
            worker_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        if server is not None:
            server.stop()
        if worker is not None:
            stop_process(worker)
        try:
            from app.core.db import get_engine

            get_engine().dispose()
        except Exception:
            pass
        _drop_database()
        _clear_redis()


@pytest.fixture
def make_key(service):
    """make_key(tenant, max_queued=None) -> API key string."""
    from app.core.db import session_scope
    from app.services.keys import create_api_key

    def make(tenant: str | None = None, max_queued: int | None = None) -> str:
        with session_scope() as s:
            return create_api_key(
                s, tenant_name=tenant or f"tenant-{uuid.uuid4().hex[:8]}", max_queued=max_queued
            ).secret

    return make


@pytest.fixture
def db_session(service):
    from app.core.db import session_scope

    with session_scope() as s:
        yield s


__all__ = ["Service", "wait_for_status", "build_tiny_checkpoint", "free_port", "sys", "subprocess"]
