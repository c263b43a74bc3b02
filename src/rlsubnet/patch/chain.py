"""A chain of patches, checked and planned before anything is read or written: the patches follow each other,
the base is the one they were made from, and each output tensor's starting bits and changes are known."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import zstandard

from rlsubnet.checkpoint import Checkpoint
from rlsubnet.checkpoint.align import layout_diff
from rlsubnet.checkpoint.hashing import short
from rlsubnet.checkpoint.index import ST_DTYPES, TensorInfo
from rlsubnet.checkpoint.layout import Layout, aux_files, layout_of
from rlsubnet.checkpoint.writer import TensorSpec, plan_shards, shard_file_names
from rlsubnet.errors import UsageError, listing
from rlsubnet.patch.codec import RecordCursor
from rlsubnet.patch.errors import PatchError, WrongBaseError
from rlsubnet.patch.format import PatchFile, check_file_name

DEFAULT_MAX_SHARD_BYTES = 5 << 30  # for outputs with no base layout to follow (a chain starting at an anchor)


def open_chain(patches) -> list[PatchFile]:
    """Open patches (paths or PatchFile) and check they form a chain, in the order given."""
    chain = [p if isinstance(p, PatchFile) else PatchFile.open(p) for p in patches]
    if not chain:
        raise UsageError("give at least one patch")
    for i, p in enumerate(chain):
        if i and p.kind == "anchor":
            raise WrongBaseError(
                f"{p.path} is a full anchor: it can only start a chain (apply it, and the patches after it, "
                "without a base)"
            )
    for i in range(1, len(chain)):
        prev, cur = chain[i - 1], chain[i]
        if cur.base_hash != prev.target_hash:
            order = _chain_order(chain)
            hint = f"; wrong order? these chain as {', '.join(q.path.name for q in order)}" if order else ""
            raise WrongBaseError(
                f"{cur.path}: expects base {short(cur.base_hash)}, but {prev.path} produces {short(prev.target_hash)} "
                f"(patch {i + 1} does not follow patch {i}{hint}); nothing written"
            )
        prev_targets = {t["name"]: t["target_hash"] for t in prev.tensors if t["op"] != "remove"}
        cur_bases = {t["name"]: t["base_hash"] for t in cur.tensors if t.get("base_hash")}
        if prev_targets != cur_bases:
            raise PatchError(f"{cur.path}: per-tensor base hashes disagree with {prev.path}'s targets (damaged patch)")
    return chain


def _chain_order(chain: list[PatchFile]) -> list[PatchFile] | None:
    """The order in which these patches would form a chain, if there is exactly one."""
    targets = {p.target_hash for p in chain}
    starts = [p for p in chain if p.base_hash not in targets]
    by_base: dict[str | None, list[PatchFile]] = {}
    for p in chain:
        by_base.setdefault(p.base_hash, []).append(p)
    if len(starts) != 1:
        return None
    order = [starts[0]]
    while len(order) < len(chain):
        nxt = by_base.get(order[-1].target_hash, [])
        if len(nxt) != 1:
            return None
        order.append(nxt[0])
    return order


def check_base_layout(base: Checkpoint, first: PatchFile) -> None:
    """Names, dtypes and shapes of the base against what the first patch was made from (headers only)."""

    # layout_diff hands back the values it was given: tensor entries first, the base's TensorInfos second
    def spec(t: object) -> tuple[str, list]:
        entry = cast(dict[str, Any], t)
        return entry.get("base_dtype", entry["dtype"]), list(entry.get("base_shape", entry["shape"]))

    def same(t: object, info: object) -> bool:
        base_info = cast(TensorInfo, info)
        return ST_DTYPES.get(spec(t)[0]) == base_info.dtype and spec(t)[1] == list(base_info.shape)

    def detail(n: str, t: object, info: object) -> str:
        base_info = cast(TensorInfo, info)
        return f"{n} ({str(base_info.dtype)[6:]}{list(base_info.shape)}, expected {''.join(map(str, spec(t)))})"

    diff = layout_diff(
        {t["name"]: t for t in first.tensors if t.get("base_hash")}, base.infos, same=same, detail=detail
    )
    if diff:
        raise WrongBaseError(
            f"{base.location} is not the base {first.path} was made from "
            f"({diff.describe('tensors missing', 'unexpected tensors', 'with another dtype or shape')}); nothing written"
        )


def base_mismatch(base: Checkpoint, first: PatchFile, bad: list[str], got: str | None) -> WrongBaseError:
    what = f"base hash {short(got)}, " if got else ""
    return WrongBaseError(
        f"{base.location} is not the base {first.path} was made from: {len(bad)} tensor(s) differ "
        f"({listing(bad)}); {what}patch expects {short(first.base_hash)}; nothing written"
    )


@dataclass
class TensorPlan:
    name: str
    dtype: torch.dtype | None  # None: not in the output (removed)
    shape: tuple[int, ...] | None
    in_base: bool
    full_from: int | None  # index of the last patch storing it whole
    deltas: list[int]  # indices of patches with changes to apply after that
    target_hash: str | None
    base_hash: str | None


def plan_chain(chain: list[PatchFile], base_names: list[str]) -> list[TensorPlan]:
    entries = [p.entries() for p in chain]
    order = list(base_names)
    seen = set(order)
    for e in entries:
        for n in e:
            if n not in seen:
                seen.add(n)
                order.append(n)
    plans = []
    for n in order:
        full_from: int | None = None
        deltas: list[int] = []
        alive = n in base_names
        for i, e in enumerate(entries):
            t = e.get(n)
            if t is None:
                if alive:
                    raise PatchError(f"{chain[i].path}: does not list tensor {n!r} that its base holds (damaged patch)")
                continue
            if t["op"] == "remove":
                alive, full_from, deltas = False, None, []
            elif t["op"] == "full":
                alive, full_from, deltas = True, i, []
            elif t["op"] == "delta":
                deltas.append(i)
        base_sha = entries[0][n]["base_hash"] if n in entries[0] else None
        if alive:
            last = entries[-1][n]  # listed: a tensor still alive but missing from a patch was refused above
            plans.append(
                TensorPlan(
                    n,
                    ST_DTYPES[last["dtype"]],
                    tuple(last["shape"]),
                    n in base_names,
                    full_from,
                    deltas,
                    last["target_hash"],
                    base_sha,
                )
            )
        else:
            plans.append(TensorPlan(n, None, None, n in base_names, None, [], None, base_sha))
    return plans


def output_layout(base: Checkpoint | None, plans: list[TensorPlan]) -> Layout:
    """The base's shards with removed tensors dropped and new ones appended to the last shard."""
    # dtype and shape are both set (kept) or both None (removed)
    out: dict[str, TensorSpec] = {
        p.name: (p.name, p.dtype, p.shape) for p in plans if p.dtype is not None and p.shape is not None
    }
    if base is None:
        specs = list(out.values())
        shards = plan_shards(specs, DEFAULT_MAX_SHARD_BYTES)
        return Layout(list(zip(shard_file_names(len(shards)), shards)))
    layout = layout_of(base)
    files = [(fname, [out[n] for n, _, _ in specs if n in out]) for fname, specs in layout.files]
    added = [out[p.name] for p in plans if p.dtype is not None and not p.in_base]
    files[-1] = (files[-1][0], files[-1][1] + added)
    files = [f for f in files if f[1]] or files[:1]  # a shard whose tensors were all removed is dropped
    return Layout(files, layout.file_metadata, layout.index_metadata, layout.folder)


def resolve_files(chain: list[PatchFile], base_folder: Path | None) -> list[tuple[str, object, str | None]] | None:
    """The output's non-weight files: (name, source, expected sha256), checked to exist before writing.

    A patch made with files lists the target folder's files exactly (embedded, or "same as in my base");
    one made without (``files: null``) leaves its base's files as they are.
    """
    current: dict[str, tuple[object, str | None]] | None = None
    if base_folder is not None:
        kept, _ = aux_files(base_folder, 1 << 62)  # weight-like files are never carried over
        current = {p.name: (p, None) for p in kept}
    for p in chain:
        files = p.manifest.get("files")
        if files is None:
            continue
        new: dict[str, tuple[object, str | None]] = {}
        names: set[str] = set()
        for f in files:
            check_file_name(p.path, f["name"], names)  # checked on open too; these names become paths
            if f["source"] == "patch":
                new[f["name"]] = ((p, f), f["sha256"])
            else:
                src = (current or {}).get(f["name"])
                if src is None:
                    where = base_folder if base_folder is not None else "the base (not a model folder)"
                    raise WrongBaseError(
                        f"{p.path}: needs {f['name']!r} from its base, and {where} has no such file "
                        "(pass --weights-only to skip non-weight files); nothing written"
                    )
                if src[1] is not None and src[1] != f["sha256"]:
                    raise PatchError(
                        f"{p.path}: file {f['name']!r} hash disagrees with the previous patch (damaged patch)"
                    )
                new[f["name"]] = (src[0], f["sha256"])
        current = new
    if current is None:
        return None
    return [(name, src, sha) for name, (src, sha) in sorted(current.items())]


def file_bytes(name: str, src, sha: str | None) -> bytes:
    if isinstance(src, Path):
        data = src.read_bytes()
        if sha is not None and hashlib.sha256(data).hexdigest() != sha:
            raise WrongBaseError(
                f"{src}: differs from the {name!r} the patch was made against (sha256 "
                f"{short(hashlib.sha256(data).hexdigest())}, expected {short(sha)}); nothing written"
            )
        return data
    patch, entry = src
    (frame,) = patch.read_record(entry["record"], f"file {name!r}")
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(1, entry["nbytes"]))
    except zstandard.ZstdError as exc:
        raise PatchError(f"{patch.path}: file {name!r}: cannot decompress ({exc})") from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise PatchError(f"{patch.path}: file {name!r} does not match its hash (damaged patch)")
    return data


def record_cursor(patch: PatchFile, name: str, esize: int, *, check: bool = True) -> RecordCursor:
    """A decoder of one tensor's record; ``check=False`` when the patch was verified already."""
    e = patch.entries()[name]
    numel = int(e["numel"])
    if e["record"] is None:
        return RecordCursor(b"", b"", numel, esize, patch.block_numel, e["op"] == "full", name)
    frames = patch.read_record(e["record"], f"tensor {name!r}", check=check)
    pos, val = frames if len(frames) == 2 else (b"", frames[0])
    return RecordCursor(pos, val, numel, esize, patch.block_numel, e["op"] == "full", f"{patch.path}: tensor {name!r}")
