"""What a hostile walk through the CLI found (issue 27): bad input exits 2 in one line,
outputs honour the umask, error hints that do not mislead, SIGTERM as a clean stop, a CLI
that answers without importing torch or Ray, the k8s README's offline dry run."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import types

import pytest

from fadrm import storage
from fadrm.cli import main

# --------------------------------------------------------------------------- 3: exit codes


@pytest.mark.parametrize("text, words", [
    ("- name: a\n- name: b\n", "holds a list"),
    ("just a string\n", "holds a string"),
    ("name: [a\n", "invalid YAML: while parsing a flow sequence"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "cannot read the config: not a text file"),
])
@pytest.mark.parametrize("command", ["run", "status"])
def test_a_config_file_that_is_not_a_mapping_is_bad_input(tmp_path, capsys, text, words,
                                                         command):
    path = tmp_path / "run.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    assert main([command, str(path), "--executor", "local"] if command == "run"
                else [command, str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: {path}: ") and words in err[-1], err
    assert len(err) == 2 and err[0] == f"config: file {path}"  # one line of error, no advice


@pytest.mark.parametrize("command", ["run", "status"])
def test_a_malformed_set_value_is_bad_input_naming_the_override(tmp_path, capsys, command):
    out = f"output={tmp_path / 'out'}"
    assert main([command, "demo", "--set", out, "--set", "recover.resolutions=[32,32"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: recover.resolutions: --set 'recover.resolutions=[32,32'"
                              ": the value is not valid YAML"), err
    assert "ParserError" not in err[-1] and "resume" not in err[-1] and len(err) == 2


# --------------------------------------------------------------------------- 7: file modes


@pytest.fixture
def umask():
    """Set the process umask for one test (and put the old one back)."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_an_atomic_write_honours_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes_atomic(str(target), b"x")
    storage.write_bytes_atomic(str(target), b"y")  # replacing keeps the mode too
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]


def test_every_output_of_a_run_is_readable_by_others_under_umask_022(tmp_path, umask):
    """Shards, sidecars, metrics.json, grid.png: 0644 (as open() makes them), not 0600."""
    from tests.test_cli import micro_config

    umask(0o022)
    assert main(["run", str(micro_config(tmp_path)), "--executor", "local",
                 "--no-progress"]) == 0
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and not p.is_symlink()]
    names = {p.name for p in files}
    assert {"metrics.json", "grid.png", "manifest.json"} <= names
    assert any(n.endswith(".arrow") for n in names), names
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


# --------------------------------------------------------------------------- 8: hints


class _Unknown:
    """A class torch's weights-only unpickler does not allow."""


@pytest.mark.parametrize("kind, words", [
    ("garbage", ": not a "),  # a damaged checkpoint, or not a plain state_dict
    ("object", "it holds a tests.test_cli_hostile._Unknown object"),
])
def test_bad_weights_never_suggest_loading_them_with_weights_only_false(tmp_path, capsys,
                                                                        kind, words):
    import torch

    path = tmp_path / "teacher.pt"
    if kind == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    else:
        torch.save({"w": torch.zeros(1), "x": _Unknown()}, path)
    code = main(["status", "demo", "--set", f"output={tmp_path / 'out'}",
                 "--set", f"teachers.0.weights={path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2, err  # "config: ..." and one error line
    assert err[1].startswith(f"error: {path}: cannot load weights for model 'convnet'"), err
    assert words in err[1]
    for advice in ("weights_only", "Re-running", "add_safe_globals", "trust"):
        assert advice not in err[1].removeprefix(f"error: {path}"), err


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only: skipped where mounting is not allowed); ``ro()`` remounts
    it read-only, ``fill()`` writes until it is full. Unmounted afterwards."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def ro():
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)

    def fill():
        fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)

    try:
        yield types.SimpleNamespace(path=where, ro=ro, fill=fill)
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_read_only_local_output_says_so_not_aws_credentials(small_disk, capsys):
    small_disk.ro()
    out = small_disk.path / "out"
    assert main(["run", "demo", "--set", f"output={out}", "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: output: {out} is not writable: it is on a read-only file system; " \
                  f"choose a writable location"
    assert "AWS" not in err and "credentials" not in err


def test_a_full_local_output_says_so_at_preflight(small_disk, capsys):
    small_disk.fill()
    out = small_disk.path / "out"
    assert main(["run", "demo", "--set", f"output={out}", "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: output: {out} is not writable: no space left on the device")
    assert "AWS" not in err


def test_a_disk_that_fills_during_a_run_names_the_file(small_disk):
    """A write that runs out of space mid-run: the error names the file (ENOSPC alone does
    not), leaves no temporary file, and the CLI says where to free space."""
    import io

    from fadrm.cli import report_error

    small_disk.fill()
    target = small_disk.path / "recover" / "unit-0.arrow"
    with pytest.raises(OSError) as info:
        storage.write_bytes_atomic(str(target), b"x" * 10000)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert not [p for p in small_disk.path.rglob("*") if p.name.endswith(".tmp")]
    text = io.StringIO()
    assert report_error(info.value, file=text) == 3
    first, second = text.getvalue().strip().splitlines()
    assert first == f"error: run failed: No space left on device: {target}"
    assert "free some space there; finished units are kept" in second


def test_an_imagefolder_root_holding_idx_files_suggests_kind_idx(tmp_path, capsys):
    from tests.conftest import FASHION_MNIST

    code = main(["status", "demo", "--set", f"output={tmp_path / 'out'}",
                 "--set", "data.kind=imagefolder", "--set", f"data.root={FASHION_MNIST}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith(f"error: data: ImageFolder root {FASHION_MNIST} has "
                                        f"no class sub-folders"), err
    assert err.endswith("-idx3-ubyte.gz, ...): set data.kind: idx"), err


def test_a_class_short_of_images_names_its_folder_not_a_pattern(tmp_path, capsys):
    from PIL import Image

    for cls, count in [("ant", 4), ("bee", 2)]:
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "data" / cls / f"{i}.png")
    code = main(["status", "demo", "--set", f"output={tmp_path / 'out'}",
                 "--set", "data.kind=imagefolder", "--set", f"data.root={tmp_path / 'data'}",
                 "--set", "data.val_per_class=0", "--set", "recover.method=random-real",
                 "--set", "ipc=3"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    assert err.startswith(f"error: data: class 'bee' ({tmp_path / 'data' / 'bee'}) has 2 "
                          f"training images"), err
    assert "<class>" not in err
