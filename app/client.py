"""`awqforge submit | jobs | status | cancel | delete | download`: a client for a running AWQForge service.

Plain HTTP (httpx) against /v1; no torch, no database. URL and key from --url / --api-key or the
environment (AWQFORGE_URL, AWQFORGE_API_KEY). Errors from the API are printed as the API's message.
Exit codes: 0 ok, 1 the job (or a download check) failed, 2 bad arguments or an API error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from awqforge import spec
from awqforge.manifest import MANIFEST_NAME, file_matches, read_manifest, sha256_bytes
from awqforge.spec import JOB_STAGES, JOB_STATUSES

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")
CHUNK = 1 << 20


class ApiError(Exception):
    """An HTTP error answer, carrying the API's own message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _message(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        return f"HTTP {resp.status_code}: {resp.text[:300]}"
    if isinstance(detail, list):
        return "; ".join(
            f"{d.get('field')}: {d.get('reason')}" if isinstance(d, dict) else str(d) for d in detail
        )
    return str(detail or f"HTTP {resp.status_code}")


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float = 30):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach {self.http.base_url}: {exc}") from None
        if r.status_code >= 400:
            raise ApiError(r.status_code, _message(r))
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    def events(self, job_id: str, last_event_id: int = 0) -> Iterator[tuple[str, dict]]:
        """(kind, data) from the job's SSE stream until it ends; reconnects from the last id if cut."""
        while True:
            headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
            kind = None
            try:
                with self.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(30, read=60)
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise ApiError(r.status_code, _message(r))
                    for line in r.iter_lines():
                        if line.startswith("id: "):
                            last_event_id = int(line[4:])
                        elif line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            data = json.loads(line[6:])
                            yield kind or "message", data
                            if kind == "end":
                                return
                            kind = None
            except httpx.HTTPError:
                time.sleep(1)  # the stream was cut: resume after the last event seen


def _api_errors(command: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """A command whose API errors end it with the API's message and exit code 2."""

    @functools.wraps(command)
    def run(argv: list[str]) -> int:
        try:
            return command(argv)
        except ApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.api_key)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", default=os.environ.get("AWQFORGE_URL", DEFAULT_URL), help="service URL (AWQFORGE_URL)"
    )
    p.add_argument("--api-key", default=os.environ.get("AWQFORGE_API_KEY"), help="API key (AWQFORGE_API_KEY)")


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_metrics(job: dict, out=sys.stdout) -> None:
    m = job.get("metrics") or {}
    if m.get("fp_perplexity") is not None and m.get("quant_perplexity") is not None:
        fp, q = m["fp_perplexity"], m["quant_perplexity"]
        print(f"perplexity  FP {fp:.2f} -> quantized {q:.2f} ({100 * (q - fp) / fp:+.1f}%)", file=out)
    if m.get("size_before_bytes") and m.get("size_after_bytes"):
        b, a = m["size_before_bytes"], m["size_after_bytes"]
        print(f"size        {_fmt_bytes(b)} -> {_fmt_bytes(a)} ({b / a:.2f}x smaller)", file=out)
    stages = [(s, m.get(f"{s}_s")) for s in JOB_STAGES]
    timed = ", ".join(f"{s} {v:.1f}s" for s, v in stages if v is not None)
    if timed:
        print(f"time        {m.get('total_s') or 0:.1f}s ({timed})", file=out)
    if m.get("peak_rss_bytes"):
        print(f"peak memory {_fmt_bytes(m['peak_rss_bytes'])} RSS", file=out)
    for a in job.get("artifacts") or []:
        print(f"artifact    {a['format']}: {a['id']} ({_fmt_bytes(a['size_bytes'])})", file=out)


def _follow(c: Client, job: dict) -> dict:
    """A progress bar over the event stream (stage lines only when stderr is not a terminal)."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bar = tqdm(
        total=100,
        unit="%",
        desc=job.get("stage") or "queued",
        disable=not tty,
        leave=True,
        bar_format="{desc:<10} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
    )
    stage = None
    try:
        for kind, data in c.events(job["id"]):
            if data.get("stage") and data["stage"] != stage:
                stage = data["stage"]
                bar.set_description_str(stage)
                if not tty:
                    print(f"[{job['id']}] {stage}", file=sys.stderr, flush=True)
            if data.get("progress") is not None:
                bar.n = round(100 * data["progress"], 1)
                bar.refresh()
            if kind in ("status", "log") and data.get("message") and not tty:
                print(f"[{job['id']}] {data['message'].splitlines()[0][:200]}", file=sys.stderr, flush=True)
            if kind == "end":
                break
    finally:
        bar.close()
    return c.request("GET", f"/v1/jobs/{job['id']}")


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="awqforge submit", description="Submit a quantization job to the service."
    )
    _common(p)
    p.add_argument("model", help="Hugging Face model id or a path under the service's ALLOWED_LOCAL_ROOTS")
    # choices come from the job specification; a flag left out is left to the service's defaults (JobSpec's)
    p.add_argument("--method", choices=spec.choices(spec.Method))
    p.add_argument("--bits", type=int)
    p.add_argument("--group-size", type=int)
    p.add_argument("--format", dest="formats", action="append", choices=spec.choices(spec.ArtifactFormat))
    p.add_argument("--calibration", help="a local file to upload, or a source (pileval, hf:..., file:...)")
    p.add_argument("--n-samples", type=int, help="calibration sequences")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sequence")
    p.add_argument("--device", choices=spec.DEVICES)
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="any other job field, e.g. --set eval='{\"seq_len\": 512}' (repeatable)",
    )
    p.add_argument(
        "--eval-task",
        dest="eval_tasks",
        action="append",
        default=[],
        metavar="NAME_OR_PATH",
        help="an lm-evaluation-harness task, FP vs quantized (repeatable)",
    )
    p.add_argument("--eval-limit", type=int, help="at most this many examples per --eval-task")
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", action="store_true", help="follow the job to its end, then print its metrics")
    return p


@_api_errors
def submit_command(argv: list[str]) -> int:
    p = submit_parser()
    args = p.parse_args(argv)

    body: dict[str, Any] = {"model": args.model}
    for name in ("method", "bits", "group_size"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.formats:
        body["formats"] = args.formats
    if args.device:
        body["device"] = args.device
    calibration: dict[str, Any] = {}
    for item in args.extra:
        key, sep, raw = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=JSON")
        try:
            body[key] = json.loads(raw)
        except json.JSONDecodeError:
            body[key] = raw
    if args.eval_tasks:
        evaluation = body["eval"] if isinstance(body.get("eval"), dict) else {}
        evaluation["tasks"] = [
            *evaluation.get("tasks", []),
            *({"name": t, "limit": args.eval_limit} for t in args.eval_tasks),
        ]
        body["eval"] = evaluation
    if isinstance(body.get("calibration"), dict):
        calibration.update(body["calibration"])
    if args.n_samples:
        calibration["n_samples"] = args.n_samples
    if args.seq_len:
        calibration["seq_len"] = args.seq_len
    c = _client(args)
    try:
        if args.calibration:
            path = Path(args.calibration).expanduser()
            if path.is_file():
                with path.open("rb") as f:
                    cal = c.request("POST", "/v1/calibration-sets", files={"file": (path.name, f)})
                calibration["upload_id"] = cal["id"]
                print(f"uploaded {path.name}: {cal['id']} ({cal['n_records']} records)", file=sys.stderr)
            else:
                calibration["source"] = args.calibration
        if calibration:
            body["calibration"] = calibration
        headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
        job = c.request("POST", "/v1/jobs", json=body, headers=headers)
        print(f"{job['id']}  {job['status']} on queue {job['queue']}")
        if not args.wait:
            return 0
        job = _follow(c, job)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on: awqforge status {job['id']}", file=sys.stderr)
        return 130
    print(f"{job['id']}  {job['status']}")
    tasks = c.request("GET", f"/v1/jobs/{job['id']}/metrics").get("tasks") if body.get("eval") else None
    if job["status"] != "succeeded":
        if tasks:  # a job below its quality gate: the figures that put it there
            print(_task_table(tasks))
        print(f"error: {job.get('error') or job['status']}", file=sys.stderr)
        return 1
    _print_metrics(job)
    if tasks:
        print(_task_table(tasks))
    return 0


def _task_table(tasks: list[dict]) -> str:
    from awqforge.tasks_eval import format_table  # no torch, no lm_eval: text only

    return format_table(tasks)


@_api_errors
def jobs_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="awqforge jobs", description="List your jobs, newest first.")
    _common(p)
    p.add_argument("--status", choices=JOB_STATUSES)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    page = _client(args).request("GET", "/v1/jobs", params=params)
    if args.json:
        print(json.dumps(page["data"], indent=2))
        return 0
    print(f"{'JOB':<30} {'STATUS':<10} {'PROGRESS':>8}  {'QUEUE':<8} {'QUANT':<12} MODEL")
    for j in page["data"]:
        quant = f"{j['method']} W{j['bits']} g{j['group_size']}"
        print(
            f"{j['id']:<30} {j['status']:<10} {100 * j['progress']:>7.0f}%  {j['queue']:<8} {quant:<12} {j['model']}"
        )
    return 0


@_api_errors
def status_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="awqforge status", description="One job: status, progress, metrics.")
    _common(p)
    p.add_argument("job")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    job = _client(args).request("GET", f"/v1/jobs/{args.job}")
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    eta = f", ETA {job['eta_s']:.0f}s" if job.get("eta_s") is not None and job["status"] == "running" else ""
    print(f"{job['id']}  {job['status']}  {100 * job['progress']:.0f}% {job.get('stage') or ''}{eta}")
    print(
        f"model       {job['model']} ({job['method']} W{job['bits']} g{job['group_size']}, queue {job['queue']})"
    )
    if job.get("error"):
        print(f"error       {job['error']}")
    _print_metrics(job)
    return 0


@_api_errors
def cancel_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="awqforge cancel", description="Cancel a queued or running job.")
    _common(p)
    p.add_argument("job")
    args = p.parse_args(argv)
    job = _client(args).request("POST", f"/v1/jobs/{args.job}/cancel")
    print(
        f"{job['id']}  {job['status']}" + (" (stops at the next block)" if job["status"] == "running" else "")
    )
    return 0


@_api_errors
def delete_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="awqforge delete", description="Delete a finished job with its artifacts (files or objects)."
    )
    _common(p)
    p.add_argument("job")
    args = p.parse_args(argv)
    _client(args).request("DELETE", f"/v1/jobs/{args.job}")
    print(f"{args.job}  deleted")
    return 0


def _fetch(c: Client, url: str, part: Path, have: int) -> bool:
    """Append the bytes after `have` to `part` (HTTP Range), or write the whole file when the server sends it
    whole or refuses the range (416: the .part is as long as the file, or longer). True: it resumed."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    with c.http.stream("GET", url, headers=headers, timeout=httpx.Timeout(30, read=300)) as r:
        if r.status_code == 416 and have:
            r.read()
            part.unlink(missing_ok=True)
            return _fetch(c, url, part, 0)
        if r.status_code >= 400:
            r.read()
            raise ApiError(r.status_code, _message(r))
        resumed = r.status_code == 206
        with part.open("ab" if resumed else "wb") as f:
            for chunk in r.iter_bytes(CHUNK):
                f.write(chunk)
    return resumed


def download_file(c: Client, url: str, dest: Path, size: int, sha256: str | None = None) -> str:
    """Fetch one file into dest, resuming a partial download with HTTP Range, and check it (size, and
    sha256 when known). A local file or .part that is not the file is fetched again from the start, once.
    Returns how: 'skipped, sha256 ok', 'resumed, sha256 ok', 'repaired, sha256 ok', 'downloaded', ...;
    a file still wrong after a fresh download is kept as <name>.corrupt and the answer says MISMATCH."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    checked = ", sha256 ok" if sha256 else ""
    if file_matches(dest, size=size, sha256=sha256):
        return "skipped" + checked
    how = "repaired" if dest.exists() else None  # a local copy that is not the file (a corrupt manifest)
    for fresh in (False, True):
        if fresh:
            part.unlink(missing_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        ranged = False
        if not part.exists() or have < size:
            ranged = _fetch(c, url, part, have)
        resumed = have > 0 and (ranged or have == size)  # a complete .part needs no request at all
        if file_matches(part, size=size, sha256=sha256):
            part.replace(dest)
            how = how or (
                "restarted after a sha256 mismatch" if fresh else "resumed" if resumed else "downloaded"
            )
            return how + checked
    part.replace(dest.with_name(dest.name + ".corrupt"))
    dest.unlink(missing_ok=True)
    return "sha256 MISMATCH" if sha256 else "size MISMATCH"


@_api_errors
def download_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="awqforge download",
        description="Download a job's artifacts into DIR/<format>/ (resumes partial files, verifies sha256).",
    )
    _common(p)
    p.add_argument("job")
    p.add_argument("dir", type=Path)
    p.add_argument("--format", dest="formats", action="append", help="only these artifact formats")
    args = p.parse_args(argv)
    c = _client(args)
    bad: list[str] = []
    arts = c.request("GET", f"/v1/jobs/{args.job}/artifacts")["data"]
    arts = [a for a in arts if not args.formats or a["format"] in args.formats]
    if not arts:
        print("error: the job has no artifacts (yet)", file=sys.stderr)
        return 1
    for a in arts:
        folder = args.dir / a["format"]
        files = {f["path"]: f for f in a["files"]}
        # sha256 of each file: the listing's (recorded by the run); for older artifacts, the server's manifest
        digests = {p: f.get("sha256") for p, f in files.items()}
        if MANIFEST_NAME in files and not all(digests.values()):
            r = c.http.get(files[MANIFEST_NAME]["url"])
            if r.status_code >= 400:
                raise ApiError(r.status_code, _message(r))
            try:
                listed = read_manifest(r.content)
            except ValueError:
                raise ApiError(0, f"{a['format']}/{MANIFEST_NAME} on the server is not a manifest") from None
            digests = {p: d or (listed.get(p) or {}).get("sha256") for p, d in digests.items()}
            digests[MANIFEST_NAME] = digests[MANIFEST_NAME] or sha256_bytes(r.content)
        for path, f in files.items():
            how = download_file(c, f["url"], folder / path, f["size_bytes"], digests.get(path))
            if "MISMATCH" in how:
                bad.append(path)
            print(f"{a['format']}/{path}  {_fmt_bytes(f['size_bytes'])}  {how}")
    if bad:
        print(f"error: sha256 mismatch for {', '.join(bad)} (kept as *.corrupt; run again)", file=sys.stderr)
        return 1
    print(f"downloaded to {args.dir}")
    return 0
