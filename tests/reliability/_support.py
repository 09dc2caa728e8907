"""Helpers for the reliability tests (not collected): invariant checks over ``introspect()``, a watchdog that
turns a hang into a failure with every thread's stack, and a runner for crash-risky code in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from kvmgmem import uapi

P = uapi.PAGE_SIZE
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


# --- invariants over introspect() (docs/reliability.md) -------------------------------------------------------


def _private_runs(snapshot: dict[str, Any]) -> list[tuple[int, int]]:
    return [(a, b if b is not None else 1 << 64) for a, b, v in snapshot["attributes"] if v & PRIVATE]


def _overlaps(runs: Iterable[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a < hi and lo < b for a, b in runs)


def _covers(runs: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether the union of (sorted, coalesced by the map) ``runs`` covers ``[lo, hi)``."""
    pos = lo
    for a, b in sorted(runs):
        if a > pos:
            break
        pos = max(pos, b)
        if pos >= hi:
            return True
    return pos >= hi


def spte_violations(snap: dict[str, Any]) -> list[str]:
    """Every SPTE in a ``SimVm.introspect()`` snapshot that maps a backing the current attributes, memslots,
    guest_memfd bindings or page states (punched = absent, hwpoison) forbid. Empty list = invariant holds."""
    out: list[str] = []
    private = _private_runs(snap)
    slots = {s["slot"]: s for s in snap["memslots"] if not s["slot"] >> 16}
    files = {g["ino"]: g for g in snap["gmem"]}
    prev_end = -1
    for spte in snap["sptes"]:
        gfn, n = spte["gfn"], spte["npages"]
        where = f"SPTE gfn {gfn:#x} (+{n}) {spte['backing']}"
        if gfn < prev_end:
            out.append(f"{where}: overlaps the previous SPTE")
        prev_end = gfn + n
        slot = slots.get(spte["slot"])
        if slot is None or not slot["base_gfn"] <= gfn or gfn + n > slot["base_gfn"] + slot["npages"]:
            out.append(f"{where}: not inside its memslot {spte['slot']} ({slot})")
            continue
        is_private = _overlaps(private, gfn, gfn + n)
        if spte["backing"] == "hva":
            if is_private:
                out.append(f"{where}: shared (hva) mapping over a PRIVATE gfn")
            if slot["gmem_only"]:
                out.append(f"{where}: hva mapping in a GMEM_ONLY slot")
            expect = slot["userspace_addr"] + (gfn - slot["base_gfn"]) * P
            if spte["host_address"] != expect:
                out.append(f"{where}: host address {spte['host_address']:#x} != slot hva {expect:#x}")
            continue
        # guest_memfd backing
        if spte["private"] and not _covers(private, gfn, gfn + n):
            out.append(f"{where}: private mapping over a gfn that is not PRIVATE")
        if not spte["private"] and (is_private or not slot["gmem_only"]):
            out.append(f"{where}: shared gmem mapping outside a GMEM_ONLY slot or over PRIVATE gfns")
        if slot["gmem_ino"] != spte["gmem_ino"]:
            out.append(f"{where}: maps inode {spte['gmem_ino']} but the slot is bound to {slot['gmem_ino']}")
            continue
        idx = slot["pgoff"] + gfn - slot["base_gfn"]
        if spte["pgoff"] != idx:
            out.append(f"{where}: file page {spte['pgoff']} != slot's page {idx}")
        file = files.get(spte["gmem_ino"])
        if file is None:
            out.append(f"{where}: its guest_memfd file is released")
            continue
        present = [(a, b) for a, b, state in file["pages"] if state == "present"]
        if not _covers(present, idx, idx + n):
            states = [(a, b, st) for a, b, st in file["pages"] if a < idx + n and idx < b]
            out.append(f"{where}: file pages [{idx}, {idx + n}) not all present (punched or poisoned): {states}")
        bound = [(a, b) for a, b, s in file["bindings"] if s == slot["slot"]]
        if not _covers(bound, idx, idx + n):
            out.append(f"{where}: file pages [{idx}, {idx + n}) not bound to slot {slot['slot']}")
    return out


# --- watchdog ----------------------------------------------------------------------------------------------


def all_thread_stacks() -> str:
    """Every live thread's stack (``sys._current_frames``), named, for a deadlock report."""
    names = {t.ident: f"{t.name}{' (daemon)' if t.daemon else ''}" for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"--- thread {names.get(ident, '?')} [{ident}] ---\n{stack}")
    return "\n".join(parts)


class WatchdogTimeout(AssertionError):
    pass


def run_threads(
    targets: dict[str, Callable[[], None]], timeout: float, on_timeout: Callable[[], None] | None = None
) -> None:
    """Run each target on its own daemon thread and wait for all of them.

    A target raising fails the run with its traceback. If any thread is still alive after ``timeout`` seconds
    (a deadlock or livelock), ``on_timeout`` runs (e.g. to unblock them) and ``WatchdogTimeout`` is raised
    with the stacks of *all* threads, taken before anything is released.
    """
    errors: list[str] = []

    def wrap(name: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException:
                errors.append(f"thread {name} failed:\n{traceback.format_exc()}")

        return run

    threads = [threading.Thread(target=wrap(n, f), name=n, daemon=True) for n, f in targets.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        stacks = all_thread_stacks()
        if on_timeout is not None:
            on_timeout()
        raise WatchdogTimeout(
            f"watchdog: threads {stuck} still running after {timeout:.1f} s (deadlock?)\n"
            + ("\n".join(errors) + "\n" if errors else "")
            + stacks
        )
    if errors:
        raise AssertionError("\n".join(errors))


# --- subprocess runner -------------------------------------------------------------------------------------


def run_python(code: str, args: list[str] | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; assert it exited normally (status 0, not killed by a signal),
    with the output in the failure message."""
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code), *(args or [])],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    assert proc.returncode == 0, f"subprocess {how}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    return proc
