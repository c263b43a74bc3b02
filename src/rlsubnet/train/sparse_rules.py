"""The per-entry update rules of the sparse optimizer: torch's single-tensor Adam(W) and SGD arithmetic, applied
to the k trainable entries' fp32 masters (so a sparse run matches a dense masked one entry by entry), and the
optimizers and hyper-parameters it accepts."""

from __future__ import annotations

import torch

from rlsubnet import limits
from rlsubnet.errors import UsageError

SUPPORTED = ("adamw", "adam", "sgd")
_CLASSES = {torch.optim.AdamW: "adamw", torch.optim.Adam: "adam", torch.optim.SGD: "sgd"}


def optimizer_kind(optimizer) -> str:
    """The kind ("adamw", "adam" or "sgd") of a name or a torch optimizer class; anything else is refused, naming those."""
    if isinstance(optimizer, type) and optimizer in _CLASSES:
        return _CLASSES[optimizer]
    if isinstance(optimizer, str) and optimizer.strip().lower() in SUPPORTED:
        return optimizer.strip().lower()
    shown = getattr(optimizer, "__name__", optimizer)
    raise UsageError(
        f"optimizer {shown!r} is not supported with sparse optimizer state (supported: {', '.join(SUPPORTED)}); "
        "use MaskedOptimizer around it for dense state"
    )


def group_defaults(kind, lr, betas, eps, weight_decay, momentum, dampening, nesterov, decoupled, maximize) -> dict:
    """The parameter-group defaults of optimizer ``kind``, checked (torch's names and meanings)."""
    lr = limits.real(lr, "lr")
    if weight_decay is None:
        weight_decay = 1e-2 if kind == "adamw" else 0.0
    weight_decay = limits.real(weight_decay, "weight_decay")
    if kind == "sgd":
        momentum = limits.real(momentum, "momentum")
        dampening = limits.real(dampening, "dampening")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise UsageError("nesterov momentum needs momentum > 0 and dampening 0")
        return {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": bool(nesterov),
            "maximize": bool(maximize),
        }
    if len(betas) != 2:
        raise UsageError(f"betas must be two numbers, got {betas!r}")
    b1 = limits.real(betas[0], "betas[0]", 0.0, 1.0)
    b2 = limits.real(betas[1], "betas[1]", 0.0, 1.0)
    if b1 >= 1 or b2 >= 1:
        raise UsageError(f"betas must be below 1, got {betas!r}")
    return {
        "lr": lr,
        "betas": (b1, b2),
        "eps": limits.real(eps, "eps"),
        "weight_decay": weight_decay,
        "maximize": bool(maximize),
        "amsgrad": False,
        "decoupled_weight_decay": kind == "adamw" or bool(decoupled),
    }


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
