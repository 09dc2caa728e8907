"""``immediate_exit`` set while a vCPU runs: the VMM's kick, noticed by a watcher thread.

Why: a VMM stops a running vCPU by sending its thread a signal whose handler sets ``kvm_run->immediate_exit``
(QEMU's SIG_IPI, kvmtool, Firecracker). On the kernel the signal itself ends ``KVM_RUN`` (EINTR,
``KVM_EXIT_INTR``). Here the handler runs in the program while the sim's CPU keeps executing, and nothing in
the sim sees the signal; what it *can* see is the flag the handler wrote. So while any vCPU is in
``KVM_RUN``, one thread polls the ``immediate_exit`` byte of the running vCPUs' ``kvm_run`` areas and kicks
a vCPU whose flag is set (``Vcpu.kick``: the run returns EINTR), a few milliseconds after the signal.
A signal whose handler does not set the flag still does not end the run.

The thread never ends (it sleeps while no vCPU runs) and there is one per process (``watcher()``): a
thread that ends frees its stacks with ``munmap`` during interpreter teardown, and those calls must not have
to go through the preload library's server routing while the thread holds the interpreter's lock.
"""

from __future__ import annotations

import threading
from typing import Any

#: How often the watcher looks at the flags while vCPUs run (seconds).
POLL_INTERVAL = 0.002


class KickWatcher:
    """Tracks the vCPUs inside KVM_RUN and kicks those whose ``immediate_exit`` the program set."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: dict[int, Any] = {}  # id(state) -> VcpuState
        self._thread: threading.Thread | None = None

    def enter(self, state: Any) -> None:
        """``state``'s vCPU is about to run the guest."""
        with self._cond:
            self._running[id(state)] = state
            if self._thread is None or not self._thread.is_alive():  # first run, or after fork()
                self._thread = threading.Thread(target=self._watch, name="kvmgmem-run-kicks", daemon=True)
                self._thread.start()
            self._cond.notify()

    def leave(self, state: Any) -> None:
        """``state``'s vCPU left the guest."""
        with self._cond:
            self._running.pop(id(state), None)

    def _watch(self) -> None:
        while True:
            with self._cond:
                while not self._running:
                    self._cond.wait()
                # Read under the lock: ``leave`` (which comes before the area can be unmapped) waits for it.
                flagged = [s for s in self._running.values() if s.area.run.immediate_exit]
                for state in flagged:
                    del self._running[id(state)]
            for state in flagged:  # outside the lock: kick() waits for the vCPU, which then calls leave()
                state.vcpu.kick()
            with self._cond:
                self._cond.wait(POLL_INTERVAL)


_watcher: KickWatcher | None = None
_watcher_lock = threading.Lock()


def watcher() -> KickWatcher:
    """The process's one ``KickWatcher`` (every ``Server`` shares it)."""
    global _watcher
    with _watcher_lock:
        if _watcher is None:
            _watcher = KickWatcher()
        return _watcher
