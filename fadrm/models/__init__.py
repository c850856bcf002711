"""Teacher and student networks by name, and their weights.

``create_model`` looks a name up in three sources, in order: the built-in registry
(``convnet`` and friends, for small images), timm, then torchvision. A name may carry its
source explicitly (``torchvision:densenet121``) where timm and torchvision share a name.

Networks designed for 224 px lose most of a 32 px image in their stride-2 stem and stem
max-pool; ``small_stem`` replaces the stem convolution with a 3x3 stride-1 one and drops that
max-pool (the usual CIFAR adaptation), so a ResNet-18 ends at 4x4 instead of 1x1.

Weights are plain state_dicts, loaded with ``weights_only=True`` (no code runs on load), and
identified by the sha256 of their bytes: the teacher fingerprint that stage keys use.

The package's modules, from the bottom: ``builtin`` (ConvNet and the built-in registry),
``layers`` (small stem, BatchNorm checks), ``create`` (names -> networks, three sources),
``weights`` (state_dict load, save and fit), ``pinned`` (pretrained files, pinned reads).
"""

from __future__ import annotations

from fadrm.models.builtin import ConvNet, builtin_models, register_model
from fadrm.models.create import ModelNameError, check_model_name, create_model
from fadrm.models.layers import apply_small_stem, has_batchnorm, has_bn_statistics
from fadrm.models.pinned import (PretrainedFile, pretrained_file, pretrained_fingerprint,
                                 read_pinned, weights_cache_dir)
from fadrm.models.weights import WeightsError, check_weights_fit, load_weights, save_weights

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
