"""Config parsing: typed sections, overrides, and errors that name the key path."""

import pytest
import yaml

from fadrm.config import ConfigError, config_to_dict, list_presets, load_config


def base() -> dict:
    return {"data": {"kind": "idx", "root": "/tmp/x", "channels": 1, "mean": [0.5],
                     "std": [0.5], "resolution": 28}, "teachers": ["convnet"]}


def error_of(data: dict, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(data, list(overrides))
    return info.value


def test_defaults_and_types():
    cfg = load_config(base())
    assert cfg.recover.method == "fadrm" and cfg.recover.alpha == 0.5
    assert cfg.recover.total_iterations == 2000
    assert cfg.recover.r_bn == 0.01 and cfg.recover.first_bn_multiplier == 10.0
    assert cfg.student.temperature == 20.0


def test_override_sets_nested_value_with_yaml_typing():
    cfg = load_config(base(), ["recover.alpha=0.4", "recover.resolutions=[16,32]",
                               "recover.stage_iterations=[5,5]", "student.eval_every=3"])
    assert cfg.recover.alpha == 0.4
    assert cfg.recover.resolutions == [16, 32]
    assert cfg.student.eval_every == 3


def test_override_into_teacher_list():
    data = base() | {"teachers": ["convnet", {"model": "resnet18"}]}
    cfg = load_config(data, ["teachers.1.model=convnet_w128"])
    assert [t.model for t in cfg.teachers] == ["convnet", "convnet_w128"]
    # The bracket form is the same key; the list's length appends an item.
    assert load_config(data, ["teachers[1].model=convnet_w128"]) == cfg
    grown = load_config(base(), ["teachers[1].model=convnet_w128", "teachers.1.recover=false"])
    assert [(t.model, t.recover) for t in grown.teachers] == [("convnet", True),
                                                               ("convnet_w128", False)]


@pytest.mark.parametrize("overrides, path, words", [
    (["student.epochs=10"], "student.epochs", "set relabel.epochs"),
    (["student.batch_size=10"], "student.batch_size", "set relabel.batch_size"),
    (["recover.iterations=10"], "recover.iterations", "recover.stage_iterations"),
    (["teachers[2].model=convnet"], "teachers[2]", "list index out of range"),
    (["teachers..model=convnet"], "teachers..model", "empty key"),
])
def test_hints_say_where_a_setting_lives(overrides, path, words):
    err = error_of(base(), overrides)
    assert str(err).startswith(path + ":") and words in str(err), str(err)


@pytest.mark.parametrize("overrides, path, words", [
    (["recover.alpah=0.3"], "recover.alpah", "did you mean 'alpha'"),
    (["recover.alpha=1.5"], "recover.alpha", "[0, 1]"),
    (["recover.alpha=high"], "recover.alpha", "number"),
    (["recover.resolutions=[32,32]"], "recover.stage_iterations", "one budget per resolution"),
    (["recover.method=magic"], "recover.method", "unknown method"),
    (["data.mean=[0.1,0.2,0.3]"], "data.mean", "one per channel"),
    (["relabel.teacher_bn_mode=frozen"], "relabel.teacher_bn_mode", "'train' or 'eval'"),
    (["relabel.label_mode=onehot"], "relabel.label_mode", "'soft' or 'hard'"),
    (["relabel.label_mode=hard", "relabel.top_k=5"], "relabel.top_k", "soft labels only"),
    (["teachers.0.model=123"], "teachers[0].model", "string"),
    (["execution.max_workers=0"], "execution.max_workers", ">= min_workers"),
    (["execution.precision=fp8"], "execution.precision", "'bf16', 'fp16' or 'fp32'"),
    (["select.teacher=3"], "select.teacher", "teachers"),
    (["student.nonsense.deep=1"], "student.nonsense", "unknown key"),
    (["ipc=0"], "ipc", "> 0"),
])
def test_errors_name_the_key_path(overrides, path, words):
    err = error_of(base(), overrides)
    assert str(err).startswith(path + ":"), str(err)
    assert words in str(err)
    assert err.path == path


def test_yaml_file_errors_name_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(base(), ["recover.method=sre2l"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(path) == cfg


@pytest.mark.parametrize("name", list_presets())
def test_presets_load_and_validate(name):
    cfg = load_config(name)
    assert cfg.recover.method in ("fadrm", "fadrm+")
    assert len(cfg.recover.resolutions) == len(cfg.recover.stage_iterations)


def test_paper_presets_carry_paper_numbers():
    c = load_config("imagenet1k-fadrm-plus")
    assert c.recover.resolutions == [200, 224, 200, 224]
    assert c.recover.stage_iterations == [500] * 4 and c.recover.jitter == 32
    assert len(c.teachers) == 4 and c.recover_teachers == [0, 1, 2, 3]
    assert load_config("cifar100-fadrm").relabel.epochs == 1000
    assert load_config("cifar100-fadrm").recover_teachers == [0]
