"""A real SIGBUS, observed from a test (not collected: no ``test_`` prefix)."""

from __future__ import annotations


def touch_dies_of_sigbus(address: int, length: int, write: bool) -> int:
    """Touch ``[address, address+length)`` (memset 0xaa, or read every byte) in a forked child and return the
    signal that ended it (0 if it exited normally).

    Why a child: the kernel answers a bad access to a guest_memfd mapping with SIGBUS, which kills the
    process; both backends give a real SIGBUS, so the test survives only in a child. Forking keeps the
    parent's ``MAP_SHARED`` mappings, so what the child wrote before dying is visible to the parent."""
    import ctypes
    import faulthandler
    import os

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            faulthandler.disable()  # die of the signal itself, without a traceback
            if write:
                ctypes.memset(address, 0xAA, length)
            else:
                ctypes.string_at(address, length)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
