"""How a method's images start: random real images, realism-selected patches, or noise.

Each is a :class:`~fadrm.methods.registry.Method` mixin that the method modules combine with
their optimisation settings. The ``init`` names are part of the select stage's key.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from fadrm.methods.registry import Method

__all__ = ["RandomRealInit", "PatchesInit", "NoiseInit", "select_settings_key"]


class RandomRealInit(Method):
    """``ipc`` distinct random real images per class (no teacher)."""

    init = "random-real"

    def initial_images(self, source: Any, classes: list[int], ipc: int, seed: int,
                       cfg: Any, teacher: Any, device: Any) -> "torch.Tensor":
        from fadrm.patches import random_real

        return random_real(source, classes, ipc, seed)

    def images_needed(self, cfg: Any) -> tuple[int, str]:
        return cfg.ipc, f"ipc {cfg.ipc} (method {cfg.recover.method})"


def select_settings_key(cfg: Any) -> dict:
    """The select settings that can change its bytes. Settings added later appear only
    where they matter, so the outputs of older configs stay valid: square patches
    (``crop_ratio`` [1, 1]) are what select always cut, and IDX images are stored at the
    resolution, so ``full_resolution`` changes nothing for them."""
    out = dataclasses.asdict(cfg.select)
    if [float(x) for x in out["crop_ratio"]] == [1.0, 1.0]:
        del out["crop_ratio"]
    if cfg.data.kind == "idx":
        del out["full_resolution"]
    return out


class PatchesInit(Method):
    """RDED's realism-scored patches: ``select.teacher`` scores crops of candidate images."""

    init = "patches"
    select_teacher = True

    def select_key(self, cfg: Any, teacher_fingerprints: list[str]) -> dict:
        return {"select": select_settings_key(cfg),
                "teacher": teacher_fingerprints[cfg.select.teacher]}

    def initial_images(self, source: Any, classes: list[int], ipc: int, seed: int,
                       cfg: Any, teacher: Any, device: Any) -> "torch.Tensor":
        from fadrm.patches import select_patches

        d = cfg.data
        return select_patches(teacher, source, classes, ipc, cfg.select, d.mean, d.std, seed,
                              device)

    def images_needed(self, cfg: Any) -> tuple[int, str]:
        f2 = cfg.select.factor**2
        return cfg.ipc * f2, f"ipc {cfg.ipc} x select.factor^2 {f2}"

    def check_select(self, cfg: Any) -> None:
        from fadrm.config import ConfigError

        need, f2 = cfg.ipc * cfg.select.factor**2, cfg.select.factor**2
        if cfg.select.num_candidates < need:
            raise ConfigError("select.num_candidates", f"is {cfg.select.num_candidates}, but "
                              f"ipc {cfg.ipc} x select.factor^2 {f2} = {need} patches per "
                              f"class need at least {need} candidate images; raise it")


class NoiseInit(Method):
    """SRe2L's start: Gaussian noise in normalised space (no select stage)."""

    init = None

    def noise(self, classes: list[int], cfg: Any, seed: int) -> "torch.Tensor":
        from fadrm.patches import noise_init

        d = cfg.data
        return noise_init(classes, cfg.ipc, d.channels, d.resolution, seed)
