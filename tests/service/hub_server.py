"""A local HTTP server speaking the Hugging Face Hub endpoints that the real `huggingface_hub` client calls
for what AWQForge uses. It is a contract test of our use of the client: our code runs unmodified through
the real client with HF_ENDPOINT pointed here.

Endpoints (as huggingface_hub 1.x/2.x calls them; read from its hf_api.py, file_download.py, _commit_api.py):
  GET  /api/models/{ns}/{name}[/revision/{rev}]      model_info / repo_info: sha, private, gated, siblings
  GET  /api/models/{ns}/{name}/tree/{rev}             list_repo_tree (snapshot_download lists files with it)
  HEAD|GET /{ns}/{name}/resolve/{rev}/{path}          file metadata (X-Repo-Commit, ETag) and download (Range)
  POST /api/validate-yaml                             the model card's metadata, checked before a commit
  POST /api/repos/create                              create_repo (409 when it exists)
  POST /api/models/{ns}/{name}/preupload/{rev}        upload mode per file ("regular") and the remote oid
  POST /api/models/{ns}/{name}/commit/{rev}           NDJSON commit: header, file (base64), deletedFile

Errors carry X-Error-Code as the Hub's do (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), so
the client raises the same exception types. Faults are injected with `fail(...)`: a status (5xx, 429 with
Retry-After) answered to the next N matching requests; `hold(...)` keeps the next matching request unanswered
until the test releases it (a client killed meanwhile: its request is never applied).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha

    def commit(self, files: dict[str, bytes], *, ref: str = "main") -> str:
        h = hashlib.sha1((self.refs.get(ref, "") + str(len(self.commits))).encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + git_blob_sha(files[path]).encode())
        sha = h.hexdigest()
        self.commits.append((sha, dict(files)))
        self.refs[ref] = sha
        return sha

    def files_at(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.refs.get(rev, rev)
        for csha, files in self.commits:
            if csha == sha:
                return csha, files
        return None


@dataclass
class Fault:
    method: str
    path: re.Pattern
    status: int
    times: int
    headers: dict[str, str]
    arrived: threading.Event | None = None  # hold(): set when the held request has come in
    release: threading.Event | None = None  # hold(): set by the test to answer it (with `status`)


class HubServer:
    """`users`: token -> user name; a user may write and read private repos in its own namespace and in
    `orgs[user]`. Gated repos need a token (401 without, 403 for users not in `gated_access`)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.users: dict[str, str] = {}
        self.orgs: dict[str, set[str]] = {}
        self.gated_access: dict[str, set[str]] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status answered)
        # Called with the repo id once a commit is stored, before it is answered (a test breaks something
        # there: the commit is made whatever the client learns of it).
        self.on_commit: Callable[[str], None] | None = None
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- set-up helpers for tests
    def add_user(self, token: str, name: str, orgs: tuple[str, ...] = ()) -> None:
        self.users[token] = name
        self.orgs[name] = set(orgs)

    def add_repo(
        self, repo_id: str, folder: Path | dict[str, bytes], *, private=False, gated=False, ref="main"
    ) -> str:
        files = (
            folder
            if isinstance(folder, dict)
            else {
                p.relative_to(folder).as_posix(): p.read_bytes()
                for p in Path(folder).rglob("*")
                if p.is_file()
            }
        )
        repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private, gated=gated))
        return repo.commit(files, ref=ref)

    def fail(self, method: str, path_regex: str, status: int, times: int = 1, **headers: str) -> None:
        self.faults.append(Fault(method, re.compile(path_regex), status, times, headers))

    def hold(self, method: str, path_regex: str, status: int = 503) -> Fault:
        """The next matching request waits, unanswered and not applied, until `fault.release` is set; then it
        gets `status` (if its client is still there). `fault.arrived` is set once it has come in."""
        fault = Fault(
            method,
            re.compile(path_regex),
            status,
            1,
            {},
            arrived=threading.Event(),
            release=threading.Event(),
        )
        self.faults.append(fault)
        return fault

    def count(self, method: str, path_regex: str, status: int | None = None) -> int:
        rx = re.compile(path_regex)
        return sum(
            1 for m, p, s in self.requests if m == method and rx.search(p) and (status is None or s == status)
        )

    # -- access rules
    def _user(self, headers) -> str | None:
        auth = headers.get("Authorization", "")
        return self.users.get(auth[7:]) if auth.startswith("Bearer ") else None

    def _owns(self, user: str | None, repo_id: str) -> bool:
        ns = repo_id.split("/", 1)[0]
        return user is not None and (ns == user or ns in self.orgs.get(user, set()))

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes | dict = b"", headers: dict | None = None, head=False):
                data = json.dumps(body).encode() if isinstance(body, dict) else body
                with hub.lock:
                    hub.requests.append((self.command, urlparse(self.path).path, status))
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if isinstance(body, dict):
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _error(self, status: int, code: str | None, message: str, head=False):
                self._send(status, {"error": message}, {"X-Error-Code": code} if code else {}, head=head)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _fault(self) -> bool:
                path = urlparse(self.path).path
                with hub.lock:
                    for f in hub.faults:
                        if f.times > 0 and f.method == self.command and f.path.search(path):
                            f.times -= 1
                            break
                    else:
                        return False
                self._body()
                if f.release is not None:
                    f.arrived.set()
                    f.release.wait(600)
                try:
                    self._send(f.status, {"error": "injected fault"}, f.headers, head=self.command == "HEAD")
                except OSError:  # the client is gone (killed while its request was held)
                    self.close_connection = True
                return True

            def _readable(self, repo_id: str, head=False) -> Repo | None:
                """The repo if this request may see it; else the error is already sent."""
                repo = hub.repos.get(repo_id)
                user = hub._user(self.headers)
                if repo is None or (repo.private and not hub._owns(user, repo_id)):
                    # As the Hub: 401 without a token, 404 with one (private repos are not revealed)
                    self._error(401 if user is None else 404, "RepoNotFound", "Repository not found", head)
                    return None
                return repo

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head=False):
                if self._fault():
                    return
                path = unquote(urlparse(self.path).path)
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
                if m:
                    return self._model_info(m.group(1), m.group(2) or "main")
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
                if m:
                    return self._tree(m.group(1), m.group(2), m.group(3) or "")
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    return self._resolve(m.group(1), m.group(2), m.group(3), head)
                self._error(404, None, f"no route {path}", head)

            def _at(self, repo_id: str, rev: str, head=False) -> tuple[Repo, str, dict[str, bytes]] | None:
                """The repo and its files at `rev` if this request may see them; else the error is sent."""
                repo = self._readable(repo_id, head)
                if repo is None:
                    return None
                found = repo.files_at(rev)
                if found is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                    return None
                return repo, *found

            def _model_info(self, repo_id: str, rev: str):
                if (at := self._at(repo_id, rev)) is None:
                    return
                repo, sha, files = at
                self._send(
                    200,
                    {
                        "_id": repo_id,
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": sha,
                        "private": repo.private,
                        "gated": "manual" if repo.gated else False,
                        "disabled": False,
                        "tags": [],
                        "siblings": [{"rfilename": p} for p in sorted(files)],
                    },
                )

            def _tree(self, repo_id: str, rev: str, prefix: str):
                """list_repo_tree (snapshot_download lists the files at the commit with it)."""
                if (at := self._at(repo_id, rev)) is None:
                    return
                entries = [
                    {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha(data)}
                    for p, data in sorted(at[2].items())
                    if p.startswith(prefix)
                ]
                data = json.dumps(entries).encode()
                self._send(200, data, {"Content-Type": "application/json"})

            def _resolve(self, repo_id: str, rev: str, filename: str, head: bool):
                if (at := self._at(repo_id, rev, head)) is None:
                    return
                repo, sha, files = at
                user = hub._user(self.headers)
                if repo.gated and not hub._owns(user, repo_id):
                    if user is None:
                        return self._error(401, "GatedRepo", "Access to this gated repo is restricted", head)
                    if user not in hub.gated_access.get(repo_id, set()):
                        return self._error(403, "GatedRepo", "You have not been granted access", head)
                if filename not in files:
                    return self._error(404, "EntryNotFound", f"{filename} not found", head)
                data = files[filename]
                headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Accept-Ranges": "bytes"}
                rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if rng and not head:
                    start = int(rng.group(1))
                    end = int(rng.group(2)) if rng.group(2) else len(data) - 1
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    return self._send(206, data[start : end + 1], headers)
                self._send(200, data, headers, head=head)

            def do_POST(self):
                if self._fault():
                    return
                path = unquote(urlparse(self.path).path)
                user = hub._user(self.headers)
                if path == "/api/validate-yaml":  # create_commit checks a README's metadata first
                    content = json.loads(self._body())["content"]
                    m = re.match(r"---\n(.*?)\n---\n", content, re.S)
                    try:
                        meta = yaml.safe_load(m.group(1)) if m else {}
                    except yaml.YAMLError as exc:
                        return self._send(400, {"errors": [{"message": str(exc)}], "warnings": []})
                    if not isinstance(meta, (dict, type(None))):
                        return self._send(400, {"errors": [{"message": "metadata must be a mapping"}]})
                    return self._send(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    body = json.loads(self._body() or b"{}")
                    repo_id = f"{body.get('organization') or user}/{body['name']}"
                    if user is None:
                        return self._error(401, None, "Invalid credentials")
                    if not hub._owns(user, repo_id):
                        return self._error(403, None, f"You don't have the rights to create {repo_id}")
                    if repo_id in hub.repos:
                        return self._error(409, None, "You already created this model repo")
                    # 2.x sends "visibility" ("private"/"public"), older clients "private": accept both
                    private = body.get("visibility", "private" if body.get("private") else "public")
                    repo = hub.repos[repo_id] = Repo(repo_id, private=private == "private")
                    repo.commit({".gitattributes": GITATTRIBUTES})  # as the Hub: a new repo has one commit
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
                if not m:
                    return self._error(404, None, f"no route {path}")
                repo_id, action, rev = m.groups()
                body = self._body()
                repo = self._readable(repo_id)
                if repo is None:
                    return
                if not hub._owns(user, repo_id):
                    return self._error(403, None, f"You don't have the rights to write to {repo_id}")
                current = repo.files_at(rev)
                files = dict(current[1]) if current else {}
                if action == "preupload":
                    wanted = json.loads(body)["files"]
                    return self._send(
                        200,
                        {
                            "files": [
                                {
                                    "path": f["path"],
                                    "uploadMode": "regular",
                                    "shouldIgnore": False,
                                    "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None,
                                }
                                for f in wanted
                            ]
                        },
                    )
                for line in body.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    elif item["key"] != "header":
                        return self._error(400, None, f"unsupported commit operation {item['key']}")
                sha = repo.commit(files, ref=rev)
                if hub.on_commit is not None:
                    hub.on_commit(repo_id)
                self._send(
                    200, {"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}"}
                )

        return Handler
