"""Real data loading: IDX parsing, ImageFolder decoding, splits, fingerprints."""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fadrm.config import ConfigError, DataConfig
from fadrm.data import (
    FASHION_MNIST_CLASSES,
    DataError,
    data_fingerprint,
    load_data,
    parse_idx,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file for a uint8 array, written by hand from the format description."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(root: Path, n_train: int = 40, n_val: int = 20, num_classes: int = 4,
                  gz_train: bool = False, gz_val: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % num_classes,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_val, dtype=np.uint8) % num_classes,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        gz = gz_train if name.startswith("train") else gz_val
        data = idx_bytes(arr)
        (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return arrays


def idx_cfg(root: Path, **kw) -> DataConfig:
    kw.setdefault("channels", 1)
    kw.setdefault("resolution", 28)
    kw.setdefault("mean", [0.5] * kw["channels"])
    kw.setdefault("std", [0.5] * kw["channels"])
    return DataConfig(kind="idx", root=str(root), **kw)


def test_parse_idx_raw_and_gzip_agree():
    arr = np.random.default_rng(1).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    raw = idx_bytes(arr)
    np.testing.assert_array_equal(parse_idx(raw), arr)
    np.testing.assert_array_equal(parse_idx(gzip.compress(raw)), arr)


def test_parse_idx_rejects_truncated_file_naming_it():
    raw = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match=r"labels\.bin.*truncated"):
        parse_idx(raw[:-10], "labels.bin")
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"\x01\x02\x03\x04rest", "x.idx")


def test_load_idx_images_labels_and_default_class_names(tmp_path):
    arrays = write_idx_set(tmp_path / "digits")
    train, val = load_data(idx_cfg(tmp_path / "digits"))
    assert train.images.shape == (40, 1, 28, 28) and train.images.dtype == torch.uint8
    assert val.images.shape == (20, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(val.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert train.classes == ["0", "1", "2", "3"] and val.classes == train.classes


def test_idx_grayscale_replicated_to_rgb_and_resized(tmp_path):
    write_idx_set(tmp_path)
    train, _ = load_data(idx_cfg(tmp_path, channels=3, resolution=32))
    assert train.images.shape == (40, 3, 32, 32)
    assert torch.equal(train.images[:, 0], train.images[:, 2])
    # A constant image stays constant through the resize.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        idx_bytes(np.full((40, 28, 28), 77, dtype=np.uint8)))
    train, _ = load_data(idx_cfg(tmp_path, resolution=14))
    assert train.images.shape == (40, 1, 14, 14) and bool((train.images == 77).all())


def test_idx_class_names_from_classes_txt_and_fashion(tmp_path):
    write_idx_set(tmp_path / "fashion-mnist", num_classes=10)
    train, _ = load_data(idx_cfg(tmp_path / "fashion-mnist"))
    assert train.classes == FASHION_MNIST_CLASSES
    (tmp_path / "fashion-mnist" / "classes.txt").write_text(
        "\n".join(f"c{i}" for i in range(10)) + "\n")
    train, _ = load_data(idx_cfg(tmp_path / "fashion-mnist"))
    assert train.classes == [f"c{i}" for i in range(10)]


def test_idx_missing_file_names_expected_path_and_package(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_data(idx_cfg(tmp_path))
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in str(err.value)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


def test_idx_subsets_are_deterministic_and_bounded(tmp_path):
    write_idx_set(tmp_path, n_train=80, n_val=40)
    cfg = idx_cfg(tmp_path, max_train_per_class=3, max_val=10)
    a_train, a_val = load_data(cfg)
    b_train, b_val = load_data(cfg)
    assert torch.bincount(a_train.labels).tolist() == [3, 3, 3, 3]
    assert len(a_val) == 10 and torch.bincount(a_val.labels).min() >= 2  # balanced-ish
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_val.images, b_val.images)
    c_train, _ = load_data(idx_cfg(tmp_path, max_train_per_class=3, split_seed=1))
    assert not torch.equal(a_train.images, c_train.images)


# --------------------------------------------------------------------------- ImageFolder


CLASSES = ["cat", "dog", "eel"]


def unique_value(label: int, i: int) -> int:
    return 20 + 40 * label + 7 * i  # every image in the fixture has its own pixel value


def make_folder(root: Path, per_class: int = 5, bad_files: bool = True) -> int:
    """Class folders of solid-colour images; the red channel identifies each image."""
    for label, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (40, 24) if i % 2 else (24, 24)  # some not square
            img = Image.new("RGB", size, (unique_value(label, i), 255 * (label == 1), 0))
            if i == per_class - 1:
                img.save(d / f"img{i}.JPG", quality=100)  # upper-case extension
            else:
                img.save(d / f"img{i}.png")
    if bad_files:
        (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(64))
        (root / "dog" / "empty.png").write_bytes(b"")
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
        (root / "eel" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir(exist_ok=True)
    return per_class * len(CLASSES)


def folder_cfg(root: Path, channels: int = 3, **kw) -> DataConfig:
    return DataConfig(kind="imagefolder", root=str(root), resolution=16, channels=channels,
                      mean=[0.5] * channels, std=[0.5] * channels, **kw)


def test_imagefolder_skips_bad_files_and_loads_the_rest(tmp_path, caplog):
    n_good = make_folder(tmp_path)
    calls = []
    with caplog.at_level(logging.WARNING, logger="fadrm.data"):
        train, val = load_data(folder_cfg(tmp_path), progress=lambda d, t: calls.append((d, t)))
    assert train.classes == CLASSES
    assert len(train) == n_good and len(val) == 0
    assert train.images.shape == (n_good, 3, 16, 16)
    assert sorted(Path(s["path"]).name for s in train.skipped) == [
        "corrupt.jpg", "empty.png", "truncated.jpg"]
    assert all(s["error"] for s in train.skipped)
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 3
    # Labels follow the folders: only "dog" images have a green channel.
    green = train.images[:, 1].float().mean(dim=(1, 2))
    assert torch.equal(green > 128, train.labels == 1)
    # Progress counts every decoded file, bad ones included.
    assert calls[-1] == (n_good + 3, n_good + 3)
    assert [d for d, _ in calls] == list(range(1, n_good + 4))


def test_imagefolder_grayscale_and_center_crop(tmp_path):
    make_folder(tmp_path, bad_files=False)
    train, _ = load_data(folder_cfg(tmp_path, channels=1))
    assert train.images.shape[1:] == (1, 16, 16)
    # A wide image: black sides, white centre square -> shorter side resized, centre kept.
    img = Image.new("L", (90, 30), 0)
    img.paste(255, (30, 0, 60, 30))
    img.save(tmp_path / "cat" / "wide.png")
    train, _ = load_data(folder_cfg(tmp_path, channels=1))
    wide = train.images[train.labels == 0].float().mean(dim=(1, 2, 3))
    assert wide.max() > 250  # the centre-cropped white square, no black bars


def test_val_per_class_holdout_is_disjoint_and_deterministic(tmp_path):
    make_folder(tmp_path, per_class=6, bad_files=False)
    cfg = folder_cfg(tmp_path, val_per_class=2)
    train, val = load_data(cfg)
    assert torch.bincount(val.labels).tolist() == [2, 2, 2]
    assert torch.bincount(train.labels).tolist() == [4, 4, 4]
    # Each image has its own red value: no held-out image is in train (PNG is lossless;
    # JPEG values are close, so compare with a tolerance).
    red_train = train.images[:, 0].float().mean(dim=(1, 2))
    red_val = val.images[:, 0].float().mean(dim=(1, 2))
    assert (red_train[:, None] - red_val[None, :]).abs().min() > 2
    again_train, again_val = load_data(cfg)
    assert torch.equal(val.images, again_val.images)
    assert torch.equal(train.images, again_train.images)


def test_max_train_per_class_limits_before_decoding(tmp_path):
    make_folder(tmp_path, per_class=6, bad_files=False)
    calls = []
    train, _ = load_data(folder_cfg(tmp_path, max_train_per_class=2),
                         progress=lambda d, t: calls.append(t))
    assert torch.bincount(train.labels).tolist() == [2, 2, 2]
    assert calls[-1] == 6  # only the selected files were decoded


def test_val_root_must_have_the_same_classes(tmp_path):
    make_folder(tmp_path / "train", bad_files=False)
    make_folder(tmp_path / "val", per_class=2, bad_files=False)
    train, val = load_data(folder_cfg(tmp_path / "train", val_root=str(tmp_path / "val")))
    assert len(val) == 6 and val.classes == train.classes
    (tmp_path / "val" / "frog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "frog" / "a.png")
    with pytest.raises(DataError, match="same class folders.*extra: \\['frog'\\]"):
        load_data(folder_cfg(tmp_path / "train", val_root=str(tmp_path / "val")))


def test_empty_class_folder_and_empty_root_are_named(tmp_path):
    make_folder(tmp_path / "data", bad_files=False)
    (tmp_path / "data" / "fox").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'data' / 'fox'} contains no images"):
        load_data(folder_cfg(tmp_path / "data"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'bare'} has no class sub-folders"):
        load_data(folder_cfg(tmp_path / "bare"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_data(folder_cfg(tmp_path / "nowhere"))


def test_invalid_config_is_rejected_with_key_path(tmp_path):
    with pytest.raises(ConfigError, match="data.channels"):
        load_data(DataConfig(kind="idx", root=str(tmp_path), channels=2))


# --------------------------------------------------------------------------- fingerprints


def test_imagefolder_fingerprint_tracks_files_and_settings(tmp_path):
    make_folder(tmp_path, bad_files=False)
    cfg = folder_cfg(tmp_path)
    fp = data_fingerprint(cfg)
    assert len(fp) == 64 and fp == data_fingerprint(cfg)
    Image.new("RGB", (24, 24), (9, 9, 9)).save(tmp_path / "cat" / "img0.png")
    os.utime(tmp_path / "cat" / "img0.png", ns=(1, 1))
    changed = data_fingerprint(cfg)
    assert changed != fp
    assert data_fingerprint(folder_cfg(tmp_path, val_per_class=1)) != changed
    assert data_fingerprint(folder_cfg(tmp_path, max_train_per_class=1)) != changed
    (tmp_path / "dog" / "img1.png").unlink()
    assert data_fingerprint(cfg) != changed


def _copy_tree_new_mtimes(src: Path, dst: Path) -> None:
    """A copy as ``cp -r`` (no -p) or a download makes it: same bytes, new mtimes."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True)
        else:
            target.write_bytes(path.read_bytes())
            st = path.stat()
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))


def test_content_fingerprint_survives_a_copy_and_tracks_bytes(tmp_path):
    from fadrm.datasource import list_data

    make_folder(tmp_path / "a", bad_files=False)
    _copy_tree_new_mtimes(tmp_path / "a", tmp_path / "b")
    listing = {r: data_fingerprint(folder_cfg(tmp_path / r)) for r in "ab"}
    content = {r: data_fingerprint(folder_cfg(tmp_path / r, fingerprint="content"))
               for r in "ab"}
    # Listing mode: new mtimes are new data. Content mode: the same bytes are the same data,
    # and the mode itself is part of the digest.
    assert listing["a"] != listing["b"]
    assert content["a"] == content["b"] and content["a"] not in listing.values()
    # The planner's one listing gives the same fingerprint as data_fingerprint.
    assert list_data(folder_cfg(tmp_path / "b", fingerprint="content")).fingerprint == content["b"]
    # One image's bytes change: so does the content fingerprint.
    Image.new("RGB", (24, 24), (9, 9, 9)).save(tmp_path / "b" / "cat" / "img0.png")
    assert data_fingerprint(folder_cfg(tmp_path / "b", fingerprint="content")) != content["a"]
    with pytest.raises(ConfigError, match="data.fingerprint"):
        data_fingerprint(folder_cfg(tmp_path / "a", fingerprint="bytes"))


def test_content_fingerprint_is_the_same_for_a_local_tree_and_its_s3_copy(tmp_path, s3_endpoint):
    from fadrm import storage

    make_folder(tmp_path, bad_files=False)
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        storage.write_bytes_atomic(f"s3://fadrm-test/copy/{path.relative_to(tmp_path)}",
                                   path.read_bytes())
    local = folder_cfg(tmp_path, fingerprint="content")
    remote = folder_cfg("s3://fadrm-test/copy", fingerprint="content")
    assert data_fingerprint(remote) == data_fingerprint(local)
    assert (data_fingerprint(folder_cfg("s3://fadrm-test/copy"))
            != data_fingerprint(folder_cfg(tmp_path)))


def test_idx_fingerprint_tracks_file_content(tmp_path):
    arrays = write_idx_set(tmp_path)
    cfg = idx_cfg(tmp_path)
    fp = data_fingerprint(cfg)
    assert fp == data_fingerprint(cfg)
    # Same size, new content and mtime: the in-process cache must not hide the change.
    labels = arrays["train-labels-idx1-ubyte"][::-1].copy()
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(labels))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert data_fingerprint(cfg) != fp
    assert data_fingerprint(idx_cfg(tmp_path, resolution=32)) != data_fingerprint(cfg)
