"""The method registry: ``register_method``, ``create_method(name)``, ``list_methods()``.

A distillation method is a :class:`Method` subclass registered under its config name
(``recover.method``). It declares how the images start (:meth:`Method.initial_images` in the
select stage, or :meth:`Method.noise` when it has no select stage), whether and how recover
optimises them (``optimize`` and the flags beside it, read by :mod:`fadrm.synthesis`),
which stages it needs (:attr:`Method.stages`), and what it asks of preflight
(:meth:`Method.images_needed`, :meth:`Method.bn_matching`).

This module sits at the bottom of the library (the config validates ``recover.method``
against it), so it imports no other part of ``fadrm``. The built-in methods
(``fadrm.methods.<module>``) use the patch selection and the data; they are imported by name
on the first lookup, like plugins, so that the config layer does not depend on them. A
method registered elsewhere (a test, a plugin) needs only this module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = ["Method", "register_method", "create_method", "list_methods", "is_method"]

# The modules of the built-in methods, in the order their methods are listed.
_BUILTIN = ("fadrm.methods.random_real", "fadrm.methods.rded", "fadrm.methods.sre2l",
            "fadrm.methods.fadrm", "fadrm.methods.fadrm_plus")
_REGISTRY: dict[str, "Method"] = {}
_loaded = False


class Method:
    """A distillation method (subclass, set ``name`` and what differs, then register).

    Initialisation: ``init`` names how the images start; it is the select stage key's
    ``init`` component, so it must stay the same for the same bytes. ``init = None``: no
    select stage, recover starts from :meth:`noise`.
    Optimisation (recover): ``optimize`` runs pixel optimisation at all; ``residual`` (ARC at
    stage boundaries), ``multi_resolution`` (recover.resolutions / stage_iterations as
    given; off: one stage at the data resolution), ``mixed_precision`` (autocast) and
    ``multi_teacher`` (round-robin over every recover teacher, FADRM+) say how.
    A *variant* (``runs_as``) is the same recover method measured with other settings, such
    as hard labels: it is listed for benchmarks but is not a ``recover.method`` value.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    init: ClassVar[str | None] = None
    select_teacher: ClassVar[bool] = False
    """The select stage scores candidates with a teacher (``select.teacher``)."""
    optimize: ClassVar[bool] = False
    residual: ClassVar[bool] = False
    multi_resolution: ClassVar[bool] = False
    mixed_precision: ClassVar[bool] = False
    multi_teacher: ClassVar[bool] = False
    runs_as: ClassVar[str | None] = None
    label_mode: ClassVar[str] = "soft"

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages between squeeze and relabel that this method needs."""
        return (("select",) if self.init is not None else ()) + (
            ("recover",) if self.optimize else ())

    @property
    def recover_method(self) -> str:
        """The ``recover.method`` value this method runs as."""
        return self.runs_as or self.name

    def settings(self) -> dict[str, Any]:
        """The config values (dotted key paths) that run this method."""
        return {"recover.method": self.recover_method, "relabel.label_mode": self.label_mode}

    # ------------------------------------------------------------- initialisation

    def select_key(self, cfg: Any, teacher_fingerprints: list[str]) -> dict:
        """Key components of the select stage beyond init, ipc, seed, data and blocks."""
        return {}

    def initial_images(self, source: Any, classes: list[int], ipc: int, seed: int,
                       cfg: Any, teacher: Any, device: Any) -> "torch.Tensor":
        """The select stage's images of one class block, ``uint8 [K, ipc, C, H, W]``."""
        raise NotImplementedError(f"method {self.name!r} has no select stage")

    def noise(self, classes: list[int], cfg: Any, seed: int) -> "torch.Tensor":
        """Recover's start without a select stage, normalised float ``[K, ipc, C, S, S]``."""
        raise NotImplementedError(f"method {self.name!r} starts from selected images")

    # ------------------------------------------------------------- preflight

    def images_needed(self, cfg: Any) -> tuple[int, str]:
        """Training images every class needs, and the phrase that says why (0: none)."""
        return 0, ""

    def check_select(self, cfg: Any) -> None:
        """Config problems of the select settings for this method (raise ConfigError)."""

    def bn_matching(self, cfg: Any) -> bool:
        """Recover matches BatchNorm statistics, so its teachers need them."""
        return self.optimize and cfg.recover.r_bn > 0


M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: register ``cls()`` under ``cls.name`` (names are unique)."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: a method needs a name")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"method {cls.name!r} is already registered "
                         f"({type(_REGISTRY[cls.name]).__qualname__})")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in _BUILTIN:
            importlib.import_module(module)
        _loaded = True


def list_methods(variants: bool = False) -> list[str]:
    """Registered method names in registration order (built-ins first); ``variants``: also
    the variants (e.g. ``random-real-hard``) that run as another method."""
    _load_builtins()
    return [n for n, m in _REGISTRY.items() if variants or m.runs_as is None]


def is_method(name: str) -> bool:
    """``name`` is a ``recover.method`` value (a registered method, not a variant)."""
    return name in list_methods()


def create_method(name: str) -> Method:
    """The registered method called ``name`` (methods hold no state: one object each)."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose from "
                       f"{list_methods(variants=True)}") from None
