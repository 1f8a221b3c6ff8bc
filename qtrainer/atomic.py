"""Atomic file writes: a file is either the previous complete version or the new complete one.

Every writer goes to a temporary file in the destination's own directory (same file system, so
the final ``os.replace`` is atomic), which is flushed and ``fsync``-ed before it replaces the
destination; the directory is ``fsync``-ed afterwards (best effort) so the rename survives a
crash. If anything fails before the replace, the temporary file is removed and the previous file
(if any) is left untouched. A symlinked destination is resolved: the file it points to is
replaced, the link stays.

Usage::

    with atomic_write("ckpt.pt") as f:          # a binary file object
        torch.save(state, f)

    with atomic_path("model.onnx") as tmp:      # a temporary path, for APIs that want a filename
        torch.onnx.export(model, args, tmp)

    write_bytes_atomic("x.bin", data); write_text_atomic("x.json", text)

The new file gets the permissions of the file it replaces, or ``0o666`` minus the umask.

A writer killed outright (SIGKILL, power loss) cannot remove its temporary file: the destination
is intact, but a hidden ``.<name>.<pid>.<random>.tmp<ext>`` stays behind. The next write of the
same destination removes such leftovers of processes that no longer run (on this machine), so a
run that is killed and resumed again and again does not fill its folder with checkpoint-sized
garbage.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_path", "atomic_write", "write_bytes_atomic", "write_text_atomic"]


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no portable read-only query: set and restore at once
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _target(path: str | os.PathLike) -> tuple[str, str, str]:
    """(resolved destination, its directory, the temp-name prefix/suffix base)."""
    dest = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(dest) or "."
    if os.path.isdir(dest):
        raise IsADirectoryError(f"cannot write file {os.fspath(path)!r}: it is a directory")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {os.fspath(path)!r}: directory {directory!r} does not exist")
    return dest, directory, os.path.basename(dest)


def _mode_for(dest: str) -> int:
    try:
        return os.stat(dest).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_leftovers(directory: str, base: str, ext: str) -> None:
    """Delete temporary files of ``base`` left by writers that were killed (their process is
    gone); best effort."""
    pattern = re.compile(rf"\.{re.escape(base)}\.(\d+)\.[^.]+\.tmp{re.escape(ext)}")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on normal exit it is fsync-ed and atomically
    renamed onto ``path``. On an exception it is deleted and ``path`` is left as it was.

    The temporary name keeps ``path``'s extension (``.model.onnx.<pid>.<random>.tmp.onnx``) for
    writers that look at it. The writer may replace the (empty) temporary file.
    """
    dest, directory, base = _target(path)
    ext = os.path.splitext(base)[1]
    _remove_leftovers(directory, base, ext)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.{os.getpid()}.", suffix=f".tmp{ext}")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(dest))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yield a file object (``mode`` ``"wb"`` or ``"w"``) whose content replaces ``path``
    atomically on normal exit; on an exception ``path`` is left as it was."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode={mode!r} is not allowed; allowed: wb, w")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text``."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
