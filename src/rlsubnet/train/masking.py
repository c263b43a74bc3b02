"""Restrict any torch optimizer's updates to a mask: training only the subnetwork, as in the paper.

:class:`MaskedOptimizer` attaches to an existing optimizer through torch's step pre/post hooks, so the optimizer
object itself is unchanged (learning-rate schedulers, ``accelerate``'s wrapper, ``state_dict`` and checkpoint
resume keep working) and every ``optimizer.step()``, whoever calls it, is masked. Inside each step, before the
optimizer's own update:

1. **Gradients are masked**: entries outside the mask get a zero gradient (``masked_fill``, so a NaN gradient is
   zeroed too); a tensor entirely outside the mask gets ``grad = None`` and the optimizer skips it. Because this
   runs inside ``step()``, it comes after gradient clipping: the paper's semantics (clip the full gradient, then
   mask). ``mask_before_clip=True`` records the other order; the caller (or :func:`rlsubnet.train.attach_mask`)
   then calls :meth:`MaskedOptimizer.mask_gradients` before clipping.
2. **Weight decay is applied only inside the mask**: for SGD, Adam and AdamW the group's ``weight_decay`` is set
   to 0 for the step and applied here to the masked entries only: decoupled (AdamW, or Adam with
   ``decoupled_weight_decay``: p ← p·(1 − lr·wd)) or coupled (L2: g ← g + wd·p). Without this, decoupled decay
   moves "frozen" fp32 weights whenever lr·wd is above ~6e-8 (2^-24, half an fp32 ULP). Groups whose parameters
   are all fully inside the mask are left to the optimizer (a density-1 mask reproduces an unmasked run bit for bit).
3. **Optimizer state cannot leak**: on the first step (and after ``load_state_dict``) the momentum / moment
   buffers of frozen entries are zeroed, so a buffer loaded from an unmasked run cannot move them; afterwards a
   zero gradient keeps them at zero (SGD: buf = μ·0 + 0; Adam: m = v = 0, update 0/(0+eps) = 0).

Exact mode covers ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (foreach, fused, momentum, nesterov, amsgrad,
maximize): frozen entries stay bit-identical because their update is exactly zero. **Strict mode** (``strict=True``;
the default for any other optimizer) also snapshots the frozen entries before the step and writes them back after
it, so any optimizer, whatever it does with a zero gradient, leaves them bit-identical; the number of entries it
tried to move is counted in :meth:`report`. Strict mode guarantees the parameter values the optimizer steps (the
fp32 masters when the model trains in fp32 under bf16 autocast), not the optimizer's internal state.

Fail loudly: names or shapes that differ between the mask and the model, a mask that selects nothing (error) or
everything (warning), a mask built in another comparison mode than the one the run will be judged in (warning),
an optimizer parameter the model does not name (error). The first ``verify_steps`` steps are checked bit for bit
even in exact mode, and a frozen entry that moved is an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlsubnet import limits
from rlsubnet._bits import int_view
from rlsubnet.checkpoint.align import layout_diff
from rlsubnet.checkpoint.tensors import tied_groups
from rlsubnet.errors import listing as _listing
from rlsubnet.masks.mask import Mask, MaskError, MaskMismatchError, as_mask
from rlsubnet.train.sharding import local as _local
from rlsubnet.train.sharding import shard_like

# set on an optimizer while a MaskedOptimizer is attached, so a second one is refused
_MASKED_ATTR = "_rlsubnet_masked"


def _shape_text(shape: object) -> str:
    return str(list(shape)) if isinstance(shape, tuple) else str(shape)


EXACT_STATE_KEYS: dict[type, tuple[str, ...]] = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
}


class MaskModeWarning(UserWarning):
    """The mask was built in another comparison mode than the one the trained model will be compared in."""


MaskDtypeWarning = MaskModeWarning  # its name before the comparison mode had its own


class FullMaskWarning(UserWarning):
    """The mask selects every trained parameter: the run is not restricted."""


@dataclass
class ParamMask:
    """The mask of one optimizer parameter."""

    name: str
    aliases: tuple[str, ...]
    param: torch.nn.Parameter
    frozen: torch.Tensor | None  # bool, param's shape and device; None when every entry trains
    n_trainable: int

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def all_frozen(self) -> bool:
        return self.n_trainable == 0


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers (names without prefixes)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under ``accelerate``'s AcceleratedOptimizer (or similar ``.optimizer`` wrappers)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or seen > 8:
            raise MaskError(f"cannot mask {type(optimizer).__name__}: not a torch.optim.Optimizer")
        optimizer, seen = inner, seen + 1
    return optimizer


def resolve_parameter_masks(mask: Mask, model: torch.nn.Module) -> tuple[dict[int, ParamMask], list[str]]:
    """Match mask tensors to the model's parameters by name: {id(param): ParamMask}, and buffer names in the mask.

    Tied parameters answer to every name they have (``lm_head.weight`` and ``model.embed_tokens.weight``); their
    masks must agree. Any mask name the model lacks, any trainable parameter the mask lacks and any shape
    difference is a :class:`MaskMismatchError` listing them all.
    """
    model = unwrap_model(model)
    named = list(model.named_parameters(remove_duplicate=False))
    by_name = dict(named)
    buffers = {n for n, _ in model.named_buffers()}
    in_buffers = [n for n in mask.names() if n not in by_name and n in buffers]
    groups = tied_groups(named, key=id)  # first name -> every name of that parameter
    diff = layout_diff(
        {n: mask.shape(n) for n in mask.names() if n not in in_buffers},
        {n: tuple(p.shape) for n, p in named},
        detail=lambda n, a, b: f"{n} {_shape_text(a)} in the mask vs {_shape_text(b)} in the model",
    )
    # a parameter is covered when the mask has any of its names; frozen ones need not be
    diff.extra = [
        first for first, ns in groups.items() if by_name[first].requires_grad and not any(n in mask for n in ns)
    ]
    if diff:
        src = mask.meta.get("path") or "the mask"
        why = diff.describe("mask tensors the model does not have", "trainable parameters the mask does not cover")
        raise MaskMismatchError(f"{src} does not fit this model ({why})")
    out: dict[int, ParamMask] = {}
    for ns in groups.values():
        covered = [n for n in ns if n in mask]
        if not covered:
            continue  # requires_grad=False and not in the mask: not ours to train
        first = mask.packed(covered[0])
        for other in covered[1:]:
            if not (mask.packed(other) == first).all():
                raise MaskMismatchError(
                    f"{covered[0]!r} and {other!r} are one tied parameter in this model but have different masks"
                )
        p = by_name[ns[0]]
        trainable = mask.tensor(covered[0], device=p.device)
        n_trainable = int(mask.count(covered[0]))
        # FSDP2 (DTensor) parameters get their mask sharded the same way, so masked ops stay on the local shard
        frozen = None if n_trainable == p.numel() else shard_like(~trainable, p, covered[0])
        out[id(p)] = ParamMask(covered[0], tuple(ns), p, frozen, n_trainable)
    return out, in_buffers


class MaskedOptimizer:
    """Restrict ``optimizer`` to ``mask`` (see the module docstring). Attaches on construction.

    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1)
    >>> masked = MaskedOptimizer(opt, "grpo.mask.safetensors", model)
    >>> loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()   # masked

    ``mask`` is a :class:`~rlsubnet.masks.Mask`, a mask file, or a dict name -> bool tensor (True = trains).
    ``model`` names the parameters (DDP / compile wrappers are looked through). ``strict=None`` picks exact mode
    for SGD/Adam/AdamW and strict mode for anything else; ``strict=False`` with another optimizer is an error.
    ``compare_mode`` is the comparison mode the trained model will be compared in ("bf16", "fp32", "native";
    None skips the check). ``verify_steps`` steps are checked bit for bit (0 disables the check in exact mode).
    """

    def __init__(
        self,
        optimizer,
        mask: Mask | str | Path | Mapping[str, torch.Tensor],
        model: torch.nn.Module,
        *,
        strict: bool | None = None,
        mask_before_clip: bool = False,
        compare_mode: str | None = "bf16",
        allow_full: bool = False,
        allow_empty: bool = False,
        verify_steps: int = 1,
        **legacy,
    ):
        if "compare_dtype" in legacy:  # the option's name before the comparison mode had its own
            warnings.warn("compare_dtype= is now compare_mode=", DeprecationWarning, stacklevel=2)
            compare_mode = legacy.pop("compare_dtype")
        if legacy:
            raise TypeError(f"unexpected keyword argument {next(iter(legacy))!r}")
        if compare_mode is not None:
            limits.mode(compare_mode, "compare_mode")
        opt = unwrap_optimizer(optimizer)
        if getattr(opt, _MASKED_ATTR, None) is not None:
            raise MaskError("this optimizer is already masked (call .remove() on the first MaskedOptimizer)")
        self.mask = as_mask(mask)
        self.optimizer = opt
        self.mask_before_clip = bool(mask_before_clip)
        self.exact = type(opt) in EXACT_STATE_KEYS
        if strict is None:
            strict = not self.exact
        elif not strict and not self.exact:
            raise MaskError(
                f"{type(opt).__name__} is not one of the optimizers whose frozen entries are provably fixed by a zero "
                f"gradient ({', '.join(t.__name__ for t in EXACT_STATE_KEYS)}); use strict=True to restore frozen "
                "entries after every step"
            )
        self.strict = bool(strict)
        self.verify_steps = int(verify_steps)
        self._check_mask_level(allow_full, allow_empty, compare_mode)

        self._pmasks, self.buffers_in_mask = resolve_parameter_masks(self.mask, model)
        opt_params = {id(p): p for g in opt.param_groups for p in g["params"]}
        unknown = [tuple(p.shape) for pid, p in opt_params.items() if pid not in self._pmasks]
        if unknown:
            raise MaskMismatchError(
                f"the optimizer holds {len(unknown)} parameters that the model does not name or the mask does not "
                f"cover (shapes {_listing([str(list(s)) for s in unknown])}); pass the model the optimizer trains"
            )
        self._active = [self._pmasks[pid] for pid in opt_params]
        self.numel = sum(pm.numel for pm in self._active)
        self.n_trainable = sum(pm.n_trainable for pm in self._active)
        if self.n_trainable == 0 and not allow_empty:
            raise MaskError(
                f"the mask selects none of the {self.numel:,} entries this optimizer trains: nothing would change"
            )
        if self.n_trainable == self.numel and not allow_full and self.mask.changed != self.mask.numel:
            warnings.warn(
                FullMaskWarning(
                    f"the mask selects all {self.numel:,} entries this optimizer trains: the run is not restricted"
                ),
                stacklevel=2,
            )
        self.steps = 0
        self.restored_entries = 0  # strict mode: entries the optimizer moved and we wrote back
        self._state_dirty = True
        self._saved_wd: list[tuple[dict[str, Any], float | torch.Tensor]] = []
        self._snapshot: list[tuple[ParamMask, torch.Tensor]] = []
        self._handles = [
            opt.register_step_pre_hook(self._pre_hook),
            opt.register_step_post_hook(self._post_hook),
            opt.register_load_state_dict_post_hook(self._on_load_state_dict),
        ]
        setattr(opt, _MASKED_ATTR, self)

    # -- checks at attach time
    def _check_mask_level(self, allow_full: bool, allow_empty: bool, compare_mode: str | None) -> None:
        m = self.mask
        src = m.meta.get("path") or "the mask"
        if m.changed == 0 and not allow_empty:
            raise MaskError(f"{src} has density 0: no parameter would train")
        if m.numel and m.changed == m.numel and not allow_full:
            warnings.warn(
                FullMaskWarning(f"{src} has density 1: every parameter trains, nothing is restricted"), stacklevel=3
            )
        if compare_mode is not None and m.kind not in ("given", "ones", "zeros") and m.mode != compare_mode:
            built = f"comparing in {m.mode!r}" if m.mode else "with no recorded comparison mode"
            warnings.warn(
                MaskModeWarning(
                    f"{src} was built {built}, but this run will be compared in {compare_mode!r}: which entries count "
                    "as changed depends on the mode (a bf16 mask of an fp32 run is not its subnetwork); rebuild the "
                    f"mask with --mode {compare_mode}, or pass compare_mode=None if this is intended"
                ),
                stacklevel=3,
            )

    # -- the step
    def _pm(self, p) -> ParamMask:
        return self._pmasks[id(p)]

    def mask_gradients(self) -> None:
        """Zero the gradient outside the mask (``grad = None`` for tensors entirely outside it)."""
        self._sync_active()
        for group in self.optimizer.param_groups:
            # SGD with maximize negates the gradient before the step: a +0 would become -0, and p - lr·(-0)
            # turns a frozen -0.0 into +0.0. Filling with -0 leaves it +0 after the negation, so no bit moves.
            zero = -0.0 if group.get("maximize", False) else 0.0
            for p in group["params"]:
                pm = self._pmasks[id(p)]
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise MaskError(f"{pm.name}: sparse gradients are not supported by the masked optimizer")
                if pm.all_frozen:
                    p.grad = None
                elif pm.frozen is not None:
                    g.masked_fill_(pm.frozen, zero)

    def _sync_active(self) -> None:
        """Follow parameter groups added after attaching (``add_param_group``): mask them too, or refuse."""
        ids = [id(p) for g in self.optimizer.param_groups for p in g["params"]]
        if len(ids) == len(self._active) and all(i == id(pm.param) for i, pm in zip(ids, self._active)):
            return
        unknown = [i for i in ids if i not in self._pmasks]
        if unknown:
            raise MaskMismatchError(
                f"{len(unknown)} parameter(s) were added to the optimizer after the mask was attached, and the "
                "model the mask was resolved against does not name them: they would train unmasked"
            )
        self._active = [self._pmasks[i] for i in ids]
        self.numel = sum(pm.numel for pm in self._active)
        self.n_trainable = sum(pm.n_trainable for pm in self._active)
        self._state_dirty = True

    def _has_frozen(self, p) -> bool:
        return self._pm(p).frozen is not None or self._pm(p).all_frozen

    def _zero_group_weight_decay(self) -> None:
        self._saved_wd = []
        if not self.exact:
            return  # strict mode restores whatever the optimizer's own decay did to frozen entries
        for group in self.optimizer.param_groups:
            wd = group.get("weight_decay", 0)
            if not float(wd) or not any(self._has_frozen(p) for p in group["params"]):
                continue
            self._saved_wd.append((group, wd))
            group["weight_decay"] = torch.zeros_like(wd) if isinstance(wd, torch.Tensor) else 0.0

    def _masked_decay(self) -> None:
        """Apply the weight decay the optimizer would have applied, to the masked entries only."""
        for group, wd in self._saved_wd:
            wd = float(wd)
            lr = float(group["lr"])
            decoupled = isinstance(self.optimizer, torch.optim.AdamW) or bool(
                group.get("decoupled_weight_decay", False)
            )
            for p in group["params"]:
                pm = self._pm(p)
                if p.grad is None or pm.all_frozen:
                    continue  # the optimizer skips a parameter without gradient: no decay either
                with torch.no_grad():
                    if decoupled:
                        decayed = p.mul(1 - lr * wd)
                        p.copy_(decayed if pm.frozen is None else torch.where(pm.frozen, p, decayed))
                    else:
                        # L2 enters the gradient; with maximize the optimizer negates the gradient first.
                        alpha = -wd if group.get("maximize", False) else wd
                        g = p.grad.add(p, alpha=alpha)
                        if pm.frozen is not None:
                            g.masked_fill_(pm.frozen, 0)
                        p.grad.copy_(g)

    def _clean_state(self) -> None:
        keys = EXACT_STATE_KEYS.get(type(self.optimizer), ())
        for pm in self._active:
            state = self.optimizer.state.get(pm.param)
            if not state or pm.frozen is None:
                continue
            for k in keys:
                buf = state.get(k)
                if isinstance(buf, torch.Tensor) and buf.shape == pm.param.shape:
                    buf.masked_fill_(pm.frozen, 0)
        self._state_dirty = False

    def _prepare_gradients(self) -> None:
        self.mask_gradients()
        self._masked_decay()

    def _take_snapshot(self) -> None:
        self._snapshot = []
        for pm in self._active:
            if pm.all_frozen:
                self._snapshot.append((pm, _local(pm.param.detach()).clone()))
            elif pm.frozen is not None:
                self._snapshot.append((pm, _local(pm.param.detach()).masked_select(_local(pm.frozen))))

    def _restore_weight_decay(self) -> None:
        for group, wd in self._saved_wd:
            group["weight_decay"] = wd
        self._saved_wd = []

    def _pre_hook(self, opt, args, kwargs):
        self._restore_weight_decay()  # left zeroed if the previous step raised before its post-hook
        self._sync_active()
        if self.exact and self._state_dirty:
            self._clean_state()
        self._zero_group_weight_decay()
        checking = self.strict or self.steps < self.verify_steps
        if checking:
            self._take_snapshot()
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._prepare_gradients()
            return None

        def masked_closure():
            loss = closure()
            self._prepare_gradients()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": masked_closure}
        return (args[0], masked_closure, *args[2:]), kwargs

    def _post_hook(self, opt, args, kwargs) -> None:
        self._restore_weight_decay()
        moved_report = []
        for pm, saved in self._snapshot:
            p = _local(pm.param.detach())
            # the snapshot holds only parameters that are all frozen or have a frozen mask
            frozen = None if pm.all_frozen or pm.frozen is None else _local(pm.frozen)
            now = p if frozen is None else p.masked_select(frozen)
            moved = int((int_view(now) != int_view(saved)).sum())
            if moved:
                moved_report.append(f"{pm.name}: {moved}")
                if frozen is None:
                    p.copy_(saved)
                else:
                    p.masked_scatter_(frozen, saved)
                self.restored_entries += moved
        self._snapshot = []
        self.steps += 1
        if moved_report and not self.strict:
            raise MaskError(
                f"{type(self.optimizer).__name__} moved frozen entries in step {self.steps} "
                f"({_listing(moved_report)}); they were restored. Use strict=True with this optimizer."
            )

    def _on_load_state_dict(self, opt) -> None:
        self._state_dirty = True

    # -- convenience: use it like the optimizer it wraps
    def step(self, closure=None):
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def remove(self) -> None:
        """Detach from the optimizer: later steps are no longer masked."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._restore_weight_decay()
        if getattr(self.optimizer, _MASKED_ATTR, None) is self:
            delattr(self.optimizer, _MASKED_ATTR)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def density(self) -> float:
        """Share of the optimizer's entries that train."""
        return self.n_trainable / self.numel if self.numel else 0.0

    def trainable_mask(self, name: str) -> torch.Tensor:
        """Boolean tensor (True = trains) of one parameter, by any of its names."""
        for pm in self._pmasks.values():
            if name in pm.aliases:
                return torch.ones_like(pm.param, dtype=torch.bool) if pm.frozen is None else ~pm.frozen
        raise KeyError(name)

    def report(self) -> dict:
        """What was masked and how: for logs and run metadata."""
        return {
            "optimizer": type(self.optimizer).__name__,
            "mode": "strict (frozen entries restored after each step)" if self.strict else "exact (zero update)",
            "order": "mask, then clip" if self.mask_before_clip else "clip the full gradient, then mask",
            "weight_decay": "applied inside the mask only"
            if self.exact
            else "optimizer's own; frozen entries restored",
            "mask": self.mask.describe(("kind", "path", "atol", "dtype", "density", "bits_sha256")),
            "numel": self.numel,
            "trainable": self.n_trainable,
            "density": self.density,
            "fully_frozen_tensors": sum(1 for pm in self._active if pm.all_frozen),
            "steps": self.steps,
            "verified_steps": min(self.steps, self.verify_steps) if not self.strict else self.steps,
            "restored_entries": self.restored_entries,
            "buffers_in_mask": list(self.buffers_in_mask),
        }


def mask_optimizer(optimizer, mask, model, **kw) -> MaskedOptimizer:
    """Attach ``mask`` to ``optimizer`` (see :class:`MaskedOptimizer`); returns the handle."""
    return MaskedOptimizer(optimizer, mask, model, **kw)
