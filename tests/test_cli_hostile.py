"""What a hostile walk through the CLI found (issue 27): bad input exits 2 in one line,
outputs honour the umask, error hints that do not mislead, SIGTERM as a clean stop, a CLI
that answers without importing torch or Ray, the k8s README's offline dry run."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

from fadrm import storage
from fadrm.cli import main

REPO = Path(__file__).resolve().parents[1]

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


# --------------------------------------------------------------------------- 10: SIGTERM

TERMINATED = "terminated (SIGTERM): finished units are kept; run the same command again to resume"


def _sigterm_config(root: Path, **execution) -> Path:
    """Recover in 4 units of a second or more each (a given teacher: no squeeze)."""
    from fadrm.models import create_model, save_weights
    from tests.conftest import FASHION_MNIST, tiny_run_config

    torch.manual_seed(0)
    save_weights(create_model("convnet", 10, in_chans=1, image_size=28), root / "teacher.pt")
    cfg = tiny_run_config(root / "out", FASHION_MNIST, ipc=4,
                          teachers=[{"model": "convnet", "weights": str(root / "teacher.pt")}])
    cfg["data"].update(max_train_per_class=20, max_val=100)
    cfg["recover"]["stage_iterations"] = [40, 40, 40]
    cfg["relabel"].update(epochs=2, epochs_per_shard=1)
    cfg["student"].update(eval_every=0)
    cfg["execution"].update(execution)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _finished_recover_units(out: Path) -> dict[str, int]:
    """Each complete recover shard (its checksum sidecar written) -> its mtime_ns."""
    return {p.name: p.stat().st_mtime_ns for p in out.glob("**/recover/**/images-*.arrow")
            if Path(f"{p}.json").exists()}


def _terminate_once_a_unit_is_done(argv: list[str], out: Path, limit: float = 600):
    """Start ``fadrm`` ``argv``; SIGTERM it as soon as a recover unit is complete. Returns
    (exit code, stderr, the units complete when the signal was sent)."""
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fadrm.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + limit
    done: dict[str, int] = {}
    try:
        while not done:
            try:
                proc.wait(timeout=0.05)  # the pause between looks; ends early if it exits
                pytest.fail(f"the run ended before a unit was done:\n{proc.stderr.read()}")
            except subprocess.TimeoutExpired:
                pass
            assert time.monotonic() < deadline, "no recover unit finished in time"
            done = _finished_recover_units(out)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, done


def test_sigterm_mid_stage_stops_like_ctrl_c_and_the_rerun_resumes(tmp_path):
    path = _sigterm_config(tmp_path)
    argv = ["run", str(path), "--executor", "local", "--no-progress"]
    code, err, done = _terminate_once_a_unit_is_done(argv, tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 143, err
    assert lines[-1] == TERMINATED and "Traceback" not in err, err
    kept = _finished_recover_units(tmp_path / "out")
    assert len(kept) < 4, "every unit finished before the signal: nothing was stopped"
    assert not list((tmp_path / "out").glob("**/.*.tmp")), "a partial file was left"
    # The re-run resumes: the units finished before the signal are not written again.
    assert main(argv) == 0
    after = _finished_recover_units(tmp_path / "out")
    assert len(after) == 4 and all(after[name] == kept[name] for name in kept)
    assert set(done) <= set(kept)


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (from /proc), e.g. an embedded Ray's raylet and workers."""
    from ray_jobs.teardown import descendants

    return descendants({pid})


def _alive(pid: int) -> bool:
    from ray_jobs.teardown import _process_table_entry

    return _process_table_entry(pid) is not None  # None: gone, or a zombie


@pytest.mark.slow
def test_sigterm_mid_stage_on_the_ray_executor_stops_workers_and_resumes(tmp_path):
    """The same through Ray Train on an embedded instance: exit 143 in one line (not Ray's
    exit 15), the instance's processes (raylet, workers) gone, and the re-run resumes."""
    path = _sigterm_config(tmp_path, min_workers=1, max_workers=1)
    argv = ["run", str(path), "--executor", "ray", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # embedded Ray
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fadrm.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    done: dict[str, int] = {}
    ray_processes: set[int] = set()
    try:
        while not done:
            try:
                proc.wait(timeout=0.2)
                pytest.fail(f"the run ended before a unit was done:\n{proc.stderr.read()}")
            except subprocess.TimeoutExpired:
                pass
            assert time.monotonic() < deadline, "no recover unit finished in time"
            done = _finished_recover_units(tmp_path / "out")
        ray_processes = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ray_processes, "no Ray processes were seen under the run"
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == TERMINATED, err
    assert "SIGTERM received" not in err and "Traceback" not in err, err
    left = {p for p in ray_processes if _alive(p)}
    assert not left, f"processes of the run's Ray instance still running: {sorted(left)}"
    kept = _finished_recover_units(tmp_path / "out")
    assert 1 <= len(kept) < 4
    rerun = subprocess.run([sys.executable, "-m", "fadrm.cli", *argv], env=env,
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    after = _finished_recover_units(tmp_path / "out")
    assert len(after) == 4 and all(after[name] == kept[name] for name in kept)


# --------------------------------------------------------------------------- 11: answering fast

HEAVY = ("torch", "ray", "ray_jobs", "pyarrow", "numpy", "PIL", "matplotlib", "torchvision")


def test_help_and_presets_import_no_heavy_module():
    """`fadrm --help` and `fadrm presets` answer without loading torch, Ray or pyarrow
    (seconds of imports on a small machine; benchmarks/cli_latency.py has the times)."""
    code = ("import contextlib, io, sys\n"
            "import fadrm.cli\n"
            "fadrm.cli.build_parser()\n"
            "with contextlib.redirect_stdout(io.StringIO()), "
            "contextlib.redirect_stderr(io.StringIO()):\n"
            "    assert fadrm.cli.main(['presets']) == 0\n"
            "    assert fadrm.cli.main(['presets', 'show', 'demo']) == 0\n"
            "print(sorted({m.split('.')[0] for m in sys.modules}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(eval(proc.stdout.strip().splitlines()[-1]))  # noqa: S307 - our own list
    assert "fadrm" in loaded and not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_cli_names_the_same_executors_as_the_runner():
    from fadrm import cli, runner

    assert cli.EXECUTORS == runner.EXECUTORS


# --------------------------------------------------------------------------- 4: README dry run


def _readme_dry_run_line() -> list[str]:
    """The k8s README's offline dry run, as written (continuation lines joined)."""
    import re
    import shlex

    text = (REPO / "k8s" / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        command = block.replace("\\\n", " ")
        for line in command.splitlines():
            if line.startswith("fadrm watch") and "--dry-run" in line:
                return shlex.split(line)
    raise AssertionError("k8s/README.md has no `fadrm watch ... --dry-run` line")


def test_the_k8s_readme_dry_run_works_offline_as_written(tmp_path):
    argv = _readme_dry_run_line()
    assert argv[:3] == ["fadrm", "watch", "k8s/base/run.yaml"] and "--dry-run" in argv
    assert (REPO / "k8s/base/run.yaml").read_text().count("s3://") >= 2  # remote storage
    # Offline: no kube-config, no cluster, and S3 refuses connections (port 9 on loopback).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KUBE", "AWS_"))}
    env.update(HOME=str(tmp_path), KUBECONFIG=str(tmp_path / "no-kube-config"),
               PYTHONPATH=str(REPO), AWS_ENDPOINT_URL_S3="http://127.0.0.1:9",
               AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([sys.executable, "-m", "fadrm.cli", *argv[1:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run: the storage is not reachable" in proc.stderr
    assert "dry run: the cluster is not reachable" in proc.stderr
    rendered = yaml.safe_load(proc.stdout.split("\nsubmit:")[0])
    assert rendered["kind"] == "RayJob"
    labels = rendered["metadata"]["labels"]
    assert labels["fadrm.io/run"] == "cifar100-ipc10" and labels["fadrm.io/teachers"] == "unknown"
    assert proc.stdout.strip().splitlines()[-1].startswith("submit: ")


def test_a_real_run_still_refuses_unreachable_storage(tmp_path, capsys):
    """Only a dry run goes on offline: `fadrm status` on the same config is bad input."""
    try:
        code = main(["status", str(REPO / "k8s/base/run.yaml"), "--set",
                     "storage.endpoint_url=http://127.0.0.1:9"])
    finally:
        storage.configure()  # the endpoint is process-wide: leave none for later tests
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: output: s3://fadrm-artifacts/runs is not "
                                        "reachable"), err
