from fastapi import APIRouter

from app.api.routes import calibration, jobs, metrics, plan
from app.schemas import ErrorResponse

# Every /v1 route may answer these (body unparsable, no valid key, request too large, a field or parameter refused, database down);
# declared here so that OpenAPI documents the bodies we send (never FastAPI's default 422 shape).
COMMON_RESPONSES = {
    400: {
        "model": ErrorResponse,
        "description": "A body that cannot be parsed (malformed JSON or multipart)",
    },
    401: {"model": ErrorResponse, "description": "Missing, unknown or revoked API key"},
    413: {"model": ErrorResponse, "description": "Request body over its size limit"},
    422: {
        "model": ErrorResponse,
        "description": "A field, parameter or header was refused (field and reason)",
    },
    503: {
        "model": ErrorResponse,
        "description": "The database is unavailable",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    },
}

api_router = APIRouter(responses=COMMON_RESPONSES)
api_router.include_router(jobs.router)
api_router.include_router(calibration.router)
api_router.include_router(plan.router)
api_router.include_router(metrics.router)
