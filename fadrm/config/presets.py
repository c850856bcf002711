"""Naming a config: a preset shipped with the library or a YAML file, and the ``CONFIG``
argument that names one on every command line."""

from __future__ import annotations

import argparse
import difflib
from importlib import resources
from pathlib import Path

from fadrm.config.checks import ConfigError


def resolve_config(source: str | Path) -> tuple[Path, str]:
    """The file a config ``source`` names, and how to say which was used.

    A path is a file, a preset is a name: ``source`` is a file path when it is a
    :class:`~pathlib.Path` or contains a path separator or ends in ``.yaml`` / ``.yml``; a
    bare name is the preset of that name when there is one (a file or folder of the same
    name in the working directory is then not used: write ``./NAME`` for it), else a file
    in the working directory. A folder is never a config (one clear error, no traceback).
    """
    text = str(source)
    presets = list_presets()
    path = Path(text).expanduser()
    is_path = (isinstance(source, Path) or "/" in text or "\\" in text
               or path.suffix in (".yaml", ".yml"))
    if not is_path and text in presets:
        shadow = ""
        if path.exists():
            kind = "folder" if path.is_dir() else "file"
            shadow = f"; not the {kind} ./{text} (write ./{text} for that)"
        return preset_path(text), f"preset {text}{shadow}"
    if path.is_dir():
        raise ConfigError("", f"{text!r} is a folder, not a config file: name a YAML file "
                          f"or a preset (presets: {', '.join(presets)})")
    if not path.is_file():
        close = difflib.get_close_matches(path.stem if is_path else text, presets, n=1)
        hint = f"did you mean the preset {close[0]!r}? " if close else ""
        raise ConfigError("", f"config file {text!r} not found ({hint}presets: "
                          f"{', '.join(presets)})")
    return path, f"file {text}"



class _KeepGiven(argparse.Action):
    """Store a positional value only when one was given (so ``--config`` can fill it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None:
            setattr(namespace, self.dest, values)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``CONFIG`` positional with ``--config CONFIG`` as an alias: one way everywhere."""
    parser.add_argument("config", nargs="?", action=_KeepGiven, default=None,
                        help="run config YAML file or preset name (see `fadrm presets`)")
    parser.add_argument("--config", dest="config", metavar="CONFIG", default=None,
                        help="the same, as an option")


def list_presets() -> list[str]:
    root = resources.files("fadrm") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    return Path(str(resources.files("fadrm") / "presets" / f"{name}.yaml"))


def preset_purpose(name: str) -> str:
    """A preset's purpose: the first comment line of its YAML file."""
    for line in preset_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""
