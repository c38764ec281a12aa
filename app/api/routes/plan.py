"""/v1/plan: the memory plan and the queue class a job would get, without submitting it."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from app.api.deps import CurrentTenant, SessionDep
from app.core.config import settings
from app.schemas import CalibrationIn, ErrorResponse, EvalIn, JobCreate
from app.services.jobs import spec_from_request
from app.services.routing import RoutingError, live_queues, route, waiting_reason
from awqforge import spec as job_spec

router = APIRouter(prefix="/plan", tags=["plan"])


class PlanPublic(BaseModel):
    queue: str | None = Field(None, description="the queue class the job would get; null when none fits")
    fits: bool
    reason: str
    waiting_reason: str | None = None
    plan: dict | None = Field(
        None, description="peak memory (bytes, by component) and time estimate on that class"
    )
    plans: dict[str, dict] | None = Field(None, description="the plan on every configured class's device")
    queue_classes: dict[str, int] = Field(..., description="configured classes and their memory (bytes)")
    live_queues: list[str] | None = Field(None, description="classes a live worker consumes; null: unknown")


def _plan(session, tenant, body: JobCreate) -> PlanPublic:
    spec = spec_from_request(session, body=body, tenant_id=tenant.id)
    live = live_queues()
    common = {
        "queue_classes": settings.queue_classes,
        "live_queues": sorted(live) if live is not None else None,
    }
    try:
        r = route(spec)
    except RoutingError as exc:
        return PlanPublic(queue=None, fits=False, reason=str(exc), plans=exc.plans, **common)
    return PlanPublic(
        queue=r.queue,
        fits=True,
        reason=r.reason,
        waiting_reason=waiting_reason(r.queue),
        plan=r.plan,
        plans=r.plans,
        **common,
    )


@router.get("", response_model=PlanPublic, responses={422: {"model": ErrorResponse}}, summary="Plan a job")
def plan_query(
    session: SessionDep,
    tenant: CurrentTenant,
    model: Annotated[job_spec.ModelRef, Query()],
    bits: Annotated[job_spec.Bits, Query()] = 4,
    group_size: Annotated[job_spec.GroupSize, Query()] = 128,
    method: Literal["awq", "rtn"] = "awq",
    n_samples: Annotated[job_spec.NSamples, Query()] = 128,
    seq_len: Annotated[job_spec.CalibrationSeqLen, Query()] = 512,
    eval_seq_len: Annotated[job_spec.EvalSeqLen, Query()] = 2048,
    evaluate: bool = True,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    rounding: Literal["nearest", "gptq"] | None = None,
    revision: Annotated[job_spec.Revision | None, Query()] = None,
) -> PlanPublic:
    fmt = ["awq"] if bits == 4 else ["compressed-tensors"]
    try:
        body = JobCreate(
            model=model,
            revision=revision,
            method=method,
            bits=bits,
            group_size=group_size,
            calibration=CalibrationIn(n_samples=n_samples, seq_len=seq_len),
            formats=fmt,
            eval=EvalIn(enabled=evaluate, seq_len=eval_seq_len),
            device=device,
            rounding=rounding,
        )
    except ValidationError as exc:  # the query's values, checked as a job body would be: a 422
        raise RequestValidationError(exc.errors()) from None
    return _plan(session, tenant, body)


@router.post(
    "", response_model=PlanPublic, responses={422: {"model": ErrorResponse}}, summary="Plan a job body"
)
def plan_body(session: SessionDep, tenant: CurrentTenant, body: JobCreate) -> PlanPublic:
    return _plan(session, tenant, body)
