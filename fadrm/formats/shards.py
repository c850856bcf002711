"""Arrow shards with checksums: the on-storage form of every stage's output.

A shard is one Arrow IPC file (zstd-compressed record batches) plus a small JSON sidecar
``<shard>.json`` holding its sha256, row count and size (a JSON output's sidecar is
``<stem>.sha256.json``: ``metrics.sha256.json``, not ``metrics.json.json``). The sidecar
is written after the shard, so "the sidecar exists" means "the unit is complete"; readers
verify the checksum and raise :class:`ShardCorruptError` on any mismatch, so a truncated
or altered shard is never used silently.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from fadrm import storage

__all__ = [
    "ShardCorruptError",
    "write_artifact",
    "read_artifact",
    "write_table",
    "read_table",
    "shard_info",
    "is_complete",
    "discard",
    "check",
    "images_table",
    "table_images",
    "write_json",
    "read_json",
]


class ShardCorruptError(IOError):
    """A shard's bytes do not match its recorded checksum (or it cannot be parsed).

    ``uri`` is the damaged output, so a run that meets it can regenerate that unit (it
    survives pickling: a Ray worker's error reaches the driver with it)."""

    def __init__(self, message: str, uri: str | None = None):
        super().__init__(message)
        self.uri = uri

    def __reduce__(self):
        return type(self), (str(self), self.uri)


def _sidecar(uri: str) -> str:
    if uri.endswith(".json"):
        return uri[: -len(".json")] + ".sha256.json"
    return uri + ".json"


def _legacy_sidecar(uri: str) -> str | None:
    """Where earlier builds put a JSON output's sidecar (``metrics.json.json``): still
    read, so finished work written by them is not redone."""
    return uri + ".json" if uri.endswith(".json") else None


def write_artifact(uri: str, data: bytes, **extra) -> dict:
    """Write ``data`` atomically, then its checksum sidecar (which marks it complete).

    Write-once: when ``uri`` is already complete nothing is written and its recorded info is
    returned, so a unit retried after a fault never overwrites finished work. (A shard
    found corrupt is deleted with :func:`discard` first, then regenerated.)
    """
    existing = shard_info(uri)
    if existing is not None:
        return existing
    info = {"sha256": storage.sha256_bytes(data), "bytes": len(data), **extra}
    storage.write_bytes_atomic(uri, data)
    storage.write_bytes_atomic(_sidecar(uri), json.dumps(info).encode())
    return info


def read_artifact(uri: str) -> bytes:
    """Read bytes written by :func:`write_artifact`, verifying the checksum."""
    data = storage.read_bytes(uri)
    info = shard_info(uri)
    if info is None:
        raise ShardCorruptError(f"{uri}: no checksum sidecar (incomplete write)", uri)
    digest = storage.sha256_bytes(data)
    if digest != info["sha256"]:
        # Never used, and not left for the next reader: discarded, so the unit becomes
        # pending and the next run regenerates it (with the same bytes).
        discard(uri)
        raise ShardCorruptError(
            f"{uri}: sha256 {digest[:12]}... does not match recorded {info['sha256'][:12]}... "
            f"(damaged; discarded: run again to regenerate it)", uri)
    return data


def table_bytes(table: pa.Table) -> bytes:
    """``table`` as a zstd-compressed Arrow IPC file."""
    sink = pa.BufferOutputStream()
    options = ipc.IpcWriteOptions(compression="zstd")
    with ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def write_table(uri: str, table: pa.Table) -> dict:
    """Write ``table`` atomically, then its sidecar; returns the sidecar info."""
    return write_artifact(uri, table_bytes(table), rows=table.num_rows)


def shard_info(uri: str) -> dict | None:
    """The sidecar of a complete shard, or None when the unit is not done."""
    for sidecar in (_sidecar(uri), _legacy_sidecar(uri)):
        if sidecar is None:
            continue
        try:
            return json.loads(storage.read_bytes(sidecar))
        except FileNotFoundError:
            pass
    return None


def is_complete(uri: str) -> bool:
    legacy = _legacy_sidecar(uri)
    return storage.exists(_sidecar(uri)) or (legacy is not None and storage.exists(legacy))


def discard(uri: str) -> None:
    """Remove a unit's output (sidecar first, so it is never complete-but-missing)."""
    storage.delete(_sidecar(uri))
    legacy = _legacy_sidecar(uri)
    if legacy is not None:
        storage.delete(legacy)
    storage.delete(uri)


def check(uri: str, full: bool = True) -> str | None:
    """Why the complete output at ``uri`` is damaged, or None when it is intact."""
    info = shard_info(uri)
    if info is None:
        return "no checksum sidecar"
    try:
        size = storage.size(uri)
    except FileNotFoundError:
        return "file missing"
    if size != info["bytes"]:
        return f"size {size} bytes, recorded {info['bytes']} (truncated or replaced)"
    if full:
        digest = storage.sha256_bytes(storage.read_bytes(uri))
        if digest != info["sha256"]:
            return f"sha256 {digest[:12]}... does not match recorded {info['sha256'][:12]}..."
    return None


def read_table(uri: str, verify: bool = True) -> pa.Table:
    """Read a shard, verifying its sha256 against the sidecar."""
    data = read_artifact(uri) if verify else storage.read_bytes(uri)
    try:
        return ipc.open_file(pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid as exc:
        raise ShardCorruptError(f"{uri}: not a readable Arrow file: {exc}", uri) from exc


def write_json(uri: str, obj: dict) -> None:
    storage.write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


# --------------------------------------------------------------------------- image shards


def images_table(images: torch.Tensor, labels: list[int], ids: list[int]) -> pa.Table:
    """uint8 images [N, C, H, W] with their labels and distilled-image ids -> Table."""
    if images.dtype != torch.uint8:
        raise TypeError(f"image shards hold uint8 pixels, got {images.dtype}")
    n, c, h, w = images.shape
    flat = images.contiguous().view(n, -1).numpy()
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.uint8()), c * h * w)
    schema = pa.schema(
        [("image_id", pa.int32()), ("label", pa.int32()), ("pixels", pixels.type)],
        metadata={"shape": json.dumps([c, h, w])},
    )
    return pa.Table.from_arrays(
        [pa.array(ids, pa.int32()), pa.array(labels, pa.int32()), pixels], schema=schema
    )


def table_images(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`images_table`: (images uint8 [N,C,H,W], labels, image ids)."""
    c, h, w = json.loads(table.schema.metadata[b"shape"])
    pixels = table.column("pixels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    images = torch.from_numpy(np.array(pixels, dtype=np.uint8).reshape(-1, c, h, w))
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    ids = torch.from_numpy(table.column("image_id").to_numpy().astype(np.int64))
    return images, labels, ids


def image_rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Zero-copy views of an image shard: (pixels uint8 [N, C*H*W], labels, ids, (C, H, W)).

    The pixel view reads the table's own buffers (one chunk at a time is combined only when
    a table has several), so a caller copies each image exactly once, into its destination.
    """
    shape = tuple(json.loads(table.schema.metadata[b"shape"]))
    column = table.column("pixels")
    chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    pixels = chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), -1)
    labels = table.column("label").to_numpy()
    ids = table.column("image_id").to_numpy()
    return pixels, labels, ids, shape


def table_nbytes(table: pa.Table) -> int:
    """Bytes of ``table`` as a compressed IPC file (what a shard costs on storage)."""
    return len(table_bytes(table))
