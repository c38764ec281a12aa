"""/dashboard: sign in with an API key (exchanged for a session cookie), then static pages whose script
calls the /v1 API with that cookie. No build step: HTML templates, one script, a vendored chart library."""

from __future__ import annotations

from html import escape
from pathlib import Path
from string import Template
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.api.deps import DashboardSessionDep, SessionDep, tenant_for_key
from app.core.config import settings
from app.services.sessions import SESSION_COOKIE, create_session, delete_session

router = APIRouter(tags=["dashboard"], include_in_schema=False)

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
_NO_STORE = {"Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin"}


def _render(name: str, status_code: int = 200, **values: str) -> HTMLResponse:
    html = Template((TEMPLATES / name).read_text()).substitute(
        project=escape(settings.PROJECT_NAME), api=settings.API_V1_STR, **values
    )
    return HTMLResponse(html, status_code=status_code, headers=_NO_STORE)


def _is_https(request: Request) -> bool:
    """uvicorn already applies X-Forwarded-Proto from FORWARDED_ALLOW_IPS; the setting trusts any proxy."""
    if request.url.scheme == "https":
        return True
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return settings.TRUST_FORWARDED_PROTO and proto == "https"


def _same_origin(request: Request) -> bool:
    """Form posts must come from our own pages: browsers send Origin (or at least Referer) on POST."""
    sent = request.headers.get("origin") or request.headers.get("referer")
    if not sent:
        return True  # not a browser (curl, tests); a cross-site browser post always carries Origin
    src = urlsplit(sent)
    host = request.headers.get("x-forwarded-host") if settings.TRUST_FORWARDED_PROTO else None
    return src.netloc == (host or request.headers.get("host", ""))


def _sign_in(error: str = "", status_code: int = 200) -> HTMLResponse:
    block = f"<p class='error' role='alert'>{escape(error)}</p>" if error else ""
    return _render("signin.html", status_code=status_code, error=block)


@router.get("/favicon.ico")
def favicon() -> Response:
    """The dashboard's icon (browsers ask every site for /favicon.ico): no 404 in the log for it."""
    return Response(
        (STATIC_DIR / "favicon.ico").read_bytes(),
        media_type="image/x-icon",
        headers={"Cache-Control": "public, max-age=86400"},
    )


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard(row: DashboardSessionDep) -> HTMLResponse:
    if row is None:
        return _sign_in()
    return _render("jobs.html", tenant=escape(row.tenant.name), csrf=escape(row.csrf_token))


@router.get("/dashboard/jobs/{job_id}", response_class=HTMLResponse)
def dashboard_job(row: DashboardSessionDep, job_id: str) -> Response:
    if row is None:
        return RedirectResponse("/dashboard", status_code=303)
    return _render(
        "job.html", tenant=escape(row.tenant.name), csrf=escape(row.csrf_token), job_id=escape(job_id)
    )


@router.post("/dashboard/login", response_class=HTMLResponse)
def dashboard_login(request: Request, session: SessionDep, key: Annotated[str, Form()] = "") -> Response:
    if not _same_origin(request):
        return _sign_in("Sign-in must come from this site's own page.", status_code=403)
    key = key.strip()
    tenant = tenant_for_key(session, key) if key else None
    if tenant is None:
        msg = "Enter an API key." if not key else "That API key is unknown or revoked."
        return _sign_in(msg, status_code=401)
    new = create_session(session, key=key, tenant_id=tenant.id)
    resp = RedirectResponse("/dashboard", status_code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        new.token,
        max_age=int(settings.DASHBOARD_SESSION_HOURS * 3600),
        path="/",
        httponly=True,
        samesite="lax",  # lax: a link from elsewhere opens the dashboard signed in; posts still need the token
        secure=_is_https(request),
    )
    return resp


@router.post("/dashboard/logout")
def dashboard_logout(
    request: Request, session: SessionDep, row: DashboardSessionDep, csrf: Annotated[str, Form()] = ""
) -> Response:
    if row is not None and (csrf != row.csrf_token or not _same_origin(request)):
        return HTMLResponse("sign-out must come from the dashboard page", status_code=403)
    delete_session(session, request.cookies.get(SESSION_COOKIE))
    resp = RedirectResponse("/dashboard", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=_is_https(request))
    return resp
