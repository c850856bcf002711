"""Real datasets: ImageFolder trees and IDX files, decoded to uint8 tensors.

Images are held as ``uint8`` tensors ``[N, C, H, W]`` at the configured resolution (the
compact form; 60k Fashion-MNIST images are 47 MB): shorter side resized, centre square;
validation images optionally with torchvision's Resize + CenterCrop (``val_crop_ratio``).
Select alone reads ImageFolder images at their stored size (``decode_originals``), to cut
its patches from the whole image. Models take normalised float input:
``normalize`` / ``denormalize`` convert, ``pixel_bounds`` gives the valid normalised range
that recover clamps to.

``load_data`` reads a data set by its ``kind`` (a registry of formats), local or ``s3://``:

- ``idx``: MNIST-style IDX files (``train-*`` / ``t10k-*``, raw or ``.gz``); t10k is the
  validation split.
- ``imagefolder``: one sub-folder per class of JPEG/PNG/BMP/WebP files. Unreadable files are
  skipped and listed in ``ImageSet.skipped``; one bad file never stops a run.

Every split and subset is chosen by ranking items on a seeded hash of their name (file path
or index), so it is deterministic and adding a file moves at most that file's neighbours.
``data_fingerprint`` hashes what the decoded data depends on, without decoding it.

The package's modules, from the bottom: ``images`` (ImageSet, normalisation, resizing),
``splits`` (seeded splits and subsets), ``decode`` (image files -> tensors), ``idx`` and
``imagefolder`` (the two kinds), ``registry`` (kind by name: load, fingerprint, summary).
"""

from __future__ import annotations

from fadrm.data.decode import decode_files, decode_originals
from fadrm.data.idx import FASHION_MNIST_CLASSES, IDX_FILES, parse_idx
from fadrm.data.imagefolder import IMAGE_EXTENSIONS, folder_listing
from fadrm.data.images import (DataError, ImageSet, Progress, center_offsets, convert_channels,
                               denormalize, eval_resize_shape, normalize, pixel_bounds,
                               resize_images)
from fadrm.data.registry import (DataSummary, class_names, data_fingerprint,
                                 fingerprint_from_digest, load_data, summarize)

# The names imported here but not in __all__ are the package's API as well (the
# library's own modules import them from here).

__all__ = [
    "ImageSet",
    "normalize",
    "denormalize",
    "pixel_bounds",
    "DataError",
    "load_data",
    "data_fingerprint",
    "parse_idx",
    "resize_images",
    "convert_channels",
    "IMAGE_EXTENSIONS",
    "FASHION_MNIST_CLASSES",
]
