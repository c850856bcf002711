"""FADRM: dataset distillation by data residual matching, on PyTorch (and Ray)."""

__version__ = "0.1.0"
