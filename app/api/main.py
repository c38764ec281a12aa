from fastapi import APIRouter

from app.api.routes import calibration, jobs, plan

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(calibration.router)
api_router.include_router(plan.router)
