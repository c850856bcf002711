"""Relabel: deterministic views, exact rendering, CutMix, teacher ensemble, Arrow storage."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fadrm.config import RelabelConfig
from fadrm.data import normalize
from fadrm.formats.labels import (
    Views,
    epoch_table,
    soft_label_schema,
    soft_targets,
    views_from_table,
)
from fadrm.relabel import (
    apply_views,
    ensemble_logits,
    make_views,
    relabel_epochs,
    view_batch,
)

torch.set_num_threads(1)

CPU = torch.device("cpu")
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def tiny_net(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, num_classes),
    )
    # Non-trivial running statistics so 'train' and 'eval' BN modes differ.
    bn = net[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return net


def random_images(n: int = 10, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, table.schema, options=opts) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(data)).read_all()


# --------------------------------------------------------------------------- views


def test_views_are_deterministic_and_seed_dependent():
    cfg = RelabelConfig(batch_size=4)
    a = make_views(3, 7, 10, cfg, 16)
    b = make_views(3, 7, 10, cfg, 16)
    assert a.equals(b)
    for other in (make_views(4, 7, 10, cfg, 16), make_views(3, 8, 10, cfg, 16)):
        assert not np.array_equal(a.image_id, other.image_id) or not np.array_equal(
            a.crop, other.crop
        )
        assert not np.array_equal(a.crop, other.crop)


def test_views_shape_batches_and_crop_ranges():
    cfg = RelabelConfig(batch_size=4, crop_scale=[0.25, 0.5])
    v = make_views(0, 0, 10, cfg, 16)
    assert sorted(v.image_id.tolist()) == list(range(10))  # a permutation
    assert [len(rows) for rows in v.batches()] == [4, 4, 2]
    for b, rows in enumerate(v.batches()):
        assert (rows.batch == b).all() and rows.pos.tolist() == list(range(len(rows)))
    top, left, h, w = v.crop.T
    assert v.crop.dtype == np.float32
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all()
    area = h * w
    assert ((area >= 0.25 - 1e-5) & (area <= 0.5 + 1e-5)).all()
    ratio = w / h
    assert ((ratio >= 3 / 4 - 1e-5) & (ratio <= 4 / 3 + 1e-5)).all()


def test_switching_augmentations_off_leaves_the_rest_unchanged():
    on = make_views(1, 2, 12, RelabelConfig(batch_size=4), 8)
    off = make_views(1, 2, 12, RelabelConfig(batch_size=4, flip=False, cutmix=False), 8)
    assert on.flip.any() and not off.flip.any()
    assert (on.mix_partner >= 0).any() and (off.mix_partner == -1).all()
    assert (off.mix_lam == 1).all() and (off.mix_box == 0).all()
    np.testing.assert_array_equal(on.image_id, off.image_id)
    np.testing.assert_array_equal(on.crop, off.crop)


def test_full_crop_is_identity_and_crop_is_a_continuous_window():
    x = normalize(random_images(3, 8), MEAN, STD)
    n = 3
    base = Views(
        epoch=np.zeros(n, np.int32), batch=np.zeros(n, np.int32),
        pos=np.arange(n, dtype=np.int32), image_id=np.array([2, 0, 1], np.int32),
        crop=np.tile(np.array([[0, 0, 1, 1]], np.float32), (n, 1)),
        flip=np.array([False, True, False]), mix_partner=np.full(n, -1, np.int32),
        mix_lam=np.ones(n, np.float32), mix_box=np.zeros((n, 4), np.int32),
    )
    out = apply_views(x, base, 8)
    assert torch.equal(out[0], x[2]) and torch.equal(out[2], x[1])
    assert torch.equal(out[1], x[0].flip(-1))

    # A sub-window, enlarged: bilinear sampling of the continuous image at the output
    # pixel centres (what grid_sample computes with align_corners=False).
    crop = np.array([[0.125, 0.25, 0.5, 0.625]], np.float32)
    rows = dataclasses.replace(base[np.array([0])], crop=crop, flip=np.array([False]))
    got = apply_views(x, rows, 8)
    top, left, h, w = (float(c) * 8 for c in crop[0])
    centres = (torch.arange(8, dtype=torch.float64) + 0.5) / 8
    ys, xs = top + centres * h, left + centres * w  # pixel coordinates
    gy, gx = torch.meshgrid(ys / 8 * 2 - 1, xs / 8 * 2 - 1, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].float()
    want = F.grid_sample(x[2:3], grid, mode="bilinear", align_corners=False,
                         padding_mode="border")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_view_batch_equals_apply_views_on_the_whole_normalised_set():
    images = random_images(10, 8)
    cfg = RelabelConfig(batch_size=4)
    views = make_views(0, 1, 10, cfg, 8)
    for rows in views.batches():
        a = view_batch(images, rows, MEAN, STD, 8, CPU)
        b = apply_views(normalize(images, MEAN, STD), rows, 8)
        assert torch.equal(a, b)


def test_cutmix_pastes_partner_pixels_and_lam_matches_box():
    images = random_images(12, 16)
    x = normalize(images, MEAN, STD)
    cfg = RelabelConfig(batch_size=6)
    mixed_rows = 0
    for epoch in range(4):
        views = make_views(5, epoch, 12, cfg, 16)
        for rows in views.batches():
            out = apply_views(x, rows, 16)
            plain = apply_views(x, dataclasses.replace(
                rows, mix_partner=np.full(len(rows), -1, np.int32)), 16)
            for i in range(len(rows)):
                p = int(rows.mix_partner[i])
                y0, x0, y1, x1 = rows.mix_box[i].tolist()
                if p < 0:
                    assert torch.equal(out[i], plain[i])
                    assert rows.mix_lam[i] == 1.0
                    continue
                mixed_rows += 1
                assert p != i and 0 < (y1 - y0) * (x1 - x0)
                inside = torch.zeros(16, 16, dtype=torch.bool)
                inside[y0:y1, x0:x1] = True
                assert torch.equal(out[i][:, inside], plain[p][:, inside])
                assert torch.equal(out[i][:, ~inside], plain[i][:, ~inside])
                lam = 1 - (y1 - y0) * (x1 - x0) / 256
                assert rows.mix_lam[i] == pytest.approx(lam, abs=1e-6)
    assert mixed_rows > 10


def test_apply_views_rejects_partial_batches():
    views = make_views(0, 0, 8, RelabelConfig(batch_size=4), 8)
    x = normalize(random_images(8, 8), MEAN, STD)
    with pytest.raises(ValueError, match="one batch"):
        apply_views(x, views[1:4], 8)
    with pytest.raises(ValueError, match="one batch"):
        apply_views(x, views[0:6], 8)


# --------------------------------------------------------------------------- teachers


def test_train_mode_bn_uses_batch_stats_without_touching_running_stats():
    teacher = tiny_net()
    teacher.train(False)
    before = copy.deepcopy(teacher.state_dict())
    x = torch.randn(6, 3, 8, 8)
    got = ensemble_logits([teacher], x, "train", None, CPU, mixed_precision=False)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not teacher.training and teacher[1].track_running_stats
    reference = copy.deepcopy(teacher).train()  # plain train mode: batch statistics
    torch.testing.assert_close(got, reference(x))
    eval_out = ensemble_logits([teacher], x, "eval", None, CPU, mixed_precision=False)
    torch.testing.assert_close(eval_out, teacher.eval()(x))
    assert not torch.allclose(got, eval_out, atol=1e-3)


def test_ensemble_mean_and_softmax_weights():
    a, b = tiny_net(seed=1).eval(), tiny_net(seed=2).eval()
    x = torch.randn(5, 3, 8, 8)
    la, lb = a(x).detach(), b(x).detach()
    mean = ensemble_logits([a, b], x, "eval", None, CPU, mixed_precision=False)
    torch.testing.assert_close(mean, (la + lb) / 2)
    weighted = ensemble_logits([a, b], x, "eval", [0.0, 10.0], CPU, mixed_precision=False)
    wa, wb = torch.softmax(torch.tensor([0.0, 1.0]), 0).tolist()
    torch.testing.assert_close(weighted, wa * la + wb * lb)
    with pytest.raises(ValueError, match="weights"):
        ensemble_logits([a, b], x, "eval", [1.0], CPU)


# --------------------------------------------------------------------------- tables


def test_relabel_is_deterministic_to_the_byte():
    images = random_images(10, 8)
    cfg = RelabelConfig(batch_size=4, teacher_bn_mode="train")
    seen = []
    runs = [
        relabel_epochs([tiny_net()], images, MEAN, STD, cfg, range(3), seed=11, device=CPU,
                       progress=lambda d, t: seen.append((d, t)))
        for _ in range(2)
    ]
    assert seen[:3] == [(1, 3), (2, 3), (3, 3)]
    assert runs[0].equals(runs[1])
    assert ipc_bytes(runs[0]) == ipc_bytes(runs[1])
    assert runs[0].schema.equals(soft_label_schema(10, 0))
    meta = runs[0].schema.metadata
    assert (meta[b"num_classes"], meta[b"top_k"], meta[b"seed"]) == (b"10", b"0", b"11")
    for epoch in range(3):
        assert views_from_table(runs[0], epoch).equals(make_views(11, epoch, 10, cfg, 8))
    other = relabel_epochs([tiny_net()], images, MEAN, STD, cfg, [0], seed=12, device=CPU)
    assert not views_from_table(other, 0).equals(views_from_table(runs[0], 0))


def test_epoch_rows_are_found_in_any_row_order():
    images = random_images(10, 8)
    cfg = RelabelConfig(batch_size=4)
    table = relabel_epochs([tiny_net()], images, MEAN, STD, cfg, [2, 5], seed=0, device=CPU,
                           mixed_precision=False)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    assert views_from_table(shuffled, 5).equals(make_views(0, 5, 10, cfg, 8))
    torch.testing.assert_close(soft_targets(epoch_table(shuffled, 5), 10),
                               soft_targets(epoch_table(table, 5), 10), rtol=0, atol=0)
    with pytest.raises(ValueError, match="epoch 3"):
        views_from_table(table, 3)


def test_top_k_round_trip_and_reconstruction():
    images = random_images(20, 8)
    teacher = tiny_net(10)
    full_cfg = RelabelConfig(batch_size=8, teacher_bn_mode="eval")
    top_cfg = dataclasses.replace(full_cfg, top_k=3)
    full = relabel_epochs([teacher], images, MEAN, STD, full_cfg, range(2), 0, CPU,
                          mixed_precision=False)
    top = relabel_epochs([teacher], images, MEAN, STD, top_cfg, range(2), 0, CPU,
                         mixed_precision=False)
    back = read_ipc(ipc_bytes(top))
    assert back.equals(top) and back.schema.metadata == top.schema.metadata
    for name in ("topk_index", "topk_value", "rest_value"):
        assert back.column(name).equals(top.column(name))

    rec = soft_targets(back, 10)
    ref = soft_targets(full, 10)  # fp16 logits of the same views
    index = torch.from_numpy(np.stack(back.column("topk_index").to_pylist())).long()
    values = torch.tensor(back.column("topk_value").to_pylist())
    rest = torch.tensor(back.column("rest_value").to_pylist())
    assert torch.equal(index, ref.topk(3, dim=1).indices)  # the largest ones were kept
    assert torch.equal(rec.gather(1, index), values)
    assert torch.equal(values, ref.gather(1, index))  # same fp16 rounding of same logits
    tail = torch.ones_like(rec, dtype=torch.bool).scatter(1, index, False)
    assert torch.equal(rec[tail].view(-1, 7), rest[:, None].expand(-1, 7))
    torch.testing.assert_close(rest, ref[tail].view(-1, 7).mean(1), atol=2e-3, rtol=1e-3)


def test_top_k_is_much_smaller_for_many_classes():
    images = random_images(100, 8)
    teacher = tiny_net(100)
    cfg = RelabelConfig(batch_size=20)
    full = relabel_epochs([teacher], images, MEAN, STD, cfg, range(2), 0, CPU)
    top = relabel_epochs([teacher], images, MEAN, STD, dataclasses.replace(cfg, top_k=10),
                         range(2), 0, CPU)
    views_bytes = len(ipc_bytes(full.select(full.column_names[:9])))
    full_labels = len(ipc_bytes(full)) - views_bytes
    top_labels = len(ipc_bytes(top)) - views_bytes
    # 10 fp16 values + 10 int32 indices + 1 fp16 vs 100 fp16 values per row.
    assert top_labels < 0.3 * full_labels
    assert len(ipc_bytes(top)) < 0.6 * len(ipc_bytes(full))


def test_schema_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        soft_label_schema(10, 10)
    with pytest.raises(ValueError, match="top_k"):
        soft_label_schema(10, -1)


# --------------------------------------------------------------------------- compact / hard


def test_top_k_indices_use_the_smallest_integer_type():
    from fadrm.formats.labels import index_type

    assert index_type(10) == pa.uint8() and index_type(256) == pa.uint8()
    assert index_type(257) == pa.uint16() and index_type(1000) == pa.uint16()
    assert index_type(70000) == pa.int32()
    assert soft_label_schema(1000, 10).field("topk_index").type.value_type == pa.uint16()
    table = relabel_epochs([tiny_net(10)], random_images(8, 8), MEAN, STD,
                           RelabelConfig(batch_size=4, top_k=3), range(1), 0, CPU)
    assert table.schema.field("topk_index").type.value_type == pa.uint8()
    full = relabel_epochs([tiny_net(10)], random_images(8, 8), MEAN, STD,
                          RelabelConfig(batch_size=4), range(1), 0, CPU)
    rec, ref = soft_targets(table, 10), soft_targets(full, 10)
    index = ref.topk(3, dim=1).indices
    assert torch.equal(rec.gather(1, index), ref.gather(1, index))


def test_channels_last_relabel_gives_the_same_logits_and_restores_the_layout():
    images = random_images(12, 8)
    teacher = tiny_net(10)
    cfg = RelabelConfig(batch_size=4, teacher_bn_mode="train")
    plain = relabel_epochs([teacher], images, MEAN, STD, cfg, range(2), 0, CPU,
                           mixed_precision=False, channels_last=False)
    nhwc = relabel_epochs([teacher], images, MEAN, STD, cfg, range(2), 0, CPU,
                          mixed_precision=False, channels_last=True)
    assert teacher[0].weight.is_contiguous()
    assert plain.select(plain.column_names[:9]).equals(nhwc.select(nhwc.column_names[:9]))
    torch.testing.assert_close(soft_targets(nhwc, 10), soft_targets(plain, 10),
                               atol=2e-3, rtol=1e-3)


def test_hard_labels_need_no_teacher_and_mix_like_cutmix():
    from fadrm.formats.labels import hard_targets, is_hard

    images = random_images(12, 8)
    labels = torch.tensor([0, 1, 2, 3] * 3)
    calls = []
    teacher = tiny_net(4)
    teacher.register_forward_pre_hook(lambda *_: calls.append(1))
    cfg = RelabelConfig(batch_size=6, label_mode="hard")
    table = relabel_epochs([teacher], images, MEAN, STD, cfg, range(3), seed=4, device=CPU,
                           labels=labels, num_classes=4)
    assert not calls and is_hard(table) and "logits" not in table.column_names
    assert table.schema.metadata[b"label_mode"] == b"hard"
    # the views are exactly those of soft relabelling with the same seed
    soft = relabel_epochs([tiny_net(4)], images, MEAN, STD,
                          dataclasses.replace(cfg, label_mode="soft"), range(3), 4, CPU)
    assert not is_hard(soft)
    mixed_rows = 0
    for epoch in range(3):
        views = views_from_table(table, epoch)
        assert views.equals(views_from_table(soft, epoch))
        rows = epoch_table(table, epoch)
        np.testing.assert_array_equal(rows.column("label").to_numpy(),
                                      labels.numpy()[views.image_id])
        for s in views.batch_slices():
            batch = rows.slice(s.start, s.stop - s.start)
            target = hard_targets(batch, 4)
            torch.testing.assert_close(target.sum(1), torch.ones(len(target)))
            own = labels[torch.from_numpy(views.image_id[s].astype(np.int64))]
            for i in range(len(target)):
                p, lam = int(views.mix_partner[s][i]), float(views.mix_lam[s][i])
                want = torch.zeros(4)
                want[own[i]] += lam if p >= 0 else 1.0
                if p >= 0:
                    mixed_rows += 1
                    want[own[p]] += 1 - lam
                torch.testing.assert_close(target[i], want)
    assert mixed_rows > 0
    with pytest.raises(ValueError, match="labels"):
        relabel_epochs([], images, MEAN, STD, cfg, range(1), 0, CPU)


def test_labels_do_not_depend_on_the_unit_size():
    """Relabel units of 1 epoch or of 3 epochs store byte-identical rows (BN in train mode:
    batch statistics, so nothing carries over between epochs or units)."""
    import pyarrow as pa

    from fadrm.config import RelabelConfig
    from fadrm.relabel import relabel_epochs

    torch.manual_seed(0)
    images = torch.randint(0, 255, (12, 3, 16, 16), dtype=torch.uint8)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(4, 5))
    cfg = RelabelConfig(batch_size=5, teacher_bn_mode="train")
    args = ([teacher], images, [0.5] * 3, [0.25] * 3, cfg)
    whole = relabel_epochs(*args, range(0, 3), seed=4, device=torch.device("cpu"))
    parts = pa.concat_tables([relabel_epochs(*args, range(e, e + 1), seed=4,
                                             device=torch.device("cpu")) for e in range(3)])
    assert whole.num_rows == 36
    assert whole.equals(parts)


def test_train_mode_bn_batch_is_half_the_stored_batch():
    """The reference labels each stored batch as two halves with BN in train mode: each
    half's logits equal labelling that half alone, and differ from the whole batch's."""
    from fadrm.config import RelabelConfig
    from fadrm.relabel import _label_batch, ensemble_logits

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(4, 5))
    x = torch.randn(16, 3, 8, 8)
    cpu = torch.device("cpu")
    halves = _label_batch([teacher], x, RelabelConfig(batch_size=16), None, cpu, False)
    first = ensemble_logits([teacher], x[:8], "train", None, cpu, False)
    second = ensemble_logits([teacher], x[8:], "train", None, cpu, False)
    assert torch.equal(halves, torch.cat([first, second]))
    whole = _label_batch([teacher], x, RelabelConfig(batch_size=16, bn_splits=1), None, cpu,
                         False)
    assert not torch.allclose(whole, halves, atol=1e-4)
    # Running statistics: no split, the same logits either way.
    evals = [_label_batch([teacher], x, RelabelConfig(teacher_bn_mode="eval", bn_splits=k),
                          None, cpu, False) for k in (1, 2)]
    assert torch.equal(evals[0], evals[1])
