"""FADRM: dataset distillation by data residual matching, on PyTorch (and Ray)."""

__version__ = "0.1.0"

__all__ = ["DistilledDataset", "__version__"]


def __getattr__(name: str):
    # Lazy: `import fadrm` stays light (no torch) until the Dataset is asked for.
    if name == "DistilledDataset":
        from fadrm.dataset import DistilledDataset

        return DistilledDataset
    raise AttributeError(f"module 'fadrm' has no attribute {name!r}")
