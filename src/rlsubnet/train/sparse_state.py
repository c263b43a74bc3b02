"""What the sparse optimizer holds per parameter, and its resumable state: ``state_dict`` / ``load_state_dict``
round-trip exactly (masters, moments, step counts, hyper-parameters), and a state saved under another optimizer,
mask, model layout or shard is refused."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rlsubnet.errors import UsageError
from rlsubnet.masks.mask import MaskError

STATE_FORMAT = "rlsubnet.sparse_optimizer"
STATE_VERSION = 1
_EXACT_DTYPES = (torch.float32, torch.float64)  # weights that are their own masters


@dataclass
class _Slot:
    """One parameter as the optimizer sees it."""

    name: str
    param: torch.nn.Parameter
    index: torch.Tensor | None  # flat local indices of the trainable entries; None: every local entry trains
    k: int  # trainable entries held by this rank
    n_trainable: int  # trainable entries in the full tensor
    start: int  # flat range of the full tensor held by this rank
    stop: int
    groups: tuple  # process groups that complete a sum over this rank's entries (FSDP2); () when local
    grad: torch.Tensor | None = None  # the k entries' gradient, in the compute dtype, summed over passes
    norm: torch.Tensor | None = None  # norm of the dense gradient that was reduced (full-norm clipping)
    passes: int = 0  # backward passes that reached this parameter since the last step


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _EXACT_DTYPES else torch.float32


class SparseStateIO:
    """Resume support for :class:`~rlsubnet.train.SparseMaskedOptimizer` (a mixin: it reads the optimizer's slots,
    mask and parameter groups)."""

    _order: list[_Slot]
    _slots: dict[int, _Slot]
    kind: str
    steps: int
    mask: Any
    param_groups: list[dict[str, Any]]
    state: Any

    def zero_grad(self, set_to_none: bool = True) -> None:  # the optimizer's own
        raise NotImplementedError

    def _layout(self) -> list[dict]:
        return [
            {"name": s.name, "numel": s.param.numel(), "start": s.start, "stop": s.stop, "k": s.k}
            for s in self._order
            if s.n_trainable
        ]

    def state_dict(self) -> dict:
        """Masters, moments, step counts and hyper-parameters (this rank's shard under FSDP2); tensors are not copied."""
        params = [p for g in self.param_groups for p in g["params"]]
        pos = {id(p): i for i, p in enumerate(params)}
        return {
            "state": {pos[id(p)]: dict(st) for p, st in self.state.items() if st},
            "param_groups": [
                {**{k: v for k, v in g.items() if k != "params"}, "params": [pos[id(p)] for p in g["params"]]}
                for g in self.param_groups
            ],
            "sparse": {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "optimizer": self.kind,
                "mask_bits_sha256": self._mask_sha(),
                "params": self._layout(),
                "steps": self.steps,
            },
        }

    def _mask_sha(self) -> str:
        if not hasattr(self, "_sha"):
            self._sha = self.mask.bits_sha256()
        return self._sha

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` of the same optimizer, mask, model layout and shard; anything else is refused."""
        head = state_dict.get("sparse") if isinstance(state_dict, Mapping) else None
        if not isinstance(head, Mapping) or head.get("format") != STATE_FORMAT:
            raise UsageError("not a SparseMaskedOptimizer state (a dense optimizer's state_dict cannot be loaded here)")
        if head.get("version") != STATE_VERSION:
            raise UsageError(
                f"sparse optimizer state version {head.get('version')!r} is not supported (expected {STATE_VERSION})"
            )
        if head.get("optimizer") != self.kind:
            raise UsageError(f"the saved state is of optimizer {head.get('optimizer')!r}, this one is {self.kind!r}")
        if head.get("mask_bits_sha256") != self._mask_sha():
            raise MaskError("the saved optimizer state was trained with another mask (bits_sha256 differs)")
        if head.get("params") != self._layout():
            raise UsageError(
                "the saved optimizer state covers other parameters or another shard of them (names, sizes or shard "
                "ranges differ): load each rank's own state with the same model and world size"
            )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)
        ):
            raise UsageError("the saved optimizer state has other parameter groups")
        params = [p for g in self.param_groups for p in g["params"]]
        new_state = {}
        for i, st in state_dict["state"].items():
            p = params[int(i)]
            s = self._slots[id(p)]
            expect = self._expected_state(s)
            # SGD without momentum keeps no buffer; everything else is made on the first step and must be there
            if set(st) - set(expect) or not set(st) >= set(expect) - {"momentum_buffer"}:
                raise UsageError(f"{s.name}: saved optimizer state has keys {sorted(st)}, expected {sorted(expect)}")
            out = {}
            for key, val in st.items():
                shape, dtype = expect[key]
                if not isinstance(val, torch.Tensor) or tuple(val.shape) != shape or val.dtype != dtype:
                    got = f"{val.dtype} {list(val.shape)}" if isinstance(val, torch.Tensor) else type(val).__name__
                    raise UsageError(f"{s.name}: saved {key} is {got}, expected {dtype} {list(shape)}")
                out[key] = val.detach().to(device=s.param.device if key != "step" else "cpu", copy=True)
            new_state[p] = out
        self.state.clear()
        self.state.update(new_state)
        for mine, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    mine[k] = v
        self.steps = int(head.get("steps", 0))
        self.zero_grad()

    def _expected_state(self, s: _Slot) -> dict:
        cdtype = _compute_dtype(s.param.dtype)
        vec: tuple[tuple[int, ...], torch.dtype] = ((s.k,), cdtype)
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if s.param.dtype not in _EXACT_DTYPES:
            out["master"] = ((s.k,), torch.float32)
        if self.kind == "sgd":
            out["momentum_buffer"] = vec
        else:
            out.update({"step": ((), torch.float32), "exp_avg": vec, "exp_avg_sq": vec})
        return out
