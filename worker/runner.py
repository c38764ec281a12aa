"""Runs one job: claim the row, call the engine, record progress, metrics and artifacts, publish.

A plain function (no Celery here) so that it can be tested and called without a broker.
Stages resolve -> calibrate -> quantize -> evaluate -> package run inside
awqforge.pipeline.run_quantization; publish runs here afterwards.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update

from app.core.config import settings
from app.core.db import session_scope
from app.core.security import decrypt_secret
from app.models import (
    Artifact,
    CalibrationSet,
    Job,
    JobMetrics,
    JobStatus,
    LayerMetric,
    utcnow,
)
from app.services.events import add_event

log = logging.getLogger("awqforge.worker")

# The engine reports overall progress (0..1 across resolve..package); publishing, done here, takes
# the last PUBLISH_SHARE of the bar when the job publishes.
PUBLISH_SHARE = 0.03
_STAGE_ALIASES = {
    "calibration": "calibrate",
    "quantization": "quantize",
    "evaluation": "evaluate",
    "eval": "evaluate",
}


class JobCancelledByUser(Exception):
    pass


def claim_job(job_id: str, worker_name: str) -> tuple[str, Job | None]:
    """Atomically move a job to running. Returns (outcome, job); job is None unless claimed.

    Claimable: queued, or running with a stale heartbeat, or running on this same worker (a
    redelivery after this worker's child died). A succeeded/failed/cancelled job is never rerun.
    """
    now = utcnow()
    stale = now - timedelta(seconds=settings.HEARTBEAT_STALE_S)
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
                or_(
                    Job.status == JobStatus.QUEUED.value,
                    (Job.status == JobStatus.RUNNING.value)
                    & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale, Job.worker == worker_name),
                ),
                Job.cancel_requested.is_(False),
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
            if job.cancel_requested and job.status == JobStatus.QUEUED.value:
                _finish(s, job, JobStatus.CANCELLED, message="cancelled before it started")
                return "cancelled", None
            return f"not claimable ({job.status})", None
        s.refresh(job)
        if job.attempts > settings.MAX_ATTEMPTS:
            _finish(
                s, job, JobStatus.FAILED, error=f"gave up after {job.attempts - 1} attempts (worker lost)"
            )
            return "gave up", None
        # A re-run starts from a clean slate: previous attempt's rows and files go.
        s.query(LayerMetric).filter(LayerMetric.job_id == job_id).delete()
        s.query(JobMetrics).filter(JobMetrics.job_id == job_id).delete()
        s.query(Artifact).filter(Artifact.job_id == job_id).delete()
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


def _finish(s, job: Job, status: JobStatus, *, error: str | None = None, message: str | None = None) -> None:
    now = utcnow()
    job.status = status.value
    job.finished_at = now
    job.updated_at = now
    job.error = error
    job.eta_s = None
    if status == JobStatus.SUCCEEDED:
        job.progress = 1.0
        job.publish_token_enc = None  # used once; nothing left to retry with it
    add_event(
        s,
        job_id=job.id,
        kind="status",
        message=message or error or status.value,
        stage=job.stage,
        progress=job.progress,
    )


class _JobReporter:
    """The progress/cancel/log callbacks handed to the engine, plus the heartbeat thread."""

    def __init__(self, job_id: str, worker_name: str, secrets_to_hide: list[str], publishes: bool):
        self.job_id = job_id
        self.engine_share = 1.0 - PUBLISH_SHARE if publishes else 1.0
        self.worker_name = worker_name
        self.hide = [x for x in secrets_to_hide if x]
        self.stage = "resolve"
        self.progress_value = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._last_progress_write = 0.0
        self._last_block: Any = None
        self._stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{job_id}", daemon=True)

    def scrub(self, text: str) -> str:
        for secret in self.hide:
            text = text.replace(secret, "***")
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
        with session_scope() as s:
            s.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.status == JobStatus.RUNNING.value)
                .values(heartbeat_at=utcnow())
                .execution_options(synchronize_session=False)
            )

    # engine callbacks
    def progress(self, event: Any) -> None:
        get = event.get if isinstance(event, dict) else lambda k, d=None: getattr(event, k, d)
        stage = _STAGE_ALIASES.get(str(get("stage") or self.stage), str(get("stage") or self.stage))
        frac = float(get("progress", 0.0) or 0.0)
        block, n_blocks = get("block"), get("n_blocks")
        now = time.monotonic()
        changed = stage != self.stage or block != self._last_block
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
        with session_scope() as s:
            s.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(
                    stage=stage,
                    progress=self.progress_value,
                    eta_s=get("eta_s"),
                    heartbeat_at=utcnow(),
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            add_event(
                s,
                job_id=self.job_id,
                kind="progress",
                stage=stage,
                progress=self.progress_value,
                message=self.scrub(str(message)) if message is not None else None,
            )

    def set_stage(self, stage: str, frac: float = 0.0, message: str | None = None) -> None:
        self.progress({"stage": stage, "progress": frac, "message": message})

    def log(self, *args: Any, **_kw: Any) -> None:
        message = self.scrub(" ".join(str(a) for a in args))
        log.info("[%s] %s", self.job_id, message)
        with session_scope() as s:
            add_event(s, job_id=self.job_id, kind="log", stage=self.stage, message=message[:4000])

    def cancel(self) -> bool:
        """Polled by the engine between blocks; reads the flag from the database at most 4 times a second."""
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= 0.25:
            self._last_cancel_check = now
            with session_scope() as s:
                self._cancelled = bool(s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        return self._cancelled


def _resolve_spec(job: Job, token: str | None):
    from awqforge.spec import JobSpec

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
    if token and data.get("publish"):
        data["publish"] = {**data["publish"], "token": token}
    return JobSpec.model_validate(data)


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
    return settings.ARTIFACT_DIR / f"tenant-{job.tenant_id}" / job.id


def run_job(job_id: str, *, worker_name: str | None = None) -> str:
    """Run one job to a terminal state. Safe to call again for the same id (redelivery)."""
    worker_name = worker_name or f"{socket.gethostname()}"
    outcome, job = claim_job(job_id, worker_name)
    if job is None:
        log.info("job %s not run: %s", job_id, outcome)
        return outcome

    token = decrypt_secret(job.publish_token_enc) if job.publish_token_enc else None
    reporter = _JobReporter(
        job_id, worker_name, [token] if token else [], publishes=bool(job.spec.get("publish"))
    )
    out_dir = job_output_dir(job)
    t0 = time.monotonic()
    reporter.start()
    try:
        spec = _resolve_spec(job, token)
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with session_scope() as s:
            s.execute(update(Job).where(Job.id == job_id).values(output_dir=str(out_dir)))

        from awqforge.pipeline import run_quantization  # imports torch: only ever in the worker child

        result = run_quantization(
            spec, out_dir, progress=reporter.progress, cancel=reporter.cancel, log=reporter.log
        )

        publish_s = None
        published: dict[str, str] = {}
        if spec.publish is not None:
            from worker.hub import hub_for

            if reporter.cancel():
                raise JobCancelledByUser()
            reporter.set_stage("publish", 0.0, f"publishing to {spec.publish.repo_id}")
            tp = time.monotonic()
            hub = hub_for(token)
            artifacts = dict(result.artifacts)
            for i, (fmt, path) in enumerate(artifacts.items()):
                sub = None if len(artifacts) == 1 else str(getattr(fmt, "value", fmt))
                published[str(getattr(fmt, "value", fmt))] = hub.publish(
                    Path(path), spec.publish.repo_id, private=spec.publish.private, path_in_repo=sub
                )
                reporter.set_stage("publish", (i + 1) / len(artifacts))
            publish_s = time.monotonic() - tp

        with session_scope() as s:
            s.add(
                JobMetrics(
                    job_id=job_id,
                    **_metric_columns(dict(result.metrics or {}), publish_s, time.monotonic() - t0),
                )
            )
            s.add_all(_layer_row(job_id, m) for m in (result.layers or []))
            for fmt, path in dict(result.artifacts).items():
                fmt_name = str(getattr(fmt, "value", fmt))
                s.add(
                    Artifact(
                        job_id=job_id,
                        format=fmt_name,
                        path=str(Path(path).resolve()),
                        size_bytes=_dir_size(Path(path)),
                        published_to=published.get(fmt_name),
                    )
                )
            report = getattr(result, "report_path", None)
            inside = report and any(
                Path(report).resolve().is_relative_to(Path(p).resolve())
                for p in dict(result.artifacts).values()
            )
            if report and Path(report).exists() and not inside:
                s.add(
                    Artifact(
                        job_id=job_id,
                        format="report",
                        path=str(Path(report).resolve()),
                        size_bytes=_dir_size(Path(report)),
                    )
                )
            row = s.get(Job, job_id)
            row.stage = "publish" if spec.publish is not None else "package"
            _finish(s, row, JobStatus.SUCCEEDED, message="succeeded")
        log.info("job %s succeeded", job_id)
        return "succeeded"
    except BaseException as exc:  # noqa: BLE001 - every way out must leave a terminal status
        cancelled = (
            isinstance(exc, JobCancelledByUser) or type(exc).__name__ == "JobCancelled" or reporter.cancel()
        )
        shutil.rmtree(out_dir, ignore_errors=True)
        with session_scope() as s:
            row = s.get(Job, job_id)
            if cancelled:
                _finish(s, row, JobStatus.CANCELLED, message=f"cancelled during {reporter.stage}")
            else:
                name = (
                    "time limit exceeded"
                    if type(exc).__name__ == "SoftTimeLimitExceeded"
                    else f"{type(exc).__name__}: {exc}"
                )
                error = reporter.scrub(f"{reporter.stage} failed: {name}")[:2000]
                add_event(
                    s,
                    job_id=job_id,
                    kind="log",
                    stage=reporter.stage,
                    message=reporter.scrub(traceback.format_exc())[-4000:],
                )
                _finish(s, row, JobStatus.FAILED, error=error)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt/SystemExit: the status is recorded, let the process go
        log.warning("job %s %s", job_id, "cancelled" if cancelled else "failed")
        return "cancelled" if cancelled else "failed"
    finally:
        reporter.stop()
