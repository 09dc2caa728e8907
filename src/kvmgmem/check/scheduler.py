"""A deterministic, preemption-bounded scheduler over the core's kernel steps (CHESS-style).

Why stateless re-execution: the core's operations are generators over one model state, which cannot be
copied cheaply mid-flight; re-running a scenario from a fresh state along a recorded prefix of choices is
simple, deterministic and replayable (Musuvathi & Qadeer, "Iterative Context Bounding", PLDI 2007).

A *schedule* is the list of thread indices that ran each step. At every step the scheduler knows which
threads are enabled (their next step's locks are free, its ``wait`` condition holds, and a thread that just
got RET_PF_RETRY re-enters only after another thread made progress). Switching away from a thread that is
still enabled is a *preemption*; the explorer tries every schedule with at most ``bound`` preemptions.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvmgmem.backends.sim.core.steps import KLock, Step

from .invariants import Checker, Violation
from .world import World


@dataclass
class Thread:
    name: str
    gen: Iterator[Step]
    pending: Step | None = None
    done: bool = False
    result: Any = None
    held: list[KLock] = field(default_factory=list)
    retry_mark: int = -1  # progress count when this thread went into RET_PF_RETRY (-1: not retrying)
    retries: int = 0
    looping: bool = False  # retried during its current operation


@dataclass(frozen=True)
class Event:
    """One executed step, for the counterexample table and the trace."""

    index: int
    thread: str
    label: str
    locks: str
    change: str


@dataclass
class Run:
    schedule: list[int]
    choices: list[tuple[list[int], int, int | None]]  # (enabled, chosen, previous thread) per step
    violations: list[Violation]
    events: list[Event]
    fingerprint: Any = None
    deadlock: bool = False
    diverged: int | None = None  # replay: the step where the given schedule no longer applied


class LockState:
    def __init__(self) -> None:
        self.owner: dict[int, str] = {}
        self.readers: dict[int, int] = {}

    def free_for(self, step: Step) -> bool:
        for lock in step.take:
            k = id(lock)
            if k in self.owner:
                return False
            if not step.read and self.readers.get(k):
                return False
        return True


MAX_RETRIES = 12


def execute(
    build: Callable[[], World],
    prefix: list[int],
    record: bool = False,
    stop_on_violation: bool = True,
    priority: list[int] | None = None,
) -> Run:
    """Run one schedule: follow ``prefix``, then keep running the current thread while it is enabled (else
    the lowest-numbered enabled one). Invariants are checked after every step."""
    world = build()
    threads = [Thread(name, gen) for name, gen in world.ops]
    locks = LockState()
    checker = Checker(world)
    for t in threads:
        _advance(t, None)
    schedule: list[int] = []
    choices: list[tuple[list[int], int, int | None]] = []
    events: list[Event] = []
    violations: list[Violation] = []
    current: int | None = None
    steps = 0
    diverged: int | None = None
    progress = 0  # steps by threads that are not re-faulting: only those can end what made a fault retry
    deadlock = False
    while True:
        enabled = [i for i, t in enumerate(threads) if not t.done and _enabled(t, locks, progress)]
        if not enabled:
            # nobody else can run: a vCPU in RET_PF_RETRY faults again at once (bounded by MAX_RETRIES)
            enabled = [i for i, t in enumerate(threads) if not t.done and t.retry_mark >= 0]
        if not enabled:
            live = [t for t in threads if not t.done]
            if live:
                deadlock = True
                waiting = "; ".join(f"{t.name} waits at {t.pending.label if t.pending else '?'}" for t in live)
                violations.append(Violation("deadlock", waiting))
            break
        pos = len(schedule)
        if pos < len(prefix) and prefix[pos] not in enabled:
            # replaying a schedule that no longer applies (e.g. recorded with a bug switch on): go on freely
            diverged, prefix = pos + 1, prefix[:pos]
        chosen = _choose(prefix[pos] if pos < len(prefix) else None, enabled, priority, current)
        choices.append((enabled, chosen, current))
        schedule.append(chosen)
        t = threads[chosen]
        step = t.pending
        assert step is not None
        before = checker.summary() if record else None
        checker.begin_step(t.name, step)
        if step.retry:
            t.retries += 1
            if t.retries > MAX_RETRIES:
                violations.append(Violation("unbounded-retries", f"{t.name} retried {t.retries} times"))
                return Run(schedule, choices, violations, events)
        order = _acquire(t, step, locks, checker)
        _advance(t, step)
        _release(t, step, locks)
        if not t.looping:
            progress += 1
        if t.pending is not None and t.pending.retry:
            t.retry_mark, t.looping = progress, True
        else:
            t.retry_mark = -1
        steps += 1
        current = chosen
        found = order + checker.after_step(t.name, step, t.done, t.result, locks_free=_mmu_free(locks, threads))
        if record:
            events.append(Event(steps, t.name, step.label, _lock_text(step), checker.diff(before, checker.summary())))
        if found:
            violations.extend(found)
            if stop_on_violation:
                return Run(schedule, choices, violations, events)
    if not violations:
        violations.extend(checker.at_quiescence())
    fingerprint = checker.fingerprint([t.result for t in threads])
    return Run(schedule, choices, violations, events, fingerprint, deadlock, diverged)


def _choose(replayed: int | None, enabled: list[int], priority: list[int] | None, current: int | None) -> int:
    """The thread to step: the replayed schedule's choice, else the first enabled one in ``priority``, else
    the current thread while it stays enabled, else the lowest-numbered enabled one."""
    if replayed is not None:
        return replayed
    if priority is not None:
        return next(i for i in priority if i in enabled)
    if current is not None and current in enabled:
        return current
    return enabled[0]


def _lock_text(step: Step) -> str:
    """A recorded event's lock column: ``+taken (read) -dropped``."""
    held = ", ".join(str(lock) + (" (read)" if step.read else "") for lock in step.take)
    dropped = ", ".join(str(lock) for lock in step.drop)
    text = "+" + held if held else ""
    if dropped:
        text += (" " if text else "") + "-" + dropped
    return text


def _enabled(t: Thread, locks: LockState, progress: int) -> bool:
    step = t.pending
    if step is None:
        return False
    if step.retry and t.retry_mark >= 0 and progress <= t.retry_mark:
        # RET_PF_RETRY: the vCPU re-enters the guest; it faults again only after another thread stepped.
        return False
    if step.wait is not None and not step.wait():
        return False
    return locks.free_for(step)


def _acquire(t: Thread, step: Step, locks: LockState, checker: Checker) -> list[Violation]:
    found: list[Violation] = []
    for lock in step.take:
        for h in t.held:
            if h.rank >= lock.rank and h is not lock:
                found.append(Violation("lock-order", f"{t.name} takes {lock} while holding {h}"))
        checker.lock_edge(t.held, lock)
        k = id(lock)
        if step.read:
            locks.readers[k] = locks.readers.get(k, 0) + 1
        else:
            locks.owner[k] = t.name
        t.held.append(lock)
    return found + checker.lock_cycles()


def _release(t: Thread, step: Step, locks: LockState) -> None:
    for lock in step.drop:
        k = id(lock)
        if step.read:
            locks.readers[k] -= 1
        else:
            locks.owner.pop(k, None)
        if lock in t.held:
            t.held.remove(lock)


def _advance(t: Thread, step: Step | None) -> None:
    try:
        t.pending = next(t.gen)
    except StopIteration as stop:
        t.pending = None
        t.done = True
        t.result = stop.value


def _mmu_free(locks: LockState, threads: list[Thread]) -> Callable[[KLock], bool]:
    def free(lock: KLock) -> bool:
        k = id(lock)
        return k not in locks.owner and not locks.readers.get(k)

    return free


def serial_fingerprints(build: Callable[[], World]) -> set[Any]:
    """The oracle: the final fingerprint of every serial order of the scenario's threads (each runs to
    completion before the next starts, as if every operation were atomic)."""
    n = len(build().ops)
    return {
        execute(build, [], stop_on_violation=False, priority=list(order)).fingerprint
        for order in itertools.permutations(range(n))
    }


@dataclass
class Exploration:
    schedules: int
    violations: list[Violation]
    counterexample: Run | None
    max_depth: int
    fingerprints: set[Any]


def explore(
    build: Callable[[], World],
    bound: int,
    oracle: set[Any] | None = None,
    limit: int = 200_000,
    shortest: bool = False,
) -> Exploration:
    """Every schedule with at most ``bound`` preemptions (depth-first over choice points), stopping at the
    first violation (``shortest``: explore on and keep the violating schedule with the fewest steps).
    ``oracle``: the final fingerprints of every serial order; a schedule ending elsewhere is
    not linearisable."""
    stack: list[tuple[list[int], int]] = [([], 0)]
    schedules = 0
    max_depth = 0
    seen: set[Any] = set()
    best: Run | None = None
    while stack and schedules < limit:
        prefix, _ = stack.pop()
        run = execute(build, prefix)
        schedules += 1
        max_depth = max(max_depth, len(run.schedule))
        if not run.violations and oracle is not None and run.fingerprint not in oracle:
            run.violations.append(Violation("not-linearisable", "the final state and results equal no serial order's"))
        if run.violations:
            if not shortest:
                return Exploration(schedules, run.violations, run, max_depth, seen)
            if best is None or len(run.schedule) < len(best.schedule):
                best = run
            # and keep branching off the steps before the violation: a shorter one may start earlier
        else:
            seen.add(run.fingerprint)
        preemptions = 0
        for i, (enabled, chosen, previous) in enumerate(run.choices):
            if i >= len(prefix):
                for alt in enabled:
                    if alt == chosen:
                        continue
                    cost = preemptions + (1 if previous is not None and previous in enabled and alt != previous else 0)
                    if cost <= bound:
                        stack.append(([*run.schedule[:i], alt], cost))
            if previous is not None and previous in enabled and chosen != previous:
                preemptions += 1
    if best is not None:
        return Exploration(schedules, best.violations, best, max_depth, seen)
    return Exploration(schedules, [], None, max_depth, seen)
