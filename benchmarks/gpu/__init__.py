"""The parts of the GPU node check (``python -m benchmarks.gpu_check``), one module per group.

The driver, :mod:`benchmarks.gpu_check`, imports the parts; a part imports only ``common``
(sizes, constants, synthetic data), ``report`` and, for ``cuda_checks``, ``compare``: never
the driver. Only ``cuda_checks`` and ``compare`` import torch at import time; the driver
imports them once it knows torch is installed.
"""
