"""Atomic file and folder writes: an interrupted run never leaves a half-written output.

Every output is written under a temporary name beside it (``.NAME.XXXXXXXX.tmp``, a file or a folder; an
output folder being replaced is moved aside to ``.NAME.old-PID`` for the moment of the swap) and renamed into
place at the end. :func:`output_lock` makes a run the only writer of an output for its whole duration, and
removes what a killed earlier run left under exactly those names.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import inspect
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from rlsubnet.errors import OutputBusyError, RlsubnetError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Longest file name most file systems take (bytes, after UTF-8 encoding).
MAX_NAME_BYTES = 255


def member_name_problem(name) -> str | None:
    """Why ``name`` cannot be a file directly inside a folder, or None when it can.

    Names read from inputs (a patch's embedded files, an index's shard names, a sync chain's patch files)
    become paths under a folder we read or write; only a plain name stays there. No separators of either
    platform, no ``.``/``..``, nothing a platform reads as absolute or as a drive, no control characters.
    """
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if not name:
        return "empty"
    if name in (".", ".."):
        return "a reference to a folder"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if len(name) >= 2 and name[1] == ":" and name[0].isascii() and name[0].isalpha():
        return "starts with a drive letter"
    try:
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            return f"longer than {MAX_NAME_BYTES} bytes"
    except UnicodeEncodeError:
        return "not valid Unicode"
    return None


def safe_member_name(name, what: str, error: type[RlsubnetError] = RlsubnetError) -> str:
    """``name`` when it is a plain file name (:func:`member_name_problem`); else an ``error`` naming ``what``
    (the input and the entry it was read from) and the reason."""
    problem = member_name_problem(name)
    if problem is not None:
        raise error(f"{what}: {name!r} is not a plain file name ({problem})")
    return name


def fix_mode(path: str | Path, mode: int = 0o666) -> None:
    # mkstemp/mkdtemp create private files; outputs get the permissions a plain open() would give.
    os.chmod(path, mode & ~_umask())


def cannot_write(folder: Path, exc: OSError, what: str, error: type[RlsubnetError] = RlsubnetError) -> RlsubnetError:
    """The one-line error for an output that cannot be created in ``folder``."""
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                return error(f"{p}: is not a folder; cannot write {what} under it")
            break
    return error(f"{folder}: cannot write {what} there ({exc.strerror or exc})")


def temp_file_beside(
    path: Path, error: type[RlsubnetError] = RlsubnetError, *, private: bool = False
) -> tuple[int, str]:
    """Create (with its folder) a temporary file next to ``path``, with a plain file's permissions (owner-only
    with ``private``); (fd, name). An unwritable place is an ``error`` naming it, not an ``OSError`` from deep
    inside."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise cannot_write(path.parent, exc, path.name, error) from None
    if not private:  # mkstemp's 0600 is kept for a private file: never open to others, not even while empty
        fix_mode(tmp)
    return fd, tmp


def atomic_write_bytes(
    path: str | Path, data: bytes, *, private: bool = False, error: type[RlsubnetError] = RlsubnetError
) -> None:
    """Write ``data`` to ``path`` under a temporary name, then rename it into place (``private``: mode 0600)."""
    path = Path(path)
    fd, tmp = temp_file_beside(path, error, private=private)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def printable(text: str) -> str:
    """``text`` with what has no UTF-8 form (a file name's undecodable bytes, which Python decodes to lone
    surrogates) spelled as ``\\udcXX`` escapes: for figures, tables and files that must be valid UTF-8."""
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def atomic_write_text(path: str | Path, text: str) -> None:
    # A path that is not valid UTF-8 (a file name's bytes decoded with surrogateescape) has no UTF-8 form;
    # such characters are written as \udcXX escapes rather than failing the whole output.
    atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def write_file_set(out_dir: str | Path, files: dict[str, bytes], *, stale: tuple[str, ...] = ()) -> list[Path]:
    """Write a set of output files into ``out_dir``, all or none.

    Every file is first written and fsynced under a temporary name; only when all of them are on disk are they
    renamed into place, so a failure (a full disk, a name taken by a folder) leaves the folder as it was.
    Files matching the glob patterns ``stale`` that this set does not contain are removed afterwards: outputs
    of an earlier run that would otherwise sit beside the new ones (a ``heatmap-3.png`` of a run with more
    checkpoints). An ``OSError`` becomes an :class:`RlsubnetError` naming the path.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RlsubnetError(f"{out}: exists and is not a folder")
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            target = out / name
            if target.is_dir():
                raise RlsubnetError(f"{target}: is a folder; cannot write an output file there")
            fd, tmp_name = temp_file_beside(target)
            staged.append((Path(tmp_name), target))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, target in staged:
            os.replace(tmp, target)
    except OSError as exc:
        raise cannot_write(out, exc, "the output files") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    keep = {out / name for name in files}
    for pattern in stale:
        for old in out.glob(pattern):
            if old not in keep and old.is_file():
                old.unlink(missing_ok=True)
    return [target for _, target in staged]


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and rename it to ``out_dir`` only if the block succeeds.

    An existing non-empty ``out_dir`` is refused unless ``overwrite``; then it is replaced only at the end.
    The output is locked (:func:`output_lock`) for the duration: one writer at a time.
    """
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        if out_dir.exists() and not out_dir.is_dir():
            raise RlsubnetError(f"{out_dir}: exists and is not a folder")
        if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
            raise RlsubnetError(f"{out_dir}: folder exists and is not empty (choose another output or remove it)")
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        except OSError as exc:
            raise cannot_write(out_dir.parent, exc, out_dir.name) from None
        fix_mode(tmp, 0o777)
        try:
            yield tmp
            if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
                # Checked again at the end: another writer (one that took no lock) may have finished meanwhile.
                raise RlsubnetError(f"{out_dir}: was created by another run meanwhile; not replaced (pass --overwrite)")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)


# -- one writer per output

# tempfile.mkstemp / mkdtemp names: prefix + 8 characters of this alphabet + suffix.
_RANDOM = "[a-z0-9_]{8}"
_held: dict[str, list] = {}  # lock file -> [fd or None, depth]: a process re-entering its own lock goes through
_held_guard = threading.Lock()


def lock_file_of(path: str | Path) -> Path:
    """The lock file of output ``path``: ``.NAME.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def own_temporaries(path: str | Path, members: Iterable[str] = ()) -> list[Path]:
    """What rlsubnet's writers of output ``path`` leave when killed, and nothing else.

    Beside ``path``: ``.NAME.XXXXXXXX.tmp`` (a file or folder from :func:`temp_file_beside` or
    :func:`atomic_dir`) and ``.NAME.old-PID`` (an earlier output moved aside by :func:`atomic_dir`). When
    ``path`` is a folder written in place, also ``.MEMBER.XXXXXXXX.tmp`` inside it for each of ``members``
    (file names or glob patterns of the files the writer puts there)."""
    path = Path(path)
    name = re.escape(path.name)
    beside = re.compile(rf"\.{name}\.(?:{_RANDOM}\.tmp|old-[0-9]+)")
    found = []
    with contextlib.suppress(OSError):
        found += [p for p in path.parent.iterdir() if beside.fullmatch(p.name)]
    members = list(members)
    if members and path.is_dir():
        inner = re.compile(rf"\.(.+)\.{_RANDOM}\.tmp")
        with contextlib.suppress(OSError):
            for p in path.iterdir():
                m = inner.fullmatch(p.name)
                if m and any(fnmatch.fnmatchcase(m.group(1), pat) for pat in members):
                    found.append(p)
    return sorted(found)


def temporaries_in(folder: str | Path) -> list[Path]:
    """Every entry of ``folder`` named as rlsubnet's writers name their temporaries, whatever the output: for a
    folder whose every entry is rlsubnet's output (a demo run's stages, masks, figures). Call under a lock."""
    pattern = re.compile(rf"\..+\.(?:{_RANDOM}\.tmp|old-[0-9]+)")
    try:
        return sorted(p for p in Path(folder).iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []


def remove_stale_temporaries(path: str | Path, members: Iterable[str] = ()) -> list[Path]:
    """Remove :func:`own_temporaries` of ``path``; call only while holding its :func:`output_lock`."""
    removed = []
    for p in own_temporaries(path, members):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="backslashreplace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text else "pid unknown"


_run_label: str | None = None


def set_run_label(label: str | None) -> None:
    """What a lock file says this process is (the CLI sets its command line); default: ``sys.argv``."""
    global _run_label
    _run_label = label


def _busy(output: Path, lock: Path, holder: str) -> OutputBusyError:
    return OutputBusyError(
        f"{output}: another rlsubnet run is writing this output ({holder}); wait for it to "
        f"finish or choose another output (lock file {lock.name})"
    )


def _describe_self() -> str:
    cmd = _run_label if _run_label is not None else " ".join(sys.argv)
    return f"{os.getpid()}: {cmd}".replace("\n", "\\n")[:1000]


def _lock(lock: Path, output: Path) -> int | None:
    """Open and flock ``lock`` (non-blocking); the fd, or None where the file system has no flock."""
    import fcntl

    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise cannot_write(output.parent, exc, output.name) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _busy(output, lock, holder) from None
            return None  # no advisory locks here (some network file systems): write unlocked, as before
        # The previous holder removes the file on release: if it did so between our open and our flock, we
        # hold a lock on a file nobody else will open. Lock the file that is there now instead.
        try:
            st, own = os.stat(lock), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, (_describe_self() + "\n").encode("utf-8", errors="backslashreplace"))
    return fd


@contextlib.contextmanager
def output_lock(path: str | Path, *, members: Iterable[str] = (), reentrant: bool = True) -> Iterator[Path]:
    """Be the only writer of output ``path`` (a file or folder) inside the block.

    An advisory ``flock`` on ``.NAME.lock`` beside the output, taken without waiting: if another process holds
    it, :class:`~rlsubnet.errors.OutputBusyError` names that run (the lock file holds its pid and command).
    Once held, the temporaries a killed earlier writer of this output left are removed
    (:func:`own_temporaries`; ``members``: the files a folder output gets, see there). The lock file is
    removed on leaving. The same process may take the lock again inside the block (a CLI command holds it
    for the whole run, the library writer it calls takes it too) unless ``reentrant`` is False. A folder
    created to hold the lock file is removed again if nothing was written into it."""
    shown = Path(path)  # as the user wrote it, for messages
    path = Path(os.path.abspath(path))
    if not path.name:
        raise RlsubnetError(f"{shown}: not a place for an output")
    lock = lock_file_of(path)
    created = []
    for p in reversed([path.parent, *path.parent.parents]):
        if not p.exists():
            created.append(p)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot_write(shown.parent, exc, path.name) from None
    key = os.path.join(os.path.realpath(lock.parent), lock.name)
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:  # this process already holds it
        if not reentrant:
            with _held_guard:
                entry[1] -= 1
            raise _busy(shown, lock, f"pid {os.getpid()}, this process")
        try:
            yield path
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    try:
        fd = _lock(lock, shown)
    except BaseException:
        _remove_empty(created)
        raise
    with _held_guard:
        _held[key] = entry = [fd, 1]
    try:
        if fd is not None:
            remove_stale_temporaries(path, members)
        yield path
    finally:
        with _held_guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
        if fd is not None and entry[1] == 0:
            with contextlib.suppress(OSError):
                lock.unlink()  # while still holding it: see the inode check in _lock
            os.close(fd)
        _remove_empty(created)


def locks_output(param: str, members: Iterable[str] = ()):
    """Decorator: hold :func:`output_lock` on the function's argument ``param`` for the whole call."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            with output_lock(signature.bind(*args, **kwargs).arguments[param], members=members):
                return fn(*args, **kwargs)

        return locked

    return decorate


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            return
