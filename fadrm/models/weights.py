"""Loading and saving state_dicts: ``weights_only`` loads (no code in a file runs), wrapper
prefixes stripped, and errors that say why a file does not fit a model."""

from __future__ import annotations

import io
import re
import warnings

import torch
from torch import nn

from fadrm import storage
from fadrm.errors import InputError
from fadrm.models.create import _NAME_ATTR


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
