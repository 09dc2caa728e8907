"""The VMM layer (issue 7): both conversion entry points, discard-policy accounting, error paths, shutdown.

Runs on the sim (the only backend here with KVM_X86_SW_PROTECTED_VM); each test skips naming the missing VM
type elsewhere. Memory sizes are small: each conversion round walks its chunk several times.
"""

from __future__ import annotations

import errno
import signal
import threading
import time

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.exits import MemoryFaultExit
from kvmgmem.guest import Asm, GuestAssertionError, GuestImage
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.guest.operands import rdi
from kvmgmem.vmm import ConversionError, DiscardPolicy, Machine, MachineError
from kvmgmem.vmm.workload import (
    PHASE,
    PHASES,
    PRIVATE_BYTE,
    ROUNDS,
    SHARED_BYTE,
    SLICE,
    SLICES,
    STOP,
    SYNC_CHECK_HIDDEN,
    SYNC_CHECK_SHARED,
    Expectations,
    conversion_workload,
)

RAM = 4 << 30
MiB = 1 << 20
PRIVATE = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED


@pytest.fixture
def protected_system() -> kvmgmem.System:
    # auto falls back to the sim, which has the type: an error opening it is a failure, not a skip
    system = kvmgmem.open("auto", vm_type=uapi.KVM_X86_SW_PROTECTED_VM)
    if uapi.KVM_X86_SW_PROTECTED_VM not in system.supported_vm_types:
        system.close()
        pytest.skip(f"KVM_X86_SW_PROTECTED_VM not in KVM_CAP_VM_TYPES on backend {system.backend}")
    yield system
    system.close()


def one_round(system: kvmgmem.System, policy: DiscardPolicy, vcpus: int = 1, size: int = 2 * MiB) -> Machine:
    """A Machine that runs exactly one conversion round per vCPU (the stop flag is set before it starts)."""
    chunk = size // vcpus
    image = GuestImage(conversion_workload(Expectations.for_policy(policy)), nvcpus=vcpus)
    seen: list[tuple[int, ...]] = []

    def on_sync(m: Machine, gv: object, args: tuple[int, ...]) -> None:
        seen.append(args)
        code, gpa, length, byte = args[:4]
        view = m.read_shared(gpa, length)
        if code == SYNC_CHECK_SHARED:
            assert view == bytes([byte]) * length
        else:
            assert code == SYNC_CHECK_HIDDEN and bytes([PRIVATE_BYTE]) not in view

    m = Machine(image, system=system, regions=[(RAM, size)], vcpus=vcpus, discard_policy=policy,
                on_sync=on_sync, args=lambda i: (RAM + i * chunk, chunk))  # fmt: skip
    m.syncs = seen  # type: ignore[attr-defined]
    for i in range(vcpus):
        m.write_u64(image.area(i).data + STOP, 1)
    return m


@pytest.mark.parametrize("vcpus", [1, 2])
def test_explicit_conversions_round_trip(protected_system: kvmgmem.System, vcpus: int) -> None:
    """KVM_HC_MAP_GPA_RANGE (explicit path): four conversions per round per vCPU, each through the one
    conversion service; the guest verified every byte, the host never saw a private byte."""
    with one_round(protected_system, DiscardPolicy.BOTH, vcpus) as m:
        m.run(timeout=120)
        stats = m.conversions.stats
        assert (stats.to_private, stats.to_shared) == (2 * vcpus, 2 * vcpus)
        assert stats.by_source == {"hypercall": 4 * vcpus}
        assert m.exits.counts["hypercall"] == 4 * vcpus and m.exits.counts["done"] == vcpus
        assert len(m.syncs) == 2 * vcpus  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("policy", "shared_held", "private_held"),
    [(DiscardPolicy.BOTH, False, False), (DiscardPolicy.PUNCH_ONLY, True, False), (DiscardPolicy.NONE, True, True)],
)
def test_discard_policy_accounting(
    protected_system: kvmgmem.System, policy: DiscardPolicy, shared_held: bool, private_held: bool
) -> None:
    """Bytes held by each store after a round, measured: QEMU's "both" frees both copies, cloud-hypervisor's
    punch-only keeps the shared copy, alioth's none keeps both (``DiscardPolicy`` in kvmgmem.vmm.convert)."""
    size = 2 * MiB
    with one_round(protected_system, policy, size=size) as m:
        m.run(timeout=120)
        (usage,) = m.usage()
        assert usage.shared_bytes == (size if shared_held else 0)
        assert usage.private_bytes == (size if private_held else 0)
        stats = m.conversions.stats
        assert stats.punched_bytes == (0 if policy is DiscardPolicy.NONE else 2 * size)
        assert stats.discarded_shared_bytes == (2 * size if policy is DiscardPolicy.BOTH else 0)


def test_the_guest_sees_each_policy(protected_system: kvmgmem.System) -> None:
    """The expectations the guest checks are the policy's: a wrong one fails inside the guest."""
    wrong = Expectations(shared_after_round_trip=SHARED_BYTE, private_after_round_trip=PRIVATE_BYTE)
    image = GuestImage(conversion_workload(wrong))
    with Machine(image, system=protected_system, regions=[(RAM, MiB)], args=(RAM, MiB)) as m:
        m.write_u64(image.area(0).data + STOP, 1)
        with pytest.raises(GuestAssertionError, match="shared copy after round trip"):
            m.run(timeout=60)


def test_bad_map_gpa_range_gets_einval(protected_system: kvmgmem.System) -> None:
    """A MAP_GPA_RANGE the VMM refuses (private memory outside guest RAM) returns -KVM_EINVAL to the guest,
    and so does one KVM itself refuses (unaligned gpa, `kvm_emulate_hypercall` (KVM_HC_MAP_GPA_RANGE)) — the guest
    checks both."""
    a = Asm()
    R.map_gpa_range(a, RAM + 64 * MiB, 1, PRIVATE, expect=-uapi.KVM_EINVAL, check="outside RAM")
    R.map_gpa_range(a, RAM + 1, 1, PRIVATE, expect=-uapi.KVM_EINVAL, check="unaligned")
    R.map_gpa_range(a, RAM, 0, PRIVATE, expect=-uapi.KVM_EINVAL, check="zero pages")
    R.map_gpa_range(a, RAM, 1, PRIVATE, expect=0, check="good")
    U.done(a)
    with Machine(a, system=protected_system, regions=[(RAM, MiB)]) as m:
        m.run(timeout=60)
        assert m.conversions.stats.refused == 1  # the other two never left KVM
        assert m.conversions.stats.to_private == 1


def test_conversion_service_validates(protected_system: kvmgmem.System) -> None:
    """The service itself: empty, unaligned and non-RAM private ranges are ConversionErrors; shared
    conversions of unassigned space are tolerated as in QEMU."""
    with Machine(Asm().hlt(), system=protected_system, regions=[(RAM, MiB)]) as m:
        svc = m.conversions
        for gpa, size in ((RAM, 0), (RAM + 1, 4096), (RAM, 100)):
            with pytest.raises(ConversionError):
                svc.convert(gpa, size, True, source="test")
        with pytest.raises(ConversionError):
            svc.convert(RAM + MiB, 4096, True, source="test")
        svc.convert(RAM + MiB, 4096, False, source="test")  # unassigned → shared: fine
        svc.convert(RAM, MiB, True, source="test")
        assert svc.stats.refused == 4 and svc.stats.to_private == 1 and svc.stats.to_shared == 1


def test_memory_fault_with_unknown_flags_is_an_error(protected_system: kvmgmem.System) -> None:
    """Every VMM read treats unknown memory-fault flags as fatal (QEMU's ``kvm_cpu_exec``, Firecracker's
    ``vstate/vcpu.rs``); so does Machine, with a message naming the flags — and PRIVATE alone converts (the implicit
    path)."""
    with Machine(Asm().hlt(), system=protected_system, regions=[(RAM, MiB)]) as m:
        gv = m.vcpus[0]
        with pytest.raises(MachineError, match="unknown flags 0x10"):
            m._memory_fault(gv, MemoryFaultExit(flags=0x18, gpa=RAM, size=4096, errno=errno.EFAULT))
        with pytest.raises(MachineError, match="poison"):
            m._memory_fault(gv, MemoryFaultExit(flags=8, gpa=RAM, size=4096, errno=uapi.EHWPOISON))
        m._memory_fault(gv, MemoryFaultExit(flags=8, gpa=RAM, size=4096, errno=errno.EFAULT))
        assert m.conversions.stats.by_source == {"memory-fault": 1}


def test_guest_failure_shuts_down_cleanly(protected_system: kvmgmem.System) -> None:
    """A guest assertion on one vCPU stops the others and surfaces as the exception; close() then leaves
    no vCPU thread behind (fds and mappings are checked by the autouse leak check)."""
    a = Asm()  # rdi = vCPU index: vCPU 1 fails its check, vCPU 0 spins until stopped
    spin = a.new_label("spin")
    a.cmp(rdi, 0).je(spin)
    U.assert_eq(a, rdi, 0, "vCPU index")
    a.label(spin).pause().jmp(spin)
    before = threading.active_count()
    with Machine(GuestImage(a, nvcpus=2), system=protected_system, regions=[(RAM, MiB)], vcpus=2) as m:
        with pytest.raises(GuestAssertionError, match="vCPU index"):
            m.run(timeout=60)
    assert threading.active_count() <= before


def test_ctrl_c_stops_every_vcpu(protected_system: kvmgmem.System) -> None:
    """KeyboardInterrupt in the VMM thread (Ctrl-C) kicks every vCPU out and propagates; nothing leaks."""
    a = Asm()
    spin = a.new_label("spin")
    a.label(spin).pause().jmp(spin)
    before = threading.active_count()
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))  # what a terminal's Ctrl-C does
    with Machine(GuestImage(a, nvcpus=2), system=protected_system, regions=[(RAM, MiB)], vcpus=2) as m:
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            m.run(timeout=60)
        assert time.monotonic() - start < 30
    timer.join()
    assert threading.active_count() <= before


def test_default_private_is_one_range_per_region(protected_system: kvmgmem.System) -> None:
    """``default_private`` marks all RAM private with one KVM_SET_MEMORY_ATTRIBUTES per region (QEMU's
    choice), so the attribute map holds one run per region however large the region is."""
    regions = [(RAM, 64 * MiB), (RAM + (1 << 30), 256 * MiB)]
    with Machine(Asm().hlt(), system=protected_system, regions=regions, default_private=True) as m:
        assert m.vm is not None
        snapshot = m.vm.introspect()
        if snapshot is None:
            pytest.skip(f"backend {m.backend} shows no attribute map (Vm.introspect() is None)")
        private = [(lo, hi) for lo, hi, attrs in _runs(snapshot) if attrs == uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE]
        assert private == [(gpa >> 12, (gpa + size) >> 12) for gpa, size in regions]


def _runs(snapshot: dict[str, object]) -> list[tuple[int, int, int]]:
    runs = snapshot["attributes"]  # the non-zero runs: (first gfn, end gfn, attributes)
    assert isinstance(runs, list)
    return [(int(lo), int(hi), int(a)) for lo, hi, a in runs]


# --- stopping a run (issue 14: --seconds must be a limit whatever the memory size) ----------------------


def _sliced(system: kvmgmem.System, slice_size: int, stop_after_slice: int) -> Machine:
    """One vCPU on 2 MiB in ``slice_size`` slices; the host sets STOP at the first sync of slice number
    ``stop_after_slice`` (0 = before the guest starts)."""
    image = GuestImage(conversion_workload(Expectations.for_policy(DiscardPolicy.BOTH)))
    data = image.area(0).data
    slices_seen: list[int] = []

    def on_sync(m: Machine, gv: object, args: tuple[int, ...]) -> None:
        code, gpa = args[:2]
        if code == SYNC_CHECK_SHARED:
            slices_seen.append(gpa)
            if len(slices_seen) == stop_after_slice:
                m.write_u64(data + STOP, 1)

    m = Machine(image, system=system, regions=[(RAM, 2 * MiB)], on_sync=on_sync, args=(RAM, 2 * MiB))
    m.slices_seen = slices_seen  # type: ignore[attr-defined]
    m.write_u64(data + SLICE, slice_size)
    if stop_after_slice == 0:
        m.write_u64(data + STOP, 1)
    return m


def test_stop_flag_is_polled_between_slices(protected_system: kvmgmem.System) -> None:
    """A stop seen after a slice that is not a round's last ends the round part-way: one 512 KiB slice ran,
    fully converted and verified, and SLICES/ROUNDS say so."""
    with _sliced(protected_system, 512 << 10, 0) as m:
        m.run(timeout=120)
        data = m.image.area(0).data
        assert (m.read_u64(data + ROUNDS), m.read_u64(data + SLICES)) == (0, 1)
        assert m.slices_seen == [RAM]  # type: ignore[attr-defined]
        assert m.conversions.stats.by_source == {"hypercall": 4}
        assert PHASES[m.read_u64(data + PHASE)] == "done"


def test_stop_in_a_rounds_last_slice_finishes_the_round(protected_system: kvmgmem.System) -> None:
    with _sliced(protected_system, 512 << 10, 4) as m:
        m.run(timeout=120)
        data = m.image.area(0).data
        assert (m.read_u64(data + ROUNDS), m.read_u64(data + SLICES)) == (1, 4)
        assert m.slices_seen == [RAM + i * (512 << 10) for i in range(4)]  # type: ignore[attr-defined]
        assert m.conversions.stats.bytes_to_private == 2 * (2 * MiB)


def test_stop_kicks_a_guest_that_never_stops(protected_system: kvmgmem.System) -> None:
    """Machine.stop() from another thread (the demo's last resort): every vCPU leaves the guest and run()
    returns normally — the EINTR of the kick is expected, not a failure, and there is no timeout error."""
    a = Asm()
    R.spin_counter(a)
    with Machine(a, system=protected_system, regions=[(RAM, MiB)], vcpus=2) as m:
        timer = threading.Timer(0.5, m.stop)
        timer.start()
        m.run(timeout=120)
        timer.join()
        assert m.stopped
        assert all(m.read_u64(m.image.area(i).data) > 0 for i in range(2))  # both had been running
