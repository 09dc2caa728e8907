"""With every bug switch off, every schedule up to 2 preemptions is clean, and the steps really interleave."""

from __future__ import annotations

import pytest

from kvmgmem.check import SCENARIOS, check, execute

#: The scenarios of the protocol notes: each must be explored with more than one schedule.
SPEC_SCENARIOS = ("attr_huge", "punch_release", "fault_delete", "two_vms")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_bounded_exploration_is_clean(name: str) -> None:
    result = check(name, preemptions=2)
    assert result.ok, [str(v) for v in result.violations]
    assert result.schedules > 1
    assert result.counterexample is None


@pytest.mark.parametrize("name", SPEC_SCENARIOS)
def test_more_preemptions_explore_more_schedules(name: str) -> None:
    """The preemption bound is what limits the search: 0 < 1 < 2 preemptions, strictly more schedules."""
    counts = [check(name, preemptions=p).schedules for p in (0, 1, 2)]
    assert counts[0] < counts[1] < counts[2], counts


def test_threads_interleave_within_operations() -> None:
    """Some explored schedule switches threads in the middle of an operation (not only between them)."""
    sc = SCENARIOS["attr_huge"]
    serial = execute(lambda: sc.build(frozenset()), [])
    switches = sum(1 for a, b in zip(serial.schedule, serial.schedule[1:], strict=False) if a != b)
    # serial: each thread runs to completion, then the next (plus retries); a preempted schedule differs
    preempted = execute(lambda: sc.build(frozenset()), [2, 2, 0, 0])
    assert not preempted.violations
    assert preempted.schedule[:4] == [2, 2, 0, 0]
    assert switches >= 2
