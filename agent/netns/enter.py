"""Enter a network namespace from the calling thread, without forking.

pyroute2's ``NetNS`` forks a helper process to open its socket. In a daemon
that runs an asyncio loop with signal handlers, a forked child inherits the
loop's signal wakeup fd, and a signal to that child reads as a signal to the
daemon. setns(2) on the calling thread avoids all of that: sockets opened
while inside stay bound to that namespace after we switch back.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def netns(path: str) -> Iterator[None]:
    """Run the block with the calling thread inside the netns at ``path``."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
