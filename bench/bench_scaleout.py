"""Jobs per minute with 1, 2 and 4 worker processes on one queue, through the real API, Redis and Postgres.

    python bench/bench_scaleout.py                    # 8 tiny jobs per setting
    python bench/bench_scaleout.py --workers 1 2 --jobs 6

Each setting gets a fresh API process and N `awqforge worker --queues cpu` processes (each with its own
AWQFORGE_HOME, as on separate machines; one torch thread each), sharing a fresh Postgres database made for
this run and Redis under a queue prefix of its own (tests/service/cluster.py). The jobs are AWQ W4 on a
random tiny Llama (hidden 256, 2 blocks), evaluation off. Jobs per minute = jobs / (last finish - first
submit). Needs Postgres and Redis (AWQFORGE_TEST_DATABASE_URL / AWQFORGE_TEST_REDIS_URL, or the local ones).
On a machine with fewer free cores than workers the figure stops growing: read it against `nproc`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "service"))
import bench_memory  # noqa: E402
import cluster as cluster_mod  # noqa: E402
import common  # noqa: E402

PG = (os.environ.get("AWQFORGE_TEST_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test").replace(
    "postgresql+psycopg://", "postgresql://", 1
)
REDIS = os.environ.get("AWQFORGE_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"


def _psql(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(sql)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "awqforge-bench" / "scaleout")
    args = p.parse_args(argv)

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    cfg = bench_memory.llama_config(256, 512, 2, 4, 2, 49152)
    model = bench_memory.write_checkpoint(work / "tiny-llama", cfg, bench_memory._tokenizer_dir())
    calib = work / "calib.txt"
    calib.write_text(common.read_texts(common.CALIB_FILES))
    db = f"awqf_bench_{uuid.uuid4().hex[:8]}"
    _psql(f'CREATE DATABASE "{db}"')
    base_env = {
        "DATABASE_URL": PG.rpartition("/")[0] + "/" + db,
        "REDIS_URL": REDIS,
        "TENANT_MAX_QUEUED_JOBS": "1000",
        "HEARTBEAT_INTERVAL_S": "2",
        "REAPER_INTERVAL_S": "3600",
    }
    env = {**os.environ, **base_env, "AWQFORGE_HOME": str(work / "admin")}
    rows = []
    try:
        subprocess.run(
            [sys.executable, "-c", "from app.core.db import run_migrations; run_migrations()"],
            env=env,
            check=True,
        )
        key = subprocess.run(
            [sys.executable, "-m", "awqforge", "keys", "create", "--tenant", "bench"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        body = {
            "model": str(model),
            "bits": 4,
            "group_size": 128,
            "calibration": {"source": f"file:{calib}", "n_samples": 8, "seq_len": 64},
            "eval": {"enabled": False},
            "n_grid": 4,
            "device": "cpu",
        }
        for n in args.workers:
            cl = cluster_mod.Cluster(base_env, models_root=work)
            try:
                for i in range(n):
                    cl.start_worker(f"bench-w{i}", ["cpu"])
                with cl.client(key) as c:
                    t0 = time.monotonic()
                    ids = [c.post("/v1/jobs", json=body).json()["id"] for _ in range(args.jobs)]
                    pending = set(ids)
                    while pending:
                        for jid in list(pending):
                            st = c.get(f"/v1/jobs/{jid}").json()["status"]
                            if st in ("succeeded", "failed", "cancelled"):
                                if st != "succeeded":
                                    raise RuntimeError(
                                        f"job {jid} {st}: {c.get(f'/v1/jobs/{jid}').json()['error']}"
                                    )
                                pending.discard(jid)
                        time.sleep(0.5)
                    wall = time.monotonic() - t0
            finally:
                cl.close()
            rows.append(
                {"workers": n, "jobs": args.jobs, "wall_s": wall, "jobs_per_min": args.jobs / wall * 60}
            )
            print(
                f"{n} worker(s): {args.jobs} jobs in {wall:.1f} s = {rows[-1]['jobs_per_min']:.2f} jobs/min",
                flush=True,
            )
    finally:
        _psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    base = rows[0]["jobs_per_min"]
    print(f"\nnproc {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end (shared machine)")
    print("workers  jobs/min  vs 1 worker")
    for r in rows:
        print(f"{r['workers']:>7} {r['jobs_per_min']:>9.2f} {r['jobs_per_min'] / base:>12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
