"""Checks of a patch manifest's fields, run when a patch is opened: every count, record location, version and
embedded file name is validated before anything is read from the records or written anywhere."""

from __future__ import annotations

import math
from pathlib import Path

from rlsubnet._version import __version__
from rlsubnet.checkpoint.index import ST_DTYPES
from rlsubnet.checkpoint.layout import is_weight_file
from rlsubnet.fileio import member_name_problem
from rlsubnet.patch.errors import PatchError, PatchVersionError

FORMAT_VERSION = 2  # the patch format this code writes and reads


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive_int(v) -> bool:
    return _count(v) and v > 0


def _require(path: Path, what: str, obj, fields: dict) -> None:
    """Each key of ``fields`` is present in ``obj`` with the right type (a type, or a predicate)."""
    if not isinstance(obj, dict):
        raise PatchError(f"{path}: damaged manifest ({what} is not an object)")
    for key, kind in fields.items():
        v = obj.get(key)
        ok = isinstance(v, kind) if isinstance(kind, type) else kind(v)
        if not ok:
            raise PatchError(f"{path}: damaged manifest ({what} has no valid {key!r}: {v!r})")


def check_file_name(path: Path, name, seen: set[str]) -> None:
    """An embedded file's name becomes a path in the output folder: a plain name, not the weights', once.
    Compared without case, as a case-insensitive file system would."""
    problem = member_name_problem(name)
    if problem is None and is_weight_file(name):
        problem = "the name of a weight or index file"
    if problem is None and name.lower() in seen:
        problem = "listed twice"
    if problem is not None:
        raise PatchError(
            f"{path}: file entry {name!r} refused: {problem} (a hostile or damaged patch); nothing written"
        )
    seen.add(name.lower())


def _check_record(path: Path, what: str, rec) -> None:
    _require(path, f"{what}'s record", rec, {"offset": _count, "sha256": str, "nbytes": list})
    if not all(_count(n) for n in rec["nbytes"]):
        raise PatchError(f"{path}: damaged manifest ({what}'s record has invalid frame sizes)")


def _check_tensor_entry(path: Path, t: dict) -> None:
    """The keys every reader of an entry relies on, so a damaged manifest fails here, not in a KeyError later."""
    what = f"tensor {t['name']!r}"
    op = t["op"]
    if op == "remove":
        _require(path, what, t, {"base_hash": str})
        return
    _require(path, what, t, {"dtype": str, "shape": list, "numel": _count, "changed": _count, "target_hash": str})
    if t["dtype"] not in ST_DTYPES or not all(_count(d) for d in t["shape"]):
        raise PatchError(f"{path}: damaged manifest ({what} has dtype {t['dtype']!r}, shape {t['shape']!r})")
    numel = math.prod(t["shape"])
    if numel != t["numel"] or t["changed"] > numel:
        raise PatchError(
            f"{path}: damaged manifest ({what}: numel {t['numel']}, changed {t['changed']}, shape {t['shape']})"
        )
    if op in ("same", "delta"):
        _require(path, what, t, {"base_hash": str})
    if op in ("delta", "full"):
        if t.get("record") is None and (op == "full" or t["changed"]):
            raise PatchError(f"{path}: damaged manifest ({what}: op {op} without a record)")
    if t.get("record") is not None:
        _check_record(path, what, t["record"])


def _check_version(path: Path, version: int) -> None:
    if version > FORMAT_VERSION:
        raise PatchVersionError(
            f"{path}: patch format version {version} is newer than this rlsubnet {__version__} reads "
            f"(up to {FORMAT_VERSION}); upgrade rlsubnet to apply it"
        )
    if version == 1:
        raise PatchVersionError(
            f"{path}: patch format version 1 (SHA-256 content hashes, from a development version of rlsubnet) "
            f"is no longer read; re-create the patch with rlsubnet {__version__}"
        )
    if version < 1:
        raise PatchError(f"{path}: invalid patch format version {version}")
