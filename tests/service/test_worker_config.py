"""Worker settings that matter for long GPU jobs (routing by need: test_routing.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import SERVICE_ENV


def test_importing_the_worker_app_does_not_import_torch():
    code = "import sys, worker.celery_app, worker.tasks, app.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"  # a prefork worker forks before CUDA can be initialised


def test_celery_settings_for_long_jobs():
    from app.core.config import settings
    from worker.celery_app import celery_app

    conf = celery_app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert conf.broker_transport_options["global_keyprefix"] == SERVICE_ENV["CELERY_QUEUE_PREFIX"]
    assert {q.name for q in conf.task_queues} == {
        settings.queue_name(q) for q in ("cpu", "gpu-24g", "gpu-80g")
    }
    assert all(q.exchange.name == q.name == q.routing_key for q in conf.task_queues)


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"ENVIRONMENT": "production", "DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://r"},
            "SECRET_KEY must be set",
        ),
        (
            {"ENVIRONMENT": "production", "SECRET_KEY": "changethis", "DATABASE_URL": "postgresql://x/y"},
            "SECRET_KEY is a default",
        ),
        ({"ENVIRONMENT": "staging", "SECRET_KEY": "x" * 40}, "no embedded mode"),
        ({"IDEMPOTENCY_TTL_HOURS": "1"}, "IDEMPOTENCY_TTL_HOURS"),
        ({"JOB_SOFT_TIME_LIMIT_S": "7200", "JOB_HARD_TIME_LIMIT_S": "3600"}, "JOB_HARD_TIME_LIMIT_S"),
    ],
)
def test_settings_refuse_unsafe_values(env, message, monkeypatch):
    from pydantic import ValidationError

    from app.core.config import Settings

    for k in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "ENVIRONMENT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None)


def test_publish_backend_selection(tmp_path, monkeypatch):
    """Which backend publishes; what each does is in test_hub_contract.py (against a Hub server)."""
    from app.core.config import settings
    from worker import hub

    monkeypatch.setattr(settings, "PUBLISH_BACKEND", "auto")
    monkeypatch.setattr(settings, "HF_ENDPOINT", None)
    monkeypatch.setattr(settings, "HF_TOKEN", None)
    monkeypatch.setattr(settings, "HUB_DIR", tmp_path / "hub")
    assert isinstance(hub.hub_for("hf_token"), hub.HuggingFaceHub)  # a job token: the Hub
    assert isinstance(hub.hub_for(None), hub.LocalHub)  # nothing configured: the local folder
    monkeypatch.setattr(settings, "HF_TOKEN", "hf_service")
    # The service is set up for the Hub: a tenant without a token goes there too (anonymously, refused),
    # never silently to the local folder.
    remote = hub.hub_for(None)
    assert isinstance(remote, hub.HuggingFaceHub) and remote.api.token is False
    monkeypatch.setattr(settings, "PUBLISH_BACKEND", "local")
    assert isinstance(hub.hub_for("hf_token"), hub.LocalHub)
