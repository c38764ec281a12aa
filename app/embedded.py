"""Running the pieces in one place: a Celery worker child process and uvicorn in a thread."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import uvicorn

from app.core.config import is_cpu_class, settings


def detect_queues() -> list[str]:
    """Queue classes this machine can serve, from nvidia-smi (never initialises CUDA in this process)."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
            mib = min(int(x) for x in out) if out else 0
        except (subprocess.SubprocessError, ValueError, OSError):
            mib = 0
        # every configured GPU class whose memory this card has (a 24 GiB card shows about 24,500 MiB)
        gpu = [
            name
            for name, size in settings.queue_classes.items()
            if not is_cpu_class(name) and mib and size <= mib * 1024**2 * 1.05
        ]
        if gpu:
            return sorted(gpu, key=lambda n: -settings.queue_classes[n])
    return [n for n in settings.queue_classes if is_cpu_class(n)] or ["cpu"]


def worker_argv(queues: list[str], *, name: str = "awqforge", loglevel: str = "INFO") -> list[str]:
    """`celery worker` arguments: one process, one job at a time, prefork so the child forks before CUDA."""
    return [
        "worker",
        "-Q",
        ",".join(settings.queue_name(q) for q in queues),
        "--concurrency",
        "1",
        "--pool",
        "prefork",
        "--prefetch-multiplier",
        "1",
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"{name}@%h",
        "--loglevel",
        loglevel,
    ]


def start_worker_process(
    queues: list[str] | None = None, *, env: dict | None = None, name: str = "embedded", log_path=None
) -> subprocess.Popen:
    """A Celery worker in a child process (its own process group), consuming every queue unless told otherwise."""
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        *worker_argv(list(queues or settings.queue_classes), name=name),
    ]
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=out or None,
        stderr=subprocess.STDOUT if out else None,
        start_new_session=True,  # Ctrl-C in the terminal reaches us; we stop the worker ourselves
    )


def stop_process(proc: subprocess.Popen, timeout: float = 5) -> None:
    """Stop a worker started above: warm shutdown, then cold (SIGQUIT), then kill its process group.

    A job cut short stays `running` with a stale heartbeat; the reaper (or the next embedded start)
    queues it again.
    """
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGQUIT, 10)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the pool, if any
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()


class ServerThread:
    """uvicorn in a background thread (demo, tests)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=3
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")
        self.url = f"http://{host}:{port}"

    def start(self, timeout: float = 20) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
