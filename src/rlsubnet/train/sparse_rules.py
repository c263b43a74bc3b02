"""The per-entry update rules of the sparse optimizer: torch's single-tensor Adam(W) and SGD arithmetic, applied
to the k trainable entries' fp32 masters (so a sparse run matches a dense masked one entry by entry)."""

from __future__ import annotations

import torch


def adam_update(param, grad, state, group, lr, wd) -> None:
    # torch's _single_tensor_adam, entry by entry
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    beta1, beta2 = (float(b) for b in group["betas"])
    step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    step_t += 1
    if wd != 0:
        if group["decoupled_weight_decay"]:
            param.mul_(1 - lr * wd)
        else:
            grad = grad.add(param, alpha=wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = step_t.item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(float(group["eps"]))
    param.addcdiv_(exp_avg, denom, value=-step_size)


def sgd_update(param, grad, state, group, lr, wd) -> None:
    # torch's _single_tensor_sgd, entry by entry
    if wd != 0:
        grad = grad.add(param, alpha=wd)
    momentum = float(group["momentum"])
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - float(group["dampening"]))
        grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
    param.add_(grad, alpha=-lr)
