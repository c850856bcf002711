"""Teacher-weights fingerprints without downloading the weights every time.

A teacher given as ``weights: s3://...`` (or a local path) is fingerprinted by the sha256 of
its bytes. Hashing means reading the whole checkpoint, which the hourly ``fadrm watch``
would otherwise do for every teacher on every tick. :func:`weights_fingerprint` reads the
bytes only when the object store says they may have changed:

1. **metadata**: one HEAD (S3: ``ETag``, ``ContentLength``, ``LastModified``; other
   filesystems: size and mtime);
2. **sidecar**: ``<weights>.sha256`` (``sha256sum`` format, written next to the weights by
   whoever uploads them) is trusted when it is at least as new as the weights;
3. **cache**: otherwise a small JSON object per weights file under ``cache_dir`` (by
   default ``<output>/fingerprints/``, next to the outputs, shared by every machine that
   runs this config) maps (ETag, size, mtime) to the sha256 computed last time;
4. **hash**: only when neither answers (first sight, or the metadata changed) are the bytes
   read and hashed, and the cache entry is (re)written. Those bytes are returned too, so
   the caller need not read them a second time.

A fingerprint is an optimisation, never trusted blindly: the weights are checked against the
recorded sha256 whenever they are loaded (``fadrm.stages.base.load_teacher``), so a stale
sidecar or cache entry fails that run loudly instead of training on other bytes. With a
``pin`` (the config's ``sha256``), a sidecar/cache answer that disagrees with the pin is not
believed: the bytes are hashed, and a real mismatch raises ``WeightsError``.

Writing the cache is best effort: read-only credentials only cost a re-hash next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from fadrm import storage

__all__ = ["WeightsFingerprint", "object_metadata", "weights_fingerprint", "cache_dir_for",
           "SIDECAR_SUFFIX", "CACHE_VERSION"]

log = logging.getLogger("fadrm.fingerprints")

SIDECAR_SUFFIX = ".sha256"
CACHE_VERSION = 1
_HEX64 = re.compile(r"\b([0-9a-fA-F]{64})\b")


@dataclass(frozen=True)
class WeightsFingerprint:
    sha256: str
    """Hex sha256 of the weights' bytes."""
    source: str
    """'sidecar', 'cache' or 'hashed' (the bytes were read)."""
    data: bytes | None = None
    """The bytes, when they were read (source 'hashed'); None otherwise."""


def cache_dir_for(output: str) -> str:
    """The default cache location of a run config: ``<output>/fingerprints``."""
    return storage.join(output, "fingerprints")


def _mtime_ns(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000_000)
    if hasattr(value, "timestamp"):  # pandas/pyarrow timestamps
        return int(value.timestamp() * 1_000_000_000)
    return int(value)


def _s3_head(uri: str) -> dict | None:
    """ETag/size/mtime of an S3 object with boto3 (None when boto3 is unavailable)."""
    try:
        import boto3
        from botocore.exceptions import ClientError
    except ImportError:
        return None
    bucket, _, key = uri[len("s3://"):].partition("/")
    store = storage.current()  # the config's `storage` section; boto3 reads the environment
    client = boto3.client("s3", endpoint_url=store.endpoint_url, region_name=store.region)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = str((exc.response.get("Error") or {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"{uri}: file not found") from None
        raise
    return {"size": int(head["ContentLength"]), "mtime_ns": _mtime_ns(head.get("LastModified")),
            "etag": str(head.get("ETag") or "").strip('"') or None}


def object_metadata(uri: str) -> dict:
    """``{"size", "mtime_ns", "etag"}`` of a file or object, without reading its bytes;
    FileNotFoundError when it does not exist. ``etag`` is None where the store has none."""
    uri = str(uri)
    if uri.startswith("s3://"):
        head = _s3_head(uri)
        if head is not None:
            return head
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: file not found")
    mtime = info.mtime_ns if info.mtime_ns is not None else _mtime_ns(info.mtime)
    return {"size": int(info.size), "mtime_ns": mtime, "etag": None}


def _cache_uri(cache_dir: str, uri: str) -> str:
    name = hashlib.sha256(str(uri).encode()).hexdigest()[:32]
    return storage.join(cache_dir, f"{name}.json")


def _same_object(entry: dict, meta: dict, uri: str) -> bool:
    if entry.get("version") != CACHE_VERSION or entry.get("uri") != str(uri):
        return False
    if entry.get("size") != meta["size"]:
        return False
    # Every piece of metadata both sides have must agree; at least one besides size.
    checks = [(entry.get(k), meta[k]) for k in ("etag", "mtime_ns") if meta[k] is not None]
    return bool(checks) and all(a == b for a, b in checks)


def _read_sidecar(uri: str, meta: dict, stat: Callable[[str], dict],
                  read: Callable[[str], bytes]) -> str | None:
    sidecar = f"{uri}{SIDECAR_SUFFIX}"
    try:
        side_meta = stat(sidecar)
    except FileNotFoundError:
        return None
    if side_meta["size"] > 4096:
        return None  # not a checksum file
    if meta["mtime_ns"] is not None and side_meta["mtime_ns"] is not None \
            and side_meta["mtime_ns"] < meta["mtime_ns"]:
        log.info("%s is older than %s: not trusted (weights re-uploaded without it?)",
                 sidecar, uri)
        return None
    match = _HEX64.search(read(sidecar).decode("ascii", "replace"))
    return match.group(1).lower() if match else None


def weights_fingerprint(
    uri: str,
    *,
    pin: str | None = None,
    cache_dir: str | None = None,
    key: str = "weights",
    stat: Callable[[str], dict] = object_metadata,
    read: Callable[[str], bytes] = storage.read_bytes,
) -> WeightsFingerprint:
    """The sha256 of the weights at ``uri``, reading them only when their metadata changed
    since they were last hashed (see the module docstring). ``pin``: the expected sha256
    (config ``sha256``); ``cache_dir``: where cache entries live (None: no cache, sidecar
    only); ``key``: the config key for error messages; ``stat``/``read``: injectable for
    tests. Raises FileNotFoundError when the weights do not exist, and ``WeightsError``
    when they do not match ``pin``."""
    uri = str(uri)
    pin = pin.lower() if pin else None
    meta = stat(uri)

    known = _read_sidecar(uri, meta, stat, read)
    if known and (pin is None or known == pin):
        return WeightsFingerprint(known, "sidecar")

    entry_uri = _cache_uri(cache_dir, uri) if cache_dir else None
    if entry_uri:
        try:
            entry = json.loads(read(entry_uri))
        except FileNotFoundError:
            entry = None
        except (OSError, ValueError) as exc:  # unreadable or damaged: a miss, never fatal
            log.warning("ignoring the fingerprint cache entry %s: %s", entry_uri, exc)
            entry = None
        if entry and _same_object(entry, meta, uri) and (pin is None or entry["sha256"] == pin):
            return WeightsFingerprint(entry["sha256"], "cache")

    data = read(uri)
    digest = hashlib.sha256(data).hexdigest()
    if pin and digest != pin:
        from fadrm.models import WeightsError

        raise WeightsError(f"{key}: {uri} has sha256 {digest[:16]}... but its pin "
                           f"(sha256 in the config) is {pin[:16]}...: the file changed, or "
                           f"the pin is wrong; nothing was loaded")
    if entry_uri:
        record = {"version": CACHE_VERSION, "uri": uri, **meta, "sha256": digest}
        try:
            storage.write_bytes_atomic(entry_uri, json.dumps(record, sort_keys=True).encode())
        except OSError as exc:  # read-only credentials, etc.: hash again next time
            log.warning("could not cache the fingerprint of %s at %s: %s", uri, entry_uri, exc)
    return WeightsFingerprint(digest, "hashed", data)
