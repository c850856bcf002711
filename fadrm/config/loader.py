"""YAML and ``--set`` overrides -> a validated :class:`RunConfig`.

Types are checked against the sections' annotations, unknown keys are rejected with a
did-you-mean (or where the setting lives instead), and every error names its key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fadrm.config.checks import ConfigError
from fadrm.config.presets import resolve_config
from fadrm.config.run import RunConfig


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, "must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, path)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, f"must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"must be a string, got {value!r}")
    raise ConfigError(path, f"unsupported type {_type_name(tp)}")


# Keys people look for in the wrong place: where the setting lives instead.
_LIVES_ELSEWHERE = {
    "student.epochs": "the student trains for relabel.epochs epochs (one stored set of "
                      "views and soft labels per epoch): set relabel.epochs",
    "student.batch_size": "the student trains on the stored relabel batches: set "
                          "relabel.batch_size (student.accumulation_steps splits each into "
                          "micro-batches)",
    "recover.iterations": "set recover.stage_iterations (one budget per MRO stage, e.g. "
                          "[500, 500, 500, 500])",
    "recover.ipc": "ipc is a top-level key: set ipc",
    "squeeze.model": "each teacher names its model: set teachers[0].model",
    "evaluate": "the student's settings are the student section (student.lr, ...); its "
                "epochs are relabel.epochs",
}


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            generic = re.sub(r"\[\d+\]", "[0]", key_path)
            if generic in _LIVES_ELSEWHERE:
                raise ConfigError(key_path, f"unknown key: {_LIVES_ELSEWHERE[generic]}")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key_path, f"unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], key_path)
    return cls(**kwargs)


def config_from_dict(data: dict) -> RunConfig:
    """Build and validate a RunConfig from plain data (as parsed from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError("", f"a run config must be a mapping, got {type(data).__name__}")
    cfg = _build(RunConfig, data, "")
    cfg.validate()
    _check_model_names(cfg)
    cfg.relative_paths = _absolute_paths(cfg)
    return cfg


def _check_model_names(cfg: RunConfig) -> None:
    """Every teacher and the student name a model some source has (did-you-mean if not)."""
    from fadrm.models import ModelNameError, check_model_name

    named = [(f"teachers[{i}].model", t.model) for i, t in enumerate(cfg.teachers)]
    models = cfg.student.models
    named += [("student.model" if len(models) == 1 and not isinstance(cfg.student.model, list)
               else f"student.model[{i}]", m) for i, m in enumerate(models)]
    for path, name in named:
        try:
            check_model_name(name)
        except ModelNameError as exc:
            raise ConfigError(path, str(exc)) from None


def _absolute(path: str | None) -> str | None:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().absolute())


def _absolute_paths(cfg: RunConfig) -> list[str]:
    """Resolve relative local paths against the working directory; returns the key paths
    of those that were relative (a submitted job's working directory is a temporary copy,
    so such a config must not be submitted: see fadrm.preflight)."""
    # Ray workers run in their own working directories: a relative local path must mean
    # the same file on the driver and on every worker, so resolve it here, once.
    relative = []

    def resolve(path: str | None, key: str) -> str | None:
        absolute = _absolute(path)
        if absolute != path and path and not Path(path).expanduser().is_absolute():
            relative.append(key)
        return absolute

    cfg.output = resolve(cfg.output, "output")
    cfg.data.root = resolve(cfg.data.root, "data.root")
    cfg.data.val_root = resolve(cfg.data.val_root, "data.val_root")
    for i, t in enumerate(cfg.teachers):
        t.weights = resolve(t.weights, f"teachers[{i}].weights")
    return relative


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what is written beside the outputs)."""
    return dataclasses.asdict(cfg)


def _key_parts(key: str) -> list[str]:
    """``teachers[0].model`` or ``teachers.0.model`` -> ['teachers', '0', 'model']."""
    return re.sub(r"\[([^\]]*)\]", r".\1", key).split(".")


def _key_path(parts: list[str]) -> str:
    """The key path as errors write it: ``teachers[0].model``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() and out else (f".{part}" if out else part)
    return out


def _set_path(data: dict, dotted: str, value: Any) -> None:
    """Apply one override ``a.b.0.c=value`` (or ``a.b[0].c=value``) to nested plain data.

    A list index may also be the list's length: that appends an item (``teachers.1.model=
    resnet18`` adds a second teacher to a one-teacher config).
    """
    parts = _key_parts(dotted)
    if not all(parts):
        raise ConfigError(dotted, "empty key in the path (write key.path=value; list items "
                          "as teachers.0.model or 'teachers[0].model')")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = _key_path(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                valid = f"0 to {len(node) - 1}, or {len(node)} to append" if node else "0"
                raise ConfigError(where, f"list index out of range: the list has "
                                  f"{len(node)} item(s); use an index {valid}, e.g. "
                                  f"teachers.0.model=... or 'teachers[0].model=...'")
            if int(part) == len(node):
                node.append(value if last else {})
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(where, "cannot set a key inside a scalar value")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what is wrong and where (line, column from 1)."""
    what = "; ".join(str(p) for p in (getattr(exc, "context", None),
                                      getattr(exc, "problem", None)) if p) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(what.split()) + where


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(key.strip(), f"--set {item!r}: the value is not valid YAML: "
                              f"{_yaml_problem(exc)} (lists: [32, 32]; quote a string "
                              f"holding [ ] {{ }} : or #)") from None
        _set_path(data, key.strip(), value)
    return data


def _with_teacher_defaults(data: dict) -> dict:
    # Teacher entries may be plain model names for brevity: ["resnet18", "convnet"].
    if isinstance(data.get("teachers"), list):
        data["teachers"] = [{"model": t} if isinstance(t, str) else t for t in data["teachers"]]
    return data



def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML file (or a preset name, or a dict) and apply ``--set`` overrides
    (``section.key=value``; list items by index: ``teachers.0.model=...`` or
    ``teachers[0].model=...``). See :func:`resolve_config` for names vs paths."""
    if isinstance(source, dict):
        data = dict(source)
    else:
        path, _ = resolve_config(source)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("", f"{path}: invalid YAML: {_yaml_problem(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                "not a text file" if isinstance(exc, UnicodeDecodeError) else str(exc)
            raise ConfigError("", f"{path}: cannot read the config: {reason}") from None
        if not isinstance(data, dict):
            raise ConfigError("", f"{path}: a run config is a mapping of sections (name:, "
                              f"output:, data:, teachers:, ...), but this file holds a "
                              f"{_yaml_kind(data)}")
    data = _with_teacher_defaults(data)
    apply_overrides(data, overrides or [])
    return config_from_dict(_with_teacher_defaults(data))


def _yaml_kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number",
            bool: "boolean"}.get(type(value), type(value).__name__)
