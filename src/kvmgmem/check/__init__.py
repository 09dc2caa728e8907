"""An interleaving checker for the sim core's fault path and invalidation protocol.

Why: the sim runs each fault whole under mmu_lock, so it can never show the races the kernel's protocol
(kvm_mmu_invalidate_begin/range_add/end, mmu_invalidate_retry_gfn, SRCU around memslot deletion,
kvm_gmem_release vs kvm_gmem_unbind) exists to prevent. The checker drives the same step generators the sim
runs, one kernel step at a time, through every schedule up to a preemption bound, checks the invariants after
every step and compares each final state with the serial orders'. Each historic bug can be put back into
the model (``BUGS``) to show the checker finds it.

Imports only the core, ``uapi`` and ``errors``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmgmem.backends.sim.core.steps import BUGS

from .invariants import INVARIANTS, Violation
from .scenarios import SCENARIOS, Scenario
from .scheduler import Exploration, Run, execute, explore, serial_fingerprints

__all__ = [
    "BUGS",
    "INVARIANTS",
    "SCENARIOS",
    "CheckResult",
    "Run",
    "Scenario",
    "Violation",
    "check",
    "execute",
    "replay",
]


@dataclass
class CheckResult:
    scenario: str
    bugs: frozenset[str]
    preemptions: int
    schedules: int
    violations: list[Violation]
    counterexample: Run | None

    @property
    def ok(self) -> bool:
        return not self.violations


def check(
    scenario: str, preemptions: int = 2, bugs: frozenset[str] | set[str] = frozenset(), shortest: bool = False
) -> CheckResult:
    """Explore every schedule of ``scenario`` with at most ``preemptions`` preemptions. ``shortest``: raise
    the bound one preemption at a time and report the shortest counterexample of the first bound that has
    one (what docs/interleavings.md shows)."""
    sc = SCENARIOS[scenario]
    unknown = set(bugs) - set(BUGS)
    if unknown:
        raise ValueError(f"unknown bug switch(es): {', '.join(sorted(unknown))}")
    frozen = frozenset(bugs)

    def build():  # type: ignore[no-untyped-def]
        return sc.build(frozen)

    oracle = serial_fingerprints(build)
    result: Exploration
    if shortest:
        for bound in range(preemptions + 1):
            result = explore(build, bound, oracle, shortest=True)
            if result.violations:
                break
    else:
        result = explore(build, preemptions, oracle)
    cex = result.counterexample
    if cex is not None:  # re-run it with the state recorded for the report
        cex = execute(build, cex.schedule, record=True)
        if not cex.violations:
            cex.violations = result.violations
    return CheckResult(scenario, frozen, preemptions, result.schedules, result.violations, cex)


def replay(scenario: str, schedule: list[int], bugs: frozenset[str] | set[str] = frozenset()) -> Run:
    """Re-run one schedule (a list of thread indices, as a counterexample prints it), recording each step."""
    frozen = frozenset(bugs)
    return execute(lambda: SCENARIOS[scenario].build(frozen), schedule, record=True, stop_on_violation=False)
