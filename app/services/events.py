"""Job events: the stream behind GET /v1/jobs/{id}/events and /logs."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.models import JobEvent


def add_event(
    session: Session,
    *,
    job_id: str,
    kind: str,
    message: str | None = None,
    stage: str | None = None,
    progress: float | None = None,
) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message, stage=stage, progress=progress))
