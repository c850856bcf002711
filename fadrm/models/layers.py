"""Finding and replacing a network's layers: the small-image stem, and whether it has
BatchNorm statistics."""

from __future__ import annotations

from torch import nn


def _first_of(model: nn.Module, kind: type, what: str) -> tuple[str, nn.Module]:
    for n, m in model.named_modules():
        if isinstance(m, kind):
            return n, m
    raise ValueError(f"model {what!r} has no {kind.__name__} layer")


def _last_of(model: nn.Module, kind: type, what: str) -> tuple[str, nn.Module]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    if not found:
        raise ValueError(f"model {what!r} has no {kind.__name__} layer")
    return found[-1]


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _conv_like(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    return nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, conv.dilation, conv.groups, conv.bias is not None)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _stem_pool(model: nn.Module, stem_conv: nn.Module) -> str | None:
    """Name of the stem max-pool: the first MaxPool2d before the first block, or None.

    A *block* is a module with its own forward (not a plain container) that holds a
    convolution but not the stem convolution: a residual block, a dense layer, an inverted
    residual. Module order is definition order, which for these networks is forward order.
    """
    for name, m in model.named_modules():
        if m is model:
            continue
        if isinstance(m, nn.MaxPool2d):
            return name
        is_block = (
            not isinstance(m, _CONTAINERS)
            and not isinstance(m, nn.Conv2d)
            and any(isinstance(c, nn.Conv2d) for c in m.modules())
            and not any(c is stem_conv for c in m.modules())
        )
        if is_block:
            return None
    return None


def apply_small_stem(model: nn.Module, in_chans: int = 3, what: str = "") -> nn.Module:
    """In place: 3x3 stride-1 stem convolution, stem max-pool replaced by Identity."""
    what = what or type(model).__name__
    conv_name, conv = _first_of(model, nn.Conv2d, what)
    new = nn.Conv2d(in_chans, conv.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    pool_name = _stem_pool(model, conv)
    _set_submodule(model, conv_name, new)
    if pool_name is not None:
        _set_submodule(model, pool_name, nn.Identity())
    return model


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any BatchNorm layer (with running statistics to match) is present."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def has_bn_statistics(model: nn.Module) -> bool:
    """Whether some BatchNorm layer keeps running statistics (what recover's BN loss matches)."""
    # The layers recover's BN loss hooks (fadrm.synthesis.BNStatLoss).
    return any(isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
               for m in model.modules())
