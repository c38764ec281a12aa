"""API under load: uvicorn + the real Postgres (and Redis as the broker), on loopback only. No GPU, no torch.

1. A steady open-loop mix of submit, poll (GET /v1/jobs/{id}) and list (GET /v1/jobs) at --rate requests/s for
   --duration s (default 200/s for 60 s). Latency is measured from each request's scheduled start, so a server
   that falls behind shows it (no coordinated omission).
2. --concurrent submissions (default 50) of one body with one Idempotency-Key: every answer must be 202 with the
   same job id, and the database must hold exactly one job for the key.
3. Status reads with --inflight requests in flight (default 20), closed loop, for --duration-reads s.

The baseline, measured in the same run first: status reads one at a time (nothing else in flight). Figures are
p50/p99 per route and their ratio to that baseline. Jobs are sent to a queue prefix of this run; no worker
consumes it, so they stay queued; the run's database and Redis keys are removed at the end.

    python bench/bench_api_load.py                      # 200 req/s for 60 s, 50 idempotent submits
    python bench/bench_api_load.py --rate 100 --duration 20

It ends with PASS or FAIL per target of issue 9 and exits 0 only when every target passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants so far, the live ones (uvicorn's worker
    processes with --workers N) included: a cost per request that does not depend on how busy the shared
    machine is, unlike latency."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [
            int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()
        ]
    except OSError:  # exited meanwhile: its time is in its parent's children's fields
        return 0.0
    own = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return own + sum(_cpu_s(c) for c in children)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


class Recorder:
    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)

    def add(self, route: str, seconds: float, error: str | None = None) -> None:
        self.lat[route].append(seconds)
        if error:
            self.errors[route].append(error)

    def table(self, baseline_p50: float | None) -> list[str]:
        rows = [
            f"{'route':<28}{'requests':>9}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
            + ("   p50/base  p99/base" if baseline_p50 else "")
        ]
        for route, lat in self.lat.items():
            p50, p99 = _pct(lat, 50), _pct(lat, 99)
            row = (
                f"{route:<28}{len(lat):>9}{len(self.errors[route]):>8}{p50 * 1e3:>9.1f}{p99 * 1e3:>9.1f}"
                f"{max(lat) * 1e3:>9.1f}"
            )
            if baseline_p50:
                row += f"{p50 / baseline_p50:>11.1f}{p99 / baseline_p50:>10.1f}"
            rows.append(row)
        return rows


async def _timed(rec: Recorder, route: str, coro, t_sched: float, ok=(200, 202)):
    try:
        r = await coro
        err = None if r.status_code in ok else f"{r.status_code}: {r.text[:200]}"
    except Exception as exc:  # transport errors count as errors, with their type
        r, err = None, type(exc).__name__
    rec.add(route, time.perf_counter() - t_sched, err)
    return r


def job_body(i: int) -> dict:
    return {
        "model": f"bench-org/model-{i % 50}",
        "bits": 4,
        "group_size": 128,
        "device": "cpu",  # routed without asking the hub for the model's size
        "calibration": {"source": "pileval", "n_samples": 32, "seq_len": 256},
    }


async def baseline_reads(
    client: httpx.AsyncClient, job_ids: list[str], seconds: float, rec: Recorder
) -> None:
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        t = time.perf_counter()
        await _timed(rec, "status (1 in flight)", client.get(f"/v1/jobs/{job_ids[i % len(job_ids)]}"), t)
        i += 1


async def steady_mix(client, job_ids: list[str], rate: float, seconds: float, mix: tuple, rec: Recorder):
    """Open loop: request k starts at t0 + k/rate whatever the answers; routes drawn by `mix` weights."""
    rng = random.Random(0)
    tasks = []
    t0 = time.perf_counter()
    n = int(rate * seconds)
    for k in range(n):
        t_sched = t0 + k / rate
        delay = t_sched - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        route = rng.choices(("submit", "status", "list"), weights=mix)[0]
        if route == "submit":

            async def submit(k=k, t_sched=t_sched):
                r = await _timed(rec, "submit", client.post("/v1/jobs", json=job_body(k)), t_sched)
                if r is not None and r.status_code == 202:
                    job_ids.append(r.json()["id"])

            tasks.append(asyncio.create_task(submit()))
        elif route == "status":
            jid = job_ids[rng.randrange(len(job_ids))]
            tasks.append(asyncio.create_task(_timed(rec, "status", client.get(f"/v1/jobs/{jid}"), t_sched)))
        else:
            tasks.append(
                asyncio.create_task(
                    _timed(rec, "list", client.get("/v1/jobs", params={"limit": 20}), t_sched)
                )
            )
    # Bounded: what has not been answered GRACE_S after the last scheduled start counts as an error.
    done, pending = await asyncio.wait(tasks, timeout=max(t0 + seconds + GRACE_S - time.perf_counter(), 0.1))
    for t in pending:
        t.cancel()
    if pending:
        rec.add("not answered in time", GRACE_S, f"{len(pending)} requests still open")
        rec.errors["not answered in time"] = ["open"] * len(pending)
    return time.perf_counter() - t0, n


async def concurrent_reads(client, job_ids: list[str], inflight: int, seconds: float, rec: Recorder) -> None:
    end = time.perf_counter() + seconds

    async def loop(w: int) -> None:  # each stops at `end`, so this phase is bounded too
        i = w
        while time.perf_counter() < end:
            t = time.perf_counter()
            await _timed(
                rec, f"status ({inflight} in flight)", client.get(f"/v1/jobs/{job_ids[i % len(job_ids)]}"), t
            )
            i += inflight

    await asyncio.gather(*(loop(w) for w in range(inflight)))


async def idempotent_burst(client, n: int, rec: Recorder) -> tuple[set[str], list[int]]:
    key = f"bench-{uuid.uuid4().hex[:8]}"
    body = job_body(10**6)
    t = time.perf_counter()
    rs = await asyncio.gather(
        *(
            _timed(
                rec,
                f"submit ({n} x one key)",
                client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}),
                t,
            )
            for _ in range(n)
        )
    )
    ids = {r.json()["id"] for r in rs if r is not None and r.status_code == 202}
    return ids, [r.status_code if r is not None else -1 for r in rs], key


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _wrk_seconds(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def _wrk_result(out: str) -> dict:
    """Requests, rate, errors (non-2xx/3xx and socket errors) and the p50/p90/p99 latency of one wrk run."""
    pct = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    avg = re.search(r"^\s+Latency\s+(\S+)", out, re.M)
    return {
        "avg": _wrk_seconds(avg.group(1)) if avg else float("nan"),
        "requests": requests,
        "rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),
        "errors": errors,
        **{f"p{q}": _wrk_seconds(pct.get(q, "nan")) for q in ("50", "90", "99")},
    }


async def wrk_mix(
    base: str,
    key: str,
    job_ids: list[str],
    rate: float,
    seconds: float,
    mix: tuple,
    home: Path,
    latency: float,
) -> dict[str, dict]:
    """Two 5 s pacing passes, then the measured run: each connection's pause is its share of the cycle less the
    route's mean answer time, corrected by how far the previous pass fell short of (or beyond) its rate."""
    routes = ("submit", "status", "list")
    rates = dict(zip(routes, (w / sum(mix) * rate for w in mix), strict=True))
    lost = dict.fromkeys(routes, latency)  # seconds per request not spent pausing
    for _ in range(2):
        seen = await _wrk_pass(base, key, job_ids, rate, 5.0, mix, home, lost)
        for r in routes:
            conns = _wrk_conns(rates[r])
            pause = max(0.0, conns / rates[r] - lost[r])
            if seen[r]["rps"] > 0:
                lost[r] = conns / seen[r]["rps"] - pause  # the real cycle less the pause asked for
    return await _wrk_pass(base, key, job_ids, rate, seconds, mix, home, lost)


# one status read per call, cycling through the run's job ids (Lua, for wrk)
_STATUS_REQUEST = "i = (i or 0) % #ids + 1; return wrk.format('GET', '/v1/jobs/' .. ids[i])"


async def _start_wrk(conns: int, seconds: float, script: Path, base: str):
    """One wrk process: one thread, `conns` connections, latency percentiles, the Lua `script`."""
    return await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{seconds:.0f}s",
        "--latency",
        "--timeout",
        "30s",
        "-s",
        str(script),
        base,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def wrk_reads(
    base: str, key: str, job_ids: list[str], inflight: int, seconds: float, home: Path
) -> dict:
    """Status reads with `inflight` requests in flight, closed loop, driven by wrk (one thread, one connection
    per request in flight): the Python client would itself take most of a core at these rates."""
    ids = ", ".join(f'"{i}"' for i in job_ids)
    script = home / "wrk-reads.lua"
    script.write_text(
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        f"ids = {{{ids}}}\n"
        f"request = function() {_STATUS_REQUEST} end\n"
    )
    p = await _start_wrk(inflight, seconds, script, base)
    return _wrk_result((await p.communicate())[0].decode())


def _wrk_conns(route_rate: float) -> int:
    return max(2, math.ceil(route_rate / 25))


async def _wrk_pass(
    base: str,
    key: str,
    job_ids: list[str],
    rate: float,
    seconds: float,
    mix: tuple,
    home: Path,
    latency: dict[str, float],
) -> dict[str, dict]:
    """The steady mix driven by wrk: one process per route, each paced (Lua `delay`) to its share of `rate`.
    wrk measures latency from when a request is sent (no correction for coordinated omission): the paced,
    lightly loaded connections keep that small, and the requests/s column shows whether the pace was held.
    A connection waits `conns / route rate` between requests, less `latency[route]` (its answer time)."""
    shares = dict(zip(("submit", "status", "list"), (w / sum(mix) * rate for w in mix), strict=True))
    body = json.dumps(job_body(0)).replace("\\", "\\\\").replace('"', '\\"')
    ids = ", ".join(f'"{i}"' for i in job_ids)
    requests = {
        "submit": f'return wrk.format("POST", "/v1/jobs", nil, "{body}")',
        "status": _STATUS_REQUEST,
        "list": "return wrk.format('GET', '/v1/jobs?limit=20')",
    }
    procs = {}
    for route, route_rate in shares.items():
        conns = _wrk_conns(route_rate)
        script = home / f"wrk-{route}.lua"
        script.write_text(
            f'wrk.headers["Authorization"] = "Bearer {key}"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"ids = {{{ids}}}\n"
            f"request = function() {requests[route]} end\n"
            f"delay = function() return {max(0.0, 1000.0 * (conns / route_rate - latency[route])):.3f} end\n"
        )
        procs[route] = await _start_wrk(conns, seconds, script, base)
    results = {}
    for route, p in procs.items():
        out = (await p.communicate())[0].decode()
        results[route] = _wrk_result(out)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second of the steady mix")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the steady mix")
    ap.add_argument("--mix", default="1,3,1", help="weights of submit,status,list (default 1,3,1)")
    ap.add_argument(
        "--concurrent", type=int, default=50, help="concurrent submissions with one Idempotency-Key"
    )
    ap.add_argument("--inflight", type=int, default=20, help="status reads in flight (closed loop)")
    ap.add_argument(
        "--duration-reads", type=float, default=15.0, help="seconds of the in-flight status reads"
    )
    ap.add_argument("--baseline-seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument(
        "--http", choices=["auto", "h11", "httptools"], default="auto", help="uvicorn's HTTP parser"
    )
    ap.add_argument(
        "--loop", choices=["auto", "asyncio", "uvloop"], default="auto", help="uvicorn's event loop"
    )
    ap.add_argument(
        "--client",
        choices=["python", "wrk"],
        default="python",
        help="who drives the steady mix: this script (httpx, open loop) or wrk (Debian's, written in C: on a "
        "2-core machine the Python client itself takes most of a core), one paced wrk per route",
    )
    ap.add_argument(
        "--pg",
        default=os.environ.get("AWQFORGE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    ap.add_argument("--redis", default=os.environ.get("AWQFORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()
    mix = tuple(float(x) for x in args.mix.split(","))

    import psycopg
    import redis

    run_id = uuid.uuid4().hex[:10]
    db = f"awqf_bench_{run_id}"
    prefix = f"awqf-bench-{run_id}-"
    admin = args.pg.replace("postgresql+psycopg://", "postgresql://", 1)
    db_url = f"{admin.rpartition('/')[0]}/{db}"
    home = Path(tempfile.mkdtemp(prefix=f"awqf-bench-{run_id}-"))
    env = {
        **os.environ,
        "AWQFORGE_HOME": str(home),
        "DATABASE_URL": db_url,
        "REDIS_URL": args.redis,
        "CELERY_QUEUE_PREFIX": prefix,
        "TENANT_MAX_QUEUED_JOBS": "10000",
        "REAPER_INTERVAL_S": "3600",
    }
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    proc = None
    try:
        setup = (
            "from app.core.db import run_migrations, session_scope\n"
            "from app.services.keys import create_api_key\n"
            "run_migrations()\n"
            "with session_scope() as s: print(create_api_key(s, tenant_name='bench', max_queued=10000).secret)\n"
        )
        key = (
            subprocess.run(
                [sys.executable, "-c", setup], env=env, cwd=ROOT, check=True, capture_output=True, text=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        port = _free_port()
        log = open(home / "uvicorn.log", "wb")  # noqa: SIM115 - the server's lifetime
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(args.workers),
                "--http",
                args.http,
                "--loop",
                args.loop,
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print((home / "uvicorn.log").read_text()[-3000:])
                return 1
            time.sleep(0.2)
        print(
            f"uvicorn ({args.workers} worker) on {base}, Postgres database {db}; {os.cpu_count()} CPUs, shared machine"
        )

        async def run() -> int:
            limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
            async with httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30, limits=limits
            ) as client:
                job_ids: list[str] = []
                for i in range(20):
                    r = await client.post("/v1/jobs", json=job_body(i))
                    r.raise_for_status()
                    job_ids.append(r.json()["id"])
                for _ in range(50):  # warm the pool and the code paths
                    await client.get(f"/v1/jobs/{job_ids[0]}")

                def cpu_per_request(c0: float, rec: Recorder) -> str:
                    n = sum(len(v) for v in rec.lat.values())
                    return f"server CPU {(_cpu_s(proc.pid) - c0) / max(n, 1) * 1e3:.2f} ms per request"

                base_rec = Recorder()
                c0 = _cpu_s(proc.pid)
                await baseline_reads(client, job_ids, args.baseline_seconds, base_rec)
                baseline = _pct(base_rec.lat["status (1 in flight)"], 50)
                print(
                    f"\nbaseline: status read, 1 in flight: p50 {baseline * 1e3:.1f} ms, "
                    f"p99 {_pct(base_rec.lat['status (1 in flight)'], 99) * 1e3:.1f} ms, "
                    f"{cpu_per_request(c0, base_rec)}"
                )

                def show(title: str, rec: Recorder, c0: float) -> None:
                    print(f"\n{title}, {cpu_per_request(c0, rec)}:")
                    for row in rec.table(baseline):
                        print("  " + row)

                rec, c0 = Recorder(), _cpu_s(proc.pid)
                if args.client == "wrk":
                    wrk = await wrk_mix(base, key, job_ids, args.rate, args.duration, mix, home, baseline)
                    n = sum(r["requests"] for r in wrk.values())
                    print(
                        f"\nsteady mix (wrk, one paced process per route): {n} requests in {args.duration:.0f} s "
                        f"({n / args.duration:.0f}/s, target {args.rate:.0f}/s), submit:status:list = {args.mix}, "
                        f"server CPU {(_cpu_s(proc.pid) - c0) / max(n, 1) * 1e3:.2f} ms per request:"
                    )
                    print(
                        f"  {'route':<10} {'requests':>9} {'req/s':>7} {'errors':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
                    )
                    for route, r in wrk.items():
                        print(
                            f"  {route:<10} {r['requests']:>9} {r['rps']:>7.1f} {r['errors']:>7} "
                            f"{r['p50'] * 1e3:>8.1f} {r['p90'] * 1e3:>8.1f} {r['p99'] * 1e3:>8.1f}"
                        )
                        if r["errors"]:
                            rec.errors[f"{route} (wrk)"].extend(["non-2xx or socket error"] * r["errors"])
                    rec.lat["status"] = [wrk["status"]["p99"]]  # the figure the target is about
                    served = n / args.duration
                else:
                    elapsed, n = await steady_mix(client, job_ids, args.rate, args.duration, mix, rec)
                    served = (n - sum(len(e) for e in rec.errors.values())) / elapsed
                    show(
                        f"steady mix: {n} requests in {elapsed:.1f} s ({n / elapsed:.0f}/s, target {args.rate:.0f}/s), "
                        f"submit:status:list = {args.mix}",
                        rec,
                        c0,
                    )
                reads, c0 = Recorder(), _cpu_s(proc.pid)
                title = f"status reads, {args.inflight} in flight for {args.duration_reads:.0f} s"
                if args.client == "wrk":
                    r = await wrk_reads(base, key, job_ids, args.inflight, args.duration_reads, home)
                    print(
                        f"\n{title} (wrk, closed loop), server CPU "
                        f"{(_cpu_s(proc.pid) - c0) / max(r['requests'], 1) * 1e3:.2f} ms per request:\n"
                        f"  {r['requests']} requests ({r['rps']:.0f}/s), {r['errors']} errors, p50 {r['p50'] * 1e3:.1f} ms, "
                        f"p90 {r['p90'] * 1e3:.1f} ms, p99 {r['p99'] * 1e3:.1f} ms "
                        f"({r['p99'] / baseline:.1f}x the baseline's p50)"
                    )
                    reads.lat[f"status ({args.inflight} in flight)"] = [r["p99"]]
                    if r["errors"]:
                        reads.errors["status reads (wrk)"].extend(["non-2xx or socket error"] * r["errors"])
                else:
                    await concurrent_reads(client, job_ids, args.inflight, args.duration_reads, reads)
                    show(title, reads, c0)
                burst, c0 = Recorder(), _cpu_s(proc.pid)
                ids, codes, idem_key = await idempotent_burst(client, args.concurrent, burst)
                show(f"{args.concurrent} concurrent submissions with one Idempotency-Key", burst, c0)
            with psycopg.connect(admin.rpartition("/")[0] + f"/{db}") as conn:
                n_jobs = conn.execute(
                    "SELECT count(DISTINCT job_id) FROM idempotency_keys WHERE key = %s", (idem_key,)
                ).fetchone()[0]
            print(
                f"  status codes: {sorted(set(codes))}; distinct job ids answered: {len(ids)}; "
                f"jobs in the database for the key: {n_jobs}"
            )
            errors = sum(len(v) for r in (rec, reads, burst) for v in r.errors.values())
            for r in (rec, reads, burst):
                for route, errs in r.errors.items():
                    if errs:
                        print(f"  {route}: {len(errs)} errors, e.g. {errs[:3]}")
            status_p99 = _pct(rec.lat["status"], 99)
            inflight_p99 = _pct(reads.lat[f"status ({args.inflight} in flight)"], 99)
            targets = [
                (
                    served >= 0.95 * args.rate,
                    f"steady mix at {args.rate:.0f}/s for {args.duration:.0f} s: {served:.0f}/s served "
                    "(at least 95% of the rate asked)",
                ),
                (errors == 0, f"no errors: {errors}"),
                (
                    len(ids) == 1 and n_jobs == 1,
                    f"{args.concurrent} concurrent submissions, one Idempotency-Key: {len(ids)} job id(s) "
                    f"answered, {n_jobs} job(s) in the database (exactly one)",
                ),
                (status_p99 < 0.1, f"status p99 in the steady mix: {status_p99 * 1e3:.1f} ms (< 100 ms)"),
                (
                    inflight_p99 < 0.1,
                    f"status p99 with {args.inflight} in flight: {inflight_p99 * 1e3:.1f} ms (< 100 ms)",
                ),
            ]
            print("\ntargets (issue 9):")
            for passed, what in targets:
                print(f"  {'PASS' if passed else 'FAIL'}  {what}")
            return 0 if all(passed for passed, _ in targets) else 1

        return asyncio.run(run())
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        r = redis.Redis.from_url(args.redis)
        keys = list(r.scan_iter(f"{prefix}*", count=1000))
        if keys:
            r.delete(*keys)
        import shutil

        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
