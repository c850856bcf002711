"""Distillation methods as registered objects (see :mod:`fadrm.methods.registry`).

One module per method: ``random_real`` (random real images, with a hard-label variant),
``rded`` (realism-selected patches), ``sre2l`` (noise + optimisation), ``fadrm`` (patches +
MRO / ARC / mixed precision) and ``fadrm_plus`` (FADRM with round-robin teachers). The image
initialisations they share are in ``inits``.
"""

from fadrm.methods.registry import Method, create_method, is_method, list_methods, register_method

__all__ = ["Method", "register_method", "create_method", "list_methods", "is_method"]
