"""Database tables (SQLAlchemy 2). The API never returns these rows directly: see app/schemas.py."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from awqforge import spec

# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC on every backend (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


# One vocabulary each, declared with the job's settings (awqforge.spec); re-exported for the service.
JobStatus = spec.JobStatus
TERMINAL_STATUSES = spec.TERMINAL_STATUSES
# A job at this stage has its artifact set recorded: it only publishes from then on (a publish retry, or a
# run lost while publishing), whichever task carries it; the artifacts are never made again.
PUBLISH_STAGE = spec.JobStage.PUBLISH.value
# A job that ended below its quality gate (eval.gate) or whose task evaluation failed: failed, its artifact set
# recorded and kept; POST /v1/jobs/{id}/publish with override_gate publishes it anyway.
GATE_STAGE = spec.GATE_STAGE


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Hub namespaces (the `owner` of `owner/name`) this tenant may publish to; NULL = its own name only.
    hub_namespaces: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # Whether jobs without their own token may use the service's HF_TOKEN (read and write).
    allow_service_token: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the public key id (prefix)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole key
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    tenant: Mapped[Tenant] = relationship()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(500), index=True)
    revision: Mapped[str | None] = mapped_column(String(200), nullable=True)
    method: Mapped[str] = mapped_column(String(16))
    bits: Mapped[int] = mapped_column(Integer)
    group_size: Mapped[int] = mapped_column(Integer)
    # The JobSpec as JSON, without the publish token.
    spec: Mapped[dict] = mapped_column(JSON)
    # Fernet-encrypted tokens (app/core/security.py), deleted when the job reaches a terminal state.
    publish_token_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    source_token_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    # where the job publishes (huggingface | local), chosen by its first publish: a retry never changes it
    publish_backend: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The commit sha `revision` resolved to on the hub (None for a local model).
    source_sha: Mapped[str | None] = mapped_column(String(64), nullable=True)
    queue: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    output_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When the job's Celery message was last sent (None: not sent yet, e.g. the broker was down) and
    # how many times; the reconciler resends a queued job whose message is overdue (jobs.reconcile_queued).
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    dispatches: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    metrics: Mapped[JobMetrics | None] = relationship(cascade="all, delete-orphan", uselist=False)
    artifacts: Mapped[list[Artifact]] = relationship(cascade="all, delete-orphan", order_by="Artifact.id")


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # status | stage | progress | log
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)


class JobMetrics(Base):
    """One row per finished job; plain columns so a dashboard can query them with SQL."""

    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    fp_perplexity: Mapped[float | None] = mapped_column(Float, nullable=True)
    quant_perplexity: Mapped[float | None] = mapped_column(Float, nullable=True)
    resolve_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    calibrate_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    quantize_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    evaluate_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    package_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    publish_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    total_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    peak_rss_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    peak_gpu_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    size_before_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    size_after_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    n_layers_quantized: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # what the job really calibrated and evaluated on (a short source is used as far as it goes)
    calibration_samples: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    calibration_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    calibration_shortfall: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    eval_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LayerMetric(Base):
    __tablename__ = "layer_metrics"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    block: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(300))
    mse_rtn: Mapped[float | None] = mapped_column(Float, nullable=True)
    mse_quant: Mapped[float | None] = mapped_column(Float, nullable=True)
    scale_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    clip_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("art"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    format: Mapped[str] = mapped_column(String(32))  # awq | compressed-tensors | report
    path: Mapped[str] = mapped_column(Text)  # folder (or file) under ARTIFACT_DIR
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # [{"path", "size_bytes", "sha256"}] as the worker wrote them (None for rows older than 0006): what a
    # publish retry checks its copy against, wherever the store is.
    files: Mapped[list | None] = mapped_column(JSON, nullable=True)
    published_to: Mapped[str | None] = mapped_column(Text, nullable=True)
    commit_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    hub_revision: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the publish commit
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TaskMetric(Base):
    """One lm-evaluation-harness task of a job: FP and quantized scores, stderr, recovery (eval.tasks)."""

    __tablename__ = "task_metrics"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(200))
    metric: Mapped[str] = mapped_column(String(64))
    fp: Mapped[float | None] = mapped_column(Float, nullable=True)
    quantized: Mapped[float | None] = mapped_column(Float, nullable=True)
    stderr: Mapped[float | None] = mapped_column(Float, nullable=True)  # the quantized score's
    fp_stderr: Mapped[float | None] = mapped_column(Float, nullable=True)
    recovery: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    fp_cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    fp_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    quantized_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TaskFPScore(Base):
    """An FP model's score on a task, kept for later jobs: `key` is the engine's cache key (model revision,
    task definition and settings); `scope` is "public" (a public hub revision: any tenant reuses it) or
    "tenant:<id>" (a private or local model: only its tenant)."""

    __tablename__ = "task_fp_scores"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[str] = mapped_column(String(40), primary_key=True)
    task: Mapped[str] = mapped_column(String(200))
    score: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class CalibrationSet(Base):
    __tablename__ = "calibration_sets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cal"))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(300))
    format: Mapped[str] = mapped_column(String(16))  # txt | jsonl | parquet
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    n_records: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DashboardSession(Base):
    """A signed-in dashboard browser: the cookie holds a random token, only its sha256 is stored."""

    __tablename__ = "dashboard_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    tenant: Mapped[Tenant] = relationship()
    api_key: Mapped[ApiKey] = relationship()


class WorkerHeartbeat(Base):
    """One row per Celery worker node, touched every HEARTBEAT_INTERVAL_S (for /metrics)."""

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    queues: Mapped[str] = mapped_column(String(200))  # comma-separated queue classes
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
