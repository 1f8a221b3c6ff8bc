"""Child processes that a test starts and always ends.

Every child gets its own process group (``start_new_session``), so that the test can end it
together with whatever it started (DDP ranks, forked writers): :func:`started` sends SIGKILL
to the whole group when the ``with`` block ends, however it ends (a failed assertion, a
timeout, pytest-timeout's interruption). SIGKILL, because a Lightning rank that handles SIGTERM
itself may not exit on it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import contextmanager
from typing import Iterator

DEFAULT_TIMEOUT_S = 900.0


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (it leads one) and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        pass
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


@contextmanager
def started(cmd: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(cmd)`` in a new process group, killed (with its group) on exit."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    try:
        yield proc
    finally:
        kill_group(proc)


def run(cmd: list[str], timeout: float = DEFAULT_TIMEOUT_S, **popen_kwargs
        ) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(cmd, capture_output=True, text=True, timeout=...)``, but the
    child's whole process group is killed afterwards, and a timeout is a test failure that
    shows the end of what the child printed."""
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    popen_kwargs.setdefault("text", True)
    with started(cmd, **popen_kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise AssertionError(f"{' '.join(map(str, cmd))} did not finish in {timeout:.0f} s")
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
