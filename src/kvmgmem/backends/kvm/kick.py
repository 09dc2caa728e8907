"""Kicking a vCPU thread out of KVM_RUN with a signal.

KVM_RUN returns EINTR when a signal is pending for the calling thread. We send ``KICK_SIGNAL`` with
``pthread_kill``; it needs a handler (the default action would kill the process), so a no-op Python handler
is installed — from the main thread, the only place Python allows it — the first time a vCPU is created
there. Until one is installed, kicks still work through ``immediate_exit`` on the next entry.
"""

from __future__ import annotations

import signal
import threading

KICK_SIGNAL = signal.SIGRTMIN + 5  # SIGRTMIN is libc's, past the signals glibc keeps for itself

_installed = False


def _ignore(signum: int, frame: object) -> None:
    """Python-level no-op: the C handler already made KVM_RUN return EINTR."""


def install_handler() -> bool:
    """Install the kick handler if we are on the main thread and nobody installed one yet."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(KICK_SIGNAL)
    if current in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, _ignore)
    _installed = True
    return True


def signal_number() -> int:
    """The signal a kick sends, or 0 while no handler is installed (sending it would kill the process)."""
    return int(KICK_SIGNAL) if _installed else 0


def send(thread_id: int) -> None:
    if _installed:
        try:
            signal.pthread_kill(thread_id, KICK_SIGNAL)
        except ProcessLookupError:
            pass
