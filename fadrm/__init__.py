"""FADRM: dataset distillation by data residual matching, on PyTorch (and Ray)."""

import importlib

__version__ = "0.1.0"

__all__ = ["DistilledDataset", "__version__"]


def __getattr__(name: str):
    # Lazy: `import fadrm` stays light (no torch) until the Dataset is asked for. Through
    # importlib, not an import statement: the package sits below every module (they read
    # its __version__), so a static edge to fadrm.dataset would close an import circle.
    if name == "DistilledDataset":
        return importlib.import_module("fadrm.dataset").DistilledDataset
    raise AttributeError(f"module 'fadrm' has no attribute {name!r}")
