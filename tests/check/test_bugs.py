"""Each historic-bug switch puts the bug back into the model; the checker must find a counterexample that
violates the invariant docs/interleavings.md names for it, and the counterexample must replay."""

from __future__ import annotations

import json

import pytest

from kvmgmem.check import BUGS, SCENARIOS, check, replay
from kvmgmem.check.report import chrome_trace, schedule_text, table

#: bug switch -> (scenario, invariant the counterexample must violate)
EXPECTED = {
    "gmem_start_unconditional": ("punch_unbound", "unbalanced"),  # A1
    "punch_hole_no_truncate": ("punch_release", "punched-not-zero"),  # A2
    "attr_change_without_range_add": ("attr_huge", "unbalanced"),  # A3
    "skip_shared_only_slots_on_attr_change": ("shared_slot_convert", "private-as-shared"),  # A4
    "invalid_slot_as_no_slot": ("fault_delete", "stale-mapping"),  # C
    "no_hugepage_head_tail_range_add": ("attr_huge", "huge-over-changing"),  # D
    "fault_reads_attr_before_snapshot": ("fault_convert", "private-as-shared"),  # E
    "unbind_skips_dying_file": ("release_delete", "use-after-free"),  # F
    "notifier_ignores_memslot_swap": ("notifier_create", "unbalanced"),  # B
}


def test_every_switch_has_an_expectation() -> None:
    assert set(EXPECTED) == set(BUGS)
    for bug, (scenario, _) in EXPECTED.items():
        assert bug in SCENARIOS[scenario].exposes


@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_switch_yields_counterexample(bug: str) -> None:
    scenario, invariant = EXPECTED[bug]
    result = check(scenario, preemptions=2, bugs={bug})
    assert not result.ok
    assert invariant in {v.invariant for v in result.violations}, [str(v) for v in result.violations]
    cex = result.counterexample
    assert cex is not None and cex.events
    # replaying the printed schedule reproduces the same violation
    again = replay(scenario, [int(i) for i in schedule_text(cex).split(",")], {bug})
    assert invariant in {v.invariant for v in again.violations}
    # and without the bug, the same schedule is clean
    fixed = replay(scenario, cex.schedule, set())
    assert invariant not in {v.invariant for v in fixed.violations}


def test_two_vms_punch_without_truncate() -> None:
    """Two VMs bound to one inode (separate begin/end per VM around one truncation) are safe in 7.2, and A2
    is found there too."""
    assert check("two_vms", 2).ok
    result = check("two_vms", 2, {"punch_hole_no_truncate"})
    assert "punched-not-zero" in {v.invariant for v in result.violations}


def test_huge_page_counterexample_needs_a_preemption() -> None:
    """Bug D is a race: serial orders never show it, one preemption inside the attribute change does."""
    assert check("attr_huge", 0, {"no_hugepage_head_tail_range_add"}).ok
    assert not check("attr_huge", 1, {"no_hugepage_head_tail_range_add"}).ok


def test_report_table_and_trace() -> None:
    result = check("release_delete", 2, {"unbind_skips_dying_file"})
    cex = result.counterexample
    assert cex is not None
    text = table(cex)
    assert "kvm_gmem_release" in text and "slots_lock" in text
    assert "VIOLATION use-after-free" in text
    trace = json.loads(json.dumps(chrome_trace(cex, "release_delete")))
    names = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert names == {"close", "vmm"}
    slices = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert len(slices) == len(cex.events)


def test_unknown_switch_rejected() -> None:
    with pytest.raises(ValueError):
        check("attr_huge", 0, {"no_such_bug"})
