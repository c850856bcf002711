"""Teacher fingerprints from object metadata (fadrm.fingerprints): the hourly watch reads
a checkpoint's bytes only when its ETag/size/mtime changed, or never with a fresh sidecar.

Local files exercise size+mtime; the moto S3 server (tests/conftest.py) exercises ETag and
LastModified through boto3, as on a real bucket.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from fadrm import fingerprints as fp
from fadrm import storage


class CountingRead:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, uri: str) -> bytes:
        self.calls.append(str(uri))
        return storage.read_bytes(uri)

    def weights_reads(self, uri) -> int:
        return self.calls.count(str(uri))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_hash_once_then_from_the_cache_until_the_file_changes(tmp_path):
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"weights v1" * 1000)
    cache = str(tmp_path / "out" / "fingerprints")
    read = CountingRead()

    first = fp.weights_fingerprint(str(weights), cache_dir=cache, read=read)
    assert first.source == "hashed" and first.sha256 == sha(weights.read_bytes())
    assert first.data == weights.read_bytes()  # handed back: no second read for the caller
    assert read.weights_reads(weights) == 1

    for _ in range(3):  # every later tick: metadata only
        again = fp.weights_fingerprint(str(weights), cache_dir=cache, read=read)
        assert again.source == "cache" and again.sha256 == first.sha256 and again.data is None
    assert read.weights_reads(weights) == 1

    weights.write_bytes(b"weights v2" * 1000)  # a new checkpoint at the same path
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = fp.weights_fingerprint(str(weights), cache_dir=cache, read=read)
    assert changed.source == "hashed" and changed.sha256 == sha(b"weights v2" * 1000)
    assert read.weights_reads(weights) == 2


def test_same_size_and_mtime_but_another_path_is_not_a_cache_hit(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"A" * 10)
    b.write_bytes(b"B" * 10)
    st = a.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    cache = str(tmp_path / "cache")
    assert fp.weights_fingerprint(str(a), cache_dir=cache).sha256 == sha(b"A" * 10)
    assert fp.weights_fingerprint(str(b), cache_dir=cache).sha256 == sha(b"B" * 10)


def test_a_fresh_sidecar_answers_without_reading_and_a_stale_one_is_ignored(tmp_path):
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"w" * 100)
    digest = sha(b"w" * 100)
    sidecar = tmp_path / "teacher.pt.sha256"
    sidecar.write_text(f"{digest}  teacher.pt\n")  # `sha256sum` format
    read = CountingRead()
    got = fp.weights_fingerprint(str(weights), read=read)
    assert got.source == "sidecar" and got.sha256 == digest
    assert read.weights_reads(weights) == 0

    # The weights re-uploaded without a new sidecar: the sidecar is older, not believed.
    weights.write_bytes(b"x" * 100)
    st = sidecar.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    got = fp.weights_fingerprint(str(weights), read=read)
    assert got.source == "hashed" and got.sha256 == sha(b"x" * 100)


def test_pins_are_checked_and_beat_a_wrong_sidecar(tmp_path):
    from fadrm.models import WeightsError

    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"real bytes")
    good = sha(b"real bytes")
    (tmp_path / "teacher.pt.sha256").write_text("0" * 64 + "\n")  # wrong, but newer
    got = fp.weights_fingerprint(str(weights), pin=good.upper())
    assert got.sha256 == good and got.source == "hashed"  # the pin wins, bytes checked
    with pytest.raises(WeightsError, match="does not match|pin"):
        fp.weights_fingerprint(str(weights), pin="1" * 64, key="teachers[0].weights")


def test_a_cache_that_cannot_be_written_only_costs_a_rehash(tmp_path, caplog):
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"w")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would be")
    got = fp.weights_fingerprint(str(weights), cache_dir=str(blocker / "fingerprints"))
    assert got.source == "hashed" and got.sha256 == sha(b"w")
    assert "could not cache" in caplog.text


def test_missing_weights_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fp.weights_fingerprint(str(tmp_path / "nope.pt"), cache_dir=str(tmp_path))


def test_cache_lives_next_to_the_outputs():
    assert fp.cache_dir_for("s3://bucket/runs") == "s3://bucket/runs/fingerprints"


def test_s3_etag_and_last_modified_decide(s3_endpoint):
    import boto3

    storage.configure()  # endpoint from AWS_ENDPOINT_URL_S3 (the fixture)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    uri = "s3://fadrm-test/teachers/fp.pt"
    cache = "s3://fadrm-test/runs/fingerprints"
    s3.put_object(Bucket="fadrm-test", Key="teachers/fp.pt", Body=b"v1" * 500)
    meta = fp.object_metadata(uri)
    assert meta["size"] == 1000 and meta["etag"] and meta["mtime_ns"]

    read = CountingRead()
    assert fp.weights_fingerprint(uri, cache_dir=cache, read=read).source == "hashed"
    assert fp.weights_fingerprint(uri, cache_dir=cache, read=read).source == "cache"
    assert read.weights_reads(uri) == 1
    assert storage.listdir(cache)  # the cache object is next to the outputs

    # Same size, new bytes: the ETag changes even within the same second.
    s3.put_object(Bucket="fadrm-test", Key="teachers/fp.pt", Body=b"v2" * 500)
    got = fp.weights_fingerprint(uri, cache_dir=cache, read=read)
    assert got.source == "hashed" and got.sha256 == sha(b"v2" * 500)
    with pytest.raises(FileNotFoundError):
        fp.object_metadata("s3://fadrm-test/teachers/absent.pt")
