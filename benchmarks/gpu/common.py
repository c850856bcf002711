"""Shared pieces of the GPU node check: sizes, constants and synthetic data.

Every module of :mod:`benchmarks.gpu` and the driver :mod:`benchmarks.gpu_check` import from
here, never from each other's siblings' internals. Standard library only at import time: the
driver must start (and refuse cleanly) on an image without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRESET = "imagenet1k-fadrm"
PRESET_PLUS = "imagenet1k-fadrm-plus"
"""FADRM+ at the same setting: four teachers used round-robin, one per iteration."""
PAPER_S_PER_IMAGE = 0.47
PAPER_PLUS_S_PER_IMAGE = 1.09
"""The paper's FADRM+ recover time on one RTX 4090 (its four ImageNet teachers)."""
MATMUL_DTYPE = "bfloat16"
"""The dtype of the ``torch.mm`` peak the fractions refer to: the loops' default precision."""
PAPER_GPU = "RTX 4090"
BLOCKED_MODULES = ("ray", "boto3", "botocore", "kubernetes", "moto")
REQUIRED_MODULES = ("torch", "torchvision", "timm", "pyarrow", "yaml", "numpy", "PIL", "tqdm",
                    "matplotlib")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
TIMM_TEACHER = "timm:mobilenetv3_small_050"


@dataclass(frozen=True)
class Sizes:
    """How big each part is. GPU: the real check; REHEARSAL: the GPU half on a CPU."""

    pipeline_classes: int = 4
    pipeline_per_class: int = 12
    recover_batch: int | None = None
    """None: the preset's recover.class_block_size (100 images, one per class)."""
    recover_budget_s: float = 45.0
    recover_plus_budget_s: float = 30.0
    recover_resolution: int | None = None
    """None: the presets' resolutions (224 px, MRO 200/224); else every stage at this size
    (the rehearsal on a CPU, where 224 px recover takes seconds per iteration)."""
    matmul_sizes: tuple[int, ...] = (4096, 8192)
    relabel_images: int = 400
    relabel_budget_s: float = 15.0
    student_images: int = 400
    student_budget_s: float = 20.0


GPU_SIZES = Sizes()
REHEARSAL_SIZES = Sizes(pipeline_per_class=6, recover_batch=4, recover_budget_s=8.0,
                        recover_plus_budget_s=6.0, recover_resolution=32,
                        matmul_sizes=(256, 512), relabel_images=16,
                        relabel_budget_s=4.0, student_images=16, student_budget_s=4.0)


def sync(device) -> None:
    """Wait for the device's queued work (no-op on the CPU): read clocks only after this."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- synthetic data


def make_image_folder(root: Path, num_classes: int = 4, per_class: int = 12, size: int = 224,
                      seed: int = 0) -> Path:
    """An ImageFolder of JPEGs: per class a colour, a stripe frequency and pixel noise, so a
    teacher can tell the classes apart after a few steps."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(num_classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.uniform(40, 215, size=3)
        for i in range(per_class):
            angle = rng.uniform(0, np.pi)
            wave = np.sin(2 * np.pi * (c + 1) * (np.cos(angle) * xx + np.sin(angle) * yy))
            img = colour[None, None, :] + 35 * wave[..., None] + rng.normal(0, 20, (size, size, 3))
            pixels = np.clip(img, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def tiny_cpu_config(output: Path, data_root: Path, name: str = "tiny-cpu") -> dict:
    """A whole run that takes seconds on two CPU cores (32 px, convnet teacher and student)."""
    return {
        "name": name,
        "output": str(output),
        "seed": 0,
        "ipc": 1,
        "data": {"kind": "imagefolder", "root": str(data_root), "val_per_class": 2,
                 "resolution": 32, "channels": 3, "mean": MEAN, "std": STD},
        "teachers": [{"model": "convnet"}],
        "squeeze": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "select": {"num_candidates": 4, "num_crops": 2},
        "recover": {"method": "fadrm", "resolutions": [24, 32], "stage_iterations": [2, 2],
                    "lr": 0.1},
        "relabel": {"epochs": 2, "batch_size": 4, "epochs_per_shard": 1},
        "student": {"model": "convnet", "accumulation_steps": 1, "eval_every": 1},
        "execution": {"device": "cpu"},
    }


def report_dir(cfg: dict) -> Path:
    """Where a finished run's report is: ``runs/<name>/latest`` (a link to the config's
    own report folder), or ``runs/<name>`` itself in the older layout."""
    runs = Path(cfg["output"]) / "runs" / cfg["name"]
    return runs / "latest" if (runs / "latest").exists() else runs

