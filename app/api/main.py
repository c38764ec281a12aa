from fastapi import APIRouter

from app.api.routes import calibration, jobs

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(calibration.router)
