"""Train only a mask's entries and pay only for them: optimizer state for the k trainable entries alone.

:class:`SparseMaskedOptimizer` is a ``torch.optim.Optimizer`` (LR schedulers, ``transformers.get_scheduler`` and
``accelerate`` accept it) built from a model and a :class:`~rlsubnet.masks.Mask`. For each parameter it keeps:

- the flat indices of the parameter's trainable entries (int32 below 2^31 entries, else int64; none when every
  entry trains);
- fp32 master values of those entries when the model stores its weights in a narrower dtype (bf16, fp16); an
  fp32 model's weights are their own masters, read and written in place;
- the optimizer's moments for those entries only (AdamW / Adam: ``exp_avg``, ``exp_avg_sq``; SGD: the momentum
  buffer) and a step count.

Memory per trainable entry, and what it is exact to: ``docs/masks-and-training.md``.

**Gradients** are reduced to the trainable entries as soon as backward has accumulated them
(``register_post_accumulate_grad_hook``) and the dense gradient is dropped (``p.grad = None``), so dense gradient
memory lives for about one tensor at a time, not the whole model. Read the gradient norm from
:attr:`last_grad_norm`, not from ``p.grad``, and clip here (``max_grad_norm``), not with
``clip_grad_norm_``: after backward the parameters hold no gradient. In TRL's trainers,
:func:`rlsubnet.train.attach_sparse` moves the clipping from the trainer into the optimizer.

**Clipping** uses the norm of the full gradient, frozen entries included, then masks (the paper's order): the hook
records each dense gradient's norm before dropping it. ``mask_before_clip=True`` clips by the norm of the masked
gradient instead. With gradient accumulation the full norm is that of the *summed* micro-batch gradients, which
per-micro-batch norms cannot give; so when clipping by the full norm, a parameter's dense gradient is left for
autograd to accumulate until its ``accumulation_steps``-th backward pass since the last step, and reduced then.
Anything not reduced by ``step()`` (a short last accumulation) is reduced there, so the result is right whatever
the count; a gradient arriving after its parameter was reduced (more passes than ``accumulation_steps``) is an
error rather than a wrong norm. Without full-norm clipping every pass is reduced at once into the fp32
accumulator. Under DDP (a distributed run whose parameters are not DTensors) the hook fires before DDP's
all-reduce has finished, so gradients are reduced in ``step()`` instead (``reduce_grads="step"``).

**Updates** follow torch's single-tensor AdamW / Adam / SGD arithmetic entry by entry, on the fp32 masters, with
weight decay on the trainable entries only; after each step the masters are written back rounded to the
weights' dtype (``flat[index] = master.to(dtype)``). Frozen entries are never written, so they stay bit-identical.
On an fp32 model the trained weights are bit-identical to those of :class:`~rlsubnet.train.MaskedOptimizer`
around the same torch optimizer (``foreach=False``, the CPU default) with ``clip_grad_norm_`` before the step.

**FSDP2**: parameters sharded by ``torch.distributed.fsdp.fully_shard`` are DTensors split on dim 0; each rank
keeps the indices and state of its own shard only, reads the sharded gradient FSDP2 hands the hook and writes
its local shard. The full-gradient norm sums the ranks' squared norms (one all-reduce per step).

``state_dict()`` / ``load_state_dict()`` round-trip exactly (masters, moments, step counts, hyper-parameters), so
a resumed run equals an uninterrupted one bit for bit; under FSDP2 each rank saves and loads its own shard's state.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from rlsubnet import limits
from rlsubnet.errors import UsageError
from rlsubnet.errors import listing as _listing
from rlsubnet.masks.mask import Mask, MaskError, as_mask
from rlsubnet.train import sharding
from rlsubnet.train.masking import (
    FullMaskWarning,
    MaskModeWarning,
    resolve_parameter_masks,
)
from rlsubnet.train.sparse_rules import SUPPORTED, adam_update, group_defaults, optimizer_kind, sgd_update
from rlsubnet.train.sparse_state import _EXACT_DTYPES, SparseStateIO, _compute_dtype, _Slot

# a weak reference to the optimizer that owns a parameter, set on the parameter itself
_OWNER_ATTR = "_rlsubnet_sparse_owner"


def _owner(p) -> SparseMaskedOptimizer | None:
    ref = getattr(p, _OWNER_ATTR, None)
    return ref() if ref is not None else None


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


class SparseMaskedOptimizer(SparseStateIO, torch.optim.Optimizer):
    """AdamW / Adam / SGD (momentum, nesterov) on the trainable entries of ``mask`` only (see the module docstring).

    >>> opt = SparseMaskedOptimizer(model, "grpo.mask.safetensors", "adamw", lr=1e-6, weight_decay=0.1,
    ...                             max_grad_norm=1.0)
    >>> loss.backward(); opt.step(); opt.zero_grad()        # no clip_grad_norm_: the optimizer clips

    ``model`` names the parameters (DDP / compile wrappers are looked through); every parameter that requires a
    gradient must be in the mask. ``weight_decay=None`` takes torch's default for the optimizer (AdamW 0.01,
    Adam and SGD 0). ``accumulation_steps``: backward passes per step when clipping by the full gradient's norm
    (see the module docstring). ``reduce_grads``: "backward" (the hook), "step", or None to choose ("step" under
    DDP). ``no_decay(name, param) -> bool`` puts the parameters it selects in a second group with weight decay 0
    (transformers and the lab exempt norms and biases: ``lambda name, p: p.ndim < 2``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mask: Mask | str | Path | Mapping[str, torch.Tensor],
        optimizer: str | type = "adamw",
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        mask_before_clip: bool = False,
        accumulation_steps: int = 1,
        reduce_grads: str | None = None,
        compare_mode: str | None = "bf16",
        allow_full: bool = False,
        no_decay: Callable[[str, torch.Tensor], bool] | None = None,
    ):
        self.kind = optimizer_kind(optimizer)
        defaults = group_defaults(
            self.kind, lr, betas, eps, weight_decay, momentum, dampening, nesterov, decoupled_weight_decay, maximize
        )
        self.max_grad_norm = (
            None if max_grad_norm is None else limits.real(max_grad_norm, "max_grad_norm", lo_open=True)
        )
        self.mask_before_clip = bool(mask_before_clip)
        self.accumulation_steps = limits.integer(accumulation_steps, "accumulation_steps", 1, limits.MAX_STEPS)
        if reduce_grads not in (None, "backward", "step"):
            raise UsageError(f"reduce_grads must be 'backward', 'step' or None, got {reduce_grads!r}")
        self.mask = as_mask(mask)
        self._check_mask(compare_mode, allow_full)

        pmasks, self.buffers_in_mask = resolve_parameter_masks(self.mask, model)
        params = [pm for pm in pmasks.values() if pm.param.requires_grad]
        untrainable = [pm.name for pm in pmasks.values() if not pm.param.requires_grad and pm.n_trainable]
        if untrainable:
            raise MaskError(
                f"the mask trains entries of {len(untrainable)} parameters that do not require a gradient "
                f"({_listing(untrainable)}): they would silently stay fixed; set requires_grad or drop them from the mask"
            )
        owners = {id(o): o for o in (_owner(pm.param) for pm in params) if o is not None}
        if owners:
            raise UsageError(
                "this model's parameters are already trained by another SparseMaskedOptimizer (its gradient hooks "
                "would take the gradients first): call .remove() on it, or delete it, before building a new one"
            )
        self.sharded = any(sharding.is_dtensor(pm.param) for pm in params)
        if reduce_grads is None:
            reduce_grads = "step" if _distributed() and not self.sharded else "backward"
        self.reduce_grads = reduce_grads
        self._slots: dict[int, _Slot] = {}
        for pm in params:
            self._slots[id(pm.param)] = self._make_slot(pm)
        del pmasks, params  # the dense boolean masks: only the indices are kept
        self.numel = sum(s.param.numel() for s in self._slots.values())
        self.n_trainable = sum(s.n_trainable for s in self._slots.values())
        self.local_trainable = sum(s.k for s in self._slots.values())
        if self.n_trainable == 0:
            raise MaskError(
                f"the mask selects none of the {self.numel:,} entries that require a gradient: nothing would change"
            )
        self._order = list(self._slots.values())  # model order: the order norms are combined in
        # model order, the same on every rank: each all-reduce must be joined by all ranks in the same order
        self._norm_groups = list(dict.fromkeys(s.groups for s in self._order if s.groups))
        self._ready = False
        trained = [s for s in self._order if s.n_trainable]
        exempt = {id(s.param) for s in trained if no_decay is not None and no_decay(s.name, s.param)}
        groups = [
            g
            for g in (
                {"params": [s.param for s in trained if id(s.param) not in exempt]},
                {"params": [s.param for s in trained if id(s.param) in exempt], "weight_decay": 0.0},
            )
            if g["params"]
        ]
        super().__init__(groups, defaults)
        self._ready = True
        self.steps = 0
        self.last_grad_norm: float | None = None
        self._norm_ahead: torch.Tensor | None = None
        self._handles = []
        me = weakref.ref(self)
        for s in self._order:
            setattr(s.param, _OWNER_ATTR, me)
        if self.reduce_grads == "backward":
            # the hooks hold the optimizer weakly: a deleted optimizer must not keep taking gradients
            def hook(p, me=me):
                opt = me()
                if opt is not None:
                    opt._on_grad(p)

            self._handles = [s.param.register_post_accumulate_grad_hook(hook) for s in self._order]

    # -- construction
    def _check_mask(self, compare_mode: str | None, allow_full: bool) -> None:
        m = self.mask
        src = m.meta.get("path") or "the mask"
        if m.changed == 0:
            raise MaskError(f"{src} has density 0: no parameter would train")
        if m.numel and m.changed == m.numel and not allow_full:
            warnings.warn(
                FullMaskWarning(f"{src} has density 1: every parameter trains, nothing is restricted"), stacklevel=3
            )
        if compare_mode is not None and m.kind not in ("given", "ones", "zeros") and m.mode != compare_mode:
            built = f"comparing in {m.dtype!r}" if m.dtype else "with no recorded comparison dtype"
            warnings.warn(
                MaskModeWarning(
                    f"{src} was built {built}, but this run will be compared in {compare_mode!r}: rebuild the mask "
                    f"with --mode {compare_mode}, or pass compare_mode=None if this is intended"
                ),
                stacklevel=3,
            )

    def _make_slot(self, pm) -> _Slot:
        p = pm.param
        loc = sharding.local(p.detach())
        if not loc.is_contiguous():
            raise UsageError(f"{pm.name}: the parameter is not contiguous; the sparse optimizer writes its flat view")
        if not p.dtype.is_floating_point:
            raise UsageError(f"{pm.name}: a {p.dtype} parameter cannot be trained")
        start, stop = sharding.local_range(p, pm.name)
        n_local = stop - start
        if pm.frozen is None:
            index, k = None, n_local
        else:
            frozen = pm.frozen
            if sharding.is_dtensor(frozen):
                frozen = frozen.to_local().reshape(-1)
            else:
                frozen = frozen.reshape(-1)[start:stop]
            trainable = (~frozen).cpu()
            k = int(trainable.sum())
            if k == n_local:
                index = None
            else:
                idx_dtype = torch.int32 if n_local < 2**31 else torch.int64
                index = trainable.nonzero().reshape(-1).to(idx_dtype).to(loc.device)
        return _Slot(pm.name, p, index, k, pm.n_trainable, start, stop, sharding.reduce_groups(p, pm.name))

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_ready", False):
            raise UsageError(
                "parameters cannot be added to a SparseMaskedOptimizer: it trains the parameters of the model and "
                "mask it was built from"
            )
        super().add_param_group(param_group)

    # -- gradients
    @property
    def _dense_norm(self) -> bool:
        return self.max_grad_norm is not None and not self.mask_before_clip

    def _on_grad(self, p) -> None:
        slot = self._slots[id(p)]
        slot.passes += 1
        self._norm_ahead = None
        if self._dense_norm and slot.passes < self.accumulation_steps:
            return  # autograd sums the next micro-batch into the dense gradient: the norm needs that sum
        with torch.no_grad():
            self._reduce(slot)

    def _reduce(self, slot: _Slot) -> None:
        g = slot.param.grad
        if g is None:
            return
        slot.param.grad = None
        g = sharding.local(g)
        if g.is_sparse:
            raise UsageError(f"{slot.name}: sparse gradients are not supported by the sparse optimizer")
        cdtype = _compute_dtype(slot.param.dtype)
        if self._dense_norm:
            if slot.norm is not None:
                raise UsageError(
                    f"{slot.name}: a gradient arrived after this parameter's gradient was already reduced for the "
                    f"step; with full-gradient clipping set accumulation_steps (now {self.accumulation_steps}) to the "
                    "number of backward passes per optimizer step"
                )
            slot.norm = torch.linalg.vector_norm(g, 2.0, dtype=cdtype)
        if not slot.k:
            return
        flat = g.reshape(-1)
        if slot.index is None:
            part = flat.to(cdtype, copy=True)  # a copy: the gradient may be a view into a DDP bucket
        else:
            part = flat.index_select(0, slot.index).to(cdtype)
        if slot.grad is None:
            slot.grad = part
        else:
            slot.grad.add_(part)

    def _total_norm(self) -> torch.Tensor:
        norms: list[torch.Tensor] = []
        grouped: dict[tuple, list[torch.Tensor]] = {}
        for s in self._order:
            n = s.norm if self._dense_norm else (torch.linalg.vector_norm(s.grad, 2.0) if s.grad is not None else None)
            if n is None:
                continue
            if s.groups:
                grouped.setdefault(s.groups, []).append(n.float())
            else:
                norms.append(n.float())
        first = norms or next(iter(grouped.values()), [])
        device = first[0].device if first else torch.device("cpu")
        if not self._norm_groups:
            # the same combination as torch.nn.utils.clip_grad_norm_, so an fp32 run matches a dense one bitwise
            return torch.linalg.vector_norm(torch.stack(norms), 2.0) if norms else torch.zeros((), device=device)
        sq = torch.stack(norms).square().sum() if norms else torch.zeros((), device=device)
        for groups in self._norm_groups:
            part = grouped.get(groups)
            part_sq = torch.stack(part).square().sum() if part else torch.zeros((), device=device)
            for g in groups:
                torch.distributed.all_reduce(part_sq, group=g)
            sq = sq + part_sq
        return sq.sqrt()

    # -- the step
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def grad_norm(self) -> float:
        """The gradient norm the next ``step()`` clips by, computed now (a trainer logs it before stepping): the full
        gradient's, or with ``mask_before_clip`` or no clipping the norm of the trainable entries' gradient."""
        with torch.no_grad():
            self._reduce_pending()
            self._norm_ahead = self._total_norm()
        self.last_grad_norm = float(self._norm_ahead)
        return self.last_grad_norm

    def _reduce_pending(self) -> None:
        for s in self._order:  # what the hook left dense: accumulation, or reduce_grads="step"
            if s.param.grad is not None:
                self._reduce(s)

    def _step(self) -> None:
        self._reduce_pending()
        coef = None
        if self.max_grad_norm is not None:
            total = self._norm_ahead if self._norm_ahead is not None else self._total_norm()
            self.last_grad_norm = float(total)
            coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        for group in self.param_groups:
            for p in group["params"]:
                s = self._slots[id(p)]
                g = s.grad
                if g is None:
                    continue  # no gradient reached it: torch's optimizers skip it too (no decay, no step count)
                if coef is not None:
                    g.mul_(coef.to(g.dtype))
                self._update(s, g, group)
        for s in self._order:
            s.grad, s.norm, s.passes = None, None, 0
        self._norm_ahead = None
        self.steps += 1

    def _update(self, s: _Slot, g: torch.Tensor, group: dict) -> None:
        flat = sharding.local(s.param.detach()).view(-1)
        state = self.state[s.param]
        separate = flat.dtype not in _EXACT_DTYPES
        if separate:
            if "master" not in state:
                src = flat if s.index is None else flat.index_select(0, s.index)
                state["master"] = src.to(torch.float32, copy=True)
            master = state["master"]
        else:
            master = flat if s.index is None else flat.index_select(0, s.index)
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if group["maximize"]:
            g.neg_()
        if self.kind == "sgd":
            sgd_update(master, g, state, group, lr, wd)
        else:
            adam_update(master, g, state, group, lr, wd)
        if s.index is None:
            if separate:
                flat.copy_(master)
        else:
            flat[s.index] = master.to(flat.dtype) if separate else master

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every gradient: the dense ones autograd holds and the reduced ones of the trainable entries."""
        for s in self._order:
            if s.param.grad is not None:
                if set_to_none:
                    s.param.grad = None
                else:
                    s.param.grad.detach_().zero_()
            s.grad, s.norm, s.passes = None, None, 0
        self._norm_ahead = None

    def remove(self) -> None:
        """Remove the gradient hooks (the optimizer then reduces gradients in ``step()``)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reduce_grads = "step"
        for s in self._order:
            if _owner(s.param) is self:
                delattr(s.param, _OWNER_ATTR)

    # -- what it costs
    def state_bytes(self) -> int:
        """Bytes held between steps: indices, fp32 masters, moments and step counts (this rank's)."""
        n = sum(s.index.numel() * s.index.element_size() for s in self._order if s.index is not None)
        for st in self.state.values():
            n += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
        return n

    def gradient_bytes(self) -> int:
        """Bytes of the reduced gradients held now (between backward and ``step()``)."""
        return sum(s.grad.numel() * s.grad.element_size() for s in self._order if s.grad is not None)

    @property
    def density(self) -> float:
        return self.n_trainable / self.numel if self.numel else 0.0

    def report(self) -> dict:
        """What is trained and what it costs: for logs and run metadata."""
        dtypes = sorted({str(s.param.dtype).replace("torch.", "") for s in self._order})
        separate = any(s.param.dtype not in _EXACT_DTYPES for s in self._order)
        sb = self.state_bytes()
        return {
            "optimizer": self.kind,
            "state": "sparse: indices, masters and moments of the trainable entries only",
            "order": ("mask, then clip" if self.mask_before_clip else "clip the full gradient, then mask")
            if self.max_grad_norm is not None
            else "no clipping",
            "max_grad_norm": self.max_grad_norm,
            "weight_decay": "applied inside the mask only",
            "gradients": "reduced in backward (post-accumulate-grad hook)"
            if self.reduce_grads == "backward"
            else "reduced in step()",
            "accumulation_steps": self.accumulation_steps,
            "weights": dtypes,
            "masters": "fp32 masters of the trainable entries; weights written back rounded"
            if separate
            else "the weights are their own masters",
            "mask": {
                "kind": self.mask.kind,
                "path": self.mask.meta.get("path"),
                "atol": self.mask.atol,
                "dtype": self.mask.dtype,
                "density": self.mask.density,
                "bits_sha256": self._mask_sha(),
            },
            "numel": self.numel,
            "trainable": self.n_trainable,
            "density": self.density,
            "sharded": self.sharded,
            "local_trainable": self.local_trainable,
            "fully_frozen_tensors": sum(1 for s in self._order if not s.n_trainable),
            "steps": self.steps,
            "last_grad_norm": self.last_grad_norm,
            "state_bytes": sb,
            "state_bytes_per_trainable_entry": sb / self.local_trainable if self.local_trainable else None,
            "buffers_in_mask": list(self.buffers_in_mask),
        }


def sparse_optimizer(model: torch.nn.Module, mask, optimizer="adamw", **kw) -> SparseMaskedOptimizer:
    """Build a :class:`SparseMaskedOptimizer` (same arguments)."""
    return SparseMaskedOptimizer(model, mask, optimizer, **kw)


__all__ = ["SUPPORTED", "SparseMaskedOptimizer", "sparse_optimizer"]
