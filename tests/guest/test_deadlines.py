"""The shared deadline thread behind every vCPU watchdog (``kvmgmem.guest.deadlines``)."""

from __future__ import annotations

import math
import os
import threading
import time

import pytest

import kvmgmem
from kvmgmem.guest import Asm, GuestImage, GuestVm
from kvmgmem.guest import routines as R
from kvmgmem.guest.deadlines import Deadlines, deadlines


def test_fires_once_after_the_timeout() -> None:
    d, fired, done = Deadlines(), [], threading.Event()
    start = time.monotonic()
    d.arm(0.05, lambda: (fired.append(time.monotonic() - start), done.set()))
    assert done.wait(5)
    d.disarm(d.arm(0.05, lambda: None))  # a later pass of the loop: the first entry is gone, not fired again
    time.sleep(0.1)
    assert len(fired) == 1 and fired[0] >= 0.05


def test_an_endless_timeout_does_not_stop_the_thread() -> None:
    """``math.inf`` (or anything past ``threading.TIMEOUT_MAX``) is a wait without end, not an OverflowError that
    would kill the one thread every watchdog of the process relies on."""
    d, fired = Deadlines(), threading.Event()
    d.arm(math.inf, lambda: None)
    time.sleep(0.05)  # the thread now sleeps for the endless deadline
    d.arm(0.02, fired.set)
    assert fired.wait(5)


def test_the_thread_survives_any_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    """SystemExit from a callback, and an excepthook that itself raises, leave the thread running."""

    def hook(args: threading.ExceptHookArgs) -> None:
        raise RuntimeError("hook")

    monkeypatch.setattr(threading, "excepthook", hook)
    d, later = Deadlines(), threading.Event()

    def leave() -> None:
        raise SystemExit(3)

    d.arm(0.01, leave)
    d.arm(0.1, later.set)
    assert later.wait(5)


def test_disarmed_never_fires() -> None:
    d, fired = Deadlines(), threading.Event()
    d.disarm(d.arm(0.02, fired.set))
    assert not fired.wait(0.2)


def test_an_earlier_deadline_wakes_the_sleeping_thread() -> None:
    """The thread sleeps for the earliest deadline it knows; a new earlier one must not wait behind it."""
    d, late, early = Deadlines(), threading.Event(), threading.Event()
    d.arm(30, late.set)
    time.sleep(0.05)  # the thread now sleeps until +30 s
    start = time.monotonic()
    d.arm(0.02, early.set)
    assert early.wait(5) and time.monotonic() - start < 2
    assert not late.is_set()


def test_no_thread_per_arm() -> None:
    d = Deadlines()
    d.arm(60, lambda: None)
    before = threading.active_count()
    tokens = [d.arm(60, lambda: None) for _ in range(1000)]
    assert threading.active_count() == before
    for token in tokens:
        d.disarm(token)


def test_a_failing_callback_is_reported_and_the_thread_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    d, later = Deadlines(), threading.Event()

    def boom() -> None:
        raise RuntimeError("boom")

    d.arm(0.01, boom)
    d.arm(0.1, later.set)
    assert later.wait(5)
    assert [type(e) for e in reported] == [RuntimeError]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_thread() -> None:
    deadlines.disarm(deadlines.arm(60, lambda: None))  # the parent's thread exists
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status only
        fired = threading.Event()
        deadlines.arm(0.01, fired.set)
        os._exit(0 if fired.wait(5) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _sync_loop() -> Asm:
    return R.sync_loop(Asm())


def test_many_timed_runs_start_no_thread() -> None:
    """A run loop with a watchdog per ucall (``GuestVcpu.run(timeout=...)``) leaves the thread count alone."""
    with kvmgmem.open("sim") as system, GuestVm.create(system, GuestImage(_sync_loop())) as gv:
        v = gv.create_vcpu()
        v.run(timeout=10)
        before = threading.active_count()
        counts = set()
        for i in range(1, 200):
            assert v.expect_sync(timeout=10) == (i,)
            counts.add(threading.active_count())
        assert counts == {before}


def test_a_watchdog_that_fires_after_the_last_check_leaves_no_kick(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline may pass between ``run_until_event``'s last look at the watchdog and its disarm: the event is
    returned, and the kick the watchdog sent is consumed then, or the next run would fail with EINTR at once."""
    from kvmgmem.guest import runner

    real = runner._next_event

    def late(vcpu: object, memory: object, dog: runner._Watchdog, *args: object) -> object:
        got = real(vcpu, memory, dog, *args)  # type: ignore[arg-type]
        dog._fire()  # the deadline passes now
        return got

    with kvmgmem.open("sim") as system, GuestVm.create(system, GuestImage(_sync_loop())) as gv:
        v = gv.create_vcpu()
        monkeypatch.setattr(runner, "_next_event", late)
        assert v.expect_sync(timeout=10) == (0,)
        monkeypatch.setattr(runner, "_next_event", real)
        assert v.expect_sync(timeout=10) == (1,)  # not EINTR from a stale kick
