"""The vCPU's request handshake on its own (``cpu/requests.py``): mode, stops, acks, ranged flushes, kicks.

Why in isolation: the handshake decides when a flush may return, and a guest run only shows it through timing.
Here the engine is a stand-in that counts ``emu_stop`` calls, so each rule is checked directly: a requester
stops a vCPU only while it may execute guest code (and again while it is still exiting, since a stop can be
lost), waits only for a vCPU that runs on another thread outside the resolver, and asks a vCPU to flush a
range only if it cached something there.
"""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest

from kvmgmem.backends.sim.cpu.requests import (
    EXITING_GUEST_MODE,
    IN_GUEST_MODE,
    MAX_PENDING_RANGES,
    OUTSIDE_GUEST_MODE,
    VcpuRequests,
)
from kvmgmem.backends.sim.cpu.stores import StoreMap
from kvmgmem.backends.sim.cpu.tlbcache import TranslationCache


class FakeEngine:
    """Counts stops; ``ctl`` is the TLB flush the cache issues."""

    def __init__(self) -> None:
        self.stops = 0
        self.tlb_flushes = 0

    def emu_stop(self) -> None:
        self.stops += 1

    def ctl(self, *_args: Any) -> None:
        self.tlb_flushes += 1


@pytest.fixture
def parts() -> tuple[FakeEngine, TranslationCache, VcpuRequests]:
    uc = FakeEngine()
    engine = cast(Any, uc)
    cache = TranslationCache(engine, StoreMap())
    return uc, cache, VcpuRequests(engine, cache)


def test_a_request_stops_a_vcpu_in_guest_mode_until_it_leaves(parts: tuple[Any, ...]) -> None:
    uc, _cache, rq = parts
    rq.post_request(None)  # outside guest mode: nothing to stop
    assert (uc.stops, rq.mode) == (0, OUTSIDE_GUEST_MODE)
    rq.mode = IN_GUEST_MODE
    rq.post_request(None)
    assert (uc.stops, rq.mode) == (1, EXITING_GUEST_MODE)  # kvm_vcpu_exiting_guest_mode
    rq.post_request(None)  # still exiting: the first stop may have been lost, so stop again
    assert uc.stops == 2
    with rq.cond:
        rq.mode = OUTSIDE_GUEST_MODE
        rq.service_locked()
    assert rq.ack == rq.req == 3


def test_wait_ack_waits_only_for_a_vcpu_running_on_another_thread(parts: tuple[Any, ...]) -> None:
    _uc, _cache, rq = parts
    ticket = rq.post_request(None)
    rq.wait_ack(ticket)  # not inside run(): the request is serviced at its next entry
    rq.owner = threading.get_ident()
    rq.wait_ack(ticket)  # the requester is the vCPU itself
    rq.owner, rq.in_resolver = -1, True
    rq.wait_ack(ticket)  # inside the resolver: it may wait on a lock the requester holds
    assert rq.ack < ticket
    rq.in_resolver = False

    def vcpu() -> None:
        time.sleep(0.05)
        with rq.cond:
            rq.service_locked()

    thread = threading.Thread(target=vcpu)
    thread.start()
    rq.wait_ack(ticket)
    assert rq.ack >= ticket
    thread.join()


def test_post_flush_asks_only_a_vcpu_that_cached_something_in_the_range(parts: tuple[Any, ...]) -> None:
    _uc, cache, rq = parts
    cache.data_cache[(64 << 12, None)] = (0x1000, True)
    cache.note_cached(64 << 12)
    assert rq.post_flush((200, 300)) is None and rq.req == 0
    ticket = rq.post_flush((64, 65))
    assert ticket == rq.req == 1 and rq.flush_ranges == [(64, 65)]
    with rq.cond:
        rq.service_locked()
    assert not cache.data_cache and not cache.touches(0, 1 << 20) and rq.ack == ticket


def test_pending_ranges_merge_and_degrade_to_one_full_flush(parts: tuple[Any, ...]) -> None:
    _uc, _cache, rq = parts
    for gfn in range(10):  # adjacent: one range
        rq.post_request((gfn, gfn + 1))
    assert rq.flush_ranges == [(0, 10)]
    for gfn in range(100, 100 + 4 * MAX_PENDING_RANGES, 4):  # never adjacent
        rq.post_request((gfn, gfn + 1))
    assert rq.flush_all and not rq.flush_ranges


def test_a_kick_has_an_immediate_exit_half_and_a_signal_half(parts: tuple[Any, ...]) -> None:
    uc, _cache, rq = parts
    rq.kick()  # no vCPU inside run(): returns at once, both halves pending
    assert rq.kicked and rq.signal and uc.stops == 0
    assert rq.take_signal() and not rq.take_signal()  # another ioctl consumed the signal
    assert rq.kicked  # immediate_exit stays for the next KVM_RUN
    assert rq.take_kick() and not rq.take_kick()
