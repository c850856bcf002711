"""Data access for the stages: one listing, and decoding only what a stage uses.

A :class:`DataSource` answers what a data set holds (classes, images per class, the data
fingerprint) from a *listing*, and decodes pixels only on request:

* ``split("val")`` decodes one split (evaluate needs the validation set, never training
  images; squeeze needs both);
* ``class_images(c, order, count)`` decodes ``count`` readable images of class ``c``, taken
  in ``order`` (select decodes only the m candidates of each class in its block);
  ``class_originals`` the same at their stored sizes (select's ``full_resolution``).

ImageFolder data is listed once per driver (:func:`list_data`); the listing travels to the
workers as an Arrow *index* shard under ``<output>/index/<fingerprint>.arrow`` (path, label,
size, split), written once per data fingerprint, so no worker lists the tree again. IDX data
(Fashion-MNIST and friends) is a few files: it is decoded whole, once per process, and served
from memory (the in-memory cache "when it fits").

:func:`load_distilled` is the same for the distilled images: relabel, evaluate and the
report read them through it (the report only the classes it draws).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from fadrm import data as fdata
from fadrm.data import decode as fdecode
from fadrm import storage
from fadrm.config import DataConfig
from fadrm.data import DataSummary, ImageSet
from fadrm.units import UnitId
from fadrm.formats import shards

__all__ = ["Listing", "list_data", "DataSource", "StreamedSplit", "load_distilled"]

_SPLITS = ("train", "val")


@dataclass
class Listing:
    """What a data set holds, without pixels: classes and the files of each split."""

    classes: list[str]
    files: dict[str, list]
    """split -> ImageFolder files (``fadrm.data._File``); empty for IDX data."""
    fingerprint: str
    """:func:`fadrm.data.data_fingerprint` of the config, from this listing."""


def list_data(cfg: DataConfig) -> Listing:
    """List ``cfg``'s data once: classes, split files and the data fingerprint."""
    cfg.validate("data")
    if cfg.kind != "imagefolder":
        return Listing(fdata.class_names(cfg), {s: [] for s in _SPLITS},
                       fdata.data_fingerprint(cfg))
    classes, train, val, digest = fdata.folder_listing(cfg)
    return Listing(classes, {"train": train, "val": val},
                   fdata.fingerprint_from_digest(cfg, digest))


def _index_table(listing: Listing) -> pa.Table:
    rows = [(split, f) for split in _SPLITS for f in listing.files[split]]
    return pa.table({
        "split": pa.array([s for s, _ in rows], pa.string()),
        "uri": pa.array([f.uri for _, f in rows], pa.string()),
        "rel": pa.array([f.rel for _, f in rows], pa.string()),
        "label": pa.array([f.label for _, f in rows], pa.int32()),
        "size": pa.array([f.size for _, f in rows], pa.int64()),
        "mtime_ns": pa.array([f.mtime_ns for _, f in rows], pa.int64()),
    }, metadata={"classes": "\n".join(listing.classes), "fingerprint": listing.fingerprint})


def _listing_from_index(table: pa.Table) -> Listing:
    meta = table.schema.metadata
    cols = {n: table.column(n).to_pylist() for n in table.column_names}
    files: dict[str, list] = {s: [] for s in _SPLITS}
    for split, uri, rel, label, size, mtime in zip(cols["split"], cols["uri"], cols["rel"],
                                                   cols["label"], cols["size"],
                                                   cols["mtime_ns"]):
        files[split].append(fdecode._File(uri, rel, label, size, mtime))
    classes = meta[b"classes"].decode().split("\n")
    return Listing(classes, files, meta[b"fingerprint"].decode())


def _decode_threads(uri: str) -> int:
    # Object stores answer one GET at a time: many in flight hide the latency. Local files
    # decode on the CPU (PIL releases the GIL), one thread per core.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 16 if storage.is_remote(uri) else max(2, cores or 1)


class DataSource:
    """The data a stage reads (see the module docstring). Picklable and cheap to ship:
    workers rebuild the listing from the index shard, pixels are never pickled."""

    def __init__(self, cfg: DataConfig, listing: Listing | None = None,
                 index_uri: str | None = None):
        self.cfg = cfg
        self.index_uri = index_uri
        self._listing = listing
        self._memory: tuple[ImageSet, ImageSet] | None = None  # IDX: decoded once

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_memory"] = None
        state.pop("_by_class", None)
        if self.index_uri is not None:
            state["_listing"] = None  # workers read the index shard instead
        return state

    # ----------------------------------------------------------------- listing

    @property
    def listing(self) -> Listing:
        if self._listing is None:
            if self.index_uri is not None and shards.is_complete(self.index_uri):
                self._listing = _listing_from_index(shards.read_table(self.index_uri))
            else:
                self._listing = list_data(self.cfg)
        return self._listing

    def write_index(self, root: str) -> str | None:
        """Write the listing as an index shard under ``root`` (once per fingerprint);
        returns its URI (None for IDX data, which needs no index)."""
        if self.cfg.kind != "imagefolder":
            return None
        listing = self.listing
        uri = storage.join(root, "index", f"{listing.fingerprint[:24]}.arrow")
        shards.write_table(uri, _index_table(listing))  # write-once: a no-op when present
        self.index_uri = uri
        return uri

    @property
    def classes(self) -> list[str]:
        return self.listing.classes

    @property
    def fingerprint(self) -> str:
        return self.listing.fingerprint

    def summary(self) -> DataSummary:
        """Images per class and split, from the listing (nothing decoded; made once)."""
        if self.__dict__.get("_summary") is None:
            folder = None
            if self.cfg.kind == "imagefolder":
                files = self.listing.files
                folder = (self.classes, files["train"], files["val"])
            self._summary = fdata.summarize(self.cfg, folder)
        return self._summary

    def count(self, split: str) -> int:
        return int(sum(getattr(self.summary(), f"{split}_counts")))

    # ----------------------------------------------------------------- pixels

    def _in_memory(self) -> tuple[ImageSet, ImageSet]:
        if self._memory is None:
            self._memory = fdata.load_data(self.cfg)
        return self._memory

    def split(self, name: str, shard: tuple[int, int] = (0, 1)) -> ImageSet:
        """Every readable image of split ``name`` ('train' or 'val'), decoded; with
        ``shard=(rank, world)`` only the rank's strided share (items rank, rank + world...)."""
        if name not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {name!r}")
        rank, world = shard
        if self.cfg.kind != "imagefolder":
            whole = self._in_memory()[_SPLITS.index(name)]
            if world == 1:
                return whole
            share = torch.arange(rank, len(whole), world)
            return ImageSet(whole.images[share], whole.labels[share], whole.classes,
                            whole.skipped if rank == 0 else [])
        files = self.listing.files[name][rank::world]
        images, skipped = self._decode(files, self._crop_ratio(name))
        bad = {s["path"] for s in skipped}
        labels = torch.tensor([f.label for f in files if f.uri not in bad], dtype=torch.long)
        return ImageSet(images, labels, self.classes, skipped)

    def decoded_gib(self, split: str) -> float:
        """GiB the split takes decoded (uint8 at the configured resolution)."""
        d = self.cfg
        return self.count(split) * d.channels * d.resolution ** 2 / 2**30

    def stream(self, split: str) -> StreamedSplit:
        """The split as a stream: decoded batch by batch by DataLoader workers."""
        return StreamedSplit(self.cfg, list(self.listing.files[split]), self.classes,
                             self._crop_ratio(split))

    def class_size(self, label: int) -> int:
        """Listed training images of class ``label`` (readable or not)."""
        if self.cfg.kind != "imagefolder":
            return self._in_memory()[0].class_size(label)
        return self._class_files(label).__len__()

    def class_images(self, label: int, order: Sequence[int], count: int) -> torch.Tensor:
        """``count`` readable training images of class ``label``: the class's images at
        positions ``order`` (into its listing), skipping unreadable ones, in that order."""
        if self.cfg.kind != "imagefolder":
            return self._in_memory()[0].class_images(label, order, count)
        out = self._first_readable(label, order, count, lambda fs: list(self._decode(fs)[0]))
        if not out:
            c, s = self.cfg.channels, self.cfg.resolution
            return torch.empty((0, c, s, s), dtype=torch.uint8)
        return torch.stack(out)

    def class_originals(self, label: int, order: Sequence[int],
                        count: int) -> list[torch.Tensor]:
        """As :meth:`class_images`, but each image uint8 ``[C, H, W]`` at its stored size
        (ImageFolder; see ``fadrm.data._decode_original``). IDX data is held in memory at
        the resolution: its images are those of :meth:`class_images`."""
        if self.cfg.kind != "imagefolder":
            return self._in_memory()[0].class_originals(label, order, count)
        threads = _decode_threads(self.cfg.root)
        return self._first_readable(
            label, order, count, lambda fs: fdata.decode_originals(fs, self.cfg, threads)[0])

    def _first_readable(self, label: int, order: Sequence[int], count: int,
                        decode: Callable[[list], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The first ``count`` readable files of class ``label`` in ``order``, decoded."""
        files = self._class_files(label)
        out: list[torch.Tensor] = []
        order = list(order)
        start = 0
        while len(out) < count and start < len(order):
            # Decode just what is still missing; an unreadable file makes room for the next.
            batch = [files[i] for i in order[start:start + count - len(out)]]
            start += len(batch)
            out += decode(batch)
        return out

    def _class_files(self, label: int) -> list:
        cache = self.__dict__.setdefault("_by_class", {})
        if not cache:
            for f in self.listing.files["train"]:
                cache.setdefault(f.label, []).append(f)
        return cache.get(label, [])

    def _crop_ratio(self, split: str) -> float | None:
        """Validation images may be decoded with the evaluation transform (val_crop_ratio)."""
        return self.cfg.val_crop_ratio if split == "val" else None

    def _decode(self, files: list,
                crop_ratio: float | None = None) -> tuple[torch.Tensor, list[dict]]:
        threads = _decode_threads(self.cfg.root)
        return fdata.decode_files(files, self.cfg, None, threads, crop_ratio)


class _FileDataset(torch.utils.data.Dataset):
    """Item i = (uint8 [C, H, W] or None when unreadable, label, the skip record or None)
    of file i of a listing."""

    def __init__(self, cfg: DataConfig, files: list, crop_ratio: float | None = None):
        self.cfg, self.files, self.crop_ratio = cfg, files, crop_ratio
        self.mode = "RGB" if cfg.channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        f = self.files[i]
        try:
            arr = torch.from_numpy(fdecode._decode(f, self.cfg.resolution, self.mode,
                                                   self.crop_ratio))
        except Exception as exc:  # noqa: BLE001 - PIL's many error types: skip the file
            error = f"{type(exc).__name__}: {exc}"
            fdecode.warn_unreadable(f.uri, error)
            return None, f.label, {"path": f.uri, "error": error}
        return (arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)), f.label, None


def _stack_readable(items) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    good = [(x, y) for x, y, _ in items if x is not None]
    skipped = [bad for _, _, bad in items if bad is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), skipped
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), skipped


class StreamedSplit:
    """A split too large to hold decoded: its labels (from the listing) and batches decoded
    on demand by torch DataLoader worker processes (parallel decoding, prefetched while
    the model trains). Batches are given by index, so a caller's sampling is unchanged."""

    def __init__(self, cfg: DataConfig, files: list, classes: list[str],
                 crop_ratio: float | None = None):
        self.cfg, self.files, self.classes = cfg, files, classes
        self.crop_ratio = crop_ratio
        self.labels = torch.tensor([f.label for f in files], dtype=torch.long)
        self.skipped: list[dict] = []  # unreadable files met so far (once each)
        self._skipped_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def batches(self, index_batches, workers: int | None = None):
        """Iterate (uint8 images, labels) for each list of indices in ``index_batches``."""
        if workers is None:
            workers = max(1, min(8, (os.cpu_count() or 2) - 1))
        loader = torch.utils.data.DataLoader(
            _FileDataset(self.cfg, self.files, self.crop_ratio), batch_sampler=index_batches,
            collate_fn=_stack_readable, num_workers=workers, prefetch_factor=4,
            persistent_workers=False)
        for images, labels, skipped in loader:
            # A loader worker process said it; recorded here, in this process, so the
            # workers of the next pass (forked from it again) say nothing more of it.
            for bad in skipped:
                fdecode.mark_said(bad["path"])
                if bad["path"] not in self._skipped_paths:
                    self._skipped_paths.add(bad["path"])
                    self.skipped.append(bad)
            yield images, labels


# --------------------------------------------------------------------------- distilled


def load_distilled(plan, classes: list[int] | None = None,
                   max_ipc: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distilled images (uint8, ordered by image id) and their labels.

    ``classes`` / ``max_ipc``: only those classes and the first ``max_ipc`` images of each
    (the report's grid), read from only the shards that hold them. Each image is copied
    once, from the shard's buffers into the result.
    """
    ipc = plan.cfg.ipc
    classes = list(range(plan.num_classes)) if classes is None else sorted(classes)
    k = ipc if max_ipc is None else min(ipc, max_ipc)
    slot = {c: n for n, c in enumerate(classes)}  # class -> its block of k rows
    stage = plan.images_stage
    wanted_blocks = {c // plan.block_size for c in classes}
    out = labels = None
    filled = 0
    for unit in stage.units():
        uid = UnitId.parse(unit)
        block, index = uid.block, uid.index
        if block not in wanted_blocks or (index is not None and index >= k):
            continue
        pixels, row_labels, ids, shape = shards.image_rows(shards.read_table(stage.unit_uri(unit)))
        keep = [(r, slot[int(i) // ipc] * k + int(i) % ipc) for r, i in enumerate(ids)
                if int(i) // ipc in slot and int(i) % ipc < k]
        if out is None:
            out = torch.empty((len(classes) * k, *shape), dtype=torch.uint8)
            labels = torch.empty(len(classes) * k, dtype=torch.long)
        src, dst = (np.array(v, dtype=np.int64) for v in zip(*keep)) if keep else ([], [])
        out.view(len(out), -1).numpy()[dst] = pixels[src]
        labels[torch.from_numpy(np.asarray(dst, dtype=np.int64))] = torch.from_numpy(
            row_labels[src].astype(np.int64))
        filled += len(keep)
    if out is None or filled != len(out):
        raise RuntimeError(f"{stage.name}: distilled images incomplete ({filled} of "
                           f"{len(classes) * k} found)")
    return out, labels
