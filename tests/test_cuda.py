"""CUDA code paths (checks in benchmarks/gpu/cuda_checks.py), marker ``cuda``.

Each check compares CUDA with the CPU or with itself (see its docstring for what and to which
tolerance); they are skipped where no CUDA GPU is present. ``python -m benchmarks.gpu_check``
runs the same checks on GPU machines without pytest.
"""

import pytest

from benchmarks.gpu.cuda_checks import CHECKS, check_cuda_device_without_gpu_fails, cuda_available

pytestmark = pytest.mark.cuda

GPU_CHECKS = [c for c in CHECKS if c.needs_cuda]


@pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("check", GPU_CHECKS, ids=[c.name for c in GPU_CHECKS])
def test_cuda_path(check):
    check.run("cuda")


def test_cuda_device_without_gpu_fails_clearly():
    # Runs everywhere: on a GPU machine the check hides the GPU itself.
    check_cuda_device_without_gpu_fails()
