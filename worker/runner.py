"""Runs one job: claim the row, call the engine, record progress, metrics and artifacts, publish.

A plain function (no Celery here) so that it can be tested and called without a broker.
Stages resolve -> calibrate -> quantize -> evaluate -> package run inside
awqforge.pipeline.run_quantization; publish runs here afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import sysconfig
import threading
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from app.core.config import settings
from app.core.db import in_session_retrying, is_connection_error, session_scope
from app.core.security import decrypt_secret
from app.models import (
    GATE_STAGE,
    PUBLISH_STAGE,
    Artifact,
    CalibrationSet,
    Job,
    JobMetrics,
    JobStatus,
    LayerMetric,
    TaskMetric,
    Tenant,
    utcnow,
)
from app.services import lifecycle
from app.services.events import add_event
from app.services.storage import artifact_store, file_manifest, job_key, store_for
from app.services.uploads import allowed_roots
from worker.task_eval import fp_cache_for, task_metric_rows

log = logging.getLogger("awqforge.worker")

# The engine reports overall progress (0..1 across resolve..package); publishing, done here, takes
# the last PUBLISH_SHARE of the bar when the job publishes.
PUBLISH_SHARE = 0.03
OUTAGE_WAIT_S = 600.0  # how long a worker whose job lost the database waits to queue it again
_STAGE_ALIASES = {
    "calibration": "calibrate",
    "quantization": "quantize",
    "evaluation": "evaluate",
    "eval": "evaluate",
}


class JobCancelledByUser(Exception):
    pass


def claim_job(job_id: str, worker_name: str) -> tuple[str, Job | None]:
    """Atomically move a job to running (lifecycle.claimable). Returns (outcome, job); job is None unless
    claimed. A succeeded/failed/cancelled job is never rerun, nor is one at the publish stage (its artifact
    set is recorded): outcome "publish", the caller publishes it."""
    now = utcnow()
    claimable = lifecycle.claimable(worker_name, now)
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            return "missing", None
        if job.status in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value):
            return f"already {job.status}", None
        res = s.execute(
            update(Job)
            .where(
                Job.id == job_id,
                claimable,
                Job.cancel_requested.is_(False),
                Job.attempts < settings.MAX_ATTEMPTS,
                lifecycle.at_publish(False),
            )
            .values(
                status=JobStatus.RUNNING.value,
                worker=worker_name,
                heartbeat_at=now,
                started_at=now,
                attempts=Job.attempts + 1,
                stage="resolve",
                progress=0.0,
                eta_s=None,
                error=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:
            s.refresh(job)
            if job.stage == PUBLISH_STAGE and job.status in lifecycle.ACTIVE_STATUSES:
                return "publish", None
            if job.cancel_requested and lifecycle.finish(
                s, job_id, JobStatus.CANCELLED, message="cancelled before it started", where=(claimable,)
            ):
                return "cancelled", None
            if job.attempts >= settings.MAX_ATTEMPTS and lifecycle.finish(
                s,
                job_id,
                JobStatus.FAILED,
                error=f"gave up after {job.attempts} attempts (worker lost)",
                where=(claimable,),
            ):
                # Redelivered after its worker died MAX_ATTEMPTS times: `attempts` stays the count of runs.
                return "gave up", None
            s.refresh(job)
            return f"not claimable ({job.status})", None
        s.refresh(job)
        # A previous run's recorded rows stay until this run records its own (record_result replaces them).
        add_event(
            s,
            job_id=job_id,
            kind="status",
            message=f"running on {worker_name} (attempt {job.attempts})",
            stage="resolve",
            progress=0.0,
        )
        s.expunge(job)
        return "claimed", job


def _requeue_for_shutdown(
    s, job_id: str, *, stage: str | None = None, message: str = "worker shut down mid-job: requeued"
) -> None:
    lifecycle.requeue(
        s,
        job_id,
        message=message,
        stage=stage,
        progress=0.0,
        eta_s=None,
        dispatched_at=None,
    )


class _JobReporter:
    """The progress/cancel/log callbacks handed to the engine, plus the heartbeat thread."""

    def __init__(
        self,
        job_id: str,
        worker_name: str,
        secrets_to_hide: list[str],
        publishes: bool,
        paths: dict[str, str] | None = None,
    ):
        self.job_id = job_id
        self.engine_share = 1.0 - PUBLISH_SHARE if publishes else 1.0
        self.worker_name = worker_name
        self.hide = [x for x in secrets_to_hide if x]
        self.paths = sorted((paths or {}).items(), key=lambda kv: -len(kv[0]))  # longest first
        self.stage = "resolve"
        self.progress_value = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self.lost = False
        self._last_progress_write = 0.0
        self._last_block: Any = None
        self._stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{job_id}", daemon=True)

    def scrub(self, text: str) -> str:
        """What a tenant may read: no secret, and server folders named by what they hold."""
        for secret in self.hide:
            text = text.replace(secret, "***")
        for path, name in self.paths:
            text = text.replace(path, name)
        return text

    # heartbeat
    def start(self) -> None:
        self._hb.start()

    def stop(self) -> None:
        self._stop.set()
        self._hb.join(timeout=5)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(settings.HEARTBEAT_INTERVAL_S):
            try:
                self.beat()
            except Exception:  # a missed beat is not fatal; a stale one gets the job requeued
                log.exception("heartbeat failed for %s", self.job_id)

    def beat(self) -> None:
        _db(
            lambda s: s.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.status == JobStatus.RUNNING.value)
                .values(heartbeat_at=utcnow())
                .execution_options(synchronize_session=False)
            ),
            "heartbeat",
        )

    # engine callbacks
    def progress(self, event: Any, *, force: bool = False) -> None:
        get = event.get if isinstance(event, dict) else lambda k, d=None: getattr(event, k, d)
        stage = _STAGE_ALIASES.get(str(get("stage") or self.stage), str(get("stage") or self.stage))
        frac = float(get("progress", 0.0) or 0.0)
        block, n_blocks = get("block"), get("n_blocks")
        now = time.monotonic()
        changed = force or stage != self.stage or block != self._last_block
        if not changed and now - self._last_progress_write < 0.5 and frac < 1.0:
            return  # progress at each block; within a block at most twice a second
        self.stage = stage
        self._last_block = block
        self._last_progress_write = now
        frac = min(max(frac, 0.0), 1.0)
        overall = (
            self.engine_share + (1 - self.engine_share) * frac
            if stage == "publish"
            else self.engine_share * frac
        )
        self.progress_value = max(self.progress_value, overall)
        message = get("message")
        if message is None and block is not None and n_blocks:
            message = f"block {block}/{n_blocks}"

        def write(s) -> None:
            res = s.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.status == JobStatus.RUNNING.value,
                    Job.worker == self.worker_name,  # a run whose job was given away writes nothing
                )
                .values(
                    stage=stage,
                    progress=self.progress_value,
                    eta_s=get("eta_s"),
                    heartbeat_at=utcnow(),
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            if res.rowcount != 1:
                return
            add_event(
                s,
                job_id=self.job_id,
                kind="progress",
                stage=stage,
                progress=self.progress_value,
                message=self.scrub(str(message)) if message is not None else None,
            )

        _db(write, "progress")

    def set_stage(self, stage: str, frac: float = 0.0, message: str | None = None) -> None:
        """A stage's start or end: always recorded (never merged away by the progress throttle)."""
        self.progress({"stage": stage, "progress": frac, "message": message}, force=True)

    def log(self, *args: Any, **_kw: Any) -> None:
        message = self.scrub(" ".join(str(a) for a in args))
        log.info("[%s] %s", self.job_id, message)
        _db(
            lambda s: add_event(s, job_id=self.job_id, kind="log", stage=self.stage, message=message[:4000]),
            "log",
        )

    def cancel(self) -> bool:
        """Polled by the engine between blocks; reads the flag from the database at most 4 times a second."""
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= 0.25:
            self._last_cancel_check = now
            row = _db(
                lambda s: s.execute(
                    select(Job.cancel_requested, Job.status, Job.worker).where(Job.id == self.job_id)
                ).one_or_none(),
                "cancel check",
            )
            # The run stops when asked to, or when the job is no longer its own (the reaper gave it away while
            # this worker could not reach the database): it then ends nothing (its finish() matches no row).
            self.lost = row is None or row[1] != JobStatus.RUNNING.value or row[2] != self.worker_name
            self._cancelled = self.lost or bool(row[0])
        return self._cancelled


def _db(work, what: str):
    """A worker's database access during a job: a database restart is waited out (up to the time after
    which the reaper would call the job lost anyway), not turned into a failed job."""
    return in_session_retrying(work, retry_for_s=settings.HEARTBEAT_STALE_S, what=what)


def _resolve_spec(job: Job, tokens: _Tokens):
    """The engine's spec (tokens put back, an upload's id turned into its file) and the upload's (file, id)."""
    from awqforge.spec import JobSpec

    upload = None
    data = dict(job.spec)
    source = data.get("calibration", {}).get("source", "")
    if source.startswith("upload:"):
        with session_scope() as s:
            cal = s.scalar(
                select(CalibrationSet).where(
                    CalibrationSet.id == source[7:], CalibrationSet.tenant_id == job.tenant_id
                )
            )
            if cal is None:
                raise ValueError(f"calibration set {source[7:]} not found")
            data["calibration"] = {**data["calibration"], "source": f"file:{cal.path}"}
            upload = (str(cal.path), source)
    data["source"] = {**data.get("source", {}), "token": tokens.source}
    if tokens.publish and data.get("publish"):
        data["publish"] = {**data["publish"], "token": tokens.publish}
    return JobSpec.model_validate(data), upload


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _metric_columns(metrics: dict, publish_s: float | None, total_s: float) -> dict:
    wall = metrics.get("wall_time_s") or {}
    wall = {_STAGE_ALIASES.get(k, k): v for k, v in wall.items()}
    return {
        "fp_perplexity": metrics.get("fp_perplexity"),
        "quant_perplexity": metrics.get("quant_perplexity"),
        "resolve_s": wall.get("resolve"),
        "calibrate_s": wall.get("calibrate"),
        "quantize_s": wall.get("quantize"),
        "evaluate_s": wall.get("evaluate"),
        "package_s": wall.get("package"),
        "publish_s": publish_s,
        "total_s": total_s,
        "peak_rss_bytes": metrics.get("peak_rss_bytes"),
        "peak_gpu_bytes": metrics.get("peak_gpu_bytes"),
        "size_before_bytes": metrics.get("size_before_bytes"),
        "size_after_bytes": metrics.get("size_after_bytes"),
        "n_layers_quantized": metrics.get("n_layers_quantized"),
        **{
            k: metrics.get(k)
            for k in ("calibration_samples", "calibration_tokens", "calibration_shortfall", "eval_tokens")
        },
    }


def _layer_row(job_id: str, m: Any) -> LayerMetric:
    get = m.get if isinstance(m, dict) else lambda k, d=None: getattr(m, k, d)
    return LayerMetric(
        job_id=job_id,
        block=int(get("block", 0) or 0),
        name=str(get("name")),
        mse_rtn=get("mse_rtn"),
        mse_quant=get("mse_quant"),
        scale_ratio=get("scale_ratio"),
        clip_ratio=get("clip_ratio"),
    )


def job_output_dir(job: Job) -> Path:
    return lifecycle.job_output_dir(job.tenant_id, job.id)


def job_work_dir(job: Job) -> Path:
    return lifecycle.job_work_dir(job.tenant_id, job.id)


@dataclass
class _Tokens:
    source: str | None
    publish: str | None
    tenant: str

    @property
    def secrets(self) -> list[str]:
        return [t for t in (self.source, self.publish, settings.HF_TOKEN) if t]


def _tokens(job: Job) -> _Tokens:
    """The job's own tokens; else the service's HF_TOKEN, only for a tenant an admin allowed to use it."""
    with session_scope() as s:
        tenant = s.get(Tenant, job.tenant_id)
        service = settings.HF_TOKEN if tenant is not None and tenant.allow_service_token else None
        name = tenant.name if tenant is not None else f"tenant-{job.tenant_id}"
    source = decrypt_secret(job.source_token_enc) if job.source_token_enc else None
    publish = decrypt_secret(job.publish_token_enc) if job.publish_token_enc else None
    return _Tokens(source=source or service, publish=publish or service, tenant=name)


def _server_paths(job: Job, upload: tuple[str, str] | None = None) -> dict[str, str]:
    """The server's folders a message may name, and what a tenant reads instead (the same for every job)."""
    from huggingface_hub import constants

    named = {
        job_output_dir(job): "<job output>",
        lifecycle.run_staging_dir(job.tenant_id, job.id): "<job output>",
        job_work_dir(job): "<job checkpoints>",
        lifecycle.publish_staging_dir(job.id): "<job output>",
        settings.ARTIFACT_DIR: "<artifacts>",
        settings.UPLOAD_DIR: "<uploads>",
        settings.HUB_DIR: "<local hub>",
        Path(constants.HF_HUB_CACHE): "<hub cache>",
        Path(constants.HF_HOME): "<hub home>",
        settings.AWQFORGE_HOME: "<service home>",
    }
    out = {}
    for path, name in named.items():
        for form in {str(path), str(Path(path).resolve())}:
            out.setdefault(form, name)
    if upload is not None:  # the uploaded calibration file by its id
        out[upload[0]] = upload[1]
        out[f"file:{upload[0]}"] = upload[1]
    return out


_CODE_ROOTS = re.compile(
    r'File "(?:[^"]*/(?:site-packages|dist-packages)/|'
    + re.escape(str(Path(__file__).resolve().parent.parent))
    + "/|"
    + re.escape(sysconfig.get_paths()["stdlib"])
    + "/)"
)


def _code_relative(trace: str) -> str:
    """A traceback with its source files named within their package, not by the server's folders."""
    return _CODE_ROOTS.sub('File "', trace)


def _forbid_implicit_hub_token() -> None:
    """The hub client must never pick up HF_TOKEN or a login file on its own: every request carries the
    token this job may use, or none."""
    from huggingface_hub import constants

    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True


def publish_artifacts(
    job_id: str,
    *,
    repo_id: str,
    private: bool,
    tokens: _Tokens,
    local: dict[str, Path] | None = None,
) -> float:
    """Publish the job's recorded artifacts (not the report) in one commit; store where, which commit.
    `local`: the artifacts' folders on this machine by format (the run that just made them); else the
    recorded artifact set is read from its store, wherever that is (an object store: downloaded into a
    temporary folder, removed afterwards), and checked against its recorded sha256s first.
    Returns the seconds it took. Raises worker.hub.PublishRefused, ArtifactMismatch or the hub's error."""
    from worker.hub import hub_for

    t0 = time.monotonic()
    with ExitStack() as copies:
        if local is not None:
            arts = [(fmt, p) for fmt, p in local.items() if fmt != "report"]
        else:
            with session_scope() as s:
                rows = [
                    (a.format, a.path, a.files)
                    for a in s.scalars(
                        select(Artifact)
                        .where(Artifact.job_id == job_id, Artifact.format != "report")
                        .order_by(Artifact.format)
                    )
                ]
            if not rows:
                raise ValueError("the job has no recorded artifacts to publish")
            # One folder per job and format: a publish of this job run again on this machine replaces what a
            # killed one left there.
            scratch = lifecycle.publish_staging_dir(job_id)
            copies.callback(shutil.rmtree, scratch, ignore_errors=True)
            arts = [
                (
                    fmt,
                    copies.enter_context(
                        store_for(path).local_copy(path, files=files, scratch=scratch / fmt)
                    ),
                )
                for fmt, path, files in rows
            ]
        folders = {"": arts[0][1]} if len(arts) == 1 else dict(arts)
        backend = _publish_destination(job_id, tokens.publish)
        published = hub_for(tokens.publish, backend).publish(
            folders, repo_id, private=private, tenant=tokens.tenant
        )
    remote = published.commit_url is not None
    with session_scope() as s:
        for a in s.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.format != "report")):
            sub = "" if len(arts) == 1 else a.format
            if remote:
                a.published_to = published.location + (f"/tree/{published.revision}/{sub}" if sub else "")
            else:
                a.published_to = f"local:{repo_id}" + (f"/{sub}" if sub else "")  # not the server's folder
            a.commit_url = published.commit_url
            a.hub_revision = published.revision
        add_event(
            s,
            job_id=job_id,
            kind="log",
            stage="publish",
            message=f"published to {repo_id} at {published.revision}"
            + ("" if published.committed else " (files unchanged: no new commit)"),
        )
    return time.monotonic() - t0


def _scrub_written(folder: Path, reporter: _JobReporter) -> None:
    """The report and the cards are read by the tenant and published: no secret and no server folder named
    there. An artifact whose file changed gets its manifest (sizes, sha256) written again."""
    from awqforge.manifest import MANIFEST_NAME, write_manifest

    changed = []
    for text_file in (*folder.rglob("*.md"), *folder.rglob("quant_report.json")):
        text = text_file.read_text()
        if (clean := reporter.scrub(text)) != text:
            text_file.write_text(clean)
            changed.append(text_file)
    for manifest in sorted(folder.rglob(MANIFEST_NAME), key=lambda m: -len(m.parts)):  # nested ones first
        if any(f.is_relative_to(manifest.parent) for f in changed):
            write_manifest(manifest.parent)


def _publish_destination(job_id: str, token: str | None) -> str:
    """The hub this job publishes to: the one its first publish chose (recorded on the job), else chosen now
    (PUBLISH_BACKEND, the job's token) and recorded, so that a retry or a publish again, with other tokens or
    none, never sends the job elsewhere."""
    from worker.hub import choose_backend

    def pick(s) -> str:
        recorded = s.scalar(select(Job.publish_backend).where(Job.id == job_id))
        if recorded:
            return recorded
        chosen = choose_backend(token)
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.publish_backend.is_(None))
            .values(publish_backend=chosen)
            .execution_options(synchronize_session=False)
        )
        return s.scalar(select(Job.publish_backend).where(Job.id == job_id)) or chosen

    return _db(pick, "choosing the publish destination")


def _quality_failed(job_id, reporter: _JobReporter, reason: str) -> str:
    """Below its quality gate (or its tasks could not run): failed at stage `gate`, artifacts recorded and
    kept, nothing published; POST /v1/jobs/{id}/publish with override_gate publishes anyway. finish() removes
    the checkpoints when it ends the job; a job given away keeps them for its new run."""
    error = reporter.scrub(reason)[:1900] + " (artifacts kept)"

    ended = _db(
        lambda s: lifecycle.finish(
            s,
            job_id,
            JobStatus.FAILED,
            where=(Job.worker == reporter.worker_name,),
            error=error,
            stage=GATE_STAGE,
        ),
        "recording the quality failure",
    )
    log.warning("job %s: %s", job_id, error)
    return "failed" if ended else "already ended"


def _publish_failed(job_id: str, reporter: _JobReporter, exc: Exception) -> str:
    """A failed publish leaves the job failed at the publish stage with its artifacts kept."""
    from worker.hub import PublishRefused

    reason = str(exc) if isinstance(exc, PublishRefused) else f"{type(exc).__name__}: {exc}"
    error = reporter.scrub(f"publish failed: {reason}")[:2000]
    ended = _db(
        lambda s: lifecycle.finish(
            s,
            job_id,
            JobStatus.FAILED,
            where=(Job.worker == reporter.worker_name,),
            error=error + " (artifacts kept; POST /v1/jobs/{id}/publish tries again)".replace("{id}", job_id),
            stage=PUBLISH_STAGE,
        ),
        "recording the failure",
    )
    log.warning("job %s: %s", job_id, error)
    return "failed" if ended else "already ended"


def claim_publish(job_id: str, worker_name: str) -> tuple[str, Job | None]:
    """Atomically move a job at the publish stage to running, with the same claim condition as a whole run:
    queued (by POST /v1/jobs/{id}/publish, or requeued after its worker was lost while publishing), or running
    with a stale heartbeat or on this same worker (a redelivery). `attempts` counts the publish runs."""
    now = utcnow()
    claimable = lifecycle.claimable(worker_name, now) & lifecycle.at_publish(True)
    with session_scope() as s:
        res = s.execute(
            update(Job)
            .where(
                Job.id == job_id,
                claimable,
                Job.cancel_requested.is_(False),
                Job.attempts < settings.MAX_ATTEMPTS,
            )
            .values(
                status=JobStatus.RUNNING.value,
                worker=worker_name,
                heartbeat_at=now,
                attempts=Job.attempts + 1,
                error=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        job = s.get(Job, job_id)
        if job is None:
            return "missing", None
        if res.rowcount != 1:
            if job.attempts >= settings.MAX_ATTEMPTS and lifecycle.finish(
                s,
                job_id,
                JobStatus.FAILED,
                error=f"publish gave up after {job.attempts} attempts (worker lost; artifacts kept)",
                where=(claimable,),
            ):
                return "gave up", None
            if job.cancel_requested and lifecycle.finish(
                s, job_id, JobStatus.CANCELLED, message="cancelled before publishing", where=(claimable,)
            ):
                return "cancelled", None
            s.refresh(job)
            return f"not claimable ({job.status}, {job.stage})", None
        s.refresh(job)
        add_event(
            s,
            job_id=job_id,
            kind="status",
            stage=PUBLISH_STAGE,
            message=f"publishing on {worker_name} (attempt {job.attempts})",
        )
        s.expunge(job)
        return "claimed", job


def run_publish(job_id: str, *, worker_name: str | None = None) -> str:
    """Publish the recorded artifact set of a job at the publish stage (POST /v1/jobs/{id}/publish, or a run
    lost while publishing), read from its store; nothing is quantized or packaged again."""
    worker_name = worker_name or socket.gethostname()
    outcome, job = claim_publish(job_id, worker_name)
    if job is None:
        log.info("job %s not published: %s", job_id, outcome)
        return outcome
    _forbid_implicit_hub_token()
    tokens = _tokens(job)
    reporter = _JobReporter(job_id, worker_name, tokens.secrets, publishes=True, paths=_server_paths(job))
    reporter.stage = "publish"
    publish = job.spec["publish"]
    reporter.start()  # a long upload keeps its heartbeat, so the reaper leaves it alone
    try:
        publish_s = publish_artifacts(
            job_id,
            repo_id=publish["repo_id"],
            private=publish.get("private", True),
            tokens=tokens,
        )
    except Exception as exc:
        return _publish_failed(job_id, reporter, exc)
    except BaseException:  # the worker is going away: publish again on the next one
        _db(lambda s: _requeue_for_shutdown(s, job_id, stage=PUBLISH_STAGE), "requeue")
        raise
    finally:
        reporter.stop()
        # a run lost while publishing left its checkpoints: the artifact set is final, they are not needed
        shutil.rmtree(job_work_dir(job), ignore_errors=True)

    def record_success(s) -> bool:
        metrics = s.get(JobMetrics, job_id)
        if metrics is not None:
            metrics.publish_s = publish_s
        return lifecycle.finish(
            s, job_id, JobStatus.SUCCEEDED, message="published", where=(Job.worker == worker_name,)
        )

    return "succeeded" if _db(record_success, "recording the publish") else "already ended"


def run_job(job_id: str, *, worker_name: str | None = None) -> str:
    """Run one job to a terminal state. Safe to call again for the same id (redelivery)."""
    worker_name = worker_name or f"{socket.gethostname()}"
    outcome, job = claim_job(job_id, worker_name)
    if outcome == "publish":  # its artifact set is recorded: a run message (stale, or resent) only publishes
        return run_publish(job_id, worker_name=worker_name)
    if job is None:
        log.info("job %s not run: %s", job_id, outcome)
        return outcome

    _forbid_implicit_hub_token()
    tokens = _tokens(job)
    reporter = _JobReporter(
        job_id, worker_name, tokens.secrets, publishes=bool(job.spec.get("publish")), paths=_server_paths(job)
    )
    out_dir = job_output_dir(job)  # the local store's folder of the job's runs
    staging = lifecycle.run_staging_dir(job.tenant_id, job_id)  # this run's output: scratch once stored
    work_dir = job_work_dir(job)
    t0 = time.monotonic()
    reporter.start()
    try:
        spec, upload = _resolve_spec(job, tokens)
        if upload is not None:
            reporter.paths = sorted(_server_paths(job, upload).items(), key=lambda kv: -len(kv[0]))
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        with session_scope() as s:
            s.execute(update(Job).where(Job.id == job_id).values(output_dir=str(out_dir)))

        from awqforge.pipeline import run_quantization  # imports torch: only ever in the worker child

        result = run_quantization(
            spec,
            staging,
            progress=reporter.progress,
            cancel=reporter.cancel,
            log=reporter.log,
            allowed_roots=allowed_roots(job.tenant_id),
            checkpoint_dir=work_dir,  # a run lost mid-way resumes at its last finished block
            fp_task_cache=fp_cache_for(job.tenant_id, spec),
        )
        quality_failure = getattr(result, "quality_failure", None)  # artifacts kept, not published

        store = artifact_store()
        made = {str(getattr(fmt, "value", fmt)): Path(p) for fmt, p in dict(result.artifacts).items()}
        report = getattr(result, "report_path", None)
        inside = report and any(Path(report).resolve().is_relative_to(p.resolve()) for p in made.values())
        if report and Path(report).exists() and not inside:
            made["report"] = Path(report)
        _scrub_written(staging, reporter)
        report_data = json.loads(Path(report).read_text()) if report and Path(report).is_file() else None
        # Files hashed, then stored, before the transaction that records them. Each run stores under a key
        # of its own: the set the job has recorded (a retry's previous run) stays whole until this one
        # replaces it, whatever happens to this run on the way.
        run_key = f"{job_key(job.tenant_id, job_id)}/run-{secrets.token_hex(4)}"
        stored = [
            dict(
                format=fmt,
                files=file_manifest(p),
                path=store.put(p, key=f"{run_key}/{fmt}"),
                size_bytes=_dir_size(p),
            )
            for fmt, p in made.items()
        ]

        def record_result(s) -> None:
            # idempotent: a run that recorded its result and was then lost records it again on resume
            s.execute(select(Job.id).where(Job.id == job_id).with_for_update())  # see prune_unrecorded
            for table in (JobMetrics, LayerMetric, Artifact, TaskMetric):
                s.query(table).filter(table.job_id == job_id).delete()
            s.add_all(task_metric_rows(job_id, report_data))
            s.add(
                JobMetrics(
                    job_id=job_id,
                    **_metric_columns(dict(result.metrics or {}), None, time.monotonic() - t0),
                )
            )
            s.add_all(_layer_row(job_id, m) for m in (result.layers or []))
            s.add_all(Artifact(job_id=job_id, **a) for a in stored)
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    source_sha=getattr(result, "source_revision", None),
                    # With the artifact set, in the same commit: from here on the job only publishes.
                    **({"stage": PUBLISH_STAGE} if spec.publish is not None and not quality_failure else {}),
                )
                .execution_options(synchronize_session=False)
            )

        _db(record_result, "recording the result")
        _db(lambda s: lifecycle.prune_unrecorded(s, job_id), "removing the replaced artifacts")
        if quality_failure:
            return _quality_failed(job_id, reporter, quality_failure)
        if spec.publish is not None:
            reporter.stage = PUBLISH_STAGE
            if reporter.cancel():
                raise JobCancelledByUser()
            reporter.set_stage(PUBLISH_STAGE, 0.0, f"publishing to {spec.publish.repo_id}")
            try:
                publish_s = publish_artifacts(
                    job_id,
                    repo_id=spec.publish.repo_id,
                    private=spec.publish.private,
                    tokens=tokens,
                    local=made,
                )
            except Exception as exc:
                shutil.rmtree(staging, ignore_errors=True)  # the store keeps them: this copy was scratch
                return _publish_failed(job_id, reporter, exc)
            reporter.set_stage("publish", 1.0)

            def record_publish(s) -> None:
                metrics = s.get(JobMetrics, job_id)
                metrics.publish_s, metrics.total_s = publish_s, time.monotonic() - t0

            _db(record_publish, "recording the publish")

        ended = _db(
            lambda s: lifecycle.finish(
                s,
                job_id,
                JobStatus.SUCCEEDED,
                where=(Job.worker == worker_name,),
                message="succeeded",
                stage=PUBLISH_STAGE if spec.publish is not None else "package",
            ),
            "recording the result",
        )
        shutil.rmtree(staging, ignore_errors=True)  # the store holds them now: this copy was scratch
        log.info("job %s %s", job_id, "succeeded" if ended else "ended elsewhere")
        return "succeeded" if ended else "already ended"
    except BaseException as exc:  # noqa: BLE001 - every way out must leave a terminal status
        if isinstance(exc, Exception) and is_connection_error(exc):
            # The database stayed away longer than a write is retried: not the job's failure. Its checkpoints
            # stay and it is queued again once the database answers (here, or by the reaper, which finds its
            # heartbeat stale); the next run resumes at its last finished block.
            shutil.rmtree(staging, ignore_errors=True)
            stage = PUBLISH_STAGE if reporter.stage == PUBLISH_STAGE else None
            try:
                in_session_retrying(
                    lambda s: _requeue_for_shutdown(
                        s, job_id, stage=stage, message="database unreachable mid-job: requeued"
                    ),
                    retry_for_s=OUTAGE_WAIT_S,
                    what="requeue after a database outage",
                )
            except Exception:
                log.warning("job %s: database still unreachable; the reaper requeues it", job_id)
            return "interrupted"
        cancelled = (
            isinstance(exc, JobCancelledByUser) or type(exc).__name__ == "JobCancelled" or reporter.cancel()
        )
        publishing = reporter.stage == PUBLISH_STAGE  # its artifact set is recorded
        if not isinstance(exc, Exception) and not cancelled:
            # The worker is going away (SystemExit, KeyboardInterrupt), not the job failing: queue it again
            # with its checkpoints kept; the reconciler sends it and the next worker resumes it. One lost
            # while publishing is queued to publish its recorded artifact set, which stays where it is stored.
            shutil.rmtree(staging, ignore_errors=True)
            stage = PUBLISH_STAGE if publishing else None
            _db(lambda s: _requeue_for_shutdown(s, job_id, stage=stage), "requeue")
            raise
        from awqforge.errors import describe  # one readable line, as the CLI prints it

        if type(exc).__name__ == "SoftTimeLimitExceeded":
            name = "time limit exceeded"
        elif isinstance(exc, DBAPIError):  # its text names the database's host and port
            name = "the database could not be reached for longer than the job's lease; retry the job"
        else:
            name = describe(exc)
        error = reporter.scrub(f"{reporter.stage} failed: {name}")[:2000]
        trace = (
            None
            if isinstance(exc, DBAPIError)
            else reporter.scrub(_code_relative(traceback.format_exc()))[-4000:]
        )

        mine = (Job.worker == worker_name,)  # a run whose job was given away ends nothing

        def record_failure(s) -> bool:
            if cancelled:
                return lifecycle.finish(
                    s, job_id, JobStatus.CANCELLED, message=f"cancelled during {reporter.stage}", where=mine
                )
            if trace:
                add_event(s, job_id=job_id, kind="log", stage=reporter.stage, message=trace)
            return lifecycle.finish(s, job_id, JobStatus.FAILED, error=error, where=mine)

        ended = _db(record_failure, "recording the failure")
        outcome = "cancelled" if cancelled else "failed"
        log.warning("job %s %s", job_id, outcome if ended else "ended elsewhere")
        return outcome if ended else "already ended"
    finally:
        reporter.stop()
