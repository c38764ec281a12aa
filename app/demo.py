"""The README's main command: start the service, quantize SmolLM2 over HTTP, show the result.

    awqforge serve --demo        (or: python -m app.demo)

Starts the API (and, in embedded mode, one worker), makes a demo API key, submits a W4 g64 AWQ job on
SmolLM2-135M-Instruct with a small calibration set, prints progress from the event stream, then the
metrics and where the artifacts are.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from app.core.config import settings


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


@contextlib.contextmanager
def _ticker(label: str, every: float = 10.0) -> Iterator[None]:
    """A line every `every` seconds while a quiet step runs, so that no minute passes in silence."""
    stop = threading.Event()
    t0 = time.monotonic()

    def tick() -> None:
        while not stop.wait(every):
            print(f"  ... {label} ({time.monotonic() - t0:.0f} s)", flush=True)

    th = threading.Thread(target=tick, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
    print(f"  {label}: done in {time.monotonic() - t0:.0f} s", flush=True)


def _quiet_progress_bars() -> None:
    """Not a terminal: progress bars would turn into one long line of carriage returns."""
    if not sys.stdout.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _follow(client: httpx.Client, job_id: str, quiet_s: float = 20.0) -> None:
    """Print the job's event stream: progress lines and log lines that say something new; during a long
    step, a "still working" line every `quiet_s` seconds, from a timer (the stream's keep-alives come only
    every 15 s, so waiting for them would print at 30 s, not 20)."""
    state = {"last_print": time.monotonic(), "stage": "-", "progress": 0.0}
    lock = threading.Lock()
    done = threading.Event()

    def still_working() -> None:
        while not done.wait(min(1.0, quiet_s / 4)):
            with lock:
                quiet = time.monotonic() - state["last_print"]
                if quiet >= quiet_s:
                    print(
                        f"[{state['progress'] * 100:5.1f}%] {state['stage']:<9} ... still working "
                        f"({quiet:.0f} s since the last step)",
                        flush=True,
                    )
                    state["last_print"] = time.monotonic()

    ticker = threading.Thread(target=still_working, name="still-working", daemon=True)
    ticker.start()
    last = None
    try:
        with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as resp:
            event = None
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "end":
                        return
                    d = json.loads(line[6:])
                    msg = d.get("message") or ""
                    with lock:
                        state["stage"] = d.get("stage") or state["stage"]
                        if d.get("progress") is not None:
                            state["progress"] = d["progress"]
                        if msg and msg != last:
                            last, state["last_print"] = msg, time.monotonic()
                            if d.get("progress") is not None:
                                print(
                                    f"[{state['progress'] * 100:5.1f}%] {state['stage']:<9} {msg}", flush=True
                                )
                            else:
                                print(f"{'':8} {'':<9} {msg}", flush=True)
    finally:
        done.set()
        ticker.join()


def print_comparison(awq: dict, rtn: dict | None) -> None:
    """FP vs RTN vs AWQ perplexity: what the activation-aware search buys over plain rounding."""
    ma, mr = awq.get("metrics") or {}, (rtn or {}).get("metrics") or {}
    fp, qa, qr = ma.get("fp_perplexity"), ma.get("quant_perplexity"), mr.get("quant_perplexity")
    if not (fp and qa):
        return
    quant = f"W{awq['bits']} g{awq['group_size']}"
    print(f"\nperplexity (lower is better; same text, {quant})")
    print(f"  FP (unquantized)        {fp:8.3f}")
    if qr:
        print(f"  RTN round-to-nearest    {qr:8.3f}  ({(qr / fp - 1) * 100:+.1f}%)")
    elif rtn is not None:
        print(f"  RTN round-to-nearest    (job {rtn['status']}: {(rtn.get('error') or '')[:120]})")
    print(f"  AWQ                     {qa:8.3f}  ({(qa / fp - 1) * 100:+.1f}%)")
    if qr and qr > fp:
        kept = (qr - qa) / (qr - fp) * 100
        print(f"  AWQ removes {kept:.0f}% of the perplexity that plain rounding adds.")


def print_summary(job: dict, *, api_url: str) -> None:
    """The job's outcome, metrics and artifact locations."""
    print(f"\njob {job['id']}: {job['status']}" + (f" ({job['error']})" if job.get("error") else ""))
    m = job.get("metrics") or {}
    if m:
        fp, q = m.get("fp_perplexity"), m.get("quant_perplexity")
        if fp and q:
            print(f"  perplexity  FP {fp:.3f}  ->  W4 g64 {q:.3f}  ({(q / fp - 1) * 100:+.1f}%)")
        if m.get("size_before_bytes") and m.get("size_after_bytes"):
            b, a = m["size_before_bytes"], m["size_after_bytes"]
            print(f"  size        {b / 2**20:.1f} MiB -> {a / 2**20:.1f} MiB  ({b / a:.2f}x smaller)")
        stages = ", ".join(
            f"{k[:-2]} {m[k]:.1f} s"
            for k in ("resolve_s", "calibrate_s", "quantize_s", "evaluate_s", "package_s", "publish_s")
            if m.get(k) is not None
        )
        print(f"  wall time   {m.get('total_s') or 0:.1f} s ({stages})")
        rss, gpu = (m.get("peak_rss_bytes") or 0) / 2**20, (m.get("peak_gpu_bytes") or 0) / 2**20
        print(f"  peak memory RSS {rss:.0f} MiB, GPU {gpu:.0f} MiB")
    for a in job.get("artifacts", []):
        where = a.get("published_to") or ""
        print(
            f"  artifact    {a['format']:<19} {len(a['files'])} files, {a['size_bytes'] / 2**20:.1f} MiB  {where}"
        )
    print(f"  artifacts on disk under {settings.ARTIFACT_DIR}")
    print(f"  API: GET {api_url}/v1/jobs/{job['id']}  (metrics, layers, artifacts, logs, events)")


def _cancel_previous_demo_jobs() -> None:
    """A new demo run supersedes unfinished jobs of an earlier one (so it is not queued behind them)."""
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import Job, Tenant
    from app.services.jobs import ACTIVE_STATUSES, cancel_job

    with session_scope() as s:
        q = (
            select(Job)
            .join(Tenant, Tenant.id == Job.tenant_id)
            .where(Tenant.name == "demo", Job.status.in_(ACTIVE_STATUSES))
        )
        for job in s.scalars(q):
            cancel_job(s, job=job)


def run_demo(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    start_worker: bool = True,
    keep_serving: bool | None = None,
    n_samples: int | None = None,
    seq_len: int | None = None,
) -> int:
    """Run the demo; calibration defaults to 64 x 512 tokens with a GPU, 8 x 64 on a CPU."""
    from awqforge.cli import skip_triton_without_cuda

    skip_triton_without_cuda()  # the SmolLM2 conversion loads transformers; without a GPU triton is not needed
    from app.core.db import session_scope
    from app.embedded import ServerThread, detect_queues, start_worker_process, stop_process
    from app.main import create_app
    from app.services.keys import create_api_key

    _quiet_progress_bars()
    has_gpu = detect_queues() != ["cpu"]  # nvidia-smi: no CUDA initialised in this process
    n_samples = n_samples or (64 if has_gpu else 8)
    seq_len = seq_len or (512 if has_gpu else 64)
    print("Preparing SmolLM2-135M-Instruct (converted from GGUF once, then reused)...", flush=True)
    with _ticker("loading torch and converting SmolLM2"):
        from awqforge.smollm import ensure_smollm2_checkpoint

        checkpoint = Path(ensure_smollm2_checkpoint()).resolve()
    # The demo submits a local checkpoint path: allow its folder for this process's API.
    settings.ALLOWED_LOCAL_ROOTS = [*settings.ALLOWED_LOCAL_ROOTS, checkpoint.parent]

    _cancel_previous_demo_jobs()
    with session_scope() as s:
        key = create_api_key(s, tenant_name="demo")
    worker_log = settings.AWQFORGE_HOME / "demo-worker.log"
    worker = start_worker_process(name="demo", log_path=worker_log) if start_worker else None
    if worker is not None:
        print(f"worker started (log: {worker_log})", flush=True)
    server = ServerThread(create_app(), host=host, port=_free_port(port)).start()
    print(f"API on {server.url} (docs: {server.url}/docs, dashboard: {server.url}/dashboard)", flush=True)
    try:
        body = {
            "model": str(checkpoint),
            "method": "awq",
            "bits": 4,
            "group_size": 64,
            # A small calibration set and grid on a CPU, so that the demo ends in minutes.
            # the English text shipped with awqforge, by name (a file: path would show the install folder)
            "calibration": {"source": "bundled", "n_samples": n_samples, "seq_len": seq_len},
            "n_grid": 20 if has_gpu else 10,
            "formats": ["awq", "compressed-tensors"],
            "eval": {"seq_len": 512, "max_seqs": 16} if has_gpu else {"seq_len": 256, "max_seqs": 4},
            "publish": {"repo_id": "demo/SmolLM2-135M-Instruct-AWQ", "private": True},
            # Without a GPU the job goes to the cpu queue; with one, the queue its size fits.
            "device": "auto" if has_gpu else "cpu",
        }
        # The same model rounded to nearest (no search): the baseline that shows what AWQ buys.
        rtn_body = {
            **{k: body[k] for k in ("model", "bits", "group_size", "calibration", "eval", "device")},
            "method": "rtn",
            "formats": ["awq"],
        }
        headers = {"Authorization": f"Bearer {key.secret}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            r = client.post("/v1/jobs", json=body)
            if r.status_code != 202:
                print(f"submit failed: {r.status_code} {r.text}", file=sys.stderr)
                return 1
            job_id = r.json()["id"]
            device = "a GPU (CUDA)" if has_gpu else "the CPU"
            print(
                f"submitted AWQ job {job_id} to queue '{r.json()['queue']}'; the worker runs it on {device}."
                " Following its events:",
                flush=True,
            )
            _follow(client, job_id)
            job = client.get(f"/v1/jobs/{job_id}").json()
            rtn = None
            if job["status"] == "succeeded":
                r = client.post("/v1/jobs", json=rtn_body)
                if r.status_code == 202:
                    rid = r.json()["id"]
                    print(
                        f"\nsubmitted RTN job {rid} (queue '{r.json()['queue']}') for comparison:", flush=True
                    )
                    _follow(client, rid)
                    rtn = client.get(f"/v1/jobs/{rid}").json()
        print_summary(job, api_url=server.url)
        print_comparison(job, rtn)
        dashboard = f"{server.url}/dashboard"
        if keep_serving is None:  # default: keep serving when someone is at the terminal
            keep_serving = sys.stdin.isatty() and sys.stdout.isatty()
        if keep_serving:
            print(f"\nDashboard: {dashboard}  (sign in with API key {key.secret})", flush=True)
            print("Serving (Ctrl-C to stop).", flush=True)
            server.thread.join()
        else:
            port = server.url.rsplit(":", 1)[1]
            print(
                f"\nSee it in the dashboard: run `awqforge serve --port {port}` and open {dashboard}\n"
                f"  sign in with the demo API key {key.secret}",
                flush=True,
            )
        return 0 if job["status"] == "succeeded" else 1
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()
        if worker is not None:
            stop_process(worker)


def main() -> int:
    from app.cli import serve_command

    return serve_command(["--demo", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
