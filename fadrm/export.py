"""`fadrm export`: a finished run's distilled set as files anyone can load (docs/EXPORT.md).

Formats:

* ``imagefolder`` (default): ``DEST/<class folder>/<image id>.png`` (lossless PNG of the
  stored uint8 pixels; torchvision's ``ImageFolder`` and Hugging Face's ``imagefolder`` read
  the tree as is) and ``soft_labels.parquet``: the relabel rows (epoch, batch, pos,
  image_id, the view parameters, the fp16 logits or top-k) exactly as stored, one row
  group per epoch.
* ``arrow``: the image and label shards copied byte for byte (with their checksum
  sidecars) under ``images/`` and ``labels/``.

Both carry ``config.yaml`` (the resolved config), ``teachers.json`` (each teacher's
fingerprint and roles, the run's fingerprints), ``metrics.json``, a dataset card
``README.md`` and, written last, ``export.json`` (what and where everything is; its presence
means the export is complete). A local export is written into a temporary sibling folder
and renamed into place; on object storage every object is one PUT and ``export.json`` comes
last. Exporting the same run to the same place again does nothing; a different export is
never overwritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fadrm import __version__, storage
from fadrm.config import RunConfig, config_to_dict
from fadrm.dataset import (EXPORT_MARKER, SOFT_LABELS, class_folders, image_path,
                           read_marker)
from fadrm.errors import InputError
from fadrm.formats import shards
from fadrm.report import find_random_real
from fadrm.lineage import digest

__all__ = ["FORMATS", "ExportResult", "export_run", "find_random_real"]

log = logging.getLogger("fadrm.export")

FORMATS = ("imagefolder", "arrow")
_PENDING = ".fadrm-export-pending.json"  # object storage: which export is being written


@dataclass
class ExportResult:
    dest: str
    format: str
    export_id: str
    written: bool
    """False when ``dest`` already held this very export (nothing was written)."""
    num_images: int
    epochs: int


def export_run(cfg: RunConfig, dest: str, fmt: str = "imagefolder") -> ExportResult:
    """Export ``cfg``'s finished run to ``dest`` (a local folder or ``s3://`` prefix)."""
    from fadrm.preflight import preflight

    if fmt not in FORMATS:
        raise InputError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    dest = str(dest).rstrip("/") or "/"
    plan = preflight(cfg, write_probe=False).plan  # the checks and plan of `fadrm status`
    _require_complete(plan)
    manifest = plan.previous_manifest()
    export_id = digest({"format": fmt, "config": plan.fingerprints()["config"],
                        "stages": {s.label: s.key.key for s in plan.stages}}, 16)
    result = ExportResult(dest, fmt, export_id, False, plan.num_classes * cfg.ipc,
                          cfg.relabel.epochs)
    marker = read_marker(dest)
    if marker is not None:
        if marker.get("export_id") == export_id:
            log.info("%s already holds this export (%s); nothing to do", dest, export_id)
            return result
        raise InputError(f"--to {dest}: holds another export ({marker.get('name')!r}, "
                         f"format {marker.get('format')}, config "
                         f"{marker.get('config_fingerprint')}); it is never overwritten: "
                         f"choose another destination or delete that one first")
    files = _Files(plan, manifest, fmt, export_id)
    if storage.is_remote(dest):
        _write_remote(dest, files, export_id)
    else:
        _write_local(storage.local_path(dest), files)
    result.written = True
    return result


def _require_complete(plan) -> None:
    """Refuse a run that is not finished, naming each stage that is not done (the states
    and reasons of `fadrm status`)."""
    status = plan.status()
    missing = [f"{s.name} {s.state} ({s.done_units}/{s.total_units} units"
               + (f"; {s.reason})" if s.reason else ")")
               for s in status.stages if s.state != "done"]
    if missing:
        raise InputError(f"{plan.cfg.name}: cannot export an unfinished run: "
                         f"{'; '.join(missing)}. Run `fadrm run` with this config first "
                         f"(`fadrm status` shows the same)")
    if plan.previous_manifest() is None:
        raise InputError(f"{plan.cfg.name}: every stage is done but this config has no report "
                         f"yet ({plan.run_dir}/manifest.json); run `fadrm run` with this "
                         f"config once more to write it")


# --------------------------------------------------------------------------- contents


class _Files:
    """The export's files as (relative path, bytes or a Parquet writer callback), in the
    order they are written; ``export.json`` (the marker) is produced last."""

    def __init__(self, plan, manifest: dict, fmt: str, export_id: str):
        self.plan, self.manifest, self.fmt, self.export_id = plan, manifest, fmt, export_id
        self.cfg = plan.cfg
        self.folders = class_folders(list(plan.classes))
        self.record: dict[str, dict] = {}  # relative path -> sha256, bytes

    def _add(self, rel: str, data: bytes) -> tuple[str, bytes]:
        self.record[rel] = {"sha256": storage.sha256_bytes(data), "bytes": len(data)}
        return rel, data

    def payload(self) -> Iterator[tuple[str, bytes | Callable[[Any], None]]]:
        """Every file but the marker: its bytes, or a function that writes it to a stream
        (the soft labels, streamed epoch by epoch: they can be many GB)."""
        if self.fmt == "imagefolder":
            yield from self._pngs()
            yield SOFT_LABELS, self._soft_labels
        else:
            yield from self._shards()
        cfg_text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        yield self._add("config.yaml", cfg_text.encode())
        yield self._add("teachers.json", _json({
            "teachers": self.manifest.get("teachers", []),
            "fingerprints": self.manifest.get("fingerprints", {})}))
        metrics = dict(self.manifest.get("metrics", {}))
        metrics["random_real"] = find_random_real(self.plan, metrics)
        yield self._add("metrics.json", _json(metrics))
        yield self._add("README.md", _card(self.plan, self.manifest, metrics, self.fmt,
                                           self.folders).encode())

    def marker(self) -> bytes:
        cfg, plan = self.cfg, self.plan
        d = cfg.data
        out = {
            "format": self.fmt, "export_id": self.export_id, "name": cfg.name,
            "method": cfg.recover.method, "fadrm_version": __version__,
            "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config_fingerprint": plan.fingerprints()["config"],
            "stage_keys": {s.label: s.key.key for s in plan.stages},
            "classes": [{"index": i, "name": n, "folder": f}
                        for i, (n, f) in enumerate(zip(plan.classes, self.folders))],
            "num_images": plan.num_classes * cfg.ipc, "ipc": cfg.ipc,
            "image_shape": [d.channels, d.resolution, d.resolution],
            "epochs": cfg.relabel.epochs, "epochs_per_shard": cfg.relabel.epochs_per_shard,
            "config": "config.yaml",
            "soft_labels": SOFT_LABELS if self.fmt == "imagefolder" else None,
            "image_shards": [r for r in self.record if r.startswith("images/")
                             and r.endswith(".arrow")],
            "label_shards": [r for r in self.record if r.startswith("labels/")
                             and r.endswith(".arrow")],
            "files": self.record,
        }
        return _json(out)

    def _pngs(self) -> Iterator[tuple[str, bytes]]:
        from PIL import Image

        from fadrm.datasource import load_distilled

        images, labels = load_distilled(self.plan)
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            arr = image.numpy()
            pic = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
            buf = io.BytesIO()
            pic.save(buf, format="PNG")  # lossless; same pixels, same bytes
            yield self._add(image_path(self.folders[label], i), buf.getvalue())

    def _soft_labels(self, stream) -> None:
        """The relabel rows as one Parquet file on ``stream``, one row group per epoch (one
        relabel shard in memory at a time); its sha256 and size are recorded as written."""
        import pyarrow.parquet as pq

        from fadrm.formats.labels import epoch_table

        relabel = self.plan.relabel
        sink = _Hashing(stream)
        writer = None
        for unit in relabel.units():
            table = shards.read_table(relabel.unit_uri(unit))
            first, last = (int(x) for x in unit[1:].split("-"))
            for epoch in range(first, last + 1):
                rows = epoch_table(table, epoch)
                if writer is None:
                    writer = pq.ParquetWriter(sink, rows.schema, compression="zstd")
                writer.write_table(rows, row_group_size=rows.num_rows)
        assert writer is not None
        writer.close()
        self.record[SOFT_LABELS] = {"sha256": sink.sha.hexdigest(), "bytes": sink.size}

    def _shards(self) -> Iterator[tuple[str, bytes]]:
        """The image and label shards (and their checksum sidecars) byte for byte."""
        for folder, stage in (("images", self.plan.images_stage), ("labels", self.plan.relabel)):
            for unit in stage.units():
                uri = stage.unit_uri(unit)
                name = uri.rstrip("/").rsplit("/", 1)[-1]
                yield self._add(f"{folder}/{name}", shards.read_artifact(uri))
                yield self._add(f"{folder}/{name}.json", storage.read_bytes(uri + ".json"))


class _Hashing:
    """A write-only file object that hashes what passes through to ``stream``."""

    def __init__(self, stream):
        self.stream, self.sha, self.size, self.closed = stream, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = bytes(data)
        self.sha.update(data)
        self.size += len(data)
        self.stream.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:  # the caller closes the stream itself
        self.closed = True


def _json(obj) -> bytes:
    return json.dumps(obj, indent=2).encode()


# --------------------------------------------------------------------------- writing


def _write_local(dest: Path, files: _Files) -> None:
    """Everything into a temporary sibling folder, then one rename: ``dest`` is absent (or
    an empty folder) until the export is complete."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"--to {dest}: exists and is not a fadrm export (no "
                         f"{EXPORT_MARKER}); choose a new or empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.export-{storage.unique_suffix()}"
    try:
        for rel, data in files.payload():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if callable(data):
                with open(path, "wb") as f:
                    data(f)
            else:
                path.write_bytes(data)
        (tmp / EXPORT_MARKER).write_bytes(files.marker())
        os.rename(tmp, dest)  # onto an absent or empty folder; fails on a non-empty one
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.exists() and read_marker(str(dest)) is not None:
            raise InputError(f"--to {dest}: another export finished there meanwhile") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_remote(dest: str, files: _Files, export_id: str) -> None:
    """Object storage: a pending note naming this export, every object (one PUT each),
    the marker last, then the note is removed. An interrupted export of the same run is
    finished by the next try; anything else under ``dest`` is refused."""
    pending = storage.join(dest, _PENDING)
    fs, path = storage.filesystem(dest)
    import pyarrow.fs as pafs

    present = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True,
                                                             allow_not_found=True))
               if i.type == pafs.FileType.File]
    if present:
        try:
            note = json.loads(storage.read_bytes(pending))
        except FileNotFoundError:
            note = {}
        if note.get("export_id") != export_id:
            raise InputError(f"--to {dest}: holds {len(present)} object(s) but no complete "
                             f"fadrm export of this run ({EXPORT_MARKER} missing); choose an "
                             f"empty prefix or delete them first")
        log.info("%s: finishing an interrupted export of this run", dest)
    storage.write_bytes_atomic(pending, _json({"export_id": export_id}))
    for rel, data in files.payload():
        if callable(data):  # one (multipart) upload, published when it completes
            with fs.open_output_stream(f"{path.rstrip('/')}/{rel}") as f:
                data(f)
        else:
            storage.write_bytes_atomic(storage.join(dest, rel), data)
    storage.write_bytes_atomic(storage.join(dest, EXPORT_MARKER), files.marker())
    storage.delete(pending)


# --------------------------------------------------------------------------- the card


def _card(plan, manifest: dict, metrics: dict, fmt: str, folders: list[str]) -> str:
    cfg, d = plan.cfg, plan.cfg.data
    n = plan.num_classes * cfg.ipc
    shape = f"{d.channels}x{d.resolution}x{d.resolution}"
    lines = [
        f"# {cfg.name}: {cfg.recover.method} distilled set, IPC {cfg.ipc}", "",
        f"{n} images ({plan.num_classes} classes x {cfg.ipc} per class, uint8 {shape}) "
        f"distilled by fadrm {__version__} with the method `{cfg.recover.method}` from "
        f"`{d.root}` ({d.kind}; data fingerprint `{plan.fingerprints()['data']}`), plus "
        f"the teachers' soft labels for {cfg.relabel.epochs} student epochs "
        f"(top-k {cfg.relabel.top_k or 'all'}, rows of kind `{cfg.relabel.label_mode}`).",
        "", "## Teachers", "", "| # | model | fingerprint | top-1 % | used for |",
        "|---|---|---|---|---|",
    ]
    tops = metrics.get("teachers_top1") or []
    for i, t in enumerate(manifest.get("teachers", [])):
        roles = ", ".join(r for r in ("recover", "relabel") if t.get(r)) or "-"
        top = f"{tops[i]:.2f}" if i < len(tops) else "?"
        lines.append(f"| {i} | {t['model']} | `{t['fingerprint']}` | {top} | {roles} |")
    rr = metrics.get("random_real")
    if cfg.recover.method == "random-real":
        margin = "this is the random-real baseline itself"
    elif rr:
        margin = (f"{rr['margin']:+.2f} points over random real images with the same "
                  f"soft-label protocol ({rr['student_top1']:.2f} %, report `{rr['name']}` "
                  f"`{rr['config_fingerprint']}`)")
    else:
        margin = ("no random-real report of the same data, IPC, teachers and protocol was "
                  "found beside this run, so no margin over random real is given")
    step = metrics.get("student_step")
    protocol = (f", the data-parallel variant: {step['batches_per_step']} stored batches per "
                f"step, lr {step['peak_lr']:.3g} by the {step['lr_scaling']} rule, not the "
                f"paper's one-batch step" if step else "")
    lines += [
        "", "## Student results", "",
        f"A `{cfg.student.model}` trained only on these images and soft labels "
        f"({cfg.relabel.epochs} epochs, seed {cfg.seed}{protocol}) reaches "
        f"**{metrics['student_top1']:.2f} %** top-1 (top-5 {metrics['student_top5']:.2f} %, "
        f"best {metrics['student_top1_best']:.2f} %) on {metrics['val_images']} real "
        f"validation images; {margin}.",
        "", "## Files", "",
    ]
    if fmt == "imagefolder":
        lines += [
            "- `<class folder>/<image id>.png`: the images (lossless PNG). Class folders, "
            "in class order: " + ", ".join(f"`{f}`" for f in folders[:20])
            + (", ..." if len(folders) > 20 else ""),
            f"- `{SOFT_LABELS}`: one row per stored view and epoch (row group = epoch): "
            "epoch, batch, pos, image_id, crop, flip, mix_partner, mix_lam, mix_box and "
            "the teachers' logits (`logits`, or `topk_index`/`topk_value`/`rest_value`).",
        ]
    else:
        lines.append("- `images/*.arrow`, `labels/*.arrow`: fadrm's shards as stored "
                     "(Arrow IPC, zstd), each with its sha256 sidecar.")
    lines += [
        "- `config.yaml` (resolved config), `teachers.json` (fingerprints), `metrics.json`, "
        f"`{EXPORT_MARKER}` (layout, classes, checksums of every file).",
        "", "## Loading", "", "```python",
    ]
    if fmt == "imagefolder":
        lines += ["from torchvision.datasets import ImageFolder",
                  "images = ImageFolder(\"THIS_FOLDER\")  # class k = logit k of the soft labels",
                  "# or: datasets.load_dataset(\"imagefolder\", data_dir=\"THIS_FOLDER\")"]
    lines += ["import fadrm",
              "data = fadrm.DistilledDataset(\"THIS_FOLDER\", epoch=0)  # stored views + "
              "soft targets",
              "```", "", "See fadrm's docs/EXPORT.md for the layout and a training loop.", ""]
    return "\n".join(lines)
