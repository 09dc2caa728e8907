"""Running guest vCPUs: one vCPU until its next ucall (with a watchdog), and many vCPUs on threads.

Why threads: each KVM_RUN blocks its caller (and releases the GIL), so concurrent guests need one host thread
per vCPU; the first failure on any thread must stop the others and reach the test, not vanish in a thread.
A watchdog kicks a vCPU that does not come back in time (KVM_RUN then fails with EINTR), which is also how
the tests probe host quirks such as a VMCALL that never returns.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvmgmem.api import Vcpu
from kvmgmem.errors import KvmError
from kvmgmem.exits import Exit, IoExit
from kvmgmem.guest.deadlines import deadlines
from kvmgmem.guest.events import (
    AssertFail,
    Event,
    GuestAssertionError,
    GuestException,
    GuestFaultError,
    GuestTimeoutError,
    Print,
    decode,
    is_ucall,
)
from kvmgmem.guest.memory import GuestMemory


class _Watchdog:
    """Kicks ``vcpu`` once ``timeout`` seconds have passed, unless disarmed first (on the shared deadline
    thread, ``deadlines``: no thread per watchdog)."""

    def __init__(self, vcpu: Vcpu, timeout: float | None) -> None:
        self.vcpu = vcpu
        self.fired = False
        self._lock = threading.Lock()
        self._armed = timeout is not None
        self._token = deadlines.arm(timeout, self._fire) if timeout is not None else None

    def _fire(self) -> None:
        with self._lock:
            if self._armed:
                self.fired = True
                self.vcpu.kick()

    def disarm(self) -> bool:
        """Stop the watchdog; True if it fired (its kick may still be pending)."""
        with self._lock:
            self._armed = False
            fired = self.fired
        if self._token is not None:
            deadlines.disarm(self._token)
        return fired


def run_until_event(
    vcpu: Vcpu,
    memory: GuestMemory,
    *,
    timeout: float | None = 10.0,
    index: int | None = None,
    on_print: Callable[[str], None] | None = None,
) -> Event | Exit:
    """Run until a SYNC/DONE ucall (returned as an event) or a non-ucall exit (returned as the exit).

    PRINTs go to ``on_print`` and running continues; ASSERT_FAIL raises ``GuestAssertionError``; a guest
    exception raises ``GuestFaultError``; no event within ``timeout`` seconds raises ``GuestTimeoutError``.
    """
    dog = _Watchdog(vcpu, timeout)
    try:
        got = _next_event(vcpu, memory, dog, timeout, index, on_print)
    except BaseException:
        dog.disarm()
        raise
    if dog.disarm():  # it fired after the last check: its kick would end the next KVM_RUN at once
        _drain_kick(vcpu)
    return got


def _next_event(
    vcpu: Vcpu,
    memory: GuestMemory,
    dog: _Watchdog,
    timeout: float | None,
    index: int | None,
    on_print: Callable[[str], None] | None,
) -> Event | Exit:
    """``run_until_event``'s loop, with the watchdog armed by the caller."""
    while True:
        exit: Exit | None = None
        try:
            exit = vcpu.run()
        except KvmError as e:
            if e.errno != errno.EINTR or not dog.fired:
                raise
        # Raised outside the except block on purpose: a chained KvmError would keep the backend's
        # KVM_RUN frame (and its kvm_run mapping) alive for as long as the caller holds the exception.
        if dog.fired:
            if exit is not None:  # the kick landed after a normal exit: consume it first
                _drain_kick(vcpu)
            where = f"vCPU {index}: " if index is not None else ""
            raise GuestTimeoutError(f"{where}no ucall within {timeout} s")
        assert exit is not None
        if not (isinstance(exit, IoExit) and is_ucall(exit)):
            return exit
        event = decode(exit, memory)
        if isinstance(event, Print):
            if on_print is not None:
                on_print(event.text)
            continue
        if isinstance(event, AssertFail):
            raise GuestAssertionError(event, index)
        if isinstance(event, GuestException):
            raise GuestFaultError(event, index)
        return event


def _drain_kick(vcpu: Vcpu) -> None:
    """A pending kick makes the next KVM_RUN return EINTR at once without entering the guest."""
    try:
        vcpu.run()
    except KvmError as e:
        if e.errno != errno.EINTR:
            raise


class VcpuThreads:
    """Run ``body(i)`` for each vCPU index on its own thread; ``stop()`` kicks them all out of the guest.

    The first exception (other than the EINTR a stop causes) stops the rest and is re-raised by ``join``.
    """

    def __init__(self, vcpus: Sequence[Vcpu], body: Callable[[int], Any]) -> None:
        self.vcpus = list(vcpus)
        self._body = body
        self.results: list[Any] = [None] * len(self.vcpus)
        self.errors: list[tuple[float, int, BaseException]] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._main, args=(i,), name=f"vcpu{i}", daemon=True) for i in range(len(vcpus))
        ]

    def _main(self, i: int) -> None:
        try:
            self.results[i] = self._body(i)
        except KvmError as e:
            if not (e.errno == errno.EINTR and self._stopping.is_set()):
                self._fail(i, e)
        except BaseException as e:  # re-raised by join() in the caller's thread
            self._fail(i, e)

    def _fail(self, i: int, e: BaseException) -> None:
        with self._lock:
            self.errors.append((time.monotonic(), i, e))
        self.stop()

    def start(self) -> VcpuThreads:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for v in self.vcpus:
            v.kick()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def join(self, timeout: float | None = 30.0) -> list[Any]:
        """Wait for every thread; raise the first failure, or ``GuestTimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        late = [t.name for t in self._threads if t.is_alive()]
        if late:
            self.stop()
            for t in self._threads:
                t.join(5.0)
        if self.errors:
            _, i, first = min(self.errors, key=lambda e: e[0])
            if len(self.errors) > 1:
                first.add_note(f"(first of {len(self.errors)} vCPU failures; this one on vCPU {i})")
            raise first
        if late:
            raise GuestTimeoutError(f"{', '.join(late)} still running after {timeout} s")
        return self.results


def run_vcpus(vcpus: Sequence[Vcpu], body: Callable[[int], Any], timeout: float | None = 30.0) -> list[Any]:
    """Start one thread per vCPU running ``body(index)``, join them, propagate the first failure."""
    return VcpuThreads(vcpus, body).start().join(timeout)
