"""Teacher and student networks by name, and their weights.

``create_model`` looks a name up in three sources, in order: the built-in registry
(``convnet`` and friends, for small images), timm, then torchvision. A name may carry its
source explicitly (``torchvision:densenet121``) where timm and torchvision share a name.

Networks designed for 224 px lose most of a 32 px image in their stride-2 stem and stem
max-pool; ``small_stem`` replaces the stem convolution with a 3x3 stride-1 one and drops that
max-pool (the usual CIFAR adaptation), so a ResNet-18 ends at 4x4 instead of 1x1.

Weights are plain state_dicts, loaded with ``weights_only=True`` (no code runs on load), and
identified by the sha256 of their bytes: the teacher fingerprint that stage keys use.
"""

from __future__ import annotations

import difflib
import io
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fadrm import storage
from fadrm.errors import InputError

__all__ = [
    "ConvNet",
    "WeightsError",
    "register_model",
    "builtin_models",
    "create_model",
    "apply_small_stem",
    "load_weights",
    "save_weights",
    "has_batchnorm",
    "has_bn_statistics",
    "check_model_name",
    "ModelNameError",
    "check_weights_fit",
    "PretrainedFile",
    "pretrained_file",
    "pretrained_fingerprint",
    "read_pinned",
    "weights_cache_dir",
]

# (num_classes, in_chans, image_size) -> model
ModelFactory = Callable[[int, int, int], nn.Module]

_BUILTIN: dict[str, ModelFactory] = {}

# create_model records the name a model was created under, for error messages.
_NAME_ATTR = "fadrm_model_name"


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make ``factory(num_classes, in_chans, image_size)`` available by ``name``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        if name in _BUILTIN:
            raise ValueError(f"model {name!r} is already registered")
        _BUILTIN[name] = factory
        return factory

    return deco


def builtin_models() -> list[str]:
    """Names of the built-in models."""
    return sorted(_BUILTIN)


# --------------------------------------------------------------------------- built-ins


_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    # One group per channel: instance norm with affine parameters (no running statistics).
    "instance": lambda c: nn.GroupNorm(c, c),
    "none": lambda c: nn.Identity(),
}


class ConvNet(nn.Module):
    """The data-distillation ConvNet: ``depth`` x [conv3x3 - norm - ReLU - avgpool2], linear.

    The classifier expects the spatial size that ``image_size`` leaves after ``depth``
    halvings; other input sizes (>= 2**depth) are average-pooled to it.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, image_size: int = 32,
                 width: int = 64, depth: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"ConvNet norm {norm!r} unknown; choose from {sorted(_NORMS)}")
        layers: list[nn.Module] = []
        channels = in_chans
        for _ in range(depth):
            layers += [
                # A bias is redundant before a norm layer that re-centres.
                nn.Conv2d(channels, width, 3, padding=1, bias=norm == "none"),
                _NORMS[norm](width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.feature_size = max(1, image_size // 2**depth)
        self.pool = nn.AdaptiveAvgPool2d(self.feature_size)
        self.classifier = nn.Linear(width * self.feature_size**2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("convnet")
def _convnet(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    return ConvNet(num_classes, in_chans, image_size, width=64)


@register_model("convnet_w128")
def _convnet_w128(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    return ConvNet(num_classes, in_chans, image_size, width=128)


@register_model("convnet_nobn")
def _convnet_nobn(num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    # Instance norm instead of BatchNorm: a teacher without BN statistics to match.
    return ConvNet(num_classes, in_chans, image_size, width=64, norm="instance")


# --------------------------------------------------------------------------- sources


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


# --------------------------------------------------------------------------- small stem


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


# --------------------------------------------------------------------------- weights


class WeightsError(InputError):
    """A weights file that cannot be loaded into the given model."""


_STATE_KEYS = ("state_dict", "model", "model_state_dict")
# Wrappers that prefix parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _label(model: nn.Module) -> str:
    name = getattr(model, _NAME_ATTR, None)
    cls = type(model).__name__
    return f"{name!r} ({cls})" if name else cls


_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose state_dict has plain names (inside DDP and torch.compile)."""
    while True:
        if isinstance(model, _WRAPPERS):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _brief(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _fit_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Why ``state`` does not fit ``model``, briefly (missing, unexpected, shapes)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_brief(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_brief(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (file vs model): {_brief(shapes, 3)}")
    return problems


def _load_problem(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in our words.

    Never torch's own advice: it suggests ``weights_only=False`` or allow-listing globals,
    i.e. running code from an untrusted file, which this project never does.
    """
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it holds a {found.group(1)} object; weights are loaded as tensors and "
                f"plain containers only (no code in the file runs), so save a state_dict: "
                f"torch.save(model.state_dict(), path)")
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        detail = f" ({found.group(1).strip()[:80]})" if found else ""
        return (f"not a plain state_dict of tensors{detail}; weights are loaded as tensors "
                f"and plain containers only (no code in the file runs)")
    return (f"not a PyTorch checkpoint, or a damaged one ({type(exc).__name__}); save "
            f"weights with torch.save(model.state_dict(), path)")


def _parse_state(data: bytes, uri: str, label: str) -> dict[str, torch.Tensor]:
    """The state_dict in checkpoint bytes (weights_only), with wrapper prefixes stripped."""
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol: noise here
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types
        raise WeightsError(f"{uri}: cannot load weights for model {label}: "
                           f"{_load_problem(exc)}") from None
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise WeightsError(f"{uri}: not a state_dict (got {type(obj).__name__}) for model "
                           f"{label}")
    return _modern_keys({_strip(k): v for k, v in obj.items()})


# torchvision's DenseNet once named its dense-layer modules "norm.1", "conv.2", ...; the
# current ones are "norm1", "conv2". Old checkpoints (the paper's era) still use the former.
_LEGACY_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
    r"running_var|num_batches_tracked))$")


def _modern_keys(state: dict) -> dict:
    if not any(_LEGACY_DENSENET.match(k) for k in state):
        return state
    out = {}
    for key, value in state.items():
        m = _LEGACY_DENSENET.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def check_weights_fit(model: nn.Module, data: bytes, uri: str) -> None:
    """Raise :class:`WeightsError` unless the checkpoint bytes fit ``model`` (key names and
    shapes). ``model`` may live on the meta device: only its state_dict's shapes are used."""
    label = _label(model)
    problems = _fit_problems(_unwrap(model), _parse_state(data, uri, label))
    if problems:
        raise WeightsError(f"{uri}: weights do not fit model {label}: " + "; ".join(problems))


def load_weights(model: nn.Module, uri: str, data: bytes | None = None) -> str:
    """Load a state_dict from ``uri`` (path or s3://) into ``model``; returns its sha256.

    Accepts a bare state_dict or a checkpoint dict holding one under 'state_dict', 'model'
    or 'model_state_dict'; 'module.' / '_orig_mod.' prefixes are stripped. ``data``: the
    file's bytes when the caller has read them already (they are not read again).
    """
    label = _label(model)
    if data is None:
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"weights for model {label}: {uri} not found") from exc
    digest = storage.sha256_bytes(data)
    state = _parse_state(data, uri, label)
    target = _unwrap(model)
    problems = _fit_problems(target, state)
    if problems:
        raise WeightsError(f"{uri}: weights do not fit model {label}: " + "; ".join(problems))
    try:
        target.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - e.g. a non-tensor value
        raise WeightsError(f"{uri}: cannot load into model {label}: {exc}") from exc
    return digest


def save_weights(model: nn.Module, uri: str) -> str:
    """Write the model's state_dict to ``uri`` atomically; returns the sha256 of the bytes."""
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    storage.write_bytes_atomic(uri, data)
    return storage.sha256_bytes(data)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any BatchNorm layer (with running statistics to match) is present."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def has_bn_statistics(model: nn.Module) -> bool:
    """Whether some BatchNorm layer keeps running statistics (what recover's BN loss matches)."""
    # The layers recover's BN loss hooks (fadrm.synthesis.BNStatLoss).
    return any(isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
               for m in model.modules())


# --------------------------------------------------------------------------- pretrained


@dataclass(frozen=True)
class PretrainedFile:
    """Where a named model's pretrained weights come from and where they are cached."""

    name: str
    url: str
    """What the library would download (a URL or a Hugging Face Hub file)."""
    path: str
    """The local file the library reads instead of downloading, once it is there."""

    @property
    def cached(self) -> bool:
        import os

        return os.path.isfile(self.path)


def pretrained_file(name: str) -> PretrainedFile | None:
    """The file ``create_model(name, pretrained=True)`` reads, or None where the source
    names no single file (a built-in model has no pretrained weights at all)."""
    src, bare = _resolve(name)
    hub_checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    if src == "torchvision":
        url = _tv_weights(bare).url
        return PretrainedFile(name, url, os.path.join(hub_checkpoints, os.path.basename(url)))
    if src != "timm":
        return None
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(bare)
    if pcfg is None:
        return None
    if pcfg.file:
        return PretrainedFile(name, pcfg.file, pcfg.file)
    if pcfg.hf_hub_id:
        try:
            import huggingface_hub
        except ImportError:
            huggingface_hub = None
        if huggingface_hub is not None:
            # timm prefers the Hub: safetensors first, then the pickled file.
            for filename in ("model.safetensors", "pytorch_model.bin"):
                hit = huggingface_hub.try_to_load_from_cache(pcfg.hf_hub_id, filename)
                if isinstance(hit, str):
                    return PretrainedFile(name, f"hf://{pcfg.hf_hub_id}/{filename}", hit)
            from huggingface_hub import constants

            path = os.path.join(constants.HF_HUB_CACHE,
                                "models--" + pcfg.hf_hub_id.replace("/", "--"))
            return PretrainedFile(name, f"hf://{pcfg.hf_hub_id}/model.safetensors", path)
    if pcfg.url:
        return PretrainedFile(name, pcfg.url,
                              os.path.join(hub_checkpoints, os.path.basename(pcfg.url)))
    return None


_HUB_HASH = re.compile(r"-([0-9a-f]{8,})\.pth$")


def pretrained_fingerprint(name: str) -> str:
    """The fingerprint of ``name``'s pretrained weights: the cached file's own sha256, so a
    library upgrade (or a replaced file) that changes the weights changes every stage key
    that used them; the bare name only where the file is not on this machine (preflight
    refuses to run such a config)."""
    try:
        source = pretrained_file(name)
    except Exception:  # noqa: BLE001 - no pretrained config: preflight names the problem
        source = None
    if source is None or not source.cached:
        return f"pretrained:{name}"
    digest = storage.file_sha256(source.path)
    pinned = _HUB_HASH.search(os.path.basename(source.url))
    if pinned and not digest.startswith(pinned.group(1)):
        # torch hub's convention: the file name carries its sha256's first hex digits.
        raise WeightsError(f"{source.path}: sha256 {digest[:12]}... does not start with "
                           f"{pinned.group(1)}, the hash its name pins ({source.url}); the "
                           f"file is damaged or not {name}'s weights: fetch it again")
    return f"pretrained:{name}:sha256:{digest}"


def weights_cache_dir() -> str:
    """Where downloaded (https://) weights are kept, by sha256: $FADRM_CACHE/weights, else
    ~/.cache/fadrm/weights."""
    import os

    root = os.environ.get("FADRM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "fadrm")
    return os.path.join(root, "weights")


def read_pinned(uri: str, sha256: str | None, key: str = "weights") -> bytes:
    """The bytes of a weights file, checked against its ``sha256`` pin when there is one.

    URLs are downloaded once per machine into :func:`weights_cache_dir` (named by the pin)
    and read from there afterwards. A mismatch is a :class:`WeightsError` naming both
    digests; nothing mismatched is ever cached or loaded.
    """
    import os

    cached = os.path.join(weights_cache_dir(), f"{sha256}.pt") if sha256 else None
    if cached and storage.is_url(uri) and os.path.isfile(cached):
        data = open(cached, "rb").read()
        if storage.sha256_bytes(data) == sha256:
            return data
    data = storage.read_bytes(uri)
    digest = storage.sha256_bytes(data)
    if sha256 and digest != sha256:
        raise WeightsError(f"{key}: {uri} has sha256 {digest[:16]}... but its pin "
                           f"(sha256 in the config) is {sha256[:16]}...: the file changed, or "
                           f"the pin is wrong; nothing was loaded")
    if cached and storage.is_url(uri):
        storage.write_bytes_atomic(cached, data)
    return data
