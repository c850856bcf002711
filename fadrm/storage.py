"""URIs -> pyarrow filesystems, with atomic writes and checksums.

Every output path may be a local path or ``s3://bucket/prefix``. S3 settings come from the
:class:`Storage` in use (``Storage.from_config(cfg.storage)``, made current with :func:`use`:
endpoint and region), then from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for
MinIO and other S3 APIs).

Atomicity: local files are written to a temporary sibling and ``os.replace``d into place;
an S3 object becomes visible only when its single PUT completes. Either way a reader never
sees a half-written file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = [
    "Storage",
    "configure",
    "current",
    "use",
    "is_remote",
    "join",
    "filesystem",
    "read_bytes",
    "write_bytes_atomic",
    "create_exclusive",
    "exists",
    "listdir",
    "delete",
    "size",
    "sha256_bytes",
    "file_sha256",
    "is_url",
    "local_path",
]


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


@dataclass(frozen=True)
class Storage:
    """Where ``s3://`` paths go: the run config's ``storage`` section; the AWS environment
    fills in whatever it leaves out. Credentials only ever come from the environment.

    One is in use per process (:func:`use`, :func:`current`); the module functions below
    (:func:`filesystem`, :func:`read_bytes`, ...) act through it.
    """

    endpoint_url: str | None = None
    """S3 API endpoint (MinIO, ...); None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, or AWS."""
    region: str | None = None
    """None: AWS_REGION / AWS_DEFAULT_REGION."""

    @classmethod
    def from_config(cls, config: Any) -> Storage:
        """From a ``fadrm.config.StorageConfig`` (its ``endpoint_url`` and ``region``)."""
        return cls(config.endpoint_url or None, config.region or None)

    def s3(self) -> pafs.S3FileSystem:
        """The S3 filesystem for these settings (built once per settings and key id)."""
        endpoint = (self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        region = (self.region or os.environ.get("AWS_REGION")
                  or os.environ.get("AWS_DEFAULT_REGION"))
        # Cached per settings: building an S3FileSystem resolves credentials each time.
        return _s3_cached(endpoint, region, os.environ.get("AWS_ACCESS_KEY_ID"))

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem for ``uri`` and the path inside it."""
        uri = str(uri)
        if uri.startswith("s3://"):
            return self.s3(), uri[len("s3://"):]
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        if is_remote(uri):
            fs, path = pafs.FileSystem.from_uri(uri)
            return fs, path
        return pafs.LocalFileSystem(), str(Path(uri).absolute())


@functools.lru_cache(maxsize=4)
def _s3_cached(endpoint: str | None, region: str | None, key_id: str | None) -> pafs.S3FileSystem:
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


_current = Storage()


def use(store: Storage) -> Storage:
    """Make ``store`` the storage of this process (set from the run config's ``storage``
    section by preflight, the plan and every Ray worker); returns it."""
    global _current
    _current = store
    _s3_cached.cache_clear()
    return store


def current() -> Storage:
    """The storage in use in this process."""
    return _current


def configure(endpoint_url: str | None = None, region: str | None = None) -> Storage:
    """S3 endpoint override and region for this process (None: from the environment)."""
    return use(Storage(endpoint_url or None, region or None))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it (:func:`current`)."""
    return _current.filesystem(uri)


def local_path(uri: str) -> Path | None:
    """The local Path of ``uri``, or None when it is remote."""
    return None if is_remote(uri) else Path(str(uri).removeprefix("file://"))


def is_url(uri: str) -> bool:
    """http(s):// (read with a GET; never listed or written)."""
    return str(uri).split("://")[0] in ("http", "https")


def _fetch_url(uri: str, timeout: float = 60.0) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri, timeout=timeout) as response:  # noqa: S310
            return response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FileNotFoundError(f"{uri}: not found (HTTP 404)") from exc
        raise OSError(f"{uri}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise OSError(f"{uri}: {exc.reason}") from exc


def read_bytes(uri: str) -> bytes:
    if is_url(uri):
        return _fetch_url(uri)
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: file not found") from exc


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that ``uri`` is either absent or complete, never partial."""
    local = local_path(uri)
    if local is not None:
        tmp = _temp_sibling(local)
        try:
            _write_synced(tmp, data)
            os.replace(tmp, local)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.filename is None:
                # A failed write (e.g. ENOSPC) does not say which file: name it.
                raise OSError(exc.errno, exc.strerror, str(local)) from exc
            raise
        return
    fs, path = filesystem(uri)
    # One PUT: S3 publishes the object only once the upload has completed.
    with fs.open_output_stream(path) as f:
        f.write(data)


def _temp_sibling(local: Path) -> Path:
    """A fresh temporary name beside ``local`` (its folder created), for a write that is
    published by a rename or a link."""
    local.parent.mkdir(parents=True, exist_ok=True)
    return local.parent / f".{local.name}.{uuid.uuid4().hex[:12]}.tmp"


def _write_synced(tmp: Path, data: bytes) -> None:
    """Create ``tmp`` (it must not exist) holding ``data``, flushed to disk. Created like
    open() creates a file (0666 less the umask, not mkstemp's 0600), so other users and
    pods of another UID on shared storage can read the outputs."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` only if no file of that name exists: True when this
    call created it, False when it was there (another writer's). Atomic: of two callers
    exactly one gets True, and a reader never sees the file without its data.

    Local: the data goes to a temporary sibling that is then hard-linked to ``uri`` (a
    link fails when the name exists). S3: one PUT with ``If-None-Match: *`` (boto3; AWS,
    MinIO and moto honour it); a store that ignores or refuses it raises an error that
    says so, rather than letting two writers both win.
    """
    local = local_path(uri)
    if local is None:
        return _s3_create_exclusive(uri, data)
    tmp = _temp_sibling(local)
    try:
        _write_synced(tmp, data)
        os.link(tmp, local)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _s3_create_exclusive(uri: str, data: bytes) -> bool:
    import boto3
    from botocore.exceptions import ClientError

    if not uri.startswith("s3://"):
        raise OSError(f"{uri}: exclusive create is supported on local paths and s3:// only")
    bucket, _, key = uri[len("s3://"):].partition("/")
    store = current()
    endpoint = (store.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    client = boto3.client("s3", endpoint_url=endpoint, region_name=store.region)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        if code in ("NotImplemented", "InvalidArgument"):
            raise OSError(f"{uri}: this S3 store does not support conditional writes "
                          f"(If-None-Match), which unit leases need: {code}") from exc
        raise
    return True


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the files directly under ``uri``; empty if it does not exist."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: file not found")
    return int(info.size)


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_digest_lock = threading.Lock()
_digests: dict[tuple[str, int | None, int | None], str] = {}


def file_sha256(uri: str, listed: tuple[int, int] | None = None) -> str:
    """sha256 of a file's bytes (local or remote, read in 1 MiB blocks), remembered in this
    process by (uri, mtime, size), so an unchanged file is hashed once. ``listed``: the
    (mtime_ns, size) a directory listing already gave, which saves a stat per file."""
    fs, path = filesystem(uri)
    if listed is None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{uri}: file not found")
        listed = (info.mtime_ns, info.size)
    key = (str(uri), *listed)
    with _digest_lock:
        if key in _digests:
            return _digests[key]
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    with _digest_lock:
        _digests[key] = h.hexdigest()
    return _digests[key]


def unique_suffix() -> str:
    return uuid.uuid4().hex[:8]
