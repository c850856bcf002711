"""Methods as registered objects: the registry, the built-ins' declarations, typed unit ids,
and a toy method defined and registered in this file alone, run end to end."""

from pathlib import Path

import pytest
import torch

from fadrm.formats import shards
from fadrm.config import ConfigError, load_config
from fadrm.executors import LocalExecutor
from fadrm.methods import Method, create_method, list_methods, register_method, registry
from fadrm.models import create_model
from fadrm.plan import RunPlan
from fadrm.runner import run_pipeline
from fadrm.units import EpochUnit, UnitId
from tests.conftest import tiny_run_config

# The six booleans each built-in was before it became an object (init, optimize, residual,
# multi_resolution, mixed_precision, multi_teacher): the same behaviour, the same bytes.
BEFORE = {
    "random-real": ("random-real", False, False, False, False, False),
    "rded": ("patches", False, False, False, False, False),
    "sre2l": (None, True, False, False, False, False),
    "fadrm": ("patches", True, True, True, True, False),
    "fadrm+": ("patches", True, True, True, True, True),
}


def test_builtins_are_registered_with_their_declarations():
    assert list_methods() == ["random-real", "rded", "sre2l", "fadrm", "fadrm+"]
    assert list_methods(variants=True) == ["random-real-hard", *list_methods()]
    for name, flags in BEFORE.items():
        m = create_method(name)
        assert m.name == name and m.runs_as is None and m.label_mode == "soft"
        assert (m.init, m.optimize, m.residual, m.multi_resolution, m.mixed_precision,
                m.multi_teacher) == flags, name
    assert create_method("sre2l").stages == ("recover",)
    assert create_method("rded").stages == ("select",)
    assert create_method("fadrm").stages == ("select", "recover")
    hard = create_method("random-real-hard")
    assert hard.settings() == {"recover.method": "random-real", "relabel.label_mode": "hard"}


def test_unknown_method_names_the_key_and_the_choices(tmp_path):
    with pytest.raises(KeyError, match="unknown method 'magic'.*random-real-hard"):
        create_method("magic")
    cfg = tiny_run_config(tmp_path, tmp_path, recover__method="random-real-hard")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)  # a variant is not a recover.method value
    assert err.value.path == "recover.method"
    assert "['fadrm', 'fadrm+', 'random-real', 'rded', 'sre2l']" in str(err.value)


def test_a_name_is_registered_once():
    class Other(Method):
        name = "fadrm"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other)
    assert type(create_method("fadrm")).__name__ == "FADRM"


@pytest.mark.parametrize("text,uid", [("b000", UnitId(0)), ("b003-i0004", UnitId(3, 4)),
                                      ("b1234-i0000", UnitId(1234, 0))])
def test_unit_ids_round_trip(text, uid):
    assert UnitId.parse(text) == uid and str(uid) == text


@pytest.mark.parametrize("bad", ["", "b3", "b003-i4", "e0000-0014", "b003-i0004x", "teacher"])
def test_malformed_unit_ids_are_refused(bad):
    with pytest.raises(ValueError, match="unit id"):
        UnitId.parse(bad)
    if not bad.startswith("e"):
        with pytest.raises(ValueError, match="epoch unit id"):
            EpochUnit.parse(bad)


def test_epoch_units_round_trip():
    unit = EpochUnit.parse("e0015-0029")
    assert unit == EpochUnit(15, 29) and str(unit) == "e0015-0029"
    assert list(unit.epochs) == list(range(15, 30))


# --------------------------------------------------------------------------- a toy method

GREY = 90  # the toy's first image of class c is this grey plus 10 * c


class ToyGrey(Method):
    """Flat grey images per class, optimised like SRe2L (one resolution, fp32)."""

    name = "toy-grey"
    init = "toy-grey"
    optimize = True
    asked: list[int] = []

    def initial_images(self, source, classes, ipc, seed, cfg, teacher, device):
        d = cfg.data
        out = torch.empty(len(classes), ipc, d.channels, d.resolution, d.resolution,
                          dtype=torch.uint8)
        for k, c in enumerate(classes):
            for i in range(ipc):
                out[k, i] = GREY + 10 * c + i
        return out

    def images_needed(self, cfg):
        ToyGrey.asked.append(cfg.ipc)
        return 1, "the toy"


@pytest.fixture
def toy(monkeypatch):
    """ToyGrey registered for this test only (the registry is restored afterwards)."""
    list_methods()  # the built-ins first
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_method(ToyGrey)
    yield create_method("toy-grey")


def test_a_toy_method_runs_end_to_end(tmp_path, toy, fmnist_root):
    weights = tmp_path / "teacher.pt"
    torch.save(create_model("convnet", 10, in_chans=1, image_size=28).state_dict(), weights)
    raw = tiny_run_config(tmp_path / "out", fmnist_root, ipc=1)
    raw["data"].update(max_train_per_class=20, max_val=100)
    raw["teachers"] = [{"model": "convnet", "weights": str(weights)}]
    raw["recover"].update(method="toy-grey", stage_iterations=[2, 2, 2])
    raw["relabel"] = {"epochs": 2, "batch_size": 10, "epochs_per_shard": 1}
    raw["student"]["eval_every"] = 1
    cfg = load_config(raw)
    assert "toy-grey" in list_methods() and cfg.recover.spec is toy

    plan = RunPlan(cfg)
    assert [s.name for s in plan.stages] == ["select", "recover", "relabel", "evaluate"]
    assert plan.select.key.components["init"] == "toy-grey"
    metrics = run_pipeline(cfg, LocalExecutor("cpu"), show_progress=False)
    assert ToyGrey.asked == [1]  # preflight asked the toy what it needs
    assert metrics["method"] == "toy-grey" and metrics["num_images"] == 10

    # select wrote exactly the toy's images; recover started there and optimised them.
    images, labels, ids = shards.table_images(shards.read_table(plan.select.unit_uri("b000")))
    assert labels.tolist() == list(range(10)) and ids.tolist() == list(range(10))
    for c in range(10):
        assert (images[c] == GREY + 10 * c).all()
    (unit,) = plan.recover.units()
    assert unit == str(UnitId(0, 0))
    recovered, _, _ = shards.table_images(shards.read_table(plan.recover.unit_uri(unit)))
    assert recovered.shape == images.shape and not torch.equal(recovered, images)
    assert Path(plan.run_dir, "metrics.json").exists()
