"""The command line as a user meets it (issue 17): names vs paths, presets, the demo with
any method, runs that keep their results, status against the config given, config hints,
progress output, and the small things (sidecar names, epoch numbering, benchmark outputs).

One micro run (random-real, a given teacher, 2 relabel epochs) and one ``--set`` variant
of it are shared by the tests of this module; everything else is cheap.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from fadrm.cli import main
from fadrm.config import load_config, preset_path
from tests.conftest import FASHION_MNIST, tiny_run_config


def micro_config(root: Path) -> Path:
    """A run of a few seconds: random-real images, a given (random) teacher, 2 epochs."""
    from fadrm.models import create_model, save_weights

    torch.manual_seed(0)
    save_weights(create_model("convnet", 10, in_chans=1, image_size=28), root / "teacher.pt")
    cfg = tiny_run_config(root / "out", FASHION_MNIST,
                          teachers=[{"model": "convnet", "weights": str(root / "teacher.pt")}])
    cfg["data"].update(max_train_per_class=20, max_val=100)
    cfg["recover"]["method"] = "random-real"
    cfg["relabel"].update(epochs=2, epochs_per_shard=1)
    cfg["student"].update(eval_every=0)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def two_variants(tmp_path_factory):
    """``run.yaml`` (student.lr 0.001), then its variant ``--set student.lr=0.003``."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST missing: run `make data`")
    root = tmp_path_factory.mktemp("cli")
    path = micro_config(root)
    base = ["run", str(path), "--executor", "local", "--no-progress"]
    assert main(base) == 0
    assert main([*base, "--set", "student.lr=0.003"]) == 0
    a = load_config(path)
    b = load_config(path, ["student.lr=0.003"])
    return path, a, b


def _dir(cfg) -> Path:
    """``<output>/runs/<name>/<config fingerprint>``: this config's own report."""
    from fadrm.plan import config_fingerprint

    return Path(cfg.output) / "runs" / cfg.name / config_fingerprint(cfg)


# --------------------------------------------------------------------------- 2: names, paths


def test_a_preset_name_beside_a_folder_of_that_name_is_the_preset(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # what `fadrm demo --output demo` leaves behind
    code = main(["status", "demo", "--set", f"output={tmp_path / 'out'}"])
    out, err = capsys.readouterr()
    assert code == 1, err  # never run: work to do (not IsADirectoryError, not exit 2)
    assert "config: preset demo; not the folder ./demo" in err
    assert "Traceback" not in err and "evaluate" in out


@pytest.mark.parametrize("given, words", [
    ("./demo", "'./demo' is a folder, not a config file"),
    ("folder", "'folder' is a folder, not a config file"),
    ("demoo", "not found (did you mean the preset 'demo'?"),
    ("missing.yaml", "config file 'missing.yaml' not found"),
])
def test_paths_are_files_and_errors_are_one_line(tmp_path, monkeypatch, capsys, given, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "folder").mkdir()
    assert main(["status", given]) == 2
    err = capsys.readouterr().err
    assert words in err and err.startswith("error: ") and "Traceback" not in err


def test_a_file_is_said_to_be_used(two_variants, capsys):
    path, _, _ = two_variants
    assert main(["status", str(path)]) == 0
    assert f"config: file {path}" in capsys.readouterr().err


# --------------------------------------------------------------------------- 3: presets


def test_presets_list_purposes_and_show_prints_the_yaml(tmp_path, capsys):
    assert main(["presets"]) == 0
    out, err = capsys.readouterr()
    line = next(x for x in out.splitlines() if x.startswith("demo "))
    assert "Fashion-MNIST" in line  # the preset's purpose beside its name
    assert "cifar100-fadrm " in out and "fadrm presets show NAME" in err
    assert main(["presets", "show", "demo"]) == 0
    shown = capsys.readouterr().out
    assert shown == preset_path("demo").read_text() and shown.startswith("# ")
    (tmp_path / "my.yaml").write_text(shown)  # `fadrm presets show demo > my.yaml`
    assert load_config(tmp_path / "my.yaml") == load_config("demo")
    assert main(["presets", "show", "dmeo"]) == 2
    assert "did you mean 'demo'" in capsys.readouterr().err


def test_readme_fadrm_commands_parse():
    """Every `fadrm ...` command in the shell blocks of README.md and docs/ is one the CLI
    accepts."""
    import re
    import shlex

    from fadrm.cli import build_parser

    repo = Path(__file__).resolve().parents[1]
    seen = 0
    for page in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split(" >")[0], comments=True)
                if words and words[0].endswith("fadrm") and words[0] != "make":
                    try:
                        build_parser().parse_args(words[1:])
                    except SystemExit as exc:
                        pytest.fail(f"{page.name}: `{line.strip()}` is rejected (exit {exc.code})")
                    seen += 1
    assert seen >= 13  # README: 7, docs/CLI.md: 6


def test_demo_preset_cites_a_readme_section_that_exists():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert '"What the demo runs"' in preset_path("demo").read_text()
    assert "### What the demo runs" in readme


# --------------------------------------------------------------------------- 4: the demo


def test_demo_with_another_method_names_each_report(monkeypatch, tmp_path, capsys):
    import fadrm.runner

    ran = []

    def fake_run(cfg, executor, show_progress=True):
        ran.append(cfg)
        return {"method": cfg.recover.method, "ipc": cfg.ipc, "num_images": 100,
                "num_classes": 10, "teacher_top1": 89.0, "student_top1": 80.0 + len(ran),
                "student_top1_best": 82.0, "student_top5": 99.0, "best_epoch": 2,
                "epochs": cfg.relabel.epochs, "val_images": 10000,
                "stage_seconds": {"select": 1.0}, "cached_stages": [],
                **({"scores": {"weight": 0.5, "lrs": 21.5, "ior": 1.0, "hlr": 19.0,
                               "real_hard_top1": 89.0, "syn_hard_top1": 70.0,
                               "random_real_top1": 79.0}}
                   if cfg.evaluate.scores else {})}

    monkeypatch.setattr(fadrm.runner, "run_config", fake_run)
    code = main(["demo", "--output", str(tmp_path), "--set", "recover.method=rded",
                 "--executor", "local"])
    out = capsys.readouterr().out
    assert code == 0  # not KeyError: 'fadrm'
    assert [(c.name, c.recover.method) for c in ran] == [("demo-random-real", "random-real"),
                                                         ("demo-rded", "rded")]
    assert "RDED + soft labels" in out and "FADRM" not in out
    # The margin the user came for, computed from the two runs (81 and 82 %).
    assert re.search(r"RDED over random-real +\+1\.00 points \(seed 0;", out), out
    assert f"{tmp_path}/runs/demo-rded/" in out and f"{tmp_path}/runs/demo-fadrm" not in out
    ran.clear()
    assert main(["demo", "--output", str(tmp_path), "--executor", "local"]) == 0
    assert [c.name for c in ran] == ["demo-random-real", "demo-fadrm"]
    # The method's run asks for the label-robust scores (the baseline needs none) and the
    # demo prints them beside top-1.
    assert [c.evaluate.scores for c in ran] == [False, True]
    out = capsys.readouterr().out
    assert "FADRM + soft labels" in out
    assert "LRS 21.50 %  (IOR +1.00, HLR 19.00: hard labels reach 89.00 %" in out, out


# --------------------------------------------------------------------------- 5: results kept


def test_each_config_keeps_its_report_and_latest_is_the_newest(two_variants):
    _, a, b = two_variants
    assert _dir(a) != _dir(b) and _dir(a).parent == _dir(b).parent
    for cfg, lr in ((a, 0.001), (b, 0.003)):
        written = yaml.safe_load((_dir(cfg) / "config.yaml").read_text())
        assert written["student"]["lr"] == lr  # the first variant's report was not replaced
        metrics = json.loads((_dir(cfg) / "metrics.json").read_text())
        assert metrics["config_fingerprint"] == _dir(cfg).name
    latest = _dir(a).parent / "latest"
    assert latest.is_symlink() and latest.resolve() == _dir(b).resolve()


def test_cached_stages_keep_their_original_time(two_variants, capsys):
    from fadrm.runner import print_summary

    _, a, b = two_variants
    first = json.loads((_dir(a) / "metrics.json").read_text())
    second = json.loads((_dir(b) / "metrics.json").read_text())
    assert first["cached_stages"] == []
    assert second["cached_stages"] == ["select", "relabel"]
    for stage in ("select", "relabel"):
        assert second["stage_seconds"][stage] == first["stage_seconds"][stage] > 0
    assert second["stage_seconds"]["evaluate"] > 0
    print_summary(b, second)
    out = capsys.readouterr().out
    seconds = second["stage_seconds"]
    assert (f"select {seconds['select']:.1f}s (cached), relabel {seconds['relabel']:.1f}s "
            f"(cached), evaluate " in out)


def test_status_diffs_against_the_config_given(two_variants, capsys):
    path, a, _ = two_variants
    # The first config is complete, though another variant ran after it: it says so, and
    # where its own report is.
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"up to date; report {_dir(a)}/" in out
    # A config never run is compared with the newest report, and says so.
    assert main(["status", str(path), "--set", "student.lr=0.005"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("evaluate"))
    assert "stale" in line and "the latest run (another config" in line
    assert "student.lr 0.005 here, 0.003 there" in line
    assert "no report of this config yet" in out


def test_status_after_a_teacher_change_names_only_what_changed_for_this_config(two_variants,
                                                                               capsys):
    from fadrm.models import create_model, save_weights

    path, a, _ = two_variants
    weights = Path(a.teachers[0].weights)
    original = weights.read_bytes()
    try:
        torch.manual_seed(5)
        save_weights(create_model("convnet", 10, in_chans=1, image_size=28), weights)
        assert main(["status", str(path)]) == 1
        out = capsys.readouterr().out
    finally:
        weights.write_bytes(original)
    line = next(x for x in out.splitlines() if x.startswith("evaluate"))
    # Against this config's own report: the teacher, not the other variant's student.lr.
    assert "stale" in line and "this config's last run" in line and "teachers" in line
    assert "student.lr" not in out


def test_rerunning_an_earlier_variant_does_nothing_and_makes_it_latest(two_variants):
    path, a, b = two_variants
    manifest = _dir(a) / "manifest.json"
    before = manifest.stat().st_mtime_ns
    try:
        assert main(["run", str(path), "--executor", "local", "--no-progress"]) == 0
        assert manifest.stat().st_mtime_ns == before  # up to date: not rewritten
        assert (_dir(a).parent / "latest").resolve() == _dir(a).resolve()
    finally:  # the other tests expect the second variant to be the newest
        assert main(["run", str(path), "--executor", "local", "--no-progress", "--set",
                     "student.lr=0.003"]) == 0
    assert (_dir(a).parent / "latest").resolve() == _dir(b).resolve()


# --------------------------------------------------------------------------- 8: config hints


def _error_line(err: str) -> str:
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]  # exactly one
    assert "Traceback" not in err
    return line


def test_student_epochs_points_at_relabel_epochs(two_variants, capsys):
    path, _, _ = two_variants
    assert main(["status", str(path), "--set", "student.epochs=10"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: student.epochs: unknown key: the student trains for "
                          "relabel.epochs epochs")
    assert "set relabel.epochs" in err


def test_bracket_list_index_in_overrides(two_variants, capsys):
    path, a, _ = two_variants
    cfg = load_config(path, ["teachers[0].ensemble_weight=1.5"])
    assert cfg.teachers[0].ensemble_weight == 1.5
    assert load_config(path, ["teachers.0.ensemble_weight=1.5"]) == cfg
    assert main(["status", str(path), "--set", "teachers[0].model=resnet"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: teachers[0].model:")  # not "teachers[0]: unknown key"
    assert main(["status", str(path), "--set", "teachers[3].model=convnet"]) == 2
    err = capsys.readouterr().err
    assert "teachers[3]: list index out of range: the list has 1 item(s)" in err


# --------------------------------------------------------------------------- 9: small things


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_without_a_tty():
    from fadrm.progress import StageProgress

    clock, log = _Clock(), io.StringIO()
    progress = StageProgress("recover", 10, file=log, clock=clock)
    clock.now = 100.0  # a long start-up (workers, data) before the first report
    progress.update(0.01)
    for step in range(1, 401):  # 400 reports over 400 s, 2.5 % of a unit each
        clock.now = 100.0 + step
        progress.update(0.01 + step * 0.025 * 0.999)
    progress.update(10)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert 20 <= len(lines) <= 22  # one line per 5 %, not one per report
    assert lines[0].startswith("recover:   0% (0/10 units, 1:40 elapsed)")  # no ETA yet
    assert "." not in lines[3].split("(")[1].split(" units")[0]  # whole units only
    assert lines[-1].startswith("recover: 100% (10/10 units")
    # A quarter of the way, ~300 s of the 400 s are left (the start-up is not counted).
    quarter = next(x for x in lines if x.startswith("recover:  25%"))
    assert "~5:0" in quarter or "~4:5" in quarter, quarter


def test_progress_bar_on_a_tty_draws_after_start_up_output():
    from fadrm.progress import StageProgress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock, term = _Clock(), Tty()
    progress = StageProgress("squeeze[0]", 3, file=term, clock=clock)
    print("WARNING: Token authentication is enabled for this Ray cluster.", file=term)
    clock.now = 5.0
    progress.update(0.3)
    clock.now = 6.0
    progress.update(1.4)
    progress.close()
    text = term.getvalue()
    assert text.startswith("WARNING: Token authentication")  # before the bar, not inside it
    assert "0.3/" not in text and "1.4/" not in text
    assert "1/3 units" in text and "1:45:09" not in text


def test_log_lines_during_a_bar_get_their_own_line(monkeypatch):
    import logging

    from fadrm.progress import StageProgress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    term = Tty()
    monkeypatch.setattr("sys.stderr", term)
    handler = logging.StreamHandler(term)
    logging.root.addHandler(handler)
    try:
        progress = StageProgress("relabel", 4, file=term)
        progress.update(1.5)
        logging.getLogger("ray_jobs.executor").warning("relabel: workers started after 8 s")
        progress.update(2)
        progress.close()
    finally:
        logging.root.removeHandler(handler)
    import re

    # On its own line: after a "\r" that cleared the bar, and ended by "\n" (the bar is
    # redrawn below it), not glued to the end of the bar's text.
    assert re.search(r"\r *\rrelabel: workers started after 8 s\n", term.getvalue())
    assert logging.root.handlers.count(handler) == 0  # the redirect is undone on close


def test_json_outputs_have_readable_sidecars(two_variants, tmp_path):
    from fadrm.plan import RunPlan
    from fadrm.formats import shards

    _, a, _ = two_variants
    evaluate = Path(RunPlan(a).evaluate.dir)
    names = sorted(p.name for p in evaluate.iterdir())
    assert "metrics.sha256.json" in names and "metrics.json.json" not in names
    # Outputs of earlier builds (metrics.json.json) still count as complete.
    uri = str(tmp_path / "metrics.json")
    shards.write_artifact(uri, b"{}")
    os.replace(tmp_path / "metrics.sha256.json", tmp_path / "metrics.json.json")
    assert shards.is_complete(uri) and shards.shard_info(uri)["bytes"] == 2
    shards.discard(uri)
    assert not shards.is_complete(uri) and not (tmp_path / "metrics.json.json").exists()


def test_best_epoch_is_said_counting_from_one(two_variants, capsys):
    from fadrm.runner import print_summary

    _, a, _ = two_variants
    metrics = json.loads((_dir(a) / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and metrics["epochs"] == 2  # stored from 0
    print_summary(a, metrics)
    assert "after epoch 2 of 2;" in capsys.readouterr().out


def test_hardware_limit_quick_does_not_touch_committed_results(monkeypatch, tmp_path):
    import fadrm.synthesis
    from benchmarks import common, hardware_limit

    written = []
    monkeypatch.setattr(hardware_limit, "matmul_peak", lambda *a: (1e9, {1024: 1e9}))
    monkeypatch.setattr(hardware_limit, "teacher_flops", lambda *a: 10**9)
    monkeypatch.setattr(fadrm.synthesis, "recover", lambda *a, **k: None)
    monkeypatch.setattr(common, "write_json",
                        lambda name, data, results=common.RESULTS: written.append(results)
                        or results / f"{name}.json")
    monkeypatch.setattr(common, "write_markdown",
                        lambda name, title, sections, results=common.RESULTS:
                        written.append(results))
    hardware_limit.main(["--quick", "--threads", "1"])
    assert written and set(written) == {common.QUICK_RESULTS} != {common.RESULTS}
    assert common.QUICK_RESULTS.relative_to(common.WORK)  # benchmarks/work/: not tracked
    written.clear()
    hardware_limit.main(["--quick", "--threads", "1", "--results", str(tmp_path)])
    assert set(written) == {tmp_path}
