"""Lets CPython run signal handlers (Ctrl-C) while a vCPU runs guest code on the main thread.

Why: CPython runs Python signal handlers only on the main thread, between bytecodes. ``emu_start`` is one long
C call, so a guest loop on the main thread would never return to the interpreter and SIGINT would wait for
SIGKILL. Real KVM returns EINTR from KVM_RUN when a signal arrives. Here one daemon thread stops the main
thread's engine every ``SIGNAL_TICK_S`` while it is in guest mode (``emu_stop``, as a request does); the run
loop then passes through Python, where a pending handler runs and its exception (KeyboardInterrupt)
propagates out of ``run()``. A stop costs one ``emu_start`` re-entry (a few µs per 20 ms); vCPUs on other
threads are never stopped (their signals are handled by the main thread anyway). ``arm``/``disarm`` run on
every ``run()``, so they are plain attribute writes: the thread polls, and goes idle (an Event) after about a
second without an armed vCPU.
"""

from __future__ import annotations

import threading
import time

from kvmgmem.backends.sim.cpu.requests import SIGNAL_TICK_S, VcpuRequests

MAIN_THREAD = threading.main_thread().ident


class SignalTicker:
    """The one ticker thread of the process (``ticker``); armed by the vCPU running on the main thread."""

    IDLE_TICKS = 50

    def __init__(self) -> None:
        self.armed: VcpuRequests | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, requests: VcpuRequests) -> None:
        self.armed = requests
        if not self._wake.is_set():  # the thread is idle, or not started yet
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="kvmgmem-sim-signal-tick", daemon=True)
                    self._thread.start()
            self._wake.set()

    def disarm(self) -> None:
        self.armed = None

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            idle = 0
            while idle < self.IDLE_TICKS:
                time.sleep(SIGNAL_TICK_S)
                armed = self.armed
                if armed is None:
                    idle += 1
                    continue
                idle = 0
                armed.stop_if_in_guest()
            self._wake.clear()
            if self.armed is not None:  # armed while we were deciding to sleep: keep ticking
                self._wake.set()


ticker = SignalTicker()
