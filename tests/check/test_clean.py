"""With every bug switch off, every schedule up to 2 preemptions is clean, and the steps really interleave."""

from __future__ import annotations

import pytest

from kvmgmem.check import SCENARIOS, check, replay

#: The scenarios the issue names (huge-region attribute change, punch vs release, memslot delete, two VMs):
#: each must be explored with more than one schedule.
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


def test_fault_inside_an_open_invalidation_retries() -> None:
    """Steps interleave inside operations: vCPU 0 faulting gfn B while the VMM's conversion of gfn A is open
    retries (the head/tail huge region of A is in the range), then maps 4 KiB once the change ended."""
    run = replay("attr_huge", [2, 2, 0, 0, 0, 0, 0], set())
    assert not run.violations
    steps = [(e.thread, e.label) for e in run.events]
    assert [t for t, _ in steps[:7]] == ["vmm", "vmm", "vcpu0", "vcpu0", "vcpu0", "vcpu0", "vcpu0"]
    assert "kvm_mmu_invalidate_begin" in steps[1][1]
    first_retry = steps.index(("vcpu0", "RET_PF_RETRY: re-enter the guest"))  # F11 saw B in the open range
    end = next(i for i, (t, label) in enumerate(steps) if t == "vmm" and "kvm_mmu_invalidate_end" in label)
    assert first_retry < end
    changes = [e.change for e in run.events]
    assert not any("0x100000+512" in c for c in changes)  # never a 2 MiB mapping over the changing region
    assert any("0x100001+1P" in c for c in changes)  # B mapped 4 KiB, private, after the change
