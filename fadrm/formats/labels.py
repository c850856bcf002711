"""Label rows: the on-disk form of the relabel stage's output, its writers and its reader.

One row per (epoch, stored batch, position): the view that the student replays (crop as
fractions of the source side, flip, CutMix partner, lambda and box in output pixels) and
its label, one of three forms (the schema's metadata names it: ``num_classes``, ``top_k``,
``label_mode``, and the relabel ``seed``):

* full fp16 logits (``top_k: 0``): column ``logits``;
* top-k (``top_k > 0``): ``topk_index`` (the smallest unsigned type that holds a class),
  ``topk_value`` (fp16) and ``rest_value``, the mean of the logits not kept;
* hard labels (``label_mode: hard``): ``label``, the image's class.

:class:`Views` is the in-memory form of the view columns (``fadrm.relabel`` draws them and
renders them into pixels). :class:`LabelRows` is the one reader: the student reads soft and
hard labels alike through it, as views plus ``[B, K]`` targets per stored batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

__all__ = [
    "LabelRows",
    "Views",
    "check_num_classes",
    "epoch_table",
    "hard_targets",
    "index_type",
    "is_hard",
    "label_arrays",
    "soft_label_schema",
    "soft_targets",
    "views_arrays",
    "views_from_table",
]

_FP16_MAX = float(np.finfo(np.float16).max)


# --------------------------------------------------------------------------- views


@dataclass
class Views:
    """View parameters of one epoch, one row per sample, ordered by (batch, pos)."""

    epoch: np.ndarray
    """int32 [N]"""
    batch: np.ndarray
    """int32 [N]: batch index within the epoch."""
    pos: np.ndarray
    """int32 [N]: position within the batch (0..B-1)."""
    image_id: np.ndarray
    """int32 [N]: index into the distilled image tensor."""
    crop: np.ndarray
    """float32 [N, 4]: (top, left, height, width) as fractions of the source side."""
    flip: np.ndarray
    """bool [N]: horizontal flip (applied after the crop)."""
    mix_partner: np.ndarray
    """int32 [N]: batch position whose pixels are pasted into the box; -1 = unchanged."""
    mix_lam: np.ndarray
    """float32 [N]: fraction of the sample's own pixels left after CutMix (1 = no mix)."""
    mix_box: np.ndarray
    """int32 [N, 4]: (y0, x0, y1, x1) CutMix box in output pixels, end exclusive."""

    def __post_init__(self) -> None:
        n = len(self.epoch)
        for f in fields(self):
            arr = getattr(self, f.name)
            if len(arr) != n:
                raise ValueError(f"Views.{f.name} has {len(arr)} rows, expected {n}")
        for name in ("crop", "mix_box"):
            if getattr(self, name).shape != (n, 4):
                raise ValueError(f"Views.{name} must have shape [{n}, 4]")

    def __len__(self) -> int:
        return len(self.epoch)

    def __getitem__(self, index: slice | np.ndarray) -> Views:
        return Views(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def batch_slices(self) -> Iterator[slice]:
        """Row ranges of the batches, in order (rows must be sorted by batch, pos)."""
        if len(self) == 0:
            return
        starts = np.flatnonzero(np.diff(self.batch)) + 1
        bounds = [0, *starts.tolist(), len(self)]
        for lo, hi in itertools.pairwise(bounds):
            yield slice(lo, hi)

    def batches(self) -> Iterator[Views]:
        """The rows of each batch, in order."""
        for s in self.batch_slices():
            yield self[s]

    def equals(self, other: Views) -> bool:
        """Every column identical (dtype and values)."""
        return all(
            getattr(self, f.name).dtype == getattr(other, f.name).dtype
            and np.array_equal(getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
        )


# --------------------------------------------------------------------------- arrow


def index_type(num_classes: int) -> pa.DataType:
    """The smallest unsigned integer type that holds a class index (uint8 up to 256)."""
    if num_classes <= 1 << 8:
        return pa.uint8()
    if num_classes <= 1 << 16:
        return pa.uint16()
    return pa.int32()


def soft_label_schema(num_classes: int, top_k: int, label_mode: str = "soft") -> pa.Schema:
    """Arrow schema of label rows: views plus full fp16 logits, top-k + the rest's mean,
    or (``label_mode='hard'``) the image's class."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be > 0, got {num_classes}")
    if top_k < 0 or (top_k > 0 and top_k >= num_classes):
        raise ValueError(
            f"top_k must be 0 (all logits) or in [1, {num_classes - 1}] for {num_classes} "
            f"classes, got {top_k}"
        )
    if label_mode not in ("soft", "hard"):
        raise ValueError(f"label_mode must be 'soft' or 'hard', got {label_mode!r}")
    if label_mode == "hard" and top_k:
        raise ValueError("top_k applies to soft labels only")
    cols = [
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("batch", pa.int32(), nullable=False),
        pa.field("pos", pa.int32(), nullable=False),
        pa.field("image_id", pa.int32(), nullable=False),
        pa.field("crop", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("flip", pa.bool_(), nullable=False),
        pa.field("mix_partner", pa.int32(), nullable=False),
        pa.field("mix_lam", pa.float32(), nullable=False),
        pa.field("mix_box", pa.list_(pa.int32(), 4), nullable=False),
    ]
    if label_mode == "hard":
        cols.append(pa.field("label", pa.int32(), nullable=False))
    elif top_k == 0:
        cols.append(pa.field("logits", pa.list_(pa.float16(), num_classes), nullable=False))
    else:
        cols += [
            # Indices in the smallest type that fits: 1 byte each up to 256 classes.
            pa.field("topk_index", pa.list_(index_type(num_classes), top_k), nullable=False),
            pa.field("topk_value", pa.list_(pa.float16(), top_k), nullable=False),
            pa.field("rest_value", pa.float16(), nullable=False),
        ]
    meta = {b"num_classes": str(num_classes).encode(), b"top_k": str(top_k).encode(),
            b"label_mode": label_mode.encode()}
    return pa.schema(cols, metadata=meta)


def _fixed_list(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(values).reshape(-1), type=arrow_type), values.shape[1]
    )


def views_arrays(views: Views) -> list[pa.Array]:
    """The view columns of ``views`` (the first nine of :func:`soft_label_schema`)."""
    return [
        pa.array(views.epoch, pa.int32()),
        pa.array(views.batch, pa.int32()),
        pa.array(views.pos, pa.int32()),
        pa.array(views.image_id, pa.int32()),
        _fixed_list(views.crop, pa.float32()),
        pa.array(views.flip, pa.bool_()),
        pa.array(views.mix_partner, pa.int32()),
        pa.array(views.mix_lam, pa.float32()),
        _fixed_list(views.mix_box, pa.int32()),
    ]


def label_arrays(logits: torch.Tensor, top_k: int) -> list[pa.Array]:
    """fp32 logits [N, K] -> the label columns (fp16 values, clamped to fp16's range)."""
    if top_k == 0:
        half = logits.clamp(-_FP16_MAX, _FP16_MAX).half().numpy()
        return [_fixed_list(half, pa.float16())]
    top = logits.topk(top_k, dim=1)
    k_all = logits.shape[1]
    # The tail's mean stands in for every logit not kept: at T = 20 the soft target is
    # far from one-hot, so filling the tail with 0 (or -inf) would distort it badly.
    rest = (logits.sum(1) - top.values.sum(1)) / (k_all - top_k)
    itype = index_type(k_all)
    return [
        _fixed_list(top.indices.numpy().astype(itype.to_pandas_dtype()), itype),
        _fixed_list(top.values.clamp(-_FP16_MAX, _FP16_MAX).half().numpy(), pa.float16()),
        pa.array(rest.clamp(-_FP16_MAX, _FP16_MAX).half().numpy(), pa.float16()),
    ]


# --------------------------------------------------------------------------- reading


def _list_column(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size-list column as a 2-D numpy array (respects slicing)."""
    col = table.column(name).combine_chunks()
    width = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def epoch_table(table: pa.Table, epoch: int) -> pa.Table:
    """The rows of one epoch, sorted by (batch, pos)."""
    rows = table.filter(pc.equal(table.column("epoch"), epoch))
    if rows.num_rows == 0:
        raise ValueError(f"soft-label table has no rows for epoch {epoch}")
    return rows.sort_by([("batch", "ascending"), ("pos", "ascending")])


def views_from_table(table: pa.Table, epoch: int) -> Views:
    """The stored views of ``epoch`` (rows sorted by batch, pos)."""
    return _views_of(epoch_table(table, epoch))


def _views_of(rows: pa.Table) -> Views:
    return Views(
        epoch=_column(rows, "epoch").astype(np.int32),
        batch=_column(rows, "batch").astype(np.int32),
        pos=_column(rows, "pos").astype(np.int32),
        image_id=_column(rows, "image_id").astype(np.int32),
        crop=_list_column(rows, "crop").astype(np.float32),
        flip=rows.column("flip").to_numpy(zero_copy_only=False).astype(bool),
        mix_partner=_column(rows, "mix_partner").astype(np.int32),
        mix_lam=_column(rows, "mix_lam").astype(np.float32),
        mix_box=_list_column(rows, "mix_box").astype(np.int32),
    )


def is_hard(table: pa.Table) -> bool:
    """Whether the rows carry hard labels (``label_mode='hard'``) instead of logits."""
    return "label" in table.column_names


def hard_targets(batch_rows: pa.Table, num_classes: int) -> torch.Tensor:
    """Class-probability targets ``[B, K]`` of one whole batch of hard-label rows.

    ``lam * onehot(own class) + (1 - lam) * onehot(CutMix partner's class)``, where the
    partner is the row at batch position ``mix_partner`` (rows in position order).
    """
    label = _column(batch_rows, "label").astype(np.int64)
    partner = _column(batch_rows, "mix_partner").astype(np.int64)
    lam = _column(batch_rows, "mix_lam").astype(np.float32)
    n = len(label)
    if n and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"stored label outside [0, {num_classes})")
    mixed = partner >= 0
    if mixed.any() and (not np.array_equal(_column(batch_rows, "pos"), np.arange(n))
                        or partner.max() >= n):
        raise ValueError("hard_targets needs the rows of one whole batch, in position order")
    out = np.zeros((n, num_classes), dtype=np.float32)
    rows = np.arange(n)
    np.add.at(out, (rows, label), np.where(mixed, lam, 1.0).astype(np.float32))
    np.add.at(out, (rows[mixed], label[partner[mixed]]), 1.0 - lam[mixed])
    return torch.from_numpy(out)


def soft_targets(table_slice: pa.Table, num_classes: int) -> torch.Tensor:
    """fp32 teacher logits ``[B, K]`` of the rows (top-k: the tail filled with rest_value)."""
    names = table_slice.column_names
    if "logits" in names:
        logits = _list_column(table_slice, "logits")
        if logits.shape[1] != num_classes:
            raise ValueError(f"stored logits have {logits.shape[1]} classes, "
                             f"expected {num_classes}")
        return torch.from_numpy(logits.astype(np.float32))
    if "topk_index" not in names:
        raise ValueError("soft-label table has neither 'logits' nor 'topk_index' columns")
    index = _list_column(table_slice, "topk_index").astype(np.int64)
    value = _list_column(table_slice, "topk_value").astype(np.float32)
    if index.size and (index.min() < 0 or index.max() >= num_classes):
        raise ValueError(f"stored top-k index outside [0, {num_classes})")
    rest = _column(table_slice, "rest_value").astype(np.float32)
    out = np.repeat(rest[:, None], num_classes, axis=1)
    np.put_along_axis(out, index, value, axis=1)
    return torch.from_numpy(out)


def check_num_classes(table: pa.Table, num_classes: int) -> None:
    """The rows were written for ``num_classes`` classes (schema metadata), when recorded."""
    meta = table.schema.metadata or {}
    stored = meta.get(b"num_classes")
    if stored is not None and int(stored) != num_classes:
        raise ValueError(f"soft labels are for {int(stored)} classes, but the student "
                         f"is trained for {num_classes}")


# --------------------------------------------------------------------------- the reader


@dataclass(frozen=True)
class LabelRows:
    """Stored label rows in (batch, pos) order, soft or hard alike: their views and targets.

    ``LabelRows.read(table, epoch, K)`` is one epoch; indexing with a slice of
    ``views.batch_slices()`` gives one stored batch, whose :meth:`targets` are what the
    student trains towards.
    """

    table: pa.Table
    views: Views
    num_classes: int

    @classmethod
    def read(cls, table: pa.Table, epoch: int, num_classes: int) -> LabelRows:
        """The rows of ``epoch``, checked against the student's ``num_classes``."""
        rows = epoch_table(table, epoch)
        check_num_classes(rows, num_classes)
        return cls(rows, _views_of(rows), num_classes)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, rows: slice) -> LabelRows:
        start, stop, _ = rows.indices(len(self))
        return LabelRows(self.table.slice(start, stop - start), self.views[rows],
                         self.num_classes)

    @property
    def hard(self) -> bool:
        """Hard-label rows (``label_mode: hard``): the student's loss is a cross-entropy."""
        return is_hard(self.table)

    def targets(self) -> torch.Tensor:
        """``[B, K]`` fp32: the teachers' logits (soft rows), or the CutMix-mixed one-hot
        class probabilities (hard rows; then the rows must be one whole stored batch)."""
        return (hard_targets if self.hard else soft_targets)(self.table, self.num_classes)
