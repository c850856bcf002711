"""Adam / AdamW that never read the device from the host.

``torch.optim.Adam``'s default (single-tensor, foreach) paths keep the step count in a
tensor and read it back with ``.item()`` at every step of every parameter, to compute the
bias corrections; under a GradScaler its ``step`` also reads ``found_inf``. On CUDA the
fused kernels avoid both (the step lives on the device, the scaler's flag is passed in),
so :func:`adam` returns them there. On the CPU :class:`HostStepAdam` does the same
arithmetic as torch's single-tensor path, op for op, with the step count a Python int:
the same bytes, no scalar reads.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["HostStepAdam", "adam"]


class HostStepAdam(torch.optim.Optimizer):
    """Adam (``weight_decay`` as L2) or AdamW (``decoupled=True``), bit-identical to
    ``torch.optim.Adam`` / ``AdamW`` with ``foreach=False`` on the CPU, with the step count
    kept on the host (no amsgrad, no maximize). The scaler is not supported: on the CPU it
    is never active."""

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.decoupled = decoupled

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("HostStepAdam.step takes no closure")
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
                state["step"] += 1
                # torch keeps the count in fp32 and reads it back as a float.
                step = float(state["step"])
                if wd != 0:
                    if self.decoupled:
                        p.mul_(1 - lr * wd)
                    else:
                        grad = grad.add(p, alpha=wd)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)


def adam(params: Iterable, device: torch.device, lr: float,
         betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
         decoupled: bool = False) -> torch.optim.Optimizer:
    """A sync-free Adam (AdamW when ``decoupled``) for parameters on ``device``: the fused
    kernel on CUDA (step count on the device, GradScaler-aware without a host read),
    :class:`HostStepAdam` elsewhere (the CPU's bytes of ``torch.optim``'s default)."""
    betas = (float(betas[0]), float(betas[1]))
    if device.type == "cuda":
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    return HostStepAdam(params, lr=lr, betas=betas, weight_decay=weight_decay,
                        decoupled=decoupled)
