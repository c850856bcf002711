"""Model factory, small-image stems, and weights files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fadrm.models import (
    WeightsError,
    builtin_models,
    create_model,
    has_batchnorm,
    load_weights,
    save_weights,
)
from fadrm.storage import sha256_bytes

torch.set_num_threads(1)


@pytest.mark.parametrize("name", builtin_models())
@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32), (3, 40)])
def test_builtin_models_classify_small_images(name, in_chans, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=in_chans, image_size=32).eval()
    assert model(torch.randn(2, in_chans, size, size)).shape == (2, 7)


def test_registry_has_the_convnets_and_batchnorm_is_detected():
    assert {"convnet", "convnet_w128", "convnet_nobn"} <= set(builtin_models())
    assert has_batchnorm(create_model("convnet", 10))
    assert not has_batchnorm(create_model("convnet_nobn", 10))
    wide = create_model("convnet_w128", 10)
    assert max(p.shape[0] for p in wide.parameters() if p.ndim == 4) == 128


def test_unknown_model_names_it_and_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'convnett'.*did you mean convnet"):
        create_model("convnett", 10)
    with pytest.raises(ValueError, match="resnet18"):
        create_model("resnet81", 10)


def _final_feature_size(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Spatial size of the last 4-d activation before global pooling."""
    sizes = []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            sizes.append(tuple(output.shape[-2:]))

    handles = [
        m.register_forward_hook(hook) for m in model.modules()
        if not list(m.children()) and not isinstance(m, nn.AdaptiveAvgPool2d)
        and "Pool" not in type(m).__name__  # global pools output 1x1
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return sizes[-1]


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18"])
def test_small_stem_keeps_4x4_features_for_resnet18_at_32px(name):
    x = torch.randn(1, 3, 32, 32)
    small = create_model(name, 10, image_size=32)  # automatic for <= 64 px
    assert _final_feature_size(small, x) == (4, 4)
    stock = create_model(name, 10, image_size=32, small_stem=False)
    assert _final_feature_size(stock, x) == (1, 1)
    assert small(x).shape == (1, 10)


def test_torchvision_model_with_one_input_channel():
    model = create_model("torchvision:resnet18", 5, in_chans=1, image_size=224).eval()
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = create_model("convnet", 10, in_chans=1, image_size=28)
    model.train()(torch.randn(8, 1, 28, 28))  # move BN running statistics off their init
    path = str(tmp_path / "w" / "teacher.pt")
    saved = save_weights(model, path)
    assert saved == sha256_bytes((tmp_path / "w" / "teacher.pt").read_bytes())

    torch.manual_seed(1)
    other = create_model("convnet", 10, in_chans=1, image_size=28)
    x = torch.randn(4, 1, 28, 28)
    assert not torch.equal(other.eval()(x), model.eval()(x))
    assert load_weights(other, path) == saved
    assert torch.equal(other.eval()(x), model.eval()(x))


def test_checkpoint_dicts_and_wrapper_prefixes_are_accepted(tmp_path):
    torch.manual_seed(0)
    model = create_model("convnet_nobn", 3, image_size=32)
    state = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": state, "epoch": 3}, tmp_path / "ckpt.pt")
    other = create_model("convnet_nobn", 3, image_size=32)
    load_weights(other, str(tmp_path / "ckpt.pt"))
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)


def test_mismatched_weights_name_file_model_and_keys(tmp_path):
    path = str(tmp_path / "ten_classes.pt")
    save_weights(create_model("convnet", 10), path)
    with pytest.raises(WeightsError) as err:
        load_weights(create_model("convnet", 5), path)
    message = str(err.value)
    assert path in message and "'convnet'" in message and "classifier.weight" in message
    nobn = str(tmp_path / "nobn.pt")
    save_weights(create_model("convnet_nobn", 10), nobn)
    with pytest.raises(WeightsError, match=r"missing keys: .*running_mean"):
        load_weights(create_model("convnet", 10), nobn)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_weights(create_model("convnet", 10), str(tmp_path / "absent.pt"))


EXECUTED: list[str] = []


def _side_effect(tag: str) -> str:
    EXECUTED.append(tag)
    return tag


class Payload:
    """Unpickling this would call _side_effect: exactly what weights_only must prevent."""

    def __reduce__(self):
        return (_side_effect, ("code ran",))


def test_weights_only_refuses_pickled_objects(tmp_path):
    model = create_model("convnet", 10)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "extra": Payload()}, path)
    with pytest.raises(WeightsError, match=r"evil\.pt.*no code in the file runs") as info:
        load_weights(model, str(path))
    assert EXECUTED == []
    assert "Re-running" not in str(info.value)  # never torch's "weights_only=False" advice
