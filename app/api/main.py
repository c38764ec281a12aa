from fastapi import APIRouter

from app.api.routes import calibration, jobs, metrics

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(calibration.router)
api_router.include_router(metrics.router)
