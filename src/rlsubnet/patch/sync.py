"""Live weight sync: a trainer writes a patch every K optimizer steps; inference workers apply them in place.

The trainer keeps one bf16 snapshot of the weights as last synced. Every K optimizer steps it rounds the
current (fp32 master) weights to bf16, writes a patch from the snapshot to them and makes the rounded
weights the new snapshot. A patch therefore holds every entry whose bf16 value differs after those K steps,
whichever step changed it: one that changed at step 1 and again at step K is there once, with its final
value; one that moved and came back is not there at all. Every M patches it also writes a full anchor of the
same state, so a worker that fell behind or joined late resynchronises from the latest anchor without the base.

    sync_dir/
      sync.json                        the chain: one entry per file, in order (rewritten atomically)
      step-00000000.anchor.rlpatch     the starting weights (initial_anchor=True)
      step-00000010.rlpatch            snapshot(step 0) -> weights at step 10
      step-00000020.rlpatch            ... every K steps
      step-00000020.anchor.rlpatch     every M patches: the full weights at that step

Workers call :func:`sync_receive` (or :func:`~rlsubnet.patch.live.apply_patch_` per file): each patch is
applied only to a model whose content hash is the patch's base, and the model ends bit-identical to the
trainer's bf16 weights at that step.

Memory on the trainer: one copy of the weights in ``dtype`` on the CPU (the snapshot) plus one block; the
patch is computed block by block from the live parameters. Only the main process writes
(``state.is_world_process_zero``); every parameter must be whole on it (single process or DDP). Sharded
parameters are refused on every rank when training begins: FSDP2's DTensors (a patch is one file of whole
tensors, and gathering the model onto one rank is what live sync avoids), and FSDP1 / ZeRO-3's empty
placeholders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from rlsubnet import limits
from rlsubnet.checkpoint import Checkpoint, element_size
from rlsubnet.checkpoint.hashing import hash_state_dict, short
from rlsubnet.checkpoint.index import TensorInfo
from rlsubnet.checkpoint.reader import StateDictCheckpoint
from rlsubnet.errors import UsageError
from rlsubnet.fileio import atomic_write_text, safe_member_name
from rlsubnet.patch.encode import DEFAULT_LEVEL, write_patch
from rlsubnet.patch.errors import WrongBaseError
from rlsubnet.patch.format import PatchFile
from rlsubnet.patch.live import apply_patch_, model_tensors
from rlsubnet.patch.signing import load_private_key
from rlsubnet.patch.signing import trusted_keys as as_trusted

SYNC_FILE = "sync.json"
SYNC_FORMAT = "rlsubnet-sync"
SYNC_VERSION = 1


class LiveCheckpoint(Checkpoint):
    """A model's current tensors as the receivers hold them (floats rounded to ``dtype``), read block by block.

    Nothing is copied up front: each read rounds and copies one block to the CPU, so writing a patch from
    the live model costs one block of memory, not a second copy of the model.
    """

    format = "live"

    def __init__(self, model, dtype: torch.dtype | None, label: str = "<live model>"):
        self._tensors = {}
        infos = {}
        if isinstance(model, torch.nn.Module):
            refuse_sharded(model)
        for name, t in model_tensors(model).items():
            if t.numel() == 0 and t.dim() == 1 and isinstance(model, torch.nn.Module):
                raise UsageError(f"tensor {name!r} is empty on this process (sharded by FSDP/ZeRO-3?); gather it first")
            out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
            self._tensors[name] = t.detach()
            nbytes = t.numel() * element_size(out_dtype)
            infos[name] = TensorInfo(name, out_dtype, tuple(t.shape), Path(label), -1, nbytes)
        super().__init__(label, label, infos)

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self._tensors[name]
        return t.reshape(-1)[start:stop].to(device="cpu", dtype=self.infos[name].dtype, copy=True)


def refuse_sharded(model) -> None:
    """A one-line error if any of ``model``'s tensors is an FSDP2 shard (a DTensor): the sync writes whole tensors."""
    from rlsubnet.train.sharding import is_dtensor

    # before model_tensors: telling tied tensors apart reads storages, which a DTensor does not have
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    sharded = [name for name, t in named if is_dtensor(t)]
    if sharded:
        raise UsageError(
            f"live sync does not support parameters sharded by FSDP2 ({len(sharded)} DTensors, e.g. {sharded[0]!r}): "
            "train without fully_shard, or save a checkpoint and make a patch from it with `rlsubnet patch create`"
        )


def _snapshot(live: LiveCheckpoint) -> dict[str, torch.Tensor]:
    return {name: live.read(name) for name in live.names()}


class SyncWriter:
    """Write the sync chain for successive states of a model (used by :class:`SparseSyncCallback`).

    ``dtype``: the dtype the receivers hold (floats are rounded to it; None keeps each tensor's own).
    ``sign_key``: sign every patch and anchor with this Ed25519 private key (a key file path, an
    ``Ed25519PrivateKey`` or its 32 raw bytes), so receivers can require it with ``trusted_keys=``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        anchor_every: int = 10,
        dtype: torch.dtype | None = torch.bfloat16,
        values: str = "xor",
        level: int = DEFAULT_LEVEL,
        sign_key=None,
    ):
        anchor_every = limits.integer(anchor_every, "anchor_every (0: no anchors after the first)", 0, limits.MAX_STEPS)
        level = limits.integer(level, "level", 1, 22)
        self.out_dir = Path(out_dir)
        self.anchor_every, self.dtype, self.values, self.level = anchor_every, dtype, values, level
        self.sign_key = None if sign_key is None else load_private_key(sign_key)  # read once, fail before training
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.hashes: dict[str, str] | None = None
        self.entries: list[dict] = []
        self.patches_since_anchor = 0
        self.last_step: int | None = None

    def _write_index(self) -> None:
        index = {
            "format": SYNC_FORMAT,
            "format_version": SYNC_VERSION,
            "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
            "entries": self.entries,
        }
        atomic_write_text(self.out_dir / SYNC_FILE, json.dumps(index, indent=1) + "\n")

    def _record(self, summary, step: int, kind: str) -> dict:
        m = summary.manifest
        entry = {
            "step": step,
            "file": summary.path.name,
            "kind": kind,
            "base": m["base"]["hash"] if m["base"] else None,
            "target": m["target"]["hash"],
            "changed": m["totals"]["changed"],
            "nbytes": summary.nbytes,
        }
        self.entries.append(entry)
        return entry

    def _anchor(self, state: dict[str, torch.Tensor], step: int) -> dict:
        path = self.out_dir / f"step-{step:08d}.anchor.rlpatch"
        summary = write_patch(
            None,
            StateDictCheckpoint(state, f"step {step}"),
            path,
            level=self.level,
            include_files=False,
            metadata={"step": step},
            overwrite=True,
            sign_key=self.sign_key,
        )
        self.hashes = summary.target_hashes
        return self._record(summary, step, "anchor")

    def start(self, model, step: int = 0, *, anchor: bool = True) -> dict | None:
        """Take the first snapshot (and write it as an anchor unless the receivers already hold it)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.snapshot = _snapshot(LiveCheckpoint(model, self.dtype))
        self.last_step = step
        entry = None
        if anchor:
            entry = self._anchor(self.snapshot, step)
        else:
            self.hashes = hash_state_dict(self.snapshot).tensors
        self._write_index()
        return entry

    def sync(self, model, step: int) -> dict | None:
        """Write the patch from the last synced snapshot to the model's current state; returns its index entry.

        A sync in which no entry changed still writes a (tiny) patch whose base and target hashes are equal, so
        the chain has one link per sync and a receiver's position in it stays unambiguous; receivers skip it.
        """
        if self.snapshot is None:
            raise UsageError("SyncWriter.sync called before start")
        live = LiveCheckpoint(model, self.dtype, f"step {step}")
        path = self.out_dir / f"step-{step:08d}.rlpatch"
        summary = write_patch(
            StateDictCheckpoint(self.snapshot, f"step {self.last_step}"),
            live,
            path,
            values=self.values,
            level=self.level,
            include_files=False,
            metadata={"step": step, "base_step": self.last_step},
            overwrite=True,
            base_hashes=self.hashes,
            hash_target_lazily=True,
            sign_key=self.sign_key,
        )
        entry = self._record(summary, step, "delta")
        for e in summary.manifest["tensors"]:  # the snapshot becomes what the receivers now hold
            if e["op"] != "same":
                self.snapshot[e["name"]] = live.read(e["name"])
        self.hashes, self.last_step = summary.target_hashes, step
        self.patches_since_anchor += 1
        if self.anchor_every and self.patches_since_anchor >= self.anchor_every:
            self._anchor(self.snapshot, step)
            self.patches_since_anchor = 0
        self._write_index()
        return entry


class SparseSyncCallback(TrainerCallback):
    """A ``transformers``/TRL trainer callback that writes a sparse patch every ``every_steps`` optimizer steps.

    >>> trainer = GRPOTrainer(..., callbacks=[SparseSyncCallback("sync/", every_steps=4, anchor_every=8)])

    Each patch compares the trainer's weights, rounded to ``dtype``, with the snapshot taken at the last
    sync (not the previous step), so it holds every entry that differs after the K steps. A full anchor
    follows every ``anchor_every`` patches (0: only the initial one). A last patch is written at the end of
    training if steps remain unsynced. ``sign_key``: sign every patch (see :class:`SyncWriter`).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        every_steps: int = 1,
        anchor_every: int = 10,
        dtype: torch.dtype | None = torch.bfloat16,
        values: str = "xor",
        level: int = DEFAULT_LEVEL,
        initial_anchor: bool = True,
        sign_key=None,
    ):
        every_steps = limits.integer(every_steps, "every_steps", 1, limits.MAX_STEPS)
        self.every_steps = every_steps
        self.initial_anchor = initial_anchor
        self.writer = SyncWriter(
            out_dir, anchor_every=anchor_every, dtype=dtype, values=values, level=level, sign_key=sign_key
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            refuse_sharded(model)  # on every rank: one rank failing alone would leave the others waiting
        if state.is_world_process_zero and model is not None:
            self.writer.start(model, state.global_step, anchor=self.initial_anchor)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Called once per optimizer step (after gradient accumulation), with global_step already advanced.
        if state.is_world_process_zero and model is not None and state.global_step % self.every_steps == 0:
            self.writer.sync(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None and self.writer.last_step != state.global_step:
            self.writer.sync(model, state.global_step)


# ------------------------------------------------------------------------------------------------ receiver
@dataclass
class SyncState:
    """Where a receiving model stands: its content hash and the step it holds."""

    hash: str
    step: int | None


def read_sync_index(sync_dir: str | Path) -> list[dict]:
    """The entries of a sync folder's index, each naming a patch file in that folder (nowhere else)."""
    path = Path(sync_dir) / SYNC_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"{path}: corrupt sync index ({exc})") from None
    if not isinstance(index, dict):
        raise UsageError(f"{path}: corrupt sync index (not a JSON object)")
    if (
        index.get("format") != SYNC_FORMAT
        or not isinstance(index.get("format_version"), int)
        or (index["format_version"] > SYNC_VERSION)
    ):
        raise UsageError(
            f"{path}: not a sync index this rlsubnet reads (format {index.get('format')!r} "
            f"version {index.get('format_version')})"
        )
    entries = index.get("entries")
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and {"file", "kind", "base", "target", "step"} <= e.keys() for e in entries
    ):
        raise UsageError(f"{path}: corrupt sync index (entries)")
    for i, e in enumerate(entries):
        safe_member_name(e["file"], f"{path}: entry {i} (step {e['step']})", UsageError)
    return entries


def sync_receive(model, sync_dir: str | Path, state: SyncState | None = None, *, trusted_keys=None) -> SyncState:
    """Bring ``model`` up to the latest synced step, in place, and return where it now stands.

    From ``state`` (or the model's hash, computed once when None), follow the chain of patches whose base is
    the model's current hash; if the model is on no path to the latest state, start again from the latest
    full anchor. Every patch is applied with its base check. ``trusted_keys``: public keys (paths,
    ``Ed25519PublicKey`` objects or raw 32-byte keys); when given, every patch on the way must be signed by one
    of them, all checked before the model changes.
    """
    keys = as_trusted(trusted_keys)
    entries = read_sync_index(sync_dir)
    if not entries:
        raise UsageError(f"{sync_dir}: the sync index lists no patches yet")
    if state is None:
        state = SyncState(hash_state_dict(model_tensors(model)).digest, None)
    latest = entries[-1]["target"]
    deltas = {e["base"]: e for e in entries if e["kind"] == "delta" and e["base"] != e["target"]}
    path = _follow(state.hash, latest, deltas)
    if path is None:
        anchors = [e for e in entries if e["kind"] == "anchor"]
        usable = [(a, tail) for a in anchors if (tail := _follow(a["target"], latest, deltas)) is not None]
        if not usable:
            raise WrongBaseError(
                f"{sync_dir}: no chain leads from the model ({short(state.hash)}) or from an anchor to the latest state"
            )
        anchor, tail = usable[-1]
        path = [anchor, *tail]
    patches = [PatchFile.open(Path(sync_dir) / e["file"]) for e in path]
    for p in patches:
        p.check_signature(keys)
    for e, p in zip(path, patches):
        # the hash the patch itself verified, not the index's word for it (sync.json is not signed)
        state = SyncState(apply_patch_(model, p), e["step"])
    return state


def _follow(start: str, end: str, deltas: dict[str, dict]) -> list[dict] | None:
    path, cur, seen = [], start, set()
    while cur != end:
        e = deltas.get(cur)
        if e is None or cur in seen:
            return None
        seen.add(cur)
        path.append(e)
        cur = e["target"]
    return path
