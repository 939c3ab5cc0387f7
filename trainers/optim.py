"""Optimizers whose state can be reset one filter at a time.

RandomOut and RePr re-initialise single filters mid-training. Zeroing a reborn filter's Adam moments
is not enough: Adam's bias correction divides by (1 - beta^t) with the *shared* step t, so a filter
whose moments restart from zero at t = 1,000 takes a first step of about
lr * (1 - b1) / sqrt(1 - b2) = 3.2 lr instead of lr, and stays too fast for hundreds of steps.
`RowAdam` keeps a step count per row (per filter, per seed of a pack: dimension 0 of every tensor)
once any row has been reset, so a reborn filter's updates are exactly those of a fresh Adam.

Until the first reset it is the same arithmetic as `torch.optim.Adam`'s single-tensor path (L2 weight
decay), op for op, so on the CPU results of trials that never reset are unchanged (on CUDA
torch.optim.Adam defaults to its multi-tensor path, which rounds differently). RandomOut with
`reset_optimizer_state` resets every active step (with a mask, no host sync), so it counts per row
from its first step: the same numbers to float rounding.
"""

from __future__ import annotations

import math

import torch


class RowAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba) with an optional per-row step count; elementwise, so one over a seed pack's
    stacked tensors equals K independent ones."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] = int(state["step"]) + 1
                if weight_decay != 0:
                    grad = grad.add(param, alpha=weight_decay)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                row_step = state.get("row_step")
                if row_step is None:
                    step = state["step"]
                    step_size = lr / (1 - beta1**step)
                    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                    param.addcdiv_(exp_avg, denom, value=-step_size)
                else:
                    row_step.add_(1)
                    # Corrections in float64 (as the scalar path's Python floats), then the param's dtype.
                    t = row_step.double()
                    step_size = (lr / (1 - torch.pow(beta1, t))).to(param.dtype)
                    bias_correction2_sqrt = (1 - torch.pow(beta2, t)).sqrt().to(param.dtype)
                    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                    param.addcdiv_(exp_avg * -step_size, denom)
        return loss

    @torch.no_grad()
    def reset_rows(self, param: torch.Tensor, rows: torch.Tensor) -> None:
        """Restart the rows of `param` selected by the boolean `rows` as a fresh Adam would: moments
        zero, step count zero. `rows` has one flag per filter: [K*F] for a grouped pack's [K*F, ...]
        tensor and for a generic pack's stacked [K, F, ...] one alike. A mask with no row set changes
        nothing but switches the parameter to per-row counting (cheap, and no host sync to find out)."""
        state = self.state.get(param)
        if not state:
            return  # no step taken yet: it is fresh already
        shape = _row_shape(param, rows.numel())
        keep = ~rows.reshape(shape)
        if state.get("row_step") is None:
            # The param's dtype: Optimizer.load_state_dict casts state to it, so a resume sees the same.
            step = float(state["step"])
            state["row_step"] = torch.full(shape, step, dtype=param.dtype, device=param.device)
        state["row_step"].mul_(keep)
        state["exp_avg"].mul_(keep)
        state["exp_avg_sq"].mul_(keep)

    @torch.no_grad()
    def reset_elements(self, param: torch.Tensor, mask: torch.Tensor) -> None:
        """Restart the elements of `param` selected by the boolean `mask` (param's shape) as a fresh
        Adam would. For weights that are not rows of a filter: the columns of a consumer layer that
        read a reset filter's channel. The step count becomes per element (param-shaped) from then on."""
        state = self.state.get(param)
        if not state:
            return
        row_step = state.get("row_step")
        if row_step is None:
            row_step = torch.full_like(param, float(state["step"]))
        elif row_step.shape != param.shape:
            row_step = row_step.expand(param.shape).clone()
        keep = ~mask
        state["row_step"] = row_step.mul_(keep)
        state["exp_avg"].mul_(keep)
        state["exp_avg_sq"].mul_(keep)


def _row_shape(param: torch.Tensor, rows: int) -> tuple[int, ...]:
    """The leading dimensions of `param` that `rows` flags index, then ones: (K*F, 1, 1, 1) for a
    [K*F, C, k, k] weight, (K, F, 1, 1, 1) for a stacked [K, F, C, k, k] one."""
    for lead in range(1, param.dim() + 1):
        if math.prod(param.shape[:lead]) == rows:
            return tuple(param.shape[:lead]) + (1,) * (param.dim() - lead)
    raise ValueError(f"reset_rows: {rows} row flags do not index a parameter of shape {tuple(param.shape)}")
