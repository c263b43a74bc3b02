"""Outputs written as a stream: a file under a temporary name beside its path, moved into place only when
complete (:class:`StagedFile`), optionally written with ``O_DIRECT`` (:class:`DirectFile`)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from rlsubnet.errors import RlsubnetError
from rlsubnet.fileio import temp_file_beside


class StagedFile:
    """A file written under a temporary name beside ``path`` (through ``self._f``) and moved into place only by
    :meth:`_commit`, after an fsync; :meth:`abort` removes it. For writers that stream their output."""

    def __init__(self, path: str | Path, error: type[RlsubnetError] = RlsubnetError, *, direct: bool = False):
        self.path = Path(path)
        fd, tmp = temp_file_beside(self.path, error)
        self._tmp = Path(tmp)
        self._f = DirectFile(fd) if direct else os.fdopen(fd, "wb")

    def _commit(self, replace_check=None) -> None:
        """fsync, close and rename into place; ``replace_check()``, if given, runs just before the rename and
        may raise to keep the file from replacing what is there (the temporary is then removed)."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if replace_check is not None:
            try:
                replace_check()
            except BaseException:
                self._tmp.unlink(missing_ok=True)
                raise
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self


class DirectFile:
    """A file written sequentially with ``O_DIRECT``: the bytes go to the disk without filling the page cache.

    For large outputs the writer will not read back (a rebuilt checkpoint): buffered writes copy every byte
    into newly allocated page-cache pages and the final fsync waits for them anyway; measured here, 1 GiB
    took 0.24-2.4 CPU s buffered (page allocation is slow on this VM) against 0.03 direct, in 0.44 s either
    way when the machine was quiet. The cost: the file is not in the page cache afterwards.

    Writes are staged in a page-aligned buffer of ``chunk`` bytes and written in whole chunks; :meth:`flush`
    writes the staged rest (the part that is not a multiple of 4096 after turning ``O_DIRECT`` off, which
    must then be the end of the file). Where ``O_DIRECT`` is not available (not Linux, or a file system such
    as tmpfs that refuses it) the same calls write through the page cache. Takes ownership of ``fd``.
    """

    ALIGN = 4096

    def __init__(self, fd: int, chunk: int = 8 << 20):
        self._fd = fd
        self._chunk = max(self.ALIGN, chunk - chunk % self.ALIGN)
        self._direct = self._set_direct(True)
        self._buf: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._fill = 0
        self.closed = False

    def _set_direct(self, on: bool) -> bool:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return False
        try:
            import fcntl

            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, (flags | flag) if on else (flags & ~flag))
        except OSError:
            return False
        return on

    def _write_all(self, data: memoryview) -> None:
        while len(data):
            try:
                n = os.write(self._fd, data)
            except OSError as exc:
                if self._direct and exc.errno == 22:  # EINVAL: the file system takes the flag but not the writes
                    self._direct = self._set_direct(False)
                    continue
                raise
            data = data[n:]

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        size = len(mv)
        if not self._direct:
            self._write_all(mv)
            return size
        view = self._view
        if view is None:
            self._buf = mmap.mmap(-1, self._chunk)  # page-aligned, as O_DIRECT needs
            view = self._view = memoryview(self._buf)
        while len(mv):
            k = min(len(mv), self._chunk - self._fill)
            view[self._fill : self._fill + k] = mv[:k]
            self._fill += k
            mv = mv[k:]
            if self._fill == self._chunk:
                self._write_all(view)
                self._fill = 0
                if not self._direct:  # fell back: write the rest as it comes
                    self._write_all(mv)
                    break
        return size

    def flush(self) -> None:
        view = self._view
        if not self._fill or view is None:  # nothing staged (a fill needs the buffer)
            return
        aligned = self._fill - self._fill % self.ALIGN
        if aligned:
            self._write_all(view[:aligned])
        if aligned < self._fill:
            self._direct = self._set_direct(False)
            self._write_all(view[aligned : self._fill])
        self._fill = 0

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            os.close(self._fd)
        finally:
            if self._view is not None:
                self._view.release()
            if self._buf is not None:
                self._buf.close()
