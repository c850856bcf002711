"""The distilled set as a PyTorch ``Dataset``, for a training loop of one's own.

:class:`DistilledDataset` reads an export folder (``fadrm export``, either format) or a
run's config (its stage outputs). With ``label_mode="soft"`` item ``i`` of epoch ``e`` is
the ``i``-th stored view of that epoch, in the stored (batch, position) order, rendered by
the same code as the student's (:func:`fadrm.relabel.view_rows`: crop, flip, CutMix with
its partner in the stored batch), with the teachers' stored logits as its target. So a
``DataLoader(data, batch_size=data.batch_size)`` (no shuffling: the stored order already is
the epoch's shuffle) yields exactly the evaluate stage's batches, and
:func:`fadrm.student.kd_step` trains on them as that stage does, bit for bit (CPU). With
``label_mode="hard"`` item ``i`` is distilled image ``i`` with its class.

Each item is rendered on its own, so any sampler works (a ``DistributedSampler`` shares
the stored views out between ranks); call :meth:`DistilledDataset.set_epoch` before each
epoch, as with a ``DistributedSampler`` (DataLoader workers that are not persistent copy
the dataset at each ``iter``, so they see the epoch set).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fadrm import storage
from fadrm.config import RunConfig, StudentConfig, config_to_dict
from fadrm.data import normalize
from fadrm.errors import InputError
from fadrm.formats import shards
from fadrm.formats.labels import epoch_table, hard_targets, is_hard, soft_targets, views_from_table
from fadrm.relabel import view_rows

__all__ = ["DistilledDataset", "EXPORT_MARKER", "SOFT_LABELS", "image_path", "class_folders"]

# The export layout (see docs/EXPORT.md); fadrm.export writes it, this module reads it.
EXPORT_MARKER = "export.json"  # written last: its presence means the export is complete
SOFT_LABELS = "soft_labels.parquet"  # imagefolder format: one row group per epoch
ID_WIDTH = 6  # image file names: <image id, zero-padded>.png


def class_folders(classes: list[str]) -> list[str]:
    """The folder of each class in an ImageFolder export: its name made safe for a path
    (``/`` and ``\\`` become ``-``). When the safe names sort differently from the class
    indices (torchvision's ``ImageFolder`` and Hugging Face's ``imagefolder`` number the
    classes in sorted folder order) or collide, each is prefixed by its zero-padded index
    (``0-T-shirt-top``), so the loaders' class ``k`` is the soft labels' logit ``k``."""
    safe = [c.replace("/", "-").replace("\\", "-").strip() or "_" for c in classes]
    safe = ["_" + s if s in (".", "..") else s for s in safe]
    if sorted(safe) == safe and len(set(safe)) == len(safe):
        return safe
    width = len(str(len(classes) - 1))
    return [f"{i:0{width}d}-{s}" for i, s in enumerate(safe)]


def image_path(folder: str, image_id: int) -> str:
    """``<class folder>/<image id>.png``: where image ``image_id`` lies in an export."""
    return f"{folder}/{image_id:0{ID_WIDTH}d}.png"


# --------------------------------------------------------------------------- sources


@dataclass
class _Distilled:
    """What the dataset needs, as plain (picklable) values: the images and where each
    epoch's label rows are."""

    images: torch.Tensor  # uint8 [N, C, H, W], by image id
    labels: torch.Tensor  # long [N]
    classes: list[str]
    config: dict  # the run's resolved config
    read_labels: Callable[[int], pa.Table]  # epoch -> a table holding (at least) that epoch


class _ShardLabels:
    """Epoch -> label rows, from Arrow shards of ``epochs_per_shard`` epochs each."""

    def __init__(self, uris: list[str], epochs_per_shard: int):
        self.uris, self.epochs_per_shard = uris, epochs_per_shard
        self._cached: tuple[str, pa.Table] | None = None

    def __call__(self, epoch: int) -> pa.Table:
        uri = self.uris[epoch // self.epochs_per_shard]
        if self._cached is None or self._cached[0] != uri:
            self._cached = (uri, shards.read_table(uri))
        return self._cached[1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cached": None}


class _ParquetLabels:
    """Epoch -> label rows, from the export's Parquet file (row group ``e`` = epoch ``e``)."""

    def __init__(self, uri: str):
        self.uri = uri

    def __call__(self, epoch: int) -> pa.Table:
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(self.uri)
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read_row_group(epoch)
        return table


def _from_config(cfg: RunConfig) -> _Distilled:
    from fadrm.datasource import load_distilled
    from fadrm.plan import RunPlan

    plan = RunPlan(cfg)
    missing = [f"{s.label}: {len(p)} of {len(s.units())} units missing"
               for s in (plan.images_stage, plan.relabel) if (p := s.pending())]
    if missing:
        raise InputError(f"{cfg.name}: the distilled set is not complete ({'; '.join(missing)}"
                         f"); run `fadrm run` with this config first")
    images, labels = load_distilled(plan)
    relabel = plan.relabel
    uris = [relabel.unit_uri(u) for u in relabel.units()]
    return _Distilled(images, labels, list(plan.classes), config_to_dict(cfg),
                      _ShardLabels(uris, cfg.relabel.epochs_per_shard))


def read_marker(root: str) -> dict | None:
    """The export's ``export.json`` (None when ``root`` holds no complete export)."""
    try:
        return json.loads(storage.read_bytes(storage.join(root, EXPORT_MARKER)))
    except FileNotFoundError:
        return None


def _decode_png(data: bytes, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.array(im.convert("L" if channels == 1 else "RGB"))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _from_export(root: str, marker: dict) -> _Distilled:
    import yaml

    config = yaml.safe_load(storage.read_bytes(storage.join(root, marker["config"])))
    classes = [c["name"] for c in marker["classes"]]
    n, (c, h, w) = marker["num_images"], marker["image_shape"]
    images = torch.empty((n, c, h, w), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    if marker["format"] == "imagefolder":
        from concurrent.futures import ThreadPoolExecutor

        ipc = marker["ipc"]
        folders = [cl["folder"] for cl in marker["classes"]]

        def load(i: int) -> None:
            uri = storage.join(root, image_path(folders[i // ipc], i))
            images[i] = torch.from_numpy(_decode_png(storage.read_bytes(uri), c))

        # Object stores answer one GET at a time: several in flight hide the latency.
        with ThreadPoolExecutor(16 if storage.is_remote(root) else 4) as pool:
            list(pool.map(load, range(n)))
        labels[:] = torch.arange(n) // ipc  # image ids are class * IPC + index
        read_labels: Callable[[int], pa.Table] = _ParquetLabels(
            storage.join(root, marker["soft_labels"]))
    elif marker["format"] == "arrow":
        filled = 0
        for name in marker["image_shards"]:
            got, got_labels, ids = shards.table_images(shards.read_table(storage.join(root,
                                                                                      name)))
            images[ids], labels[ids] = got, got_labels
            filled += len(ids)
        if filled != n:
            raise InputError(f"{root}: the image shards hold {filled} images, export.json "
                             f"says {n}")
        read_labels = _ShardLabels([storage.join(root, u) for u in marker["label_shards"]],
                                   marker["epochs_per_shard"])
    else:
        raise InputError(f"{root}/{EXPORT_MARKER}: unknown format {marker['format']!r}")
    return _Distilled(images, labels, classes, config, read_labels)


def _open(source: Any) -> _Distilled:
    if isinstance(source, RunConfig):
        return _from_config(source)
    text = str(source)
    marker = read_marker(text) if (storage.is_remote(text) or Path(text).is_dir()) else None
    if marker is not None:
        return _from_export(text, marker)
    if storage.is_remote(text) or Path(text).is_dir():
        raise InputError(f"{text}: not a complete fadrm export (no {EXPORT_MARKER}; "
                         f"`fadrm export CONFIG --to {text}` writes one)")
    from fadrm.config import load_config

    return _from_config(load_config(text))


# --------------------------------------------------------------------------- dataset


class DistilledDataset(torch.utils.data.Dataset):
    """The distilled images with their stored views and soft labels (see the module doc).

    ``path_or_config``: an export folder (local or ``s3://``), a config file or preset
    name, or a :class:`~fadrm.config.RunConfig`. ``label_mode``: ``"soft"`` -> items
    ``(view, target)``: the float view ``[C, H, W]`` (normalised with the data's mean and
    std) and the stored target ``[K]`` (teacher logits; class probabilities when the run
    stored hard-label rows, :attr:`hard_rows`); ``"hard"`` -> items ``(image, class)``: the
    plain image, normalised, or ``transform(uint8 [C, H, W])`` when given.
    """

    def __init__(self, path_or_config: Any, epoch: int = 0, label_mode: str = "soft",
                 transform: Callable[[torch.Tensor], Any] | None = None):
        if label_mode not in ("soft", "hard"):
            raise InputError(f"label_mode must be 'soft' or 'hard', got {label_mode!r}")
        self.label_mode, self.transform = label_mode, transform
        self._src = _open(path_or_config)
        self.config: dict = self._src.config
        data = self.config["data"]
        self.mean, self.std = list(data["mean"]), list(data["std"])
        self.student = StudentConfig(**self.config["student"])
        self.epochs: int = int(self.config["relabel"]["epochs"])
        self.batch_size: int = int(self.config["relabel"]["batch_size"])
        """Rows of one stored batch: one optimiser step of the evaluate stage's student."""
        self.epoch = -1
        self._views = self._targets = None
        self._batch_of: np.ndarray | None = None
        self.hard_rows = False
        self.set_epoch(epoch)

    @property
    def images(self) -> torch.Tensor:
        """The distilled images, uint8 ``[N, C, H, W]``, by image id."""
        return self._src.images

    @property
    def labels(self) -> torch.Tensor:
        """Each distilled image's class index."""
        return self._src.labels

    @property
    def classes(self) -> list[str]:
        return self._src.classes

    @property
    def num_classes(self) -> int:
        return len(self._src.classes)

    def set_epoch(self, epoch: int) -> None:
        """Serve the stored views of ``epoch`` (0 .. epochs - 1) from now on."""
        epoch = int(epoch)
        if not 0 <= epoch < self.epochs:
            raise InputError(f"epoch must lie in [0, {self.epochs}) (the stored epochs), "
                             f"got {epoch}")
        if epoch == self.epoch or self.label_mode == "hard":
            self.epoch = epoch
            return
        table = epoch_table(self._src.read_labels(epoch), epoch)
        views = views_from_table(table, epoch)
        self.hard_rows = is_hard(table)
        slices = list(views.batch_slices())
        if self.hard_rows:  # each row's target needs its CutMix partner's class
            targets = torch.cat([hard_targets(table.slice(s.start, s.stop - s.start),
                                              self.num_classes) for s in slices])
        else:
            targets = soft_targets(table, self.num_classes)
        self._batches = [views[s] for s in slices]
        self._starts = np.array([s.start for s in slices])
        self._batch_of = np.repeat(np.arange(len(slices)),
                                   [s.stop - s.start for s in slices])
        self._views, self._targets, self.epoch = views, targets, epoch

    def __len__(self) -> int:
        return len(self._src.images) if self.label_mode == "hard" else len(self._views)

    def __getitem__(self, index: int):
        if self.label_mode == "hard":
            image = self._src.images[index]
            x = (self.transform(image) if self.transform is not None
                 else normalize(image[None], self.mean, self.std)[0])
            return x, int(self._src.labels[index])
        if not 0 <= index < len(self._views):
            raise IndexError(f"index {index} out of range for {len(self._views)} views")
        b = int(self._batch_of[index])
        rows = self._batches[b]
        position = np.array([index - int(self._starts[b])])
        x = view_rows(self._src.images, rows, position, self.mean, self.std,
                      self._src.images.shape[2], torch.device("cpu"))[0]
        return x, self._targets[index]
