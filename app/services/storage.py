"""Artifact storage: where a worker puts a finished artifact folder and where the API reads it from.

Two backends behind one interface (`ArtifactStore`: put, list_files, head, stream, presign, delete,
local_copy); the API and the worker call only that, never ask which backend they hold:
- `LocalStore` (the embedded default): folders under ARTIFACT_DIR; a location is the absolute path. API and
  workers must share that folder (one machine, or a volume). It cannot presign.
- `S3Store`: any S3-compatible object store through boto3 (AWS, MinIO, moto...). A worker on any machine
  uploads each file (multipart above S3_MULTIPART_THRESHOLD) under `S3_PREFIX/<key>/`; the location is
  `s3://bucket/<prefix>/<key>`. The API of any other machine lists and streams the files, or hands out
  presigned download URLs so that large files never pass through it.

Keys are `tenant-<id>/<job>/<run>/<format>`: every run stores under its own prefix, so a retry never
overwrites the artifacts its job has recorded; what no row names any more is removed with
`delete(job_location, keep=recorded)`.

An artifact row's location says which backend reads it (`s3://` or a path), so artifacts written before a
change of ARTIFACT_STORE stay readable. Torch-free: the API imports this.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from app.core.config import settings
from awqforge.errors import AWQForgeError
from awqforge.manifest import tree_files, tree_problems

log = logging.getLogger("awqforge.storage")
S3_SCHEME = "s3://"
CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the artifact's root, posix
    size_bytes: int
    etag: str  # a strong validator, quoted (HTTP ETag)
    mtime: float


class StoreUnavailable(AWQForgeError):
    """The object store could not take a file; the message names the file, never the store's address."""


class ArtifactMismatch(Exception):
    """A stored artifact's files are not the ones its run recorded (missing, extra or different bytes)."""


def file_manifest(local: Path) -> list[dict]:
    """Every file of a finished artifact (a folder, or one file): path, size and sha256, as recorded in
    artifacts.files."""
    return [
        {"path": rel, "size_bytes": f["size"], "sha256": f["sha256"]} for rel, f in tree_files(local).items()
    ]


def check_manifest(local: Path, files: list[dict]) -> None:
    """Raise ArtifactMismatch unless `local` holds exactly the recorded files, byte for byte."""
    problems = tree_problems(
        local, {f["path"]: {"size": f.get("size_bytes"), "sha256": f["sha256"]} for f in files}
    )
    if problems:
        raise ArtifactMismatch("the stored artifact is not the one recorded: " + "; ".join(problems[:5]))


def job_key(tenant_id: int, job_id: str) -> str:
    """The key every artifact of the job is stored under (each run adds `/<run>/<format>`)."""
    return f"tenant-{tenant_id}/{job_id}"


def _relative(file_path: str) -> PurePosixPath | None:
    """A file name inside an artifact, or None for one that tries to leave it (absolute, "..", empty)."""
    rel = PurePosixPath(file_path)
    if rel.is_absolute() or ".." in rel.parts or not file_path or file_path.endswith("/"):
        return None
    return rel


class ArtifactStore:
    """What the worker and the API need from a store. `path` arguments name a file inside the artifact at
    `location`; one that tries to leave it is treated as missing."""

    def put(self, local: Path, *, key: str) -> str:
        """Store a finished artifact folder (or one file, kept under its name); returns its location (kept in
        artifacts.path). `local` stays as it was."""
        raise NotImplementedError

    def list_files(self, location: str) -> list[StoredFile]:
        """The artifact's files, sorted by path ([] when it is gone)."""
        raise NotImplementedError

    def head(self, location: str, path: str) -> StoredFile | None:
        raise NotImplementedError

    def stream(self, location: str, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The file's bytes from `start` to `end` (inclusive; None: to the end)."""
        raise NotImplementedError

    def presign(self, location: str, path: str) -> str | None:
        """A URL that downloads the file without the API, or None where the store cannot make one."""
        return None

    def delete(self, location: str, *, keep: Iterable[str] = ()) -> None:
        """Remove what `location` holds (a folder or file; every object under the prefix), except what lies
        under one of the `keep` locations."""
        raise NotImplementedError

    def local_copy(
        self, location: str, *, files: list[dict] | None, scratch: Path
    ) -> AbstractContextManager[Path]:
        """The artifact as a folder on this machine, checked against its recorded `files` (when recorded);
        a remote store downloads it into the folder `scratch` (emptied first: a copy left by a killed run
        goes), removed on exit."""
        raise NotImplementedError

    def job_location(self, tenant_id: int, job_id: str) -> str:
        """The location that holds everything this store keeps for the job (put keys start with it)."""
        raise NotImplementedError


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same file system (the run's staging folder is under ARTIFACT_DIR): no copy
    except OSError:
        shutil.copy2(src, dst)


class LocalStore(ArtifactStore):
    def put(self, local: Path, *, key: str) -> str:
        local, dest = Path(local), settings.ARTIFACT_DIR / key
        shutil.rmtree(dest, ignore_errors=True)  # what a killed attempt at this same key left
        if local.is_file():
            dest.mkdir(parents=True)
            _link_or_copy(str(local), str(dest / local.name))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(local, dest, copy_function=_link_or_copy)
        return str(dest.resolve())

    def _file(self, location: str, path: str) -> Path | None:
        from awqforge.errors import InputError
        from awqforge.resolve import resolve_local_path

        root = Path(location).resolve()
        if root.is_file():  # a location written as the file itself (before runs had folders)
            return root if path == root.name else None
        if _relative(path) is None:
            return None
        try:  # the one resolver: links and ".." followed, whatever it names must stay inside the artifact
            target = resolve_local_path(path, [root], what="file", base=root)
        except InputError:
            return None
        return target if target.is_file() else None

    @staticmethod
    def _stat(rel: str, p: Path) -> StoredFile:
        st = p.stat()
        return StoredFile(rel, st.st_size, f'"{st.st_size:x}-{st.st_mtime_ns:x}"', st.st_mtime)

    def list_files(self, location: str) -> list[StoredFile]:
        root = Path(location)
        if root.is_file():
            return [self._stat(root.name, root)]
        if not root.is_dir():
            return []
        files = (p for p in root.rglob("*") if p.is_file())
        return sorted((self._stat(p.relative_to(root).as_posix(), p) for p in files), key=lambda f: f.path)

    def head(self, location: str, path: str) -> StoredFile | None:
        target = self._file(location, path)
        return None if target is None else self._stat(path, target)

    def stream(self, location: str, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        target = self._file(location, path)
        if target is None:
            raise FileNotFoundError(path)
        left = None if end is None else end - start + 1
        with open(target, "rb") as f:
            f.seek(start)
            while left is None or left > 0:
                data = f.read(CHUNK if left is None else min(CHUNK, left))
                if not data:
                    return
                if left is not None:
                    left -= len(data)
                yield data

    def delete(self, location: str, *, keep: Iterable[str] = ()) -> None:
        _prune(Path(location), {Path(k).resolve() for k in keep})

    @contextmanager
    def local_copy(self, location: str, *, files: list[dict] | None, scratch: Path) -> Iterator[Path]:
        root = Path(location)  # already here (one machine, or a shared volume): read in place
        if files is not None:
            check_manifest(root, files)
        yield root

    def job_location(self, tenant_id: int, job_id: str) -> str:
        return str(settings.ARTIFACT_DIR / job_key(tenant_id, job_id))


def _prune(p: Path, keep: set[Path]) -> None:
    resolved = p.resolve()
    if resolved in keep:
        return
    if p.is_dir() and not p.is_symlink() and any(k.is_relative_to(resolved) for k in keep):
        for child in p.iterdir():
            _prune(child, keep)
    elif p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


class S3Store(ArtifactStore):
    def __init__(self) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not settings.S3_BUCKET:
            raise ValueError("ARTIFACT_STORE=s3 needs S3_BUCKET")
        self.bucket = settings.S3_BUCKET
        self.prefix = settings.S3_PREFIX.strip("/")

        def client(endpoint: str | None):
            return boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=settings.S3_REGION,
                aws_access_key_id=settings.S3_ACCESS_KEY_ID,
                aws_secret_access_key=settings.S3_SECRET_ACCESS_KEY,
                config=Config(
                    signature_version="s3v4",
                    s3={"addressing_style": settings.S3_ADDRESSING_STYLE},
                    retries={"max_attempts": 5, "mode": "standard"},
                ),
            )

        self.client = client(settings.S3_ENDPOINT_URL)
        # The host is part of the signature: URLs for the API's clients are signed for the address they use.
        public = settings.S3_PUBLIC_ENDPOINT_URL
        self.presign_client = client(public) if public and public != settings.S3_ENDPOINT_URL else self.client
        self.transfer = TransferConfig(
            multipart_threshold=settings.S3_MULTIPART_THRESHOLD,
            multipart_chunksize=settings.S3_MULTIPART_CHUNKSIZE,
        )

    # locations are s3://bucket/<key prefix of the artifact>
    def _split(self, location: str) -> tuple[str, str]:
        bucket, _, key = location.removeprefix(S3_SCHEME).partition("/")
        return bucket, key.rstrip("/")

    def _key(self, location: str, path: str) -> tuple[str, str] | None:
        rel = _relative(path)
        if rel is None:
            return None
        bucket, base = self._split(location)
        return bucket, f"{base}/{rel.as_posix()}"

    def _objects(self, location: str) -> Iterator[dict]:
        bucket, base = self._split(location)
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base + "/"):
            yield from page.get("Contents", [])

    def put(self, local: Path, *, key: str) -> str:
        local = Path(local)
        base = "/".join(p for p in (self.prefix, key.strip("/")) if p)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for f in files:
            rel = f.name if local.is_file() else f.relative_to(local).as_posix()
            try:
                self.client.upload_file(str(f), self.bucket, f"{base}/{rel}", Config=self.transfer)
            except Exception as exc:
                # boto's text names the endpoint and the key: the tenant reads this error
                cause = exc.__context__ or exc  # boto3 wraps the client's error in S3UploadFailedError
                code = getattr(cause, "response", {}).get("Error", {}).get("Code") or type(cause).__name__
                log.warning("upload of %s failed: %s", rel, code)
                raise StoreUnavailable(f"the artifact store did not take {rel} ({code})") from None
        return f"{S3_SCHEME}{self.bucket}/{base}"

    def job_location(self, tenant_id: int, job_id: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/" + "/".join(
            p for p in (self.prefix, job_key(tenant_id, job_id)) if p
        )

    def list_files(self, location: str) -> list[StoredFile]:
        skip = len(self._split(location)[1]) + 1
        return sorted(
            (
                StoredFile(o["Key"][skip:], int(o["Size"]), o["ETag"], o["LastModified"].timestamp())
                for o in self._objects(location)
            ),
            key=lambda f: f.path,
        )

    def head(self, location: str, path: str) -> StoredFile | None:
        from botocore.exceptions import ClientError

        bk = self._key(location, path)
        if bk is None:
            return None
        try:
            h = self.client.head_object(Bucket=bk[0], Key=bk[1])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return StoredFile(path, int(h["ContentLength"]), h["ETag"], h["LastModified"].timestamp())

    def presign(self, location: str, path: str) -> str | None:
        bk = self._key(location, path)
        if bk is None:
            return None
        return self.presign_client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": bk[0],
                "Key": bk[1],
                "ResponseContentDisposition": f'attachment; filename="{PurePosixPath(path).name}"',
            },
            ExpiresIn=settings.S3_PRESIGN_EXPIRES_S,
        )

    def stream(self, location: str, path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        bk = self._key(location, path)
        if bk is None:
            raise FileNotFoundError(path)
        ranged = {"Range": f"bytes={start}-{'' if end is None else end}"} if start or end is not None else {}
        body = self.client.get_object(Bucket=bk[0], Key=bk[1], **ranged)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def download(self, location: str, dest: Path, *, paths: list[str] | None = None) -> None:
        """Download the artifact's files (`paths`, else every object under its prefix) into folder `dest`."""
        from botocore.exceptions import ClientError

        bucket, _ = self._split(location)
        for rel in paths if paths is not None else [f.path for f in self.list_files(location)]:
            bk = self._key(location, rel)
            if bk is None:
                raise ArtifactMismatch(f"the stored artifact lists a file that is not a key: {rel!r}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.client.download_file(bucket, bk[1], str(target), Config=self.transfer)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    raise ArtifactMismatch(
                        f"the stored artifact is not the one recorded: {rel}: missing"
                    ) from exc
                raise

    @contextmanager
    def local_copy(self, location: str, *, files: list[dict] | None, scratch: Path) -> Iterator[Path]:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            self.download(location, scratch, paths=[f["path"] for f in files] if files is not None else None)
            if files is not None:
                check_manifest(scratch, files)
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def delete(self, location: str, *, keep: Iterable[str] = ()) -> None:
        bucket, _ = self._split(location)
        # "a/b/" and not "a/b": job_10 shares a prefix with job_1, not a folder
        kept = tuple(self._split(k)[1] + "/" for k in keep if k.startswith(f"{S3_SCHEME}{bucket}/"))
        doomed = [{"Key": o["Key"]} for o in self._objects(location) if not o["Key"].startswith(kept)]
        for i in range(0, len(doomed), 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": doomed[i : i + 1000]})


@lru_cache(maxsize=1)
def _s3() -> S3Store:
    return S3Store()


def store_for(location: str) -> ArtifactStore:
    """The backend that reads an artifact row's location."""
    return _s3() if location.startswith(S3_SCHEME) else LocalStore()


def artifact_store() -> ArtifactStore:
    """The backend new artifacts go to (ARTIFACT_STORE)."""
    return _s3() if settings.ARTIFACT_STORE == "s3" else LocalStore()


def job_stores() -> list[ArtifactStore]:
    """Where a job's files may lie: the local folder (a run's output before it is stored) and the configured
    store when that is another."""
    store = artifact_store()
    return [LocalStore()] if isinstance(store, LocalStore) else [LocalStore(), store]
