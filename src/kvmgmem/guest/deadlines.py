"""One thread for every vCPU watchdog: callbacks fired at deadlines, armed and disarmed without a thread each.

Why: ``run_until_event`` arms a watchdog for every ucall it waits for, so a guest that makes 10,000 ucalls arms
10,000 of them. A ``threading.Timer`` per watchdog starts and cancels a host thread each time (about 125 µs
here, more than a sim vCPU's whole exit round trip and ten times a kvm CPL0 one), and with several vCPU
threads every start also hands the GIL around. Here arming is a dict insert under a lock; the one daemon
thread sleeps until the earliest deadline and is woken only when a new deadline comes before the one it
sleeps for. A disarmed entry is simply gone, so the thread at most wakes once in vain.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable


class Deadlines:
    """Fires each armed callback once, on its own daemon thread, when its deadline passes. Only the module's
    ``deadlines`` is reset in a forked child (``os.register_at_fork``).

    >>> fired = threading.Event()
    >>> d = Deadlines()
    >>> token = d.arm(0.01, fired.set)
    >>> fired.wait(5)
    True
    >>> d.disarm(d.arm(60, fired.clear))  # disarmed: never fires
    >>> fired.is_set()
    True
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: dict[int, tuple[float, Callable[[], None]]] = {}
        self._tokens = itertools.count(1)
        self._sleeps_until: float | None = None  # the deadline the thread waits for (None: none armed)
        self._thread: threading.Thread | None = None

    def arm(self, timeout: float, fire: Callable[[], None]) -> int:
        """Call ``fire()`` on the deadline thread ``timeout`` seconds from now, unless ``disarm``-ed first.
        Returns the token ``disarm`` takes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = (deadline, fire)
            if self._thread is None or not self._thread.is_alive():  # first arm, or the thread was killed
                self._thread = threading.Thread(target=self._loop, name="kvmgmem-deadlines", daemon=True)
                self._thread.start()
            elif self._sleeps_until is None or deadline < self._sleeps_until:
                self._cond.notify()
        return token

    def disarm(self, token: int) -> None:
        """Forget ``token``; its callback will not be called (unless it already runs)."""
        with self._cond:
            self._armed.pop(token, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [token for token, (deadline, _) in self._armed.items() if deadline <= now]
                if not due:
                    self._sleeps_until = min((deadline for deadline, _ in self._armed.values()), default=None)
                    # a timeout past TIMEOUT_MAX (math.inf, say) is a wait without end: it would raise here
                    wait = None if self._sleeps_until is None else min(self._sleeps_until - now, threading.TIMEOUT_MAX)
                    self._cond.wait(wait)
                    continue
                callbacks = [self._armed.pop(token)[1] for token in due]
                self._sleeps_until = None
            for fire in callbacks:
                _call(fire)

    def _after_fork(self) -> None:
        """A forked child has no deadline thread and inherits armed entries nothing will fire."""
        self._cond = threading.Condition(threading.Lock())
        self._armed.clear()
        self._sleeps_until = None
        self._thread = None


def _call(fire: Callable[[], None]) -> None:
    """Run one callback; whatever it raises (SystemExit too) is reported like an exception on a Timer thread,
    and the deadline thread goes on: every other watchdog of the process depends on it."""
    try:
        fire()
    except BaseException as exc:
        try:
            threading.excepthook(
                threading.ExceptHookArgs((type(exc), exc, exc.__traceback__, threading.current_thread()))
            )
        except BaseException:  # a failing excepthook must not take the thread down either
            pass


#: The process's deadline thread, shared by every watchdog.
deadlines = Deadlines()
os.register_at_fork(after_in_child=deadlines._after_fork)

__all__ = ["Deadlines", "deadlines"]
