"""Artifact storage: where a worker puts a finished artifact folder and where the API reads it from.

Two backends behind one interface:
- `LocalStore` (the embedded default): the folder the engine wrote under ARTIFACT_DIR stays where it is;
  its location is the absolute path. API and workers must share that folder (one machine, or a volume).
- `S3Store`: any S3-compatible object store through boto3 (AWS, MinIO, moto...). A worker on any machine
  uploads each file (multipart above S3_MULTIPART_THRESHOLD) under `S3_PREFIX/tenant-<id>/<job>/<format>/`;
  the location is `s3://bucket/key-prefix`. The API of any other machine lists and streams the files, or
  hands out presigned download URLs so that large files never pass through it.

An artifact row's location says which backend reads it (`s3://` or a path), so artifacts written before a
change of ARTIFACT_STORE stay readable. Torch-free: the API imports this.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from app.core.config import settings
from awqforge.manifest import tree_files, tree_problems

S3_SCHEME = "s3://"


@dataclass
class StoredFile:
    path: str  # relative to the artifact's root, posix
    size_bytes: int


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


class ArtifactStore:
    """What the worker and the API need from a store."""

    remote = False

    def local_copy(
        self, location: str, *, files: list[dict] | None, scratch: Path
    ) -> AbstractContextManager[Path]:
        """The artifact as a folder on this machine, checked against its recorded `files` (when recorded);
        a remote store downloads it into the folder `scratch` (emptied first: a copy left by a killed run
        goes), removed on exit."""
        raise NotImplementedError

    def put_dir(self, local: Path, *, key: str) -> str:
        """Store a finished artifact folder (or file); returns its location (kept in artifacts.path)."""
        raise NotImplementedError

    def list_files(self, location: str) -> list[StoredFile]:
        raise NotImplementedError

    def delete(self, location: str) -> None:
        """Remove what `location` holds (a folder or file; every object under the prefix)."""
        raise NotImplementedError

    def job_location(self, tenant_id: int, job_id: str) -> str:
        """The location that holds everything this store keeps for the job (put_dir keys start with it)."""
        raise NotImplementedError


class LocalStore(ArtifactStore):
    def put_dir(self, local: Path, *, key: str) -> str:
        return str(Path(local).resolve())

    @contextmanager
    def local_copy(self, location: str, *, files: list[dict] | None, scratch: Path) -> Iterator[Path]:
        root = Path(location)  # already here (one machine, or a shared volume): read in place
        if files is not None:
            check_manifest(root, files)
        yield root

    def list_files(self, location: str) -> list[StoredFile]:
        root = Path(location)
        if root.is_file():
            return [StoredFile(root.name, root.stat().st_size)]
        if not root.is_dir():
            return []
        return sorted(
            (
                StoredFile(p.relative_to(root).as_posix(), p.stat().st_size)
                for p in root.rglob("*")
                if p.is_file()
            ),
            key=lambda f: f.path,
        )

    def delete(self, location: str) -> None:
        p = Path(location)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def job_location(self, tenant_id: int, job_id: str) -> str:
        return str(settings.ARTIFACT_DIR / f"tenant-{tenant_id}" / job_id)


class S3Store(ArtifactStore):
    remote = True

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

    def put_dir(self, local: Path, *, key: str) -> str:
        local = Path(local)
        base = "/".join(p for p in (self.prefix, key.strip("/")) if p)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for f in files:
            rel = f.name if local.is_file() else f.relative_to(local).as_posix()
            self.client.upload_file(str(f), self.bucket, f"{base}/{rel}", Config=self.transfer)
        return f"{S3_SCHEME}{self.bucket}/{base}"

    def job_location(self, tenant_id: int, job_id: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/" + "/".join(
            p for p in (self.prefix, f"tenant-{tenant_id}/{job_id}") if p
        )

    def list_files(self, location: str) -> list[StoredFile]:
        bucket, base = self._split(location)
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base + "/"):
            for obj in page.get("Contents", []):
                out.append(StoredFile(obj["Key"][len(base) + 1 :], int(obj["Size"])))
        return sorted(out, key=lambda f: f.path)

    def _key(self, location: str, file_path: str) -> tuple[str, str] | None:
        rel = PurePosixPath(file_path)
        if rel.is_absolute() or ".." in rel.parts or not file_path or file_path.endswith("/"):
            return None
        bucket, base = self._split(location)
        return bucket, f"{base}/{rel.as_posix()}"

    def head(self, location: str, file_path: str) -> dict | None:
        from botocore.exceptions import ClientError

        bk = self._key(location, file_path)
        if bk is None:
            return None
        try:
            return self.client.head_object(Bucket=bk[0], Key=bk[1])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def presigned_url(self, location: str, file_path: str) -> str | None:
        bk = self._key(location, file_path)
        if bk is None:
            return None
        return self.presign_client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": bk[0],
                "Key": bk[1],
                "ResponseContentDisposition": f'attachment; filename="{PurePosixPath(file_path).name}"',
            },
            ExpiresIn=settings.S3_PRESIGN_EXPIRES_S,
        )

    def stream(self, location: str, file_path: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        bk = self._key(location, file_path)
        body = self.client.get_object(Bucket=bk[0], Key=bk[1])["Body"]
        try:
            yield from body.iter_chunks(chunk)
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

    def delete(self, location: str) -> None:
        bucket, base = self._split(location)
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


@lru_cache(maxsize=1)
def _s3() -> S3Store:
    return S3Store()


def store_for(location: str) -> ArtifactStore:
    """The backend that reads an artifact row's location."""
    return _s3() if location.startswith(S3_SCHEME) else LocalStore()


def artifact_store() -> ArtifactStore:
    """The backend new artifacts go to (ARTIFACT_STORE)."""
    return _s3() if settings.ARTIFACT_STORE == "s3" else LocalStore()


def object_store_download(location: str, file_path: str, *, redirect: bool):
    """The API's answer for a file in the object store: a 307 to a presigned URL, or the bytes streamed."""
    from fastapi.responses import RedirectResponse, StreamingResponse

    from app.services.jobs import ServiceError

    store = store_for(location)
    head = store.head(location, file_path)
    if head is None:
        raise ServiceError(404, "file not found")
    if redirect:
        return RedirectResponse(store.presigned_url(location, file_path), status_code=307)
    name = PurePosixPath(file_path).name.replace('"', "")
    return StreamingResponse(
        store.stream(location, file_path),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(head["ContentLength"]),
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )
