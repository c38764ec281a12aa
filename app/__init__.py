"""AWQForge service: the REST API (FastAPI), its database (SQLAlchemy 2 + Alembic) and the CLI commands.

    client --HTTP--> app (FastAPI, /v1) --SQL--> Postgres | SQLite (embedded)
                        |  send_task("awqforge.run_job", [job_id], queue=<cpu|gpu-24g|gpu-80g>)
                        v
                     broker: Redis | kombu filesystem transport (embedded)
                        v
                     worker (Celery, prefork, 1 process = 1 job) -> worker.runner.run_job(job_id)
                        -> awqforge.pipeline.run_quantization -> progress/heartbeat/metrics rows -> hub

Decisions worth knowing:
- Embedded broker: kombu's filesystem transport (`filesystem://`, folders under AWQFORGE_HOME/broker): no server,
  works across processes (API process + worker child). It has no redelivery of unacknowledged messages, which
  is why job state and recovery live in the database (heartbeat + reaper), not in the broker.
- Publish tokens: validated with the job, then stored only Fernet-encrypted (key derived from SECRET_KEY, or a
  generated AWQFORGE_HOME/secret.key) in jobs.publish_token_enc; the Celery message carries only the job id.
  The worker decrypts it, scrubs it from logs and errors, and wipes it when the job succeeds. Never returned.
- Queue routing at submit time (services/routing.py): the memory plan from config.json (awqforge/plan.py)
  picks the smallest QUEUE_CLASSES class that fits, preferring GPU classes and classes with a live worker
  (Celery inspect, cached); none fits -> 422; no config -> DEFAULT_QUEUE.
- Artifacts (services/storage.py): the local folder, or an S3-compatible store that workers upload to.
- Per-tenant limit: unfinished jobs (queued + running) per tenant, TENANT_MAX_QUEUED_JOBS or the tenant's own.
"""
