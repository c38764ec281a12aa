"""`awqforge serve | keys | tenants | worker`: entry points the engine CLI dispatches to (argv without the command)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from app.core.config import settings


def _wait_for_database(timeout_s: float = 60) -> None:
    from app.core.db import check_database

    settings.ensure_dirs()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check_database()
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"database unreachable: {type(exc).__name__}: {exc}") from exc
            time.sleep(1)


def _wait_and_migrate(timeout_s: float = 60) -> None:
    """Prestart: wait for the database, then `alembic upgrade head`."""
    from app.core.db import run_migrations

    _wait_for_database(timeout_s)
    run_migrations()


def _requeue_orphans() -> None:
    """Embedded mode has exactly one worker, about to start: jobs left `running` by the last one are orphans."""
    from app.core.db import session_scope
    from app.services.jobs import reap_stale_jobs

    with session_scope() as s:
        requeued = reap_stale_jobs(s, all_running=True)
    if requeued:
        print(f"requeued {len(requeued)} job(s) interrupted by the last shutdown", flush=True)


def serve_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="awqforge serve",
        description=(
            "Run the API. With no DATABASE_URL/REDIS_URL set it is embedded: SQLite, a filesystem broker, "
            "one worker in a child process and a local hub folder under AWQFORGE_HOME."
        ),
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--worker",
        dest="worker",
        action="store_true",
        default=None,
        help="also run one worker (the default in embedded mode)",
    )
    p.add_argument("--no-worker", dest="worker", action="store_false")
    p.add_argument("--no-migrate", action="store_true", help="skip `alembic upgrade head` at start")
    p.add_argument(
        "--demo", action="store_true", help="run one real SmolLM2 job end to end, print metrics, exit"
    )
    p.add_argument(
        "--keep-serving",
        action="store_true",
        default=None,
        help="with --demo: keep serving after the job (the default at a terminal)",
    )
    p.add_argument("--no-keep-serving", dest="keep_serving", action="store_false", help="with --demo: exit")
    p.add_argument("--demo-samples", type=int, default=None, help="with --demo: calibration sequences")
    p.add_argument(
        "--demo-seq-len", type=int, default=None, help="with --demo: calibration tokens per sequence"
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.demo else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("alembic", "httpx", "kombu.connection"):
        logging.getLogger(noisy).setLevel(logging.ERROR if args.demo else logging.WARNING)

    if not args.no_migrate:
        _wait_and_migrate()
    run_worker = settings.is_embedded if args.worker is None else args.worker
    if args.demo:
        from app.demo import run_demo

        if run_worker and settings.is_embedded:
            _requeue_orphans()
        return run_demo(
            host=args.host,
            port=args.port,
            start_worker=run_worker,
            keep_serving=args.keep_serving,
            n_samples=args.demo_samples,
            seq_len=args.demo_seq_len,
        )

    import uvicorn

    from app.embedded import start_worker_process, stop_process
    from app.main import create_app

    if run_worker and settings.is_embedded:
        _requeue_orphans()
    worker = start_worker_process(name="embedded") if run_worker else None
    mode = "embedded (SQLite + filesystem broker)" if settings.is_embedded else "server"
    print(
        f"AWQForge API on http://{args.host}:{args.port}  ({mode}; data in {settings.AWQFORGE_HOME})",
        flush=True,
    )
    try:
        uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None:
            stop_process(worker)
    return 0


def keys_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="awqforge keys", description="Manage API keys (stored as sha256 hashes)."
    )
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser(
        "create", help="create a key for a tenant (the tenant is created if new); prints it once"
    )
    c.add_argument("--tenant", required=True)
    c.add_argument("--max-queued", type=int, default=None, help="per-tenant limit on unfinished jobs")
    r = sub.add_parser("revoke", help="revoke a key by its id (the part after 'awqf_')")
    r.add_argument("key_id")
    ls = sub.add_parser("list", help="list key ids (never the keys)")
    ls.add_argument("--tenant", default=None)
    args = p.parse_args(argv)

    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import ApiKey, Tenant, utcnow
    from app.services.keys import create_api_key

    _wait_and_migrate(timeout_s=10)
    if args.action == "create":
        with session_scope() as s:
            key = create_api_key(s, tenant_name=args.tenant, max_queued=args.max_queued)
        print(f"key id: {key.key_id}  (tenant {args.tenant})", file=sys.stderr)
        print(key.secret)
        print("Store it now: it is shown only this once.", file=sys.stderr)
        return 0
    if args.action == "revoke":
        key_id = args.key_id.split("_")[1] if args.key_id.startswith("awqf_") else args.key_id
        with session_scope() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                print(f"no key {key_id}", file=sys.stderr)
                return 1
            row.revoked_at = row.revoked_at or utcnow()
        print(f"revoked {key_id}")
        return 0
    with session_scope() as s:
        q = select(ApiKey, Tenant.name).join(Tenant)
        if args.tenant:
            q = q.where(Tenant.name == args.tenant)
        for key, tenant in s.execute(q.order_by(ApiKey.created_at)):
            state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
            print(f"{key.id}\t{tenant}\t{key.created_at:%Y-%m-%d %H:%M}\t{state}")
    return 0


def tenants_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="awqforge tenants",
        description=(
            "Manage tenants: the hub namespaces each may publish to (default: its own name) and whether its "
            "jobs may use the service's HF_TOKEN (default: no)."
        ),
    )
    sub = p.add_subparsers(dest="action", required=True)
    for action in ("create", "update"):
        a = sub.add_parser(action, help=f"{action} a tenant")
        a.add_argument("name")
        a.add_argument(
            "--namespace",
            action="append",
            default=None,
            help="a hub namespace (the owner in owner/name) the tenant may publish to; repeat for more; "
            "replaces the list",
        )
        a.add_argument("--no-namespaces", action="store_true", help="the tenant may publish nowhere")
        a.add_argument(
            "--allow-service-token",
            dest="service_token",
            action="store_true",
            default=None,
            help="jobs without their own token may use the service's HF_TOKEN",
        )
        a.add_argument("--deny-service-token", dest="service_token", action="store_false")
        a.add_argument("--max-queued", type=int, default=None, help="per-tenant limit on unfinished jobs")
    sub.add_parser("list", help="list tenants, their namespaces and service-token flag")
    args = p.parse_args(argv)

    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import Tenant
    from app.services.jobs import tenant_namespaces
    from app.services.keys import upsert_tenant

    _wait_and_migrate(timeout_s=10)
    if args.action == "list":
        with session_scope() as s:
            for t in s.scalars(select(Tenant).order_by(Tenant.name)):
                print(
                    f"{t.name}\tnamespaces={','.join(tenant_namespaces(t)) or '-'}"
                    f"\tservice_token={'yes' if t.allow_service_token else 'no'}"
                    f"\tmax_queued={t.max_queued_jobs or settings.TENANT_MAX_QUEUED_JOBS}"
                )
        return 0
    namespaces = [] if args.no_namespaces else args.namespace
    try:
        with session_scope() as s:
            t = upsert_tenant(
                s,
                name=args.name,
                create=args.action == "create",
                namespaces=namespaces,
                allow_service_token=args.service_token,
                max_queued=args.max_queued,
            )
            line = (
                f"{t.name}: namespaces={','.join(tenant_namespaces(t)) or '-'} "
                f"service_token={'yes' if t.allow_service_token else 'no'}"
            )
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(line)
    return 0


def worker_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="awqforge worker",
        description=("Run one Celery worker: one job at a time (run one per GPU, e.g. with --gpu)."),
    )
    p.add_argument(
        "--queues",
        default=None,
        help="comma-separated queue classes from QUEUE_CLASSES (default: detected with nvidia-smi)",
    )
    p.add_argument("--gpu", default=None, help="CUDA_VISIBLE_DEVICES for this worker")
    p.add_argument("--name", default=None, help="node name (unique per host; default from --gpu or the pid)")
    p.add_argument("--loglevel", default="INFO")
    args = p.parse_args(argv)

    from app.embedded import detect_queues, worker_argv

    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    queues = [q.strip() for q in args.queues.split(",")] if args.queues else detect_queues()
    bad = [q for q in queues if q not in settings.queue_classes]
    if bad:
        print(f"unknown queue(s) {bad}; choose from {list(settings.queue_classes)}", file=sys.stderr)
        return 2
    _wait_for_database()  # migrations are the API's prestart step, not every worker's
    from worker.celery_app import celery_app

    # Node names must be unique per host: the runner trusts "same node" to mean "my own redelivery".
    name = args.name or (f"awqforge-gpu{args.gpu}" if args.gpu is not None else f"awqforge-{os.getpid()}")
    celery_app.worker_main(worker_argv(queues, name=name, loglevel=args.loglevel))
    return 0


def migrate_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="awqforge migrate",
        description=(
            "Wait for the database, then apply the schema migrations (`alembic upgrade`): the one-shot "
            "step before the API and the workers start. Works from an installed wheel (no alembic.ini)."
        ),
    )
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the database")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from app.core.db import run_migrations

    _wait_for_database(args.timeout)
    run_migrations(revision=args.revision)
    print(f"database at {args.revision}")
    return 0


COMMANDS = {
    "serve": serve_command,
    "migrate": migrate_command,
    "keys": keys_command,
    "tenants": tenants_command,
    "worker": worker_command,
}


def main(argv: list[str] | None = None) -> int:
    """`python -m app.cli serve|migrate|keys|tenants|worker ...` (the same as `awqforge serve|migrate|...`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m app.cli {{{'|'.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
