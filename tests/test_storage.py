"""Storage: atomic writes, checksums, and the same calls against S3 (moto server on loopback)."""

import pyarrow as pa
import pytest
import torch

from fadrm import storage
from fadrm.formats import shards


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes_atomic(str(target), b"x" * 1000)
    assert target.read_bytes() == b"x" * 1000
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]  # temp file renamed away


def test_image_shard_round_trip_and_checksum(tmp_path):
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    uri = str(tmp_path / "images.arrow")
    assert not shards.is_complete(uri)
    info = shards.write_table(uri, shards.images_table(images, [0, 0, 1, 1, 2, 2], list(range(6))))
    assert shards.is_complete(uri) and info["rows"] == 6
    back, labels, ids = shards.table_images(shards.read_table(uri))
    assert torch.equal(back, images) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    # truncation is detected, not parsed into garbage
    data = (tmp_path / "images.arrow").read_bytes()
    (tmp_path / "images.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(shards.ShardCorruptError):
        shards.read_table(uri)


def test_s3_shards_round_trip(s3_endpoint):
    uri = "s3://fadrm-test/run/recover/k/images.arrow"
    table = pa.table({"x": list(range(100))})
    shards.write_table(uri, table)
    assert shards.is_complete(uri) and storage.exists(uri)
    assert shards.read_table(uri).equals(table)
    assert storage.listdir("s3://fadrm-test/run/recover/k") == ["images.arrow",
                                                               "images.arrow.json"]
    storage.write_bytes_atomic(uri, b"garbage")
    with pytest.raises(shards.ShardCorruptError):
        shards.read_table(uri)


def test_s3_endpoint_from_config_instead_of_environment(s3_endpoint, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    try:
        storage.configure(endpoint_url=s3_endpoint)
        storage.write_bytes_atomic("s3://fadrm-test/configured/a.bin", b"abc")
        assert storage.read_bytes("s3://fadrm-test/configured/a.bin") == b"abc"
    finally:
        storage.configure()


def test_storage_from_the_config_section_serves_every_reader(s3_endpoint, monkeypatch):
    """A Storage built from the config's `storage` section (no endpoint in the environment):
    the module functions and the fingerprints' metadata reads (boto3) both go to it."""
    from fadrm import fingerprints
    from fadrm.config import StorageConfig

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    store = storage.Storage.from_config(StorageConfig(endpoint_url=s3_endpoint,
                                                      region="us-east-1"))
    assert (store.endpoint_url, store.region) == (s3_endpoint, "us-east-1")
    try:
        assert storage.use(store) is storage.current() is store
        storage.write_bytes_atomic("s3://fadrm-test/from-config/w.pt", b"w" * 10)
        assert storage.read_bytes("s3://fadrm-test/from-config/w.pt") == b"w" * 10
        assert fingerprints.object_metadata("s3://fadrm-test/from-config/w.pt")["size"] == 10
    finally:
        storage.configure()
    assert storage.current() == storage.Storage()  # back to the environment's settings


def test_storage_endpoint_must_be_a_url():
    from fadrm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="^storage.endpoint_url:"):
        load_config({"data": {"root": "/x"}, "storage": {"endpoint_url": "minio:9000"}})
