"""recover.ipc_per_forward: several IPC indices of a class block in one forward, wired into
the recover stage (its units, seeds, shards and key)."""

from __future__ import annotations

import pytest
import torch

from fadrm.config import ConfigError, load_config
from fadrm.datasource import load_distilled
from fadrm.models import create_model
from fadrm.plan import RunPlan, config_fingerprint
from fadrm.stages.base import WorkerContext
from tests.conftest import tiny_run_config


def _settings(out, root, weights=None, ipc_per_forward=None, **recover):
    settings = tiny_run_config(out, root)
    settings["ipc"] = 3
    if weights is not None:
        settings["teachers"] = [{"model": "convnet", "weights": str(weights)}]
    settings["recover"].update(recover)
    if ipc_per_forward is not None:
        settings["recover"]["ipc_per_forward"] = ipc_per_forward
    return settings


def test_ipc_per_forward_is_keyed_only_when_not_1(fmnist_root, tmp_path):
    def plan(k=None):
        return RunPlan(load_config(_settings(tmp_path / "out", fmnist_root, ipc_per_forward=k)))

    default, one, two = plan(), plan(1), plan(2)
    assert "ipc_per_forward" not in one.recover.key.components["recover"]
    assert default.recover.key.key == one.recover.key.key
    assert config_fingerprint(default.cfg) == config_fingerprint(one.cfg)
    assert two.recover.key.components["recover"]["ipc_per_forward"] == 2
    assert two.recover.key.key != one.recover.key.key
    assert two.relabel.key.key != one.relabel.key.key  # downstream of other images
    assert config_fingerprint(two.cfg) != config_fingerprint(one.cfg)
    # ipc 3 with 2 per forward: a group of two, then one of one, named by the first index.
    assert two.recover.units() == ["b000-i0000", "b000-i0002"]
    assert list(two.recover.indices("b000-i0002")) == [2]
    assert one.recover.units() == ["b000-i0000", "b000-i0001", "b000-i0002"]


@pytest.mark.parametrize(("value", "words"), [(0, "> 0"), (4, "<= ipc (3)")])
def test_ipc_per_forward_out_of_range_names_the_key(fmnist_root, tmp_path, value, words):
    with pytest.raises(ConfigError, match=r"^recover\.ipc_per_forward:") as err:
        load_config(_settings(tmp_path, fmnist_root, ipc_per_forward=value))
    assert words in str(err.value)


def _teacher_file(path):
    torch.manual_seed(0)
    net = create_model("convnet", 10, in_chans=1, image_size=28)
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():  # running statistics to match, as a trained teacher has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    torch.save(net.state_dict(), path)
    return path


def test_grouped_units_give_the_one_at_a_time_images(fmnist_root, tmp_path):
    """fp32: each index of a grouped unit keeps its one-at-a-time seed, draws, BN term and
    CE mean, so its images are those of its own unit up to float rounding of the larger
    convolutions (~1e-4 in normalised pixels after 12 iterations), i.e. at most one uint8
    level apart after quantisation."""
    weights = _teacher_file(tmp_path / "teacher.pt")
    ctx = WorkerContext()
    images = {}
    for k in (1, 2):
        settings = _settings(tmp_path / "out", fmnist_root, weights, k)
        settings["execution"]["precision"] = "fp32"
        plan = RunPlan(load_config(settings))
        for stage in (plan.select, plan.recover):
            state = stage.setup(ctx)
            for unit in stage.units():
                stage.run_unit(state, unit, ctx)
        images[k], labels = load_distilled(plan)
        assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    diff = (images[1].int() - images[2].int()).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) < 0.01
