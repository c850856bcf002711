"""Issue 27, item 9: what a run did without saying so. ``execution.use_gpu: true`` with the
local executor and no GPU is refused (not run on the CPU); a teacher no better than chance
and skipped unreadable inputs are warnings (logged, in metrics.json, in the summary); an
unreadable image is said once; the execution options that change no result keep the
config's report folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from fadrm.cli import main
from fadrm.config import ExecutionConfig, config_from_dict, load_config
from fadrm.errors import EXIT_BAD_INPUT, EXIT_OK, InputError
from fadrm.executors import local_device
from fadrm.plan import RUN_ONLY_OPTIONS, config_fingerprint, report_dir
from tests.conftest import tiny_run_config

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- use_gpu


def test_use_gpu_without_a_gpu_is_bad_input_before_any_work(tmp_path, fmnist_root,
                                                            monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = tiny_run_config(tmp_path / "out", fmnist_root)
    settings["execution"].update(device="auto", use_gpu=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    assert main(["run", str(path), "--executor", "local", "--no-progress"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: execution.use_gpu: is true but this machine has no "
                              "CUDA GPU (local executor)"), err
    assert len(err) == 2  # the config line and one line of error
    assert not (tmp_path / "out" / "squeeze").exists()  # nothing ran


@pytest.mark.parametrize("use_gpu, device, cuda, want", [
    (None, "auto", False, "auto"), (None, "cpu", True, "cpu"),
    (False, "auto", True, "cpu"), (True, "auto", True, "cuda"), (True, "cuda", True, "cuda"),
    (True, "auto", False, "execution.use_gpu: is true but this machine has no CUDA GPU"),
    (True, "cpu", True, "execution.use_gpu: is true but execution.device is 'cpu'"),
    (False, "cuda", True, "execution.use_gpu: is false but execution.device is 'cuda'"),
])
def test_the_local_executor_device_follows_use_gpu(monkeypatch, use_gpu, device, cuda, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    exe = ExecutionConfig(use_gpu=use_gpu, device=device)
    if want.startswith("execution."):
        with pytest.raises(InputError, match=want.replace("(", r"\(")):
            local_device(exe)
    else:
        assert local_device(exe) == want


# --------------------------------------------------------------------------- fingerprint


@pytest.mark.parametrize("option, value", [
    ("verify_outputs", True), ("max_failures", 0), ("resource_wait_s", 60.0),
    ("worker_start_timeout_s", 30.0), ("worker_group", "per_stage"),
    ("address", "ray://head:10001"),
])
def test_run_only_options_keep_the_report_folder(tmp_path, fmnist_root, option, value):
    assert option in RUN_ONLY_OPTIONS
    base = tiny_run_config(tmp_path, fmnist_root)
    cfg = config_from_dict(base)
    other = config_from_dict({**base, "execution": {**base["execution"], option: value}})
    assert getattr(other.execution, option) == value
    assert report_dir(other) == report_dir(cfg)


@pytest.mark.parametrize("option, value", [
    ("threads_per_worker", 2), ("train_workers", 2), ("device", "cuda"), ("use_gpu", True),
])
def test_options_that_change_results_still_change_the_fingerprint(tmp_path, fmnist_root,
                                                                  option, value):
    base = tiny_run_config(tmp_path, fmnist_root)
    other = config_from_dict({**base, "execution": {**base["execution"], option: value}})
    assert config_fingerprint(other) != config_fingerprint(config_from_dict(base))


# The report folders of the shipped configs (pinned: a change that moves one fails here).
# The demo's output, ``runs/demo``, is made absolute against the working directory, so its
# folder is pinned for a fixed output; the others write to s3.
SHIPPED_FINGERPRINTS = [
    ("demo", ["output=/runs/demo"], "4bc71a8c3dc8"),
    ("imagenet1k-fadrm", [], "b9389c277143"),
    ("cifar100-fadrm-plus", [], "c66329d49f67"),
    (str(REPO / "k8s/base/run.yaml"), [], "22d1050991a7"),
]


@pytest.mark.parametrize("source, overrides, fingerprint", SHIPPED_FINGERPRINTS)
def test_shipped_configs_keep_their_fingerprints(source, overrides, fingerprint):
    assert config_fingerprint(load_config(source, overrides)) == fingerprint


# --------------------------------------------------------------------------- warnings


def _folder_run(tmp: Path) -> Path:
    """A 3-class ImageFolder (one unreadable training image; a validation set in which
    class ``a`` is 1 of 7 images) with three teachers: two trained here, one given weights
    that always answer ``a`` (14 % top-1: below the 33 % of chance)."""
    from fadrm.models import create_model

    for split, counts in (("train", (8, 8, 8)), ("val", (1, 3, 3))):
        for c, (name, n) in enumerate(zip("abc", counts)):
            folder = tmp / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (c * 100, i * 20, 50)).save(folder / f"{i}.png")
    (tmp / "data" / "train" / "b" / "bad.png").write_bytes(b"not a png at all")
    model = create_model("convnet", 3, in_chans=3, image_size=16, small_stem=True)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    torch.save(model.state_dict(), tmp / "always-a.pt")
    settings = {
        "name": "folder", "output": str(tmp / "out"), "ipc": 1,
        "data": {"kind": "imagefolder", "root": str(tmp / "data" / "train"),
                 "val_root": str(tmp / "data" / "val"), "resolution": 16, "channels": 3,
                 "mean": [0.5] * 3, "std": [0.5] * 3},
        # Two teachers trained here (each lists the unreadable file) and the given one.
        "teachers": [{"model": "convnet"}, {"model": "convnet"},
                     {"model": "convnet", "weights": str(tmp / "always-a.pt")}],
        "squeeze": {"epochs": 1, "batch_size": 8, "lr": 0.05},
        "select": {"num_candidates": 2, "num_crops": 1},
        "recover": {"method": "fadrm", "resolutions": [16], "stage_iterations": [2],
                    "lr": 0.05},
        "relabel": {"epochs": 2, "batch_size": 3, "epochs_per_shard": 2},
        "student": {"model": "convnet", "accumulation_steps": 1, "eval_every": 1},
        "execution": {"device": "cpu"},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_a_teacher_below_chance_and_skipped_inputs_are_warnings(tmp_path, capsys, caplog):
    path = _folder_run(tmp_path)
    bad = str(tmp_path / "data" / "train" / "b" / "bad.png")
    with caplog.at_level(logging.WARNING):
        assert main(["run", str(path), "--executor", "local", "--no-progress"]) == EXIT_OK
    # Squeeze and select both decode the training set: the bad file is said once.
    said = [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("skipping unreadable image")]
    assert len(said) == 1 and bad in said[0], said
    teacher = ("teachers[2] (convnet): validation top-1 14.29 % is not above chance "
               "(33.33 % for 3 classes)")
    skipped = (f"1 unreadable input(s) skipped (1 under data.root "
               f"{tmp_path / 'data' / 'train'})")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert teacher in logged and skipped in logged
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("  warning ")]
    assert len(warnings) == 2 and teacher in warnings[0] and skipped in warnings[1], out
    metrics = json.loads((tmp_path / "out/runs/folder/latest/metrics.json").read_text())
    assert metrics["num_skipped_inputs"] == 1
    assert [teacher in metrics["warnings"][0], skipped in metrics["warnings"][1]] == [True] * 2
    # Teachers 0 and 1 learned (above chance): no warning names them.
    assert not any("teachers[0]" in w or "teachers[1]" in w for w in metrics["warnings"])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_streamed_split_records_an_unreadable_file_once(tmp_path, workers):
    from fadrm.datasource import DataSource

    _folder_run(tmp_path)
    cfg = load_config(tmp_path / "run.yaml")
    stream = DataSource(cfg.data).stream("train")
    bad = str(tmp_path / "data" / "train" / "b" / "bad.png")
    batches = [list(range(0, len(stream), 2)), list(range(1, len(stream), 2))]
    # The loader's worker processes (forked) log: a file handler hears them too.
    said = tmp_path / "said.log"
    handler = logging.FileHandler(said)
    logger = logging.getLogger("fadrm.data")
    logger.addHandler(handler)
    try:
        for _ in range(3):  # three epochs, each with fresh loader workers
            seen = sum(len(labels) for _, labels in stream.batches(batches, workers=workers))
            assert seen == len(stream) - 1
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert stream.skipped == [{"path": bad, "error": stream.skipped[0]["error"]}]
    lines = [line for line in said.read_text().splitlines() if bad in line]
    assert len(lines) == 1 and lines[0].startswith("skipping unreadable image"), lines


# --------------------------------------------------------------------------- stage_seconds

_KILL_IN_RECOVER = """
import os, signal, sys, time
from fadrm.stages import RecoverStage
real = RecoverStage.run_unit
calls = []
def timed(self, state, unit, ctx):
    if len(calls) == 2:  # two units finished: killed as a pod is, no handler runs
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.perf_counter()
    real(self, state, unit, ctx)
    calls.append(time.perf_counter() - start)
    with open(sys.argv[2], "a") as f:
        f.write(f"{calls[-1]}\\n")
RecoverStage.run_unit = timed
from fadrm.cli import main
sys.exit(main(["run", sys.argv[1], "--executor", "local", "--no-progress"]))
"""


def test_a_resumed_stage_counts_the_killed_runs_finished_units(tmp_path, fmnist_root):
    import signal
    import subprocess
    import sys

    from fadrm.executors import LocalExecutor
    from fadrm.plan import RunPlan
    from fadrm.runner import run_pipeline

    settings = tiny_run_config(tmp_path / "out", fmnist_root, ipc=4)
    settings["squeeze"]["epochs"] = 1
    settings["recover"]["stage_iterations"] = [20, 20, 20]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(settings))
    units = tmp_path / "units.txt"
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_RECOVER, str(path), str(units)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first_units = [float(x) for x in units.read_text().split()]
    cfg = load_config(path)
    recover = RunPlan(cfg).recover
    assert len(first_units) == 2 and len(recover.pending()) == 2
    killed = recover.recorded_seconds()  # kept as each unit finished, never closed
    # Seconds are stored to 0.01 s: the recorded time holds both units, to that precision.
    assert killed is not None and killed >= sum(first_units) - 0.01

    metrics = run_pipeline(cfg, LocalExecutor("cpu"), show_progress=False)
    timing = json.loads(Path(recover.timing_uri).read_text())
    resumed = timing["seconds"]  # this run's part: the killed run never ended its own
    assert 0 < resumed and timing["last_units"] == 2
    assert metrics["stage_seconds"]["recover"] == pytest.approx(killed + resumed, abs=0.011)
