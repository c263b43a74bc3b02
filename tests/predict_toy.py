"""A toy regression model with Llama-style names, trained with the plan's own optimizer: small enough to run a
probe and a full run in a second, structured enough that some entries drift steadily and others only wander."""

from __future__ import annotations

import torch
from torch import nn

from rlsubnet.masks import Mask
from rlsubnet.predict import Plan
from rlsubnet.predict.probe import plan_optimizer, unique_named_parameters

IN, HID, OUT = 24, 48, 12


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.empty(HID, IN))
        self.down = nn.Parameter(torch.empty(OUT, HID))
        self.norm = nn.Parameter(torch.ones(IN))

    def forward(self, x):
        return torch.tanh((x * self.norm) @ self.up.T) @ self.down.T

    def named_parameters(self, *args, **kwargs):
        names = {"up": "model.layers.0.mlp.up_proj.weight", "down": "model.layers.0.mlp.down_proj.weight",
                 "norm": "model.layers.0.input_layernorm.weight"}
        for n, p in super().named_parameters(*args, **kwargs):
            yield names[n], p


def make_toy(seed: int = 0) -> Toy:
    g = torch.Generator().manual_seed(seed)
    m = Toy()
    with torch.no_grad():
        for p in (m.up, m.down):
            # θ0 as a bf16 checkpoint stores it, upcast: the masters start on the bf16 grid
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16).float())
    return m


def grad_fn_for(teacher_seed: int = 1, noise: float = 1.0, batch: int = 8):
    """Gradients of an MSE toward a fixed teacher on fresh batches: a steady mean plus batch noise."""
    tg = torch.Generator().manual_seed(teacher_seed)
    teacher = torch.randn(OUT, IN, generator=tg) * 0.3

    def grad_fn(model, step):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(batch, IN, generator=g)
        y = x @ teacher.T + noise * torch.randn(batch, OUT, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()

    return grad_fn


def state(model, dtype=torch.bfloat16) -> dict:
    return {n: p.detach().to(dtype).clone() for n, p in model.named_parameters()}


def train(model, plan: Plan, grad_fn, steps: int | None = None) -> None:
    """The real run: the plan's optimizer and schedule, the same gradients as the probe's."""
    params = unique_named_parameters(model)
    opt = plan_optimizer(plan, params)
    lrs = plan.lrs()
    for t in range(plan.steps if steps is None else steps):
        for group in opt.param_groups:
            group["lr"] = float(lrs[t])
        opt.zero_grad(set_to_none=True)
        grad_fn(model, t)
        opt.step()


def realized_mask(base: dict, model, atol: float = 1e-5) -> Mask:
    from rlsubnet.masks import build_mask

    return build_mask(base, state(model), atol=atol, hash_content=True)


