"""Service settings: one class, read from the environment (and an optional .env file).

Every other module imports `settings`; nothing else reads os.environ for configuration.
With neither DATABASE_URL nor REDIS_URL/BROKER_URL set the service runs "embedded":
SQLite under AWQFORGE_HOME and kombu's filesystem transport as the broker (no server needed).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from awqforge.parsing import parse_size


def is_cpu_class(name: str) -> bool:
    """A queue class for CPU workers (QUEUE_CLASSES names starting with "cpu"); every other class is a GPU's."""
    return name.startswith("cpu")


_UNSAFE_SECRETS = {"changethis", "secret", "changeme", "password", ""}


def _default_home() -> Path:
    return Path(os.environ.get("AWQFORGE_HOME", "~/.awqforge")).expanduser()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")

    ENVIRONMENT: Literal["local", "staging", "production"] = "local"
    API_V1_STR: str = "/v1"
    PROJECT_NAME: str = "AWQForge"

    AWQFORGE_HOME: Path = Field(default_factory=_default_home)
    DATABASE_URL: str | None = None
    # Or the parts (docker-compose): the URL is built with each part percent-encoded, so a password
    # with '@', ':', '/' or '%' works. DATABASE_URL wins when both are set.
    POSTGRES_SERVER: str | None = None
    POSTGRES_PORT: int = 5432
    POSTGRES_USER: str = "postgres"
    POSTGRES_PASSWORD: str | None = None
    POSTGRES_DB: str = "awqforge"
    # REDIS_URL and BROKER_URL are synonyms; BROKER_URL wins when both are set.
    REDIS_URL: str | None = None
    BROKER_URL: str | None = None

    # Encrypts publish tokens at rest (Fernet key derived from it). Generated and kept in
    # AWQFORGE_HOME/secret.key when unset; must be set explicitly outside ENVIRONMENT=local.
    SECRET_KEY: str | None = None

    HUB_DIR: Path | None = None  # local hub folder (publish backend without a token)
    # auto: the Hugging Face Hub when the job has a token or HF_ENDPOINT/HF_TOKEN is set, else HUB_DIR.
    PUBLISH_BACKEND: Literal["auto", "local", "huggingface"] = "auto"
    HF_ENDPOINT: str | None = None
    HF_TOKEN: str | None = (
        None  # used only for tenants allowed to (`awqforge tenants update --allow-service-token`)
    )
    HUB_METADATA_TIMEOUT_S: float = 5.0  # the config.json look-up that routes a hub model at submit
    PUBLISH_ATTEMPTS: int = 5  # tries per hub request on 429/5xx
    PUBLISH_BACKOFF_S: float = 1.0  # first wait when no Retry-After is given; doubles per try (cap 60 s)
    ARTIFACT_DIR: Path | None = None  # where workers write artifacts (kept there by the local store)
    # Artifact store (app/services/storage.py): the local folder, or S3-compatible object storage that
    # workers on any machine upload to and the API of any machine reads (streams or presigns) from.
    ARTIFACT_STORE: Literal["local", "s3"] = "local"
    S3_ENDPOINT_URL: str | None = None  # e.g. http://minio:9000; None: AWS
    # The store's address as the API's clients reach it, for presigned download URLs (default: S3_ENDPOINT_URL,
    # which inside compose is a name only the containers resolve).
    S3_PUBLIC_ENDPOINT_URL: str | None = None
    S3_BUCKET: str | None = None
    S3_PREFIX: str = "awqforge"  # keys: <prefix>/tenant-<id>/<job id>/<format>/<file>
    S3_REGION: str = "us-east-1"
    S3_ACCESS_KEY_ID: str | None = None
    S3_SECRET_ACCESS_KEY: str | None = None
    S3_ADDRESSING_STYLE: Literal["auto", "path", "virtual"] = "path"
    S3_MULTIPART_THRESHOLD: int = Field(64 * 1024**2, ge=5 * 1024**2)
    S3_MULTIPART_CHUNKSIZE: int = Field(64 * 1024**2, ge=5 * 1024**2)
    S3_PRESIGN_EXPIRES_S: int = Field(3600, ge=60, le=7 * 24 * 3600)
    UPLOAD_DIR: Path | None = None
    # Local model paths and file: sources in job bodies must lie under one of these folders.
    # Uploads are the supported way to bring your own calibration data.
    # os.pathsep-separated in the environment (or a JSON list).
    ALLOWED_LOCAL_ROOTS: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    TENANT_MAX_QUEUED_JOBS: int = Field(4, ge=1, le=10_000)
    MAX_UPLOAD_BYTES: int = Field(64 * 1024 * 1024, ge=1024, le=4 * 1024**3)
    # Any other request body (a job is a few hundred bytes); larger ones get 413 before they are read.
    MAX_REQUEST_BYTES: int = Field(1024 * 1024, ge=1024, le=64 * 1024**2)
    DB_RETRY_AFTER_S: int = Field(5, ge=1, le=3600)  # Retry-After of the 503 while the database is down
    # Connections per process; the API also admits at most this many requests at once to its database
    # routes (more wait in the event loop, holding neither a thread nor a connection).
    DB_POOL_SIZE: int = Field(20, ge=1, le=500)
    IDEMPOTENCY_TTL_HOURS: int = Field(24, ge=24, le=24 * 90)
    # A read (GET/HEAD) may use an API key's answer (its tenant) for this long without asking the
    # database: a key revoked in another process still reads for at most this many seconds; it can
    # change nothing meanwhile (every other method asks the database). 0: always ask.
    API_KEY_CACHE_S: float = Field(5.0, ge=0, le=300)
    # A pooled connection idle for longer than this is checked (a round trip) before it is used again;
    # one in steady use is not. A connection that died meanwhile fails its request with 503, once.
    DB_PING_IDLE_S: float = Field(1.0, ge=0, le=3600)

    # Celery / job execution
    CELERY_QUEUE_PREFIX: str = ""
    # Queue classes and the memory a worker of each class has for one job (GPU memory; RAM for cpu*
    # classes). A job goes to the smallest class its memory plan fits (awqforge/plan.py).
    QUEUE_CLASSES: str = "cpu=64GiB,gpu-24g=24GiB,gpu-80g=80GiB"
    QUEUE_MEMORY_HEADROOM: float = Field(0.9, gt=0, le=1)  # fraction of a class's memory a plan may use
    DEFAULT_QUEUE: str = "gpu-80g"  # when the model's config cannot be read (hub unreachable)
    LIVE_WORKERS_TIMEOUT_S: float = Field(1.0, gt=0, le=30)  # Celery inspect reply wait
    LIVE_WORKERS_CACHE_S: float = Field(15.0, ge=0)  # how long the live queues answer is reused
    JOB_SOFT_TIME_LIMIT_S: int = Field(6 * 3600, ge=60)
    JOB_HARD_TIME_LIMIT_S: int = Field(6 * 3600 + 600, ge=60)
    HEARTBEAT_INTERVAL_S: float = Field(10.0, gt=0)
    HEARTBEAT_STALE_S: float = Field(120.0, gt=0)
    REAPER_INTERVAL_S: float = Field(30.0, gt=0)
    # A finished job's artifacts (files or objects) are deleted this many days after it ended (None: kept).
    ARTIFACT_RETENTION_DAYS: float | None = Field(None, gt=0)
    MAX_ATTEMPTS: int = Field(3, ge=1)
    # A queued job whose message was sent this long ago and that has not started is sent again
    # (doubling each time, up to 16x): the message may have been consumed without a claim, or lost.
    REDISPATCH_AFTER_S: float = Field(600.0, gt=0)

    # Dashboard sign-in: an API key is exchanged for a session cookie that lasts this long.
    DASHBOARD_SESSION_HOURS: float = Field(8.0, gt=0, le=24 * 30)
    # Behind a TLS-terminating proxy: believe its X-Forwarded-Proto (marks the cookie Secure).
    TRUST_FORWARDED_PROTO: bool = False
    # Celery workers serve their own Prometheus metrics on this port (0: off; one port per worker).
    WORKER_METRICS_PORT: int = Field(0, ge=0, le=65535)

    @field_validator("ALLOWED_LOCAL_ROOTS", mode="before")
    @classmethod
    def _split_roots(cls, v: object) -> object:
        if isinstance(v, str):
            if v.strip().startswith("["):
                import json

                return json.loads(v)
            return [p for p in v.split(os.pathsep) if p.strip()]
        return v

    @model_validator(mode="after")
    def _derive_and_check(self) -> Settings:
        home = self.AWQFORGE_HOME.expanduser()
        self.AWQFORGE_HOME = home
        self.HUB_DIR = (self.HUB_DIR or home / "hub").expanduser()
        self.ARTIFACT_DIR = (self.ARTIFACT_DIR or home / "artifacts").expanduser()
        self.UPLOAD_DIR = (self.UPLOAD_DIR or home / "uploads").expanduser()
        if self.is_embedded and not self.ALLOWED_LOCAL_ROOTS:
            # Single-user local mode: checkpoints under AWQFORGE_HOME/models may be named by path.
            self.ALLOWED_LOCAL_ROOTS = [home / "models"]
        if self.JOB_HARD_TIME_LIMIT_S <= self.JOB_SOFT_TIME_LIMIT_S:
            raise ValueError("JOB_HARD_TIME_LIMIT_S must be above JOB_SOFT_TIME_LIMIT_S")
        if self.HEARTBEAT_STALE_S < 3 * self.HEARTBEAT_INTERVAL_S:
            raise ValueError("HEARTBEAT_STALE_S must be at least 3 x HEARTBEAT_INTERVAL_S")
        if self.ARTIFACT_STORE == "s3" and not self.S3_BUCKET:
            raise ValueError("ARTIFACT_STORE=s3 needs S3_BUCKET (and S3_ENDPOINT_URL for a non-AWS store)")
        classes = self.queue_classes  # parses QUEUE_CLASSES, raising on a bad entry
        if self.DEFAULT_QUEUE not in classes:
            raise ValueError(
                f"DEFAULT_QUEUE {self.DEFAULT_QUEUE!r} is not one of QUEUE_CLASSES ({', '.join(classes)})"
            )
        if self.CELERY_QUEUE_PREFIX and not all(c.isalnum() or c in "-_." for c in self.CELERY_QUEUE_PREFIX):
            raise ValueError("CELERY_QUEUE_PREFIX may hold only letters, digits, '-', '_' and '.'")
        if self.SECRET_KEY is not None and (
            self.SECRET_KEY.lower() in _UNSAFE_SECRETS or len(self.SECRET_KEY) < 32
        ):
            # refused everywhere: a short key would otherwise pass here and fail later, at start
            raise ValueError(
                f"SECRET_KEY is a default or shorter than 32 characters ({len(self.SECRET_KEY)}); "
                "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        if not self.DATABASE_URL and self.POSTGRES_SERVER:
            from urllib.parse import quote

            auth = quote(self.POSTGRES_USER, safe="")
            if self.POSTGRES_PASSWORD:
                auth += ":" + quote(self.POSTGRES_PASSWORD, safe="")
            self.DATABASE_URL = (
                f"postgresql+psycopg://{auth}@{self.POSTGRES_SERVER}:{self.POSTGRES_PORT}/"
                f"{quote(self.POSTGRES_DB, safe='')}"
            )
        if self.ENVIRONMENT != "local":
            if self.SECRET_KEY is None:
                raise ValueError("SECRET_KEY must be set when ENVIRONMENT is not 'local'")
            if self.is_embedded:
                raise ValueError(
                    f"ENVIRONMENT={self.ENVIRONMENT} needs DATABASE_URL and REDIS_URL (no embedded mode)"
                )
        return self

    @property
    def is_embedded(self) -> bool:
        return not self.DATABASE_URL and not (self.REDIS_URL or self.BROKER_URL)

    @property
    def database_url(self) -> str:
        url = self.DATABASE_URL or f"sqlite:///{self.AWQFORGE_HOME / 'awqforge.db'}"
        # A bare postgres URL would pick psycopg2; this project uses psycopg 3.
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def broker_url(self) -> str:
        return self.BROKER_URL or self.REDIS_URL or "filesystem://"

    @property
    def broker_is_filesystem(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.AWQFORGE_HOME / "broker"

    @property
    def queue_classes(self) -> dict[str, int]:
        """QUEUE_CLASSES as {name: memory bytes}, smallest first; `cpu*` names are CPU workers."""
        out: dict[str, int] = {}
        for entry in filter(None, (e.strip() for e in self.QUEUE_CLASSES.split(","))):
            name, sep, size = entry.partition("=")
            name = name.strip()
            if not sep or not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"QUEUE_CLASSES entry {entry!r} is not name=memory (e.g. gpu-24g=24GiB)")
            out[name] = parse_size(size, field=f"QUEUE_CLASSES {name}")
        if not out:
            raise ValueError("QUEUE_CLASSES names no queue class")
        return dict(sorted(out.items(), key=lambda kv: kv[1]))

    def queue_name(self, queue_class: str) -> str:
        return f"{self.CELERY_QUEUE_PREFIX}{queue_class}"

    def secret_key(self) -> str:
        """The configured SECRET_KEY, or one generated once and kept (0600) under AWQFORGE_HOME."""
        if self.SECRET_KEY:
            return self.SECRET_KEY
        path = self.AWQFORGE_HOME / "secret.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".secret.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
            try:  # first writer wins; a concurrent process reads the winner's key
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        return path.read_text().strip()

    def ensure_dirs(self) -> None:
        for d in (self.AWQFORGE_HOME, self.HUB_DIR, self.ARTIFACT_DIR, self.UPLOAD_DIR):
            d.mkdir(parents=True, exist_ok=True)
        if self.broker_is_filesystem:
            for sub in ("queue", "control", "processed"):
                (self.broker_dir / sub).mkdir(parents=True, exist_ok=True)


settings = Settings()
