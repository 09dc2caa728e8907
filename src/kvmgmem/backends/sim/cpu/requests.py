"""A vCPU's requests, mode and kicks: KVM's ``vcpu->requests``, ``vcpu->mode`` and ``kvm_vcpu_kick``.

Why a handshake at all: a flush (``kvm_flush_remote_tlbs``) or a store change must not return while a vCPU can
still use what it drops. As in ``kvm_make_all_cpus_request``, a requester bumps ``req`` (a flush also queues
its gfn range), stops a vCPU in guest mode (``emu_stop``, repeated until it took: a stop racing with
``emu_start``'s setup is lost) and waits for ``ack`` from every vCPU that is inside ``run()`` on another
thread — except one inside the resolver (``in_resolver``), which may be blocked on a lock the requester
holds (KVM likewise only waits for vCPUs in guest mode). The vCPU applies every pending request at its safe
point (``service_locked``). Such a vCPU cannot use a stale translation meanwhile: every TLB install and every
Python-side dereference of guest memory happens under ``lock`` and only while ``req == ack``.

``mode`` follows KVM's ``vcpu->mode``: IN_GUEST_MODE while unicorn executes guest code, OUTSIDE_GUEST_MODE
whenever the vCPU is in Python (fault hook, exit handling), EXITING_GUEST_MODE once a requester or a kick
stopped it (``kvm_vcpu_exiting_guest_mode``). Unlike an IPI a stop can be lost, so a vCPU still exiting is
stopped again until it leaves.

A kick (``kvm_vcpu_kick`` with KVM_RUN's ``immediate_exit``) has two halves: ``kicked`` ends the running or
next ``run()`` (``types.Interrupted``: the caller's EINTR), ``signal`` is what any other ioctl sees as
``signal_pending(current)``.
"""

from __future__ import annotations

import enum
import threading
from typing import NoReturn

from kvmgmem.backends.sim.cpu.tlbcache import TranslationCache
from kvmgmem.backends.sim.cpu.types import Interrupted
from kvmgmem.backends.sim.cpu.uc import Engine
from kvmgmem.errors import closed_error

MAX_PENDING_RANGES = 32  # more pending flush ranges than this degrade to one full flush
SIGNAL_TICK_S = 0.02  # how long a main-thread vCPU may stay in unicorn before Python can run signal handlers
ACK_POLL_S = 0.0005  # how often a waiting requester repeats its stop (a stop racing emu_start is lost)


class Mode(enum.IntEnum):
    """KVM's ``vcpu->mode`` values the sim uses."""

    OUTSIDE_GUEST_MODE = 0
    IN_GUEST_MODE = 1
    EXITING_GUEST_MODE = 2


OUTSIDE_GUEST_MODE = Mode.OUTSIDE_GUEST_MODE
IN_GUEST_MODE = Mode.IN_GUEST_MODE
EXITING_GUEST_MODE = Mode.EXITING_GUEST_MODE


class VcpuRequests:
    """The request state of one vCPU, guarded by ``cond`` (whose ``lock`` the fill path takes directly)."""

    def __init__(self, uc: Engine, cache: TranslationCache) -> None:
        self._uc = uc
        self._cache = cache
        cache.owner = self  # what the cache publishes in the VM's index (tlbcache.CachedRegions)
        self.lock = threading.Lock()  # cond's lock, taken directly where a fill's microseconds count
        self.cond = threading.Condition(self.lock)
        self.mode = OUTSIDE_GUEST_MODE
        self.in_resolver = False
        self.owner: int | None = None  # thread ident inside run()
        self.req = 0
        self.ack = 0
        self.flush_all = False
        self.flush_ranges: list[tuple[int, int]] = []
        self.kicked = False  # KVM_RUN's immediate_exit
        self.signal = False  # the signal half of a kick (KVM_RUN takes both; KVM_PRE_FAULT_MEMORY only this)
        self.code_stale = False  # drop translated code before the next entry
        self.closed = False

    # --- kicks ---------------------------------------------------------------------------------------------

    def kick(self) -> None:
        """Make the running (or next) ``run()`` raise ``Interrupted``; waits until it left the guest."""
        with self.cond:
            self.kicked = self.signal = True
            self.cond.notify_all()  # a vCPU blocked in block() wakes now
            while self.kicked and self.must_wait_locked():
                self.stop_guest_locked()
                self.cond.wait(ACK_POLL_S)

    def take_kick(self) -> bool:
        """Consume a pending kick (KVM's ``immediate_exit`` checked before anything else in KVM_RUN)."""
        if not self.kicked:  # unlocked fast path: run() checks again under the lock
            return False
        with self.cond:
            return self.take_kick_locked()

    def take_kick_locked(self) -> bool:
        """Consume a pending kick, signal half included (delivered on the way out of KVM_RUN)."""
        kicked, self.kicked = self.kicked, False
        if kicked:
            self.signal = False
            self.cond.notify_all()
        return kicked

    def block(self, op: str) -> NoReturn:
        """``kvm_vcpu_block`` when nothing can wake the vCPU but a signal (no interrupt controller is modelled):
        wait for a kick, consume it and report it (``Interrupted(blocked=True)``; the caller's EINTR). A kicker
        waits for this, as for a running vCPU. Caller holds the vCPU mutex. A closed vCPU fails ``op`` with the
        fd layer's EBADF (``closed_error``, as ``SimCpu.loaded``)."""
        with self.cond:
            self.owner = threading.get_ident()
            try:
                while not self.kicked:
                    if self.closed:
                        raise closed_error(op, "vCPU")
                    self.cond.wait(SIGNAL_TICK_S)  # wakes for a kick, and lets the main thread see Ctrl-C
                self.kicked = self.signal = False
            finally:
                self.owner = None
                self.cond.notify_all()
        raise Interrupted(blocked=True)

    def take_signal(self) -> bool:
        """Consume the signal a kick sent (``signal_pending(current)`` for an ioctl other than KVM_RUN, e.g.
        KVM_PRE_FAULT_MEMORY): the ioctl fails with EINTR and the signal is delivered on its way out, while
        ``immediate_exit`` stays set for the next ``run()``, as a VMM's kick leaves both."""
        if not self.signal:
            return False
        with self.cond:
            signalled, self.signal = self.signal, False
            return signalled

    def stop_guest_locked(self) -> None:
        """``kvm_vcpu_exiting_guest_mode`` and the IPI: stop the engine if the vCPU may be executing guest code."""
        if self.mode != OUTSIDE_GUEST_MODE:
            self.mode = EXITING_GUEST_MODE
            self._uc.emu_stop()

    def stop_if_in_guest(self) -> None:
        """Stop the engine if it executes guest code (the signal ticker: let Python run signal handlers)."""
        with self.cond:
            self.stop_guest_locked()

    # --- requests ------------------------------------------------------------------------------------------

    def post_request(self, flush: tuple[int | None, int | None] | None) -> int:
        """Request a safe-point pass (with a flush of ``flush``'s gfn range, None ends = all); the ticket."""
        with self.cond:
            if flush is not None:
                start, end = flush
                if start is None or end is None:
                    self.flush_all = True
                else:
                    self.add_flush_range_locked(start, end)
            return self.bump_locked()

    def bump_locked(self) -> int:
        self.req += 1
        self.stop_guest_locked()
        return self.req

    def post_flush(self, rng: tuple[int, int] | None) -> int | None:
        """A CpuSet flush: request it only if this vCPU cached something in ``rng``; returns the ticket."""
        with self.lock:  # cond's lock, taken directly: once per vCPU per flush
            if rng is None:
                self.flush_all = True
            elif self.flush_all:
                pass  # a full flush is already pending
            elif not self._cache.touches(*rng):
                return None
            else:
                self.add_flush_range_locked(*rng)
            return self.bump_locked()

    def add_flush_range_locked(self, start: int, end: int) -> None:
        """Queue a ranged flush, merging it into an overlapping or adjacent one; past MAX_PENDING_RANGES
        (a vCPU outside run() collecting one range per zap) everything degrades to one full flush."""
        if self.flush_all:
            return
        ranges = self.flush_ranges
        for i, (s, e) in enumerate(ranges):
            if s <= end and start <= e:
                ranges[i] = (min(s, start), max(e, end))
                return
        if len(ranges) >= MAX_PENDING_RANGES:
            self.flush_all = True
            ranges.clear()
        else:
            ranges.append((start, end))

    def must_wait_locked(self) -> bool:
        """Whether a requester has to wait for this vCPU's ack: it is inside ``run()`` on another thread and
        not inside the resolver (which may be blocked on a lock the requester holds)."""
        owner = self.owner
        return owner is not None and owner != threading.get_ident() and not self.in_resolver

    def wait_ack(self, ticket: int) -> None:
        """Wait until the vCPU serviced request ``ticket`` (or need not be waited for)."""
        with self.cond:
            while self.ack < ticket and self.must_wait_locked():
                self.stop_guest_locked()
                self.cond.wait(ACK_POLL_S)

    def service_locked(self) -> None:
        """At a safe point on the vCPU thread (engine stopped): apply every pending request, then ack."""
        cache = self._cache
        if self.req == self.ack and cache.stores.generation == cache.stores_gen:
            return
        if self.flush_all or self.flush_ranges:
            cache.clear(None if self.flush_all else self.flush_ranges)
            self.flush_all = False
            self.flush_ranges = []
        if cache.sync_stores():
            self.code_stale = True
        self.ack = self.req
        self.cond.notify_all()
