"""/v1/calibration-sets: bring your own calibration text."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import CurrentTenant, SessionDep
from app.core.config import settings
from app.schemas import CalibrationSetPublic, ErrorResponse
from app.services import uploads
from app.services.jobs import ServiceError

router = APIRouter(prefix="/calibration-sets", tags=["calibration"])


@router.post(
    "",
    status_code=201,
    response_model=CalibrationSetPublic,
    responses={401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary='Upload calibration text (.txt lines, .jsonl with a "text" field, or .parquet with a "text" column)',
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "examples": {
                        "jsonl": {"summary": "curl -F file=@calib.jsonl", "value": {"file": "calib.jsonl"}},
                        "txt": {
                            "summary": "curl -F file=@calib.txt (one sample per line)",
                            "value": {"file": "calib.txt"},
                        },
                    }
                }
            }
        }
    },
)
async def upload_calibration_set(
    session: SessionDep,
    tenant: CurrentTenant,
    file: Annotated[UploadFile, File(description="the calibration file")],
) -> CalibrationSetPublic:
    if file.size is not None and file.size > settings.MAX_UPLOAD_BYTES:
        raise ServiceError(413, f"upload exceeds the limit of {settings.MAX_UPLOAD_BYTES} bytes")
    row = await run_in_threadpool(
        uploads.store_upload, session, tenant_id=tenant.id, filename=file.filename or "", stream=file.file
    )
    return CalibrationSetPublic.model_validate(row)
