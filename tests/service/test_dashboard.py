"""The dashboard: API key -> session sign-in (cookie flags, errors, sign-out, CSRF), and in a real
browser (Debian's chromium driven by Playwright) submitting a job and watching it finish."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.services


def _sign_in(service, key: str, **headers) -> httpx.Response:
    with httpx.Client(base_url=service.url) as c:
        return c.post("/dashboard/login", data={"key": key}, headers=headers, follow_redirects=False)


def _cookie(resp: httpx.Response) -> str:
    return resp.headers["set-cookie"].split(";")[0].split("=", 1)[1]


def test_sign_in_exchanges_the_key_for_a_session(service, make_key, db_session):
    from app.core.security import hash_key
    from app.models import DashboardSession

    key = make_key(tenant="dash-tenant")
    with httpx.Client(base_url=service.url) as c:
        page = c.get("/dashboard")
        assert page.status_code == 200 and "API key" in page.text and "dash-tenant" not in page.text

    bad = _sign_in(service, key[:-3] + "xyz")
    assert bad.status_code == 401 and "unknown or revoked" in bad.text and "set-cookie" not in bad.headers
    assert "Enter an API key" in _sign_in(service, "  ").text

    ok = _sign_in(service, key)
    assert ok.status_code == 303 and ok.headers["location"] == "/dashboard"
    set_cookie = ok.headers["set-cookie"]
    flags = {p.strip().split("=")[0].lower() for p in set_cookie.split(";")[1:]}
    assert set_cookie.startswith("awqforge_session=") and {"httponly", "samesite", "max-age"} <= flags
    assert "samesite=lax" in set_cookie.lower() and "secure" not in flags  # plain http here
    token = _cookie(ok)
    assert key not in set_cookie and len(token) >= 40
    db_session.expire_all()
    row = db_session.get(DashboardSession, hash_key(token))  # stored hashed only
    assert (
        row is not None and row.tenant.name == "dash-tenant" and token not in (row.token_hash, row.csrf_token)
    )

    cookies = {"awqforge_session": token}
    with httpx.Client(base_url=service.url, cookies=cookies) as c:
        page = c.get("/dashboard")
        assert "dash-tenant" in page.text and page.headers["cache-control"] == "no-store"
        assert row.csrf_token in page.text  # the page carries its CSRF token for the script
        assert c.get("/v1/jobs").status_code == 200  # the script calls the API with the cookie
        # A cookie alone cannot change anything: unsafe methods need the session's CSRF token.
        body = service.job_body()
        no_token = c.post("/v1/jobs", json=body)
        assert no_token.status_code == 403 and "X-CSRF-Token" in no_token.json()["detail"]
        assert c.post("/v1/jobs", json=body, headers={"X-CSRF-Token": "wrong"}).status_code == 403
        created = c.post("/v1/jobs", json=body, headers={"X-CSRF-Token": row.csrf_token})
        assert created.status_code == 202, created.text
        c.post(f"/v1/jobs/{created.json()['id']}/cancel", headers={"X-CSRF-Token": row.csrf_token})
        # Sign-out needs the token too; then the session is gone from the database.
        assert c.post("/dashboard/logout", data={"csrf": "nope"}).status_code == 403
        out = c.post("/dashboard/logout", data={"csrf": row.csrf_token}, follow_redirects=False)
        assert out.status_code == 303 and 'awqforge_session=""' in out.headers["set-cookie"]
    db_session.expire_all()
    assert db_session.get(DashboardSession, hash_key(token)) is None
    with httpx.Client(base_url=service.url, cookies=cookies) as c:
        assert c.get("/v1/jobs").status_code == 401
        assert "API key" in c.get("/dashboard").text


def test_cross_site_sign_in_secure_cookie_and_revoked_key(service, make_key, db_session):
    from app.core.config import settings
    from app.models import ApiKey, utcnow

    key = make_key()
    evil = _sign_in(service, key, Origin="https://evil.example")
    assert evil.status_code == 403 and "set-cookie" not in evil.headers

    # Behind a TLS proxy the cookie is marked Secure: uvicorn believes X-Forwarded-Proto from
    # FORWARDED_ALLOW_IPS (127.0.0.1 by default), TRUST_FORWARDED_PROTO=true believes it from anywhere.
    assert "secure" not in _sign_in(service, key).headers["set-cookie"].lower()
    assert (
        "; secure" in _sign_in(service, key, **{"X-Forwarded-Proto": "https"}).headers["set-cookie"].lower()
    )
    settings.TRUST_FORWARDED_PROTO = True
    try:
        ok = _sign_in(service, key, **{"X-Forwarded-Proto": "https"})
    finally:
        settings.TRUST_FORWARDED_PROTO = False
    assert "; secure" in ok.headers["set-cookie"].lower()

    # Revoking the key ends its sessions.
    db_session.get(ApiKey, key.split("_")[1]).revoked_at = utcnow()
    db_session.commit()
    with httpx.Client(base_url=service.url, cookies={"awqforge_session": _cookie(ok)}) as c:
        assert c.get("/v1/jobs").status_code == 401


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is needed (scripts/install.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots_dir():
    d = Path(os.environ.get("AWQFORGE_SCREENSHOTS") or tempfile.mkdtemp(prefix="awqforge-screenshots-"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {d}")
    return d


def test_browser_submit_and_watch_a_job(service, make_key, browser, shots_dir):
    key = make_key(tenant="browser-tenant")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{service.url}/dashboard")

    page.fill("#key", "awqf_0000_not-a-key")
    page.click("#signin button")
    assert "unknown or revoked" in page.locator(".error").inner_text()
    page.screenshot(path=str(shots_dir / "01-sign-in-error.png"))

    page.fill("#key", key)
    page.click("#signin button")
    page.wait_for_selector("text=browser-tenant")
    assert all(c["httpOnly"] for c in page.context.cookies() if c["name"] == "awqforge_session")
    assert page.evaluate("document.cookie") == ""  # the session is invisible to scripts

    # A bad submission shows the API's reason.
    page.fill("input[name=model]", "/etc")
    page.click("#submit-job")
    page.wait_for_selector("#submit-msg.error")
    assert "model" in page.locator("#submit-msg").inner_text()

    # A real one, with an uploaded calibration file, through the Celery worker.
    calib = service.home / "browser-calib.txt"
    shutil.copy(service.calib_file, calib)
    page.fill("input[name=model]", str(service.model_dir))
    page.select_option("select[name=group_size]", "32")
    page.set_input_files("input[name=calibration]", str(calib))
    page.fill("input[name=n_samples]", "4")
    page.fill("input[name=seq_len]", "32")
    page.fill(
        "textarea[name=extra]",
        json.dumps({"device": "cpu", "n_grid": 4, "eval": {"seq_len": 32, "max_seqs": 2}}),
    )
    page.click("#submit-job")
    page.wait_for_selector("#submit-msg a")
    job_id = page.locator("#submit-msg code").inner_text()
    row = page.locator(f"#row-{job_id}")
    row.wait_for()
    page.screenshot(path=str(shots_dir / "02-jobs-submitted.png"))
    # The list follows the event stream: the row turns succeeded without a page reload.
    done = f"#row-{job_id}:not([data-status=queued]):not([data-status=running])"
    page.wait_for_selector(done, timeout=300_000)
    detail = service.client(key).get(f"/v1/jobs/{job_id}").json()
    assert row.get_attribute("data-status") == "succeeded", detail
    assert "100%" in row.inner_text() and "→" in row.inner_text()
    page.screenshot(path=str(shots_dir / "03-jobs-finished.png"))

    page.click(f"#row-{job_id} a")
    page.wait_for_selector("#status.succeeded")
    page.wait_for_selector("#layer-chart canvas")
    page.wait_for_selector("#artifacts td.sha")
    assert "→" in page.locator("#ppl").inner_text() and "%" in page.locator("#ppl-note").inner_text()
    assert "smaller" in page.locator("#size-note").inner_text()
    assert page.locator("#timeline div").count() >= 3
    shas = [t for t in page.locator("#artifacts td.sha").all_inner_texts() if len(t) == 64]
    assert shas, page.locator("#artifacts").inner_text()
    # the log fills from the event stream, which may still be arriving: wait for it (up to 30 s), not read once
    page.wait_for_function("document.getElementById('log').textContent.includes('quantize')", timeout=30_000)
    page.screenshot(path=str(shots_dir / "04-job-page.png"), full_page=True)

    page.click("#signout")
    page.wait_for_selector("#signin")
    assert errors == []
    page.close()


def test_browser_job_page_shows_task_recovery(service, make_key, browser, shots_dir):
    """The job page of a job with lm-eval tasks: a bar per model and task (FP, quantized) at the API's
    figures, scaled to the largest, with the recovery; and the side-by-side generations of its report."""
    pytest.importorskip("lm_eval")
    from .conftest import wait_for_status

    key = make_key(tenant="recovery-tenant")
    tasks = [{"name": "awqforge_mc", "limit": 8}, {"name": "awqforge_cloze", "limit": 8}]
    prompts = ["The License", "Once upon a time"]
    ev = {"seq_len": 32, "max_seqs": 2, "tasks": tasks, "prompts": prompts, "max_new_tokens": 4}
    with service.client(key) as c:
        r = c.post("/v1/jobs", json=service.job_body(eval=ev))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job = wait_for_status(c, job_id, ("succeeded", "failed", "cancelled"), timeout=300)
        assert job["status"] == "succeeded", job["error"]
        rows = c.get(f"/v1/jobs/{job_id}/metrics").json()["tasks"]
        files = next(a for a in job["artifacts"] if a["format"] == "awq")["files"]
        report = c.get(next(f["url"] for f in files if f["path"] == "quant_report.json")).json()
    gens = report["evaluation"]["generations"]
    assert [t["task"] for t in rows] == ["awqforge_mc", "awqforge_cloze"] and len(gens) == 2

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{service.url}/dashboard")
    page.fill("#key", key)
    page.click("#signin button")
    page.wait_for_selector("text=recovery-tenant")
    page.goto(f"{service.url}/dashboard/jobs/{job_id}")
    page.wait_for_selector("#tasks-card:not([hidden]) #task-chart .task")
    page.wait_for_selector("#generations .gen")
    shown = page.locator("#task-chart .task")
    assert shown.count() == len(rows)
    top = max(v or 0 for t in rows for v in (t["fp"], t["quantized"]))
    for i, t in enumerate(rows):
        task = shown.nth(i)
        head = task.locator("b").inner_text(), task.locator(".muted").first.inner_text()
        assert head[0] == t["task"], head
        recovery = head[1].split("recovery ")[1].split(",")[0]
        assert (
            recovery == "–"
            if t["recovery"] is None
            else float(recovery) == pytest.approx(t["recovery"], abs=1e-3)
        )
        for cls, label, value in (("fp", "FP", t["fp"]), ("quant", "quantized", t["quantized"])):
            bar = task.locator(".tbar").filter(has=page.locator(f".tfill.{cls}"))
            assert bar.locator(".tlabel").inner_text() == label
            assert float(bar.locator("span").last.inner_text()) == pytest.approx(value, abs=1e-4)
            width = bar.locator(".tfill").evaluate("e => parseFloat(e.style.width)")
            assert width == pytest.approx(60 * value / top if top else 0, abs=0.01), (t["task"], label)
    shown_gens = page.locator("#generations .gen")
    assert shown_gens.count() == len(gens)
    for i, g in enumerate(gens):
        text = " ".join(shown_gens.nth(i).inner_text().split())
        assert g["prompt"] in text
        assert f"FP: {' '.join(g['fp'].split())}".strip() in text
        assert f"quantized: {' '.join(g['quantized'].split())}".strip() in text
    page.locator("#tasks-card").screenshot(path=str(shots_dir / "05-task-recovery.png"))
    assert errors == []
    page.close()
