"""``create_model``: a name looked up in the built-in registry, timm, then torchvision;
unknown names get did-you-mean suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fadrm.errors import InputError
from fadrm.models.builtin import _BUILTIN, builtin_models
from fadrm.models.layers import (_conv_like, _first_of, _last_of, _set_submodule,
                                 apply_small_stem)

# create_model records the name a model was created under, for error messages.
_NAME_ATTR = "fadrm_model_name"


@dataclass(frozen=True)
class _Source:
    has: Callable[[str], bool]
    create: Callable[[str, int, int, int, bool], nn.Module]
    """(name, num_classes, in_chans, image_size, pretrained) -> model"""
    names: Callable[[], list[str]]
    adapt_stem: bool
    """Whether small_stem applies (built-ins are small-image networks already)."""


def _create_builtin(name: str, num_classes: int, in_chans: int, image_size: int,
                    pretrained: bool) -> nn.Module:
    if pretrained:
        raise ValueError(f"built-in model {name!r} has no pretrained weights; "
                         f"train it (squeeze) or give teacher weights")
    return _BUILTIN[name](num_classes, in_chans, image_size)


def _timm_has(name: str) -> bool:
    import timm

    # Hub references are resolved by timm itself when the model is created.
    return name.startswith("hf-hub:") or timm.is_model(name)


def _timm_create(name: str, num_classes: int, in_chans: int, image_size: int,
                 pretrained: bool) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                             in_chans=in_chans)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _tv_names() -> list[str]:
    import torchvision.models as tvm

    # Classification models only (not detection, segmentation, video, ...).
    return tvm.list_models(module=tvm)


def _tv_create(name: str, num_classes: int, in_chans: int, image_size: int,
               pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    if pretrained:
        # Pretrained heads have the hub's class count: load them, then replace the head.
        model = tvm.get_model(name, weights=_tv_weights(name))
        head_name, head = _last_of(model, nn.Linear, name)
        if head.out_features != num_classes:
            _set_submodule(model, head_name, nn.Linear(head.in_features, num_classes))
    else:
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    if in_chans != 3:
        conv_name, conv = _first_of(model, nn.Conv2d, name)
        new = _conv_like(conv, in_chans)
        with torch.no_grad():
            # Keep pretrained filters meaningful: sum RGB for gray, else tile and rescale.
            w = conv.weight
            if in_chans == 1:
                new.weight.copy_(w.sum(1, keepdim=True))
            else:
                reps = -(-in_chans // w.shape[1])
                new.weight.copy_(w.repeat(1, reps, 1, 1)[:, :in_chans] * (3 / in_chans))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        _set_submodule(model, conv_name, new)
    return model


def _tv_weights(name: str):
    """The torchvision weights ``pretrained: true`` means: IMAGENET1K_V1 where it exists (what
    the paper's code loads with ``pretrained=True``; DEFAULT is V2 for some models), else
    the model's DEFAULT."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(name)
    return enum.__members__.get("IMAGENET1K_V1", enum.DEFAULT)


_SOURCES: dict[str, _Source] = {
    "builtin": _Source(lambda n: n in _BUILTIN, _create_builtin, builtin_models, False),
    "timm": _Source(_timm_has, _timm_create, _timm_names, True),
    "torchvision": _Source(lambda n: n in _tv_names(), _tv_create, _tv_names, True),
}


class ModelNameError(InputError):
    """A model name that no source (built-in, timm, torchvision) knows."""


# Prefixes a name may carry besides the sources: timm's own hub references.
_PASS_THROUGH_PREFIXES = ("hf-hub", "hf_hub", "timm-hub")


def _resolve(name: str) -> tuple[str, str]:
    """(source, bare name) for ``name`` or ``source:name``; ModelNameError with suggestions."""
    prefix, _, rest = name.partition(":")
    if rest and prefix not in _SOURCES and prefix not in _PASS_THROUGH_PREFIXES:
        raise ModelNameError(
            f"unknown model source {prefix + ':'!r} in {name!r}; write the name alone "
            f"(built-in, then timm, then torchvision) or with one of the prefixes "
            f"{', '.join(s + ':' for s in _SOURCES if s != 'builtin')}"
        )
    if rest and prefix in _SOURCES:
        candidates = [(prefix, rest)]
    else:
        candidates = [(src, name) for src in _SOURCES]
    for src, bare in candidates:
        if _SOURCES[src].has(bare):
            return src, bare
    sources = [prefix] if rest and prefix in _SOURCES else list(_SOURCES)
    all_names = [n for s in sources for n in _SOURCES[s].names()]
    all_names = list(dict.fromkeys(all_names))  # timm and torchvision share names
    bare = rest if rest and prefix in _SOURCES else name
    close = difflib.get_close_matches(bare, all_names, n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    where = (f"a {prefix} model" if rest and prefix in _SOURCES else
             f"a built-in {builtin_models()}, timm or torchvision model")
    raise ModelNameError(f"unknown model {name!r} (not {where}){hint}")


def check_model_name(name: str) -> str:
    """The source ('builtin', 'timm' or 'torchvision') that ``name`` resolves to; raises
    :class:`ModelNameError` (with did-you-mean suggestions) when none has it."""
    return _resolve(name)[0]


def create_model(name: str, num_classes: int, in_chans: int = 3, image_size: int = 224,
                 small_stem: bool | None = None, pretrained: bool = False) -> nn.Module:
    """Build a classifier by name (built-in, then timm, then torchvision).

    ``small_stem`` None means: use the small-image stem when ``image_size <= 64``. Built-in
    models are small-image networks already and are never changed; they size their
    classifier from ``image_size``.
    """
    src, bare = _resolve(name)
    source = _SOURCES[src]
    model = source.create(bare, num_classes, in_chans, image_size, pretrained)
    if source.adapt_stem and (image_size <= 64 if small_stem is None else small_stem):
        apply_small_stem(model, in_chans, name)
    setattr(model, _NAME_ATTR, name)
    return model
