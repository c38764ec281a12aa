"""Choosing a worker queue class from the job's memory plan and the workers that are alive, at submit time.

The plan (awqforge/plan.py, pure Python: no torch here) comes from the model's config.json and the job's
settings. A job goes to the smallest class whose memory (QUEUE_CLASSES, times QUEUE_MEMORY_HEADROOM) holds
its peak; with device=auto GPU classes come first, but a class no live worker consumes is passed over for
one that has a worker (a deployment without GPU workers runs everything on `cpu`). No class large enough:
the job is refused (RoutingError -> 422). Live queues come from Celery's inspect (cached briefly); when
they cannot be known (embedded filesystem broker, broker down) the configured classes decide alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from app.core.config import is_cpu_class, settings
from awqforge.parsing import is_local_reference
from awqforge.plan import GIB, JobSettings, PlanError, plan
from awqforge.resolve import hub_offline

log = logging.getLogger("awqforge.routing")


class RoutingError(Exception):
    """No configured queue class can hold the job."""

    def __init__(self, reason: str, plans: dict[str, dict] | None = None):
        super().__init__(reason)
        self.plans = plans


@dataclass
class Route:
    queue: str
    plan: dict | None  # the plan on the chosen class's device; None when the config could not be read
    reason: str
    plans: dict[str, dict] | None = None  # per class, when the config was read


_config_cache: dict[tuple, tuple[float, dict]] = {}
_CONFIG_TTL_S = 300.0


def model_config(model: str, revision: str | None = None, token: str | None = None) -> dict | None:
    """config.json of a local checkpoint (already checked against ALLOWED_LOCAL_ROOTS) or from the hub.

    One request with a short timeout and no retries: a submit never waits on an unreachable hub (the
    default queue decides then). Hub answers are kept a few minutes per model, revision and token."""
    if is_local_reference(model):
        try:
            return json.loads((Path(model).expanduser() / "config.json").read_text())
        except (OSError, ValueError):
            return None
    if hub_offline():
        return None
    key = (model, revision, hashlib.sha256((token or "").encode()).hexdigest())
    hit = _config_cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < _CONFIG_TTL_S:
        return hit[1]
    from huggingface_hub import constants

    endpoint = (settings.HF_ENDPOINT or constants.ENDPOINT).rstrip("/")
    url = f"{endpoint}/{model}/resolve/{quote(revision or 'main', safe='')}/config.json"
    headers = {"Authorization": f"Bearer {token}"} if token else {}  # the job's own, never the service's
    config = None
    try:
        r = _hub_client().get(url, headers=headers)
        config = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        log.info("no config for %s (%s); using the default queue", model, type(exc).__name__)
    if not isinstance(config, dict):
        config = None
    # a miss is kept too (an unreachable hub is not asked again on every submit), for less time
    _config_cache[key] = (time.monotonic() - (0 if config else _CONFIG_TTL_S - 30), config)
    return config


# -- the checkpoint's tensor names (modules_to_not_convert is checked against them at submit) ----------

_shapes_cache: dict[tuple, tuple[float, dict | None]] = {}


def model_tensor_shapes(model: str, revision: str | None = None, token: str | None = None) -> dict | None:
    """Tensor name -> shape (None where only an index names it) of a local checkpoint (its safetensors
    headers) or a hub model (its index json, else model.safetensors' header by HTTP Range), or None when
    they cannot be had. Hub look-ups go through the config's client and are cached as the config is."""
    from awqforge.weight_names import local_shapes

    if is_local_reference(model):
        from app.services.uploads import allowed_roots
        from awqforge.errors import InputError
        from awqforge.resolve import resolve_local_path

        try:
            return local_shapes(resolve_local_path(model, allowed_roots(), what="model"))
        except InputError:
            return None
    if hub_offline():
        return None
    key = (model, revision, hashlib.sha256((token or "").encode()).hexdigest())
    hit = _shapes_cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < _CONFIG_TTL_S:
        return hit[1]
    shapes = None
    try:
        shapes = _hub_shapes(model, revision, token)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.info("no tensor names for %s (%s)", model, type(exc).__name__)
    _shapes_cache[key] = (time.monotonic() - (0 if shapes else _CONFIG_TTL_S - 30), shapes)
    return shapes


def _hub_shapes(model: str, revision: str | None, token: str | None) -> dict | None:
    from huggingface_hub import constants

    from awqforge.weight_names import SAFETENSORS_INDEX

    endpoint = (settings.HF_ENDPOINT or constants.ENDPOINT).rstrip("/")
    base = f"{endpoint}/{model}/resolve/{quote(revision or 'main', safe='')}/"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = _hub_client().get(base + SAFETENSORS_INDEX, headers=headers)
    if r.status_code == 200:
        weight_map = r.json()["weight_map"]
        shapes: dict = dict.fromkeys(weight_map)
        # fused 3-D experts: one shard's header says how many experts (module_names needs the count)
        fused = next(
            (t for t in weight_map if t.endswith((".experts.gate_up_proj", ".experts.down_proj"))), None
        )
        if fused is not None:
            header = _remote_header(base + quote(weight_map[fused]), headers)
            shapes.update({t: info["shape"] for t, info in header.items() if t in shapes})
        return shapes
    if r.status_code != 404:
        return None
    header = _remote_header(base + "model.safetensors", headers)
    return {t: info["shape"] for t, info in header.items()}


def _remote_header(url: str, headers: dict) -> dict:
    """A safetensors file's header over HTTP: its first bytes by Range, then the rest of the header if longer
    (a server that ignores Range is read only as far as the header)."""
    from awqforge.weight_names import header_length, parse_header

    first = 64 * 1024
    status, raw = _read_prefix(url, {**headers, "Range": f"bytes=0-{first - 1}"}, first)
    n = header_length(raw[:8])
    if len(raw) < 8 + n:
        if status == 206:
            raw = raw[:8] + _read_prefix(url, {**headers, "Range": f"bytes=8-{8 + n - 1}"}, n)[1]
        else:  # no Range support: the body starts at byte 0
            raw = _read_prefix(url, headers, 8 + n)[1]
    return parse_header(raw[8 : 8 + n])


def _read_prefix(url: str, headers: dict, limit: int) -> tuple[int, bytes]:
    with _hub_client().stream("GET", url, headers=headers) as r:
        if r.status_code not in (200, 206):
            raise httpx.HTTPStatusError(f"{r.status_code} for {url}", request=r.request, response=r)
        out = bytearray()
        for chunk in r.iter_bytes():
            out += chunk
            if len(out) >= limit:
                break
        return r.status_code, bytes(out[:limit])


@functools.cache
def _hub_client() -> httpx.Client:
    """One client for the whole process: its TLS context and connections are made once, not per submit."""
    return httpx.Client(timeout=settings.HUB_METADATA_TIMEOUT_S, follow_redirects=True)


# -- live workers ---------------------------------------------------------------------------------

_live_lock = threading.Lock()
_live_cache: tuple[float, set[str] | None] | None = None
_live_refreshing = False


def live_queues(*, refresh: bool = False) -> set[str] | None:
    """Queue classes some live worker consumes (Celery inspect), or None when this cannot be known.

    The first call (or refresh=True) asks the workers and waits for them (LIVE_WORKERS_TIMEOUT_S). After that
    an answer older than LIVE_WORKERS_CACHE_S is still returned while one background thread asks again, so a
    request never waits on the broadcast: with no worker alive it lasts the whole timeout."""
    global _live_cache, _live_refreshing
    with _live_lock:
        cached = _live_cache
        if cached is not None and not refresh and settings.LIVE_WORKERS_CACHE_S > 0:  # 0: always ask
            if time.monotonic() - cached[0] >= settings.LIVE_WORKERS_CACHE_S and not _live_refreshing:
                _live_refreshing = True
                threading.Thread(target=_refresh_live_queues, name="live-queues", daemon=True).start()
            return cached[1]
    result = _inspect_live_queues()
    with _live_lock:
        _live_cache = (time.monotonic(), result)
    return result


def _refresh_live_queues() -> None:
    global _live_cache, _live_refreshing
    try:
        result = _inspect_live_queues()
        with _live_lock:
            _live_cache = (time.monotonic(), result)
    finally:
        _live_refreshing = False


def _inspect_live_queues() -> set[str] | None:
    if settings.broker_is_filesystem:  # no remote control on the embedded broker
        return None
    from worker.celery_app import celery_app

    try:
        replies = celery_app.control.inspect(timeout=settings.LIVE_WORKERS_TIMEOUT_S).active_queues()
    except Exception as exc:
        log.warning("could not ask the workers which queues they consume: %s", type(exc).__name__)
        return None
    prefix = settings.CELERY_QUEUE_PREFIX
    live = set()
    for queues in (replies or {}).values():
        for q in queues or []:
            name = q.get("name", "")
            if name.startswith(prefix):
                live.add(name[len(prefix) :])
    return live & set(settings.queue_classes)


def waiting_reason(queue: str) -> str | None:
    """Why a queued job on `queue` cannot start now, when no live worker consumes that queue."""
    live = live_queues()
    if live is None or queue in live:
        return None
    if not live:
        return f"no worker is alive; start one with `awqforge worker --queues {queue}`"
    return (
        f"no live worker consumes queue {queue!r} (live: {', '.join(sorted(live))}); "
        f"start one with `awqforge worker --queues {queue}`"
    )


# -- the choice -----------------------------------------------------------------------------------


def plans_by_class(config: dict, job: JobSettings) -> dict[str, dict]:
    return {
        name: plan(config, job, device="cpu" if is_cpu_class(name) else "cuda").to_dict()
        for name in settings.queue_classes
    }


def route(spec) -> Route:
    """The queue class for a JobSpec; RoutingError when no class it may use is large enough."""
    classes = settings.queue_classes
    allowed = [c for c in classes if spec.device == "auto" or (spec.device == "cpu") == is_cpu_class(c)]
    if not allowed:
        kind = "CPU" if spec.device == "cpu" else "GPU"
        raise RoutingError(
            f"device={spec.device!r} but no {kind} queue class is configured (QUEUE_CLASSES: {', '.join(classes)})"
        )
    live = live_queues()
    config = model_config(spec.model, spec.revision, spec.source.token)
    plans = None
    if config is not None:
        try:
            plans = plans_by_class(config, JobSettings.from_spec(spec))
        except (PlanError, ValueError, TypeError, ZeroDivisionError) as exc:
            log.info("no plan for %s: %s", spec.model, exc)
    if plans is None:
        if settings.DEFAULT_QUEUE in allowed and (live is None or settings.DEFAULT_QUEUE in live):
            queue = settings.DEFAULT_QUEUE
        else:
            alive = [c for c in allowed if live and c in live]
            queue = (
                alive[-1]
                if alive
                else (settings.DEFAULT_QUEUE if settings.DEFAULT_QUEUE in allowed else allowed[-1])
            )
        return Route(queue, None, "model config unavailable: default queue")

    def fits(c: str) -> bool:
        return plans[c]["peak_bytes"] <= classes[c] * settings.QUEUE_MEMORY_HEADROOM

    fitting = [c for c in allowed if fits(c)]
    if not fitting:
        largest = max(allowed, key=lambda c: classes[c])
        p = plans[largest]
        raise RoutingError(
            f"the job needs {p['peak_bytes'] / GIB:.1f} GiB at its peak ({p['peak_stage']} stage) on "
            f"{p['device']}; the largest queue class it may use, {largest}, has "
            f"{classes[largest] * settings.QUEUE_MEMORY_HEADROOM / GIB:.1f} GiB usable. Lower "
            "calibration.n_samples / seq_len or eval.seq_len, or add a larger queue class (QUEUE_CLASSES)",
            plans,
        )
    # GPU classes before CPU ones, each smallest first (classes are ordered by memory)
    fitting.sort(key=lambda c: (is_cpu_class(c), classes[c]))
    queue = fitting[0]
    reason = "smallest class that fits"
    if live is not None:
        alive = [c for c in fitting if c in live]
        if alive:
            if alive[0] != queue:
                reason = f"smallest class that fits with a live worker ({queue} has none)"
            queue = alive[0]
        else:
            reason = "smallest class that fits; no live worker consumes it yet"
    return Route(queue, plans[queue], reason, plans)
