"""`fadrm export` and `fadrm.DistilledDataset` (issue 25): the PNG tree round-trips to the
stored pixels through torchvision's ImageFolder, the soft labels to the stored rows, an
export is never overwritten, an unfinished run is refused, and a plain loop over the
Dataset reproduces the evaluate stage's student bit for bit.

Two micro runs share a given (random) teacher and the soft-label protocol: random-real
and RDED (select only), so RDED's card has a margin over random real.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from fadrm.formats import shards
from fadrm.cli import main
from fadrm.config import load_config
from fadrm.plan import RunPlan
from tests.conftest import FASHION_MNIST, tiny_run_config


def _config(root: Path, method: str) -> Path:
    cfg = tiny_run_config(root / "out", FASHION_MNIST,
                          teachers=[{"model": "convnet", "weights": str(root / "teacher.pt")}])
    cfg["name"] = f"tiny-{method}"
    cfg["data"].update(max_train_per_class=20, max_val=100)
    cfg["recover"]["method"] = method
    # 3 epochs in 2 shards, batches of 8 + 8 + 4 (a short last batch), top-4 logits, two
    # micro-batches per step: every path of the student's loop that the Dataset must match.
    cfg["relabel"].update(epochs=3, epochs_per_shard=2, batch_size=8, top_k=4)
    cfg["student"].update(eval_every=0, accumulation_steps=2)
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished random-real and RDED runs: {method: (config path, RunConfig)}."""
    from fadrm.models import create_model, save_weights

    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST missing: run `make data`")
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    save_weights(create_model("convnet", 10, in_chans=1, image_size=28), root / "teacher.pt")
    out = {}
    for method in ("random-real", "rded"):
        path = _config(root, method)
        assert main(["run", str(path), "--executor", "local", "--no-progress"]) == 0
        out[method] = (path, load_config(path))
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """The RDED run exported in both formats: {format: folder}."""
    path, _ = runs["rded"]
    root = tmp_path_factory.mktemp("dest")
    out = {}
    for fmt in ("imagefolder", "arrow"):
        dest = root / fmt
        assert main(["export", str(path), "--to", str(dest), "--format", fmt]) == 0
        out[fmt] = dest
    return out


def _distilled(cfg):
    from fadrm.datasource import load_distilled

    plan = RunPlan(cfg)
    images, labels = load_distilled(plan)
    return plan, images, labels


def test_imagefolder_round_trips_to_the_stored_pixels(runs, exported):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    _, cfg = runs["rded"]
    plan, images, labels = _distilled(cfg)
    folder = ImageFolder(str(exported["imagefolder"]), loader=_gray_loader)
    assert len(folder) == len(images) == 20
    # Fashion-MNIST's names do not sort in class order ('T-shirt/top' first): the folders
    # are prefixed so that ImageFolder's class k is the soft labels' logit k.
    assert folder.classes[0] == "0-T-shirt-top" and folder.classes[9] == "9-Ankle boot"
    seen = set()
    for path, target in folder.samples:
        image_id = int(Path(path).stem)
        seen.add(image_id)
        assert target == int(labels[image_id])
        assert torch.equal(pil_to_tensor(_gray_loader(path)), images[image_id])
    assert seen == set(range(20))
    marker = json.loads((exported["imagefolder"] / "export.json").read_text())
    assert [c["name"] for c in marker["classes"]] == plan.classes


def _gray_loader(path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        assert im.mode == "L"  # one channel, stored as such (lossless)
        return im.copy()


def test_class_folders_keep_sorted_names_and_make_slashes_safe():
    from fadrm.dataset import class_folders

    assert class_folders(["airplane", "automobile", "bird"]) == ["airplane", "automobile",
                                                                  "bird"]
    assert class_folders(["b/x", "a"]) == ["0-b-x", "1-a"]
    assert class_folders([str(i) for i in range(12)])[10] == "10-10"  # '10' < '2' as text


def test_soft_labels_parquet_holds_the_stored_rows_one_group_per_epoch(runs, exported):
    from fadrm.formats.labels import epoch_table

    plan = RunPlan(runs["rded"][1])
    parquet = pq.ParquetFile(exported["imagefolder"] / "soft_labels.parquet")
    assert parquet.num_row_groups == 3
    for epoch in range(3):
        unit = plan.relabel.unit_for_epoch(epoch)
        stored = epoch_table(shards.read_table(plan.relabel.unit_uri(unit)), epoch)
        got = parquet.read_row_group(epoch)
        assert got.column_names == stored.column_names
        assert got.schema.metadata[b"top_k"] == b"4"
        for name in stored.column_names:
            assert got.column(name).to_pylist() == stored.column(name).to_pylist(), name
    marker = json.loads((exported["imagefolder"] / "export.json").read_text())
    import hashlib

    data = (exported["imagefolder"] / "soft_labels.parquet").read_bytes()
    assert marker["files"]["soft_labels.parquet"] == {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_arrow_export_copies_the_shards_byte_for_byte(runs, exported):
    plan = RunPlan(runs["rded"][1])
    dest = exported["arrow"]
    for folder, stage in (("images", plan.images_stage), ("labels", plan.relabel)):
        for unit in stage.units():
            uri = stage.unit_uri(unit)
            assert (dest / folder / Path(uri).name).read_bytes() == Path(uri).read_bytes()
    card = (dest / "README.md").read_text()
    assert "IPC 2" in card and "`rded`" in card


def test_card_gives_teachers_results_and_margin_over_random_real(runs, exported):
    from fadrm.plan import report_dir

    card = (exported["imagefolder"] / "README.md").read_text()
    ours = json.loads((Path(report_dir(runs["rded"][1])) / "metrics.json").read_text())
    base = json.loads((Path(report_dir(runs["random-real"][1])) / "metrics.json").read_text())
    margin = ours["student_top1"] - base["student_top1"]
    assert f"**{ours['student_top1']:.2f} %**" in card
    assert f"{margin:+.2f} points over random real" in card
    teachers = json.loads((exported["imagefolder"] / "teachers.json").read_text())
    assert teachers["teachers"][0]["fingerprint"].startswith("sha256:")
    assert teachers["teachers"][0]["fingerprint"] in card
    assert "ImageFolder" in card and "DistilledDataset" in card
    assert yaml.safe_load((exported["imagefolder"] / "config.yaml").read_text())[
        "recover"]["method"] == "rded"


def test_same_export_again_is_a_no_op_and_a_different_one_is_refused(runs, exported,
                                                                     capsys, tmp_path):
    path, _ = runs["rded"]
    dest = exported["imagefolder"]
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    assert main(["export", str(path), "--to", str(dest)]) == 0
    assert "already holds this export" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before
    # Another run, or the same run in another format: refused, nothing touched.
    assert main(["export", str(runs["random-real"][0]), "--to", str(dest)]) == 2
    assert "holds another export ('tiny-rded'" in capsys.readouterr().err
    assert main(["export", str(path), "--to", str(dest), "--format", "arrow"]) == 2
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before
    # A folder with other things in it is not an export: refused too.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", str(path), "--to", str(tmp_path / "busy")]) == 2
    assert "is not a fadrm export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temporary left
    (tmp_path / "empty").mkdir()  # an empty folder (made for it) is fine
    assert main(["export", str(path), "--to", str(tmp_path / "empty"), "--format", "arrow"]) == 0
    assert (tmp_path / "empty" / "export.json").is_file()


def test_an_interrupted_export_leaves_nothing_and_s3_finishes_it(runs, tmp_path,
                                                                  monkeypatch, s3_endpoint):
    import boto3

    from fadrm import export as ex

    _, cfg = runs["rded"]

    def broken(self, stream):
        stream.write(b"PAR1 half")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ex._Files, "_soft_labels", broken)
        with pytest.raises(OSError, match="disk full"):
            ex.export_run(cfg, str(tmp_path / "dest"))
        assert list(tmp_path.iterdir()) == []  # no DEST, no temporary sibling
        with pytest.raises(OSError, match="disk full"):
            ex.export_run(cfg, "s3://fadrm-test/interrupted")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="fadrm-test",
                                                     Prefix="interrupted/")["Contents"]}
    assert "interrupted/export.json" not in keys and len(keys) > 20  # the PNGs were put
    from fadrm.dataset import read_marker

    assert read_marker("s3://fadrm-test/interrupted") is None  # incomplete: not an export
    assert ex.export_run(cfg, "s3://fadrm-test/interrupted").written  # the same run: finished
    assert read_marker("s3://fadrm-test/interrupted")["name"] == "tiny-rded"


def test_an_unfinished_run_is_refused_naming_what_is_missing(runs, capsys, tmp_path):
    path, _ = runs["rded"]
    code = main(["export", str(path), "--set", "student.lr=0.003", "--to",
                 str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot export an unfinished run" in err
    # As `fadrm status` says it: the stage, its state, its units and why.
    assert "evaluate stale (0/1 units; differs from" in err and "student.lr 0.003 here" in err
    assert "relabel" not in err.split("unfinished run:")[1].split(".")[0]
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- the Dataset


def _assert_loop_gives_the_student(cfg, source) -> None:
    """The docs/EXPORT.md loop over ``DistilledDataset(source)`` (with the stage's seed and
    model) gives the evaluate stage's student.pt, every tensor equal."""
    from fadrm import DistilledDataset
    from fadrm.models import create_model
    from fadrm.stages import unit_seed
    from fadrm.student import cosine_lr, kd_step, param_groups

    plan = RunPlan(cfg)
    stored = torch.load(Path(plan.evaluate.dir) / "student.pt", weights_only=True)

    data = DistilledDataset(source)
    seed = unit_seed(cfg.seed, "evaluate", "student")
    torch.manual_seed(seed)
    model = create_model(cfg.student.model, data.num_classes, in_chans=1, image_size=28,
                         small_stem=cfg.student.small_stem)
    loader = torch.utils.data.DataLoader(data, batch_size=data.batch_size)
    s = data.student
    opt = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr)
    for epoch in range(data.epochs):
        data.set_epoch(epoch)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(s.lr, epoch, data.epochs, s.eta)
        for x, targets in loader:
            kd_step(model, opt, x, targets, s, hard=data.hard_rows)
    model.to(memory_format=torch.contiguous_format)
    mine = model.state_dict()
    assert mine.keys() == stored.keys()
    for name, value in stored.items():
        assert torch.equal(mine[name], value), name


def test_a_plain_loop_over_the_dataset_reproduces_the_student_bit_for_bit(runs, exported):
    _, cfg = runs["rded"]
    _assert_loop_gives_the_student(cfg, str(exported["imagefolder"]))


def test_the_loop_reproduces_a_hard_label_student_too(runs, tmp_path):
    """Hard-label rows (the hard-label baseline): CutMix-mixed class targets, cross-entropy;
    the Dataset read from the run's config this time."""
    path, _ = runs["random-real"]
    settings = yaml.safe_load(path.read_text())
    settings["name"] = "tiny-hard"
    settings["relabel"].update(label_mode="hard", top_k=0)
    hard = tmp_path / "hard.yaml"
    hard.write_text(yaml.safe_dump(settings))
    assert main(["run", str(hard), "--executor", "local", "--no-progress"]) == 0
    from fadrm import DistilledDataset

    data = DistilledDataset(str(hard))
    assert data.hard_rows and torch.allclose(data[0][1].sum(), torch.tensor(1.0))
    _assert_loop_gives_the_student(load_config(hard), str(hard))


def test_dataset_on_an_arrow_export_a_config_and_s3_serves_the_same_items(runs, exported):
    from fadrm import DistilledDataset

    path, _ = runs["rded"]
    a = DistilledDataset(str(exported["imagefolder"]), epoch=2)
    for other in (DistilledDataset(str(exported["arrow"]), epoch=2),
                  DistilledDataset(str(path), epoch=2)):
        assert len(other) == len(a) == 20
        for i in (0, 7, 19):
            x, t = a[i]
            y, u = other[i]
            assert torch.equal(x, y) and torch.equal(t, u)
    a.set_epoch(0)
    assert not torch.equal(a[0][0], DistilledDataset(str(path), epoch=2)[0][0])
    with pytest.raises(ValueError, match=r"epoch must lie in \[0, 3\)"):
        a.set_epoch(3)


def test_views_match_the_students_rendering_and_samplers_share_them(runs, exported):
    from torch.utils.data import DistributedSampler

    from fadrm import DistilledDataset
    from fadrm.formats.labels import soft_targets, views_from_table
    from fadrm.relabel import view_batch

    _, cfg = runs["rded"]
    plan, images, _ = _distilled(cfg)
    data = DistilledDataset(str(exported["imagefolder"]), epoch=1)
    table = shards.read_table(plan.relabel.unit_uri(plan.relabel.unit_for_epoch(1)))
    views = views_from_table(table, 1)
    first = views[0:8]  # the stored first batch, rendered whole as relabel did
    whole = view_batch(images, first, cfg.data.mean, cfg.data.std, 28, torch.device("cpu"))
    assert torch.equal(torch.stack([data[i][0] for i in range(8)]), whole)
    assert any(first.mix_partner >= 0)  # CutMix partners are rendered too
    from fadrm.formats.labels import epoch_table

    assert torch.equal(torch.stack([data[i][1] for i in range(20)]),
                       soft_targets(epoch_table(table, 1), 10))
    # Two ranks of a DistributedSampler: every stored view once, as the Dataset serves it.
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
        loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
        for x, _ in loader:
            seen.append(x)
    assert sum(len(x) for x in seen) == 20


def test_hard_mode_gives_plain_images_and_classes(runs, exported):
    from fadrm import DistilledDataset
    from fadrm.data import normalize

    _, cfg = runs["rded"]
    _, images, labels = _distilled(cfg)
    data = DistilledDataset(str(exported["imagefolder"]), label_mode="hard")
    assert len(data) == 20
    x, y = data[5]
    assert y == int(labels[5]) and torch.equal(x, normalize(images[5:6], cfg.data.mean,
                                                            cfg.data.std)[0])
    raw = DistilledDataset(str(exported["arrow"]), label_mode="hard", transform=lambda t: t)
    assert torch.equal(raw[5][0], images[5])


def test_dataset_refuses_a_folder_that_is_not_an_export(tmp_path):
    from fadrm import DistilledDataset
    from fadrm.errors import InputError

    with pytest.raises(InputError, match="not a complete fadrm export"):
        DistilledDataset(str(tmp_path))


def test_s3_export_marker_last_and_dataset_reads_it(runs, exported, s3_endpoint):
    import boto3

    from fadrm import DistilledDataset

    path, _ = runs["rded"]
    dest = "s3://fadrm-test/exports/rded"
    assert main(["export", str(path), "--to", dest]) == 0
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="fadrm-test",
                                                     Prefix="exports/rded/")["Contents"]}
    local = {str(p.relative_to(exported["imagefolder"]))
             for p in exported["imagefolder"].rglob("*") if p.is_file()}
    # Every file, no pending note left (pyarrow keeps an empty "folder/" marker object
    # when it deletes the last object of a prefix: not a file).
    assert {k for k in keys if not k.endswith("/")} == {f"exports/rded/{k}" for k in local}
    body = client.get_object(Bucket="fadrm-test", Key="exports/rded/soft_labels.parquet")
    assert body["Body"].read() == (exported["imagefolder"] / "soft_labels.parquet").read_bytes()
    assert main(["export", str(path), "--to", dest]) == 0  # the same: nothing to do
    a, b = DistilledDataset(dest, epoch=1), DistilledDataset(str(exported["imagefolder"]),
                                                            epoch=1)
    assert torch.equal(a[3][0], b[3][0]) and torch.equal(a.images, b.images)
    # Objects of something else under the prefix: refused.
    client.put_object(Bucket="fadrm-test", Key="exports/other/x.bin", Body=b"x")
    assert main(["export", str(path), "--to", "s3://fadrm-test/exports/other"]) == 2


def test_importing_fadrm_does_not_import_torch():
    code = "import sys, fadrm; assert 'torch' not in sys.modules; fadrm.DistilledDataset"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --------------------------------------------------------------------------- RGB, docs


@pytest.fixture(scope="module")
def rgb_export(tmp_path_factory):
    """A micro CIFAR-10 ImageFolder (6 images per class), its random-real run, exported."""
    import shutil

    from fadrm.models import create_model, save_weights

    cifar = Path("/work/shared/datasets/cifar10-train")
    if not cifar.is_dir():
        pytest.skip("CIFAR-10 ImageFolder not at /work/shared/datasets/cifar10-train")
    root = tmp_path_factory.mktemp("rgb")
    for folder in sorted(cifar.iterdir()):
        (root / "data" / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:6]:
            shutil.copy(f, root / "data" / folder.name / f.name)
    torch.manual_seed(0)
    save_weights(create_model("convnet", 10, in_chans=3, image_size=32), root / "teacher.pt")
    cfg = tiny_run_config(root / "out", root / "data",
                          teachers=[{"model": "convnet", "weights": str(root / "teacher.pt")}])
    cfg["name"] = "rgb"
    cfg["data"] = {"kind": "imagefolder", "root": str(root / "data"), "resolution": 32,
                   "val_per_class": 2}
    cfg["recover"]["method"] = "random-real"
    cfg["relabel"].update(epochs=2, epochs_per_shard=2)
    cfg["student"].update(eval_every=0)
    path = root / "rgb.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--executor", "local", "--no-progress"]) == 0
    assert main(["export", str(path), "--to", str(root / "export")]) == 0
    return load_config(path), root / "export"


def test_rgb_export_keeps_class_names_and_pixels(rgb_export):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    cfg, dest = rgb_export
    _, images, labels = _distilled(cfg)
    assert "this is the random-real baseline itself" in (dest / "README.md").read_text()
    folder = ImageFolder(str(dest))  # torchvision's default (RGB) loader, as users call it
    assert folder.classes[:2] == ["airplane", "automobile"] and len(folder) == 20
    for path, target in folder.samples:
        image_id = int(Path(path).stem)
        assert target == int(labels[image_id])
        assert torch.equal(pil_to_tensor(folder.loader(path)), images[image_id])


def test_the_docs_training_loop_runs_on_an_export(rgb_export):
    """docs/EXPORT.md's loop, as written (only the export's path replaced), trains a
    torchvision ResNet-18 on the export with DataLoader workers."""
    import re

    cfg, dest = rgb_export
    text = (Path(__file__).parents[1] / "docs" / "EXPORT.md").read_text()
    block = next(b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
                 if "kd_step" in b)
    assert len(block.strip().splitlines()) < 15
    scope: dict = {}
    exec(block.replace('"exports/cifar10-ipc10"', repr(str(dest))), scope)  # noqa: S102
    model, data = scope["model"], scope["data"]
    assert data.epoch == 1 and type(model).__name__ == "ResNet"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Trained on every stored batch: 2 epochs x 2 batches x their micro-batches (BN batches).
    steps = 2 * 2 * cfg.student.accumulation_steps
    assert int(model.bn1.num_batches_tracked) == steps and model.bn1.running_mean.abs().sum() > 0
