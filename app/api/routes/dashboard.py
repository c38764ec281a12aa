"""/dashboard: a server-rendered page of the tenant's jobs and their metrics (no build step)."""

from __future__ import annotations

from html import escape
from typing import Annotated

from fastapi import APIRouter, Form
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select

from app.api.deps import DASHBOARD_COOKIE, DashboardTenant, SessionDep, tenant_for_key
from app.models import Job

router = APIRouter(tags=["dashboard"], include_in_schema=False)

_STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;color:#222}table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.35rem .5rem;text-align:left;font-size:.9rem}th{background:#f4f4f4}
.succeeded{color:#1a7f37}.failed{color:#cf222e}.running{color:#0969da}.cancelled{color:#777}
progress{width:7rem}code{font-size:.85rem}"""


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def _mib(v: int | None) -> str:
    return "" if v is None else f"{v / 2**20:.1f}"


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard(session: SessionDep, tenant: DashboardTenant, refresh: int = 5) -> HTMLResponse:
    if tenant is None:
        return _page(
            "AWQForge: sign in",
            "<h1>AWQForge</h1><form method='post' action='/dashboard/login'>"
            "<label>API key <input type='password' name='key' size='60' autocomplete='off'></label> "
            "<button>Open dashboard</button></form>",
        )
    jobs = list(
        session.scalars(
            select(Job).where(Job.tenant_id == tenant.id).order_by(Job.created_at.desc()).limit(200)
        )
    )
    rows = []
    for j in jobs:
        m = j.metrics
        rows.append(
            "<tr>"
            f"<td><code>{escape(j.id)}</code></td><td>{escape(j.model)}</td>"
            f"<td>{escape(j.method)} W{j.bits} g{j.group_size}</td>"
            f"<td class='{escape(j.status)}'>{escape(j.status)}</td><td>{escape(j.stage or '')}</td>"
            f"<td><progress max='1' value='{j.progress:.3f}'></progress> {j.progress * 100:.0f}%</td>"
            f"<td>{_fmt(m.fp_perplexity if m else None)}</td><td>{_fmt(m.quant_perplexity if m else None)}</td>"
            f"<td>{_mib(m.size_before_bytes if m else None)}</td><td>{_mib(m.size_after_bytes if m else None)}</td>"
            f"<td>{_fmt(m.total_s if m else None, '.1f')}</td><td>{_mib(m.peak_rss_bytes if m else None)}</td>"
            f"<td>{escape((j.error or '')[:160])}</td></tr>"
        )
    head = (
        "<tr><th>job</th><th>model</th><th>quant</th><th>status</th><th>stage</th><th>progress</th>"
        "<th>FP ppl</th><th>quant ppl</th><th>size before MiB</th><th>size after MiB</th><th>total s</th>"
        "<th>peak RSS MiB</th><th>error</th></tr>"
    )
    meta = (
        f"<meta http-equiv='refresh' content='{max(refresh, 2)}'>"
        if any(j.status in ("queued", "running") for j in jobs)
        else ""
    )
    return _page(
        "AWQForge jobs",
        f"{meta}<h1>AWQForge jobs: {escape(tenant.name)}</h1><table>{head}{''.join(rows)}</table>"
        "<p>API: <a href='/docs'>/docs</a></p>",
    )


@router.post("/dashboard/login")
def dashboard_login(session: SessionDep, key: Annotated[str, Form()]) -> RedirectResponse:
    resp = RedirectResponse("/dashboard", status_code=303)
    if tenant_for_key(session, key) is not None:
        resp.set_cookie(DASHBOARD_COOKIE, key, httponly=True, samesite="strict", max_age=8 * 3600)
    return resp
