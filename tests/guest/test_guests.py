"""Guests on a real backend: ucalls, exceptions, GM-13, hypercalls, vCPU threads, big fills.

Every test runs once per backend (tests/conftest.py); an unusable backend or missing capability is a skip
that names it. CPL0 guest code is emulated on this host (~1.7 M instr/s), so CPL0 work stays tiny and the
big loops run at CPL3.
"""

from __future__ import annotations

import time

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.exits import HypercallExit
from kvmgmem.guest import (
    PAGE_1G,
    PAGE_4K,
    Asm,
    Done,
    GuestAssertionError,
    GuestFaultError,
    GuestImage,
    GuestTimeoutError,
    GuestVcpu,
    Sync,
    UnexpectedExitError,
    max_page_size,
    qword,
)
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.guest.operands import rax, rdi, rsi
from kvmgmem.hostmem import HostMemory

from ._util import MakeGuest, require_cap

GiB, MiB = 1 << 30, 1 << 20
CPL = pytest.mark.parametrize("user", [False, True], ids=["cpl0", "cpl3"])


@CPL
def test_sync_print_done(make_guest: MakeGuest, user: bool) -> None:
    a = Asm()
    U.print_(a, "hello from the guest")
    U.sync(a, rdi, rsi, 3, 0xDEADBEEFCAFE, -1)
    a.mov(rax, 7)
    U.sync(a, rax, qword[rsi])
    U.done(a)
    image = GuestImage(a, user=user)
    v = make_guest(image).vcpus[0]
    assert v.expect_sync() == (0, image.area(0).data, 3, 0xDEADBEEFCAFE, (1 << 64) - 1)
    assert v.prints == ["hello from the guest"]
    assert v.expect_sync() == (7, 0)
    v.run_to_done()
    assert isinstance(v.run(), Done)  # resuming after DONE reports DONE again


@CPL
def test_ud2_reports_vector_and_rip(make_guest: MakeGuest, user: bool) -> None:
    a = Asm()
    a.nop().label("bad").ud2()
    image = GuestImage(a, user=user)
    v = make_guest(image).vcpus[0]
    with pytest.raises(GuestFaultError) as info:
        v.run()
    ev = info.value.event
    assert (ev.vector, ev.error_code, ev.rip) == (6, 0, image.address("bad"))
    assert ev.cpl == (3 if user else 0)
    assert "#UD" in str(info.value) and f"{image.address('bad'):#x}" in str(info.value)


@CPL
def test_page_fault_reports_error_code_and_cr2(make_guest: MakeGuest, user: bool) -> None:
    a = Asm()
    a.mov(rax, 1 << 40)  # beyond the 512 GiB identity map: not present
    a.label("load").mov(rax, qword[rax])
    image = GuestImage(a, user=user)
    v = make_guest(image).vcpus[0]
    with pytest.raises(GuestFaultError) as info:
        v.run()
    ev = info.value.event
    assert (ev.vector, ev.rip, ev.cr2) == (14, image.address("load"), 1 << 40)
    assert ev.error_code == (4 if user else 0)  # not-present read, U/S set from CPL3


def test_guest_assertion_becomes_python_exception(make_guest: MakeGuest) -> None:
    a = Asm()
    a.mov(rax, 41)
    U.assert_eq(a, rax, 42, "answer")
    U.done(a)
    v = make_guest(GuestImage(a)).vcpus[0]
    with pytest.raises(GuestAssertionError, match=r"'answer' failed: expected 0x2a, got 0x29") as info:
        v.run()
    assert (info.value.check, info.value.expected, info.value.actual) == ("answer", 42, 41)


@CPL
def test_gm13_guest_round_trip(system: kvmgmem.System, backend: str, make_guest: MakeGuest, user: bool) -> None:
    """GM-13 (guest_memfd_test.c) with the hva = the gmem's own mapping (on this host CPL0 goes through the hva:
    docs/conformance.md)."""
    want = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
    require_cap(system, backend, "GUEST_MEMFD_FLAGS", uapi.KVM_CAP_GUEST_MEMFD_FLAGS, want)
    p, gpa = uapi.PAGE_SIZE, 4 * GiB
    a = Asm()
    R.verify(a, gpa, p, 0xAA, "gm13 reads 0xaa")
    R.fill(a, gpa, p, 0xFF)
    U.done(a)
    g = make_guest(GuestImage(a, user=user))
    with g.vm.create_guest_memfd(p, want) as gmem:
        mapping = gmem.mmap()  # the slot's hva: this host's CPL0 accesses go through it
        try:
            g.add_memory(1, gpa, mapping, flags=uapi.KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
            mapping[:] = b"\xaa" * p
            g.vcpus[0].run_to_done()
            with gmem.mmap() as again:  # a fresh mapping sees what the guest wrote
                assert again[:] == b"\xff" * p
        finally:
            g.close()  # deletes the slot with the VM, so the mapping is no longer pinned
            mapping.close()


# --- KVM_HC_MAP_GPA_RANGE (Documentation/virt/kvm/x86/hypercalls.rst, `kvm_emulate_hypercall`) ----------------

HC_GPA, HC_NPAGES = 4 * GiB, 16
HC_ATTRS = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED | uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_4K
VMCALL_PROBE_S = 0.5


def _hypercall_guest(expect: int) -> GuestImage:
    a = Asm()
    a.label("vmcall")  # the first instructions load the arguments; the label names the sequence
    R.map_gpa_range(a, HC_GPA, HC_NPAGES, HC_ATTRS, expect=expect)
    U.sync(a, rax)
    U.done(a)
    return GuestImage(a)  # CPL0: from CPL3 KVM answers -KVM_EPERM


def _run_probing_vmcall(v: GuestVcpu, backend: str) -> object:
    """Run; if the vCPU is still inside VMCALL after the probe time, skip: this host's VMCALL never returns
    to the VMM (kvm_pvm; docs/conformance.md, `vmcall_never_returns`), so neither KVM_EXIT_HYPERCALL nor -KVM_ENOSYS
    can be observed."""
    try:
        return v.run(timeout=VMCALL_PROBE_S)
    except GuestTimeoutError:
        pass  # skip below, outside the handler, so the skip does not chain (and pin) the timeout
    regs = v.vcpu.get_regs()
    code = v.machine.memory.read(regs.rip, 3)
    assert code == b"\x0f\x01\xc1", f"guest stuck at {regs.rip:#x} ({code.hex()}), not on a vmcall"
    pytest.skip(
        f"backend {backend}: VMCALL never returned to the VMM within {VMCALL_PROBE_S} s (vCPU kicked, RIP "
        f"{regs.rip:#x} still on the vmcall) — this host's KVM spins on VMCALL (docs/conformance.md)"
    )


def test_map_gpa_range_exits_when_enabled(system: kvmgmem.System, backend: str, make_guest: MakeGuest) -> None:
    mask = require_cap(system, backend, "EXIT_HYPERCALL", uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)
    g = make_guest(_hypercall_guest(expect=0))
    g.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, mask & (1 << uapi.KVM_HC_MAP_GPA_RANGE))
    v = g.vcpus[0]
    got = _run_probing_vmcall(v, backend)
    assert isinstance(got, HypercallExit), got
    assert got.nr == uapi.KVM_HC_MAP_GPA_RANGE
    assert got.args[:3] == (HC_GPA, HC_NPAGES, HC_ATTRS)
    assert got.longmode
    v.vcpu.complete_hypercall(0)
    assert v.expect_sync() == (0,)
    v.run_to_done()


def test_map_gpa_range_enosys_when_not_enabled(backend: str, make_guest: MakeGuest) -> None:
    v = make_guest(_hypercall_guest(expect=-uapi.KVM_ENOSYS)).vcpus[0]
    got = _run_probing_vmcall(v, backend)
    assert isinstance(got, Sync) and got.args == ((-uapi.KVM_ENOSYS) & (1 << 64) - 1,), got
    v.run_to_done()


# --- several vCPUs ------------------------------------------------------------------------------------------


def test_two_vcpus_spin_concurrently(make_guest: MakeGuest) -> None:
    a = Asm()
    R.spin_counter(a)  # inc qword [rsi] forever; rsi = this vCPU's data area
    image = GuestImage(a, nvcpus=2, user=True)  # CPL3: native speed on this host
    g = make_guest(image, vcpus=2)
    counters = [image.area(i).data for i in range(2)]
    threads = g.threads(lambda v: v.run(timeout=None)).start()
    try:
        time.sleep(0.2)
        first = [g.memory.read_u64(c) for c in counters]
        time.sleep(0.2)
        second = [g.memory.read_u64(c) for c in counters]
    finally:
        threads.stop()
    assert threads.join(10.0) == [None, None]  # both ended by the stop kick, nothing else
    assert all(f > 0 for f in first), first
    assert all(s > f for s, f in zip(second, first, strict=True)), (first, second)


def test_first_vcpu_failure_propagates_and_stops_the_rest(make_guest: MakeGuest) -> None:
    a = Asm()
    U.assert_cmp(a, "e", rdi, 1, "only vCPU 1 may pass")  # vCPU 0 fails at once
    R.spin_counter(a)
    g = make_guest(GuestImage(a, nvcpus=2, user=True), vcpus=2)
    started = time.monotonic()
    with pytest.raises(GuestAssertionError, match="vCPU 0: guest check 'only vCPU 1 may pass'"):
        g.run_vcpus(lambda v: v.run(timeout=None), timeout=10.0)
    assert time.monotonic() - started < 5.0


def test_vcpu_threads_time_out(make_guest: MakeGuest) -> None:
    a = Asm()
    R.spin_counter(a)
    g = make_guest(GuestImage(a, nvcpus=2, user=True), vcpus=2)
    with pytest.raises(GuestTimeoutError, match="still running"):
        g.run_vcpus(lambda v: v.run(timeout=None), timeout=0.3)


def test_single_vcpu_watchdog(make_guest: MakeGuest) -> None:
    a = Asm()
    R.read_loop(a, 0x1000)  # PK cases (x86/private_mem_kvm_exits_test.c): read a u64 forever
    v = make_guest(GuestImage(a, user=True)).vcpus[0]
    with pytest.raises(GuestTimeoutError):
        v.run(timeout=0.2)
    assert v.vcpu.get_regs().rbx == 0x1000


# --- memory-wide routines ---------------------------------------------------------------------------------------


def test_fill_verify_64mib_at_cpl3(make_guest: MakeGuest) -> None:
    size, gpa = 64 * MiB, 1 * GiB
    a = Asm()
    R.fill(a, gpa, size, 0x5A)
    R.verify(a, gpa, size, 0x5A, "after fill")
    U.sync(a)
    R.verify(a, gpa, size, 0x5A, "after host write")
    U.done(a)
    g = make_guest(GuestImage(a, user=True))
    with HostMemory(size) as mem:
        try:
            g.add_memory(1, gpa, mem)
            v = g.vcpus[0]
            assert v.expect_sync(timeout=30) == ()
            assert mem[:: 1 << 20] == b"\x5a" * 64 and mem[-1] == 0x5A
            bad = 37 * MiB + 123
            mem[bad] = 0x11
            with pytest.raises(GuestAssertionError, match="'after host write' failed: expected 0x5a, got 0x11") as e:
                v.run(timeout=30)
            assert e.value.extra == (gpa + bad,)  # the first differing address
        finally:
            g.close()


def test_verify_reports_first_mismatch_address(make_guest: MakeGuest) -> None:
    gpa, size = 1 * GiB, 2 * MiB
    a = Asm()
    R.verify(a, gpa, size, 0, "zeroes")
    U.done(a)
    g = make_guest(GuestImage(a, user=True))
    with HostMemory(size) as mem:
        try:
            g.add_memory(1, gpa, mem)
            mem[4099] = 7
            mem[9000] = 8
            with pytest.raises(GuestAssertionError) as info:
                g.vcpus[0].run()
            assert (info.value.expected, info.value.actual, info.value.extra) == (0, 7, (gpa + 4099,))
        finally:
            g.close()


def test_touch_pages_and_reach_512gib(make_guest: MakeGuest) -> None:
    """A slot at 511 GiB is reached through the default 512 GiB identity map (2 MiB pages)."""
    gpa, size = 511 * GiB, 2 * MiB
    a = Asm()
    R.touch_pages(a, gpa, size, value=1)
    R.touch_pages(a, gpa, size, value=None)
    U.done(a)
    g = make_guest(GuestImage(a, user=True))
    with HostMemory(size) as mem:
        try:
            g.add_memory(1, gpa, mem)
            g.vcpus[0].run_to_done()
            assert mem[::4096] == b"\x01" * (size // 4096)
            assert mem[1::4096] == b"\x00" * (size // 4096)
        finally:
            g.close()


def test_one_gib_pages_where_cpuid_offers_them(system: kvmgmem.System, backend: str, make_guest: MakeGuest) -> None:
    if max_page_size(system) != PAGE_1G:
        pytest.skip(f"backend {backend}: supported CPUID lacks PDPE1GB (0x80000001 EDX bit 26), 2 MiB pages only")
    gpa, size = 3 * GiB, 2 * MiB
    a = Asm()
    R.fill(a, gpa, size, 0x3C)
    U.done(a)
    g = make_guest(GuestImage(a, page_size=PAGE_1G, user=True))
    with HostMemory(size) as mem:
        try:
            g.add_memory(1, gpa, mem)
            g.vcpus[0].run_to_done()
            assert mem[:] == b"\x3c" * size
        finally:
            g.close()


def test_unexpected_ucall_is_named(make_guest: MakeGuest) -> None:
    a = Asm()
    U.done(a)
    v = make_guest(GuestImage(a)).vcpus[0]
    with pytest.raises(UnexpectedExitError, match=r"vCPU 0: unexpected ucall Done\(\)"):
        v.expect_sync()


def test_4k_pages(make_guest: MakeGuest) -> None:
    """Page size is configurable: a 1 GiB identity map with 4 KiB leaves reaches a slot at 512 MiB."""
    gpa, size = 512 * MiB, 1 * MiB
    a = Asm()
    R.fill(a, gpa, size, 0x77)
    R.verify(a, gpa, size, 0x77, "4k fill")
    U.done(a)
    image = GuestImage(a, user=True, page_size=PAGE_4K, reach=1 * GiB)
    assert image.tables.size == (1 + 1 + 1 + 512) * 4096
    g = make_guest(image)
    with HostMemory(size) as mem:
        try:
            g.add_memory(1, gpa, mem)
            g.vcpus[0].run_to_done()
            assert mem[:] == b"\x77" * size
        finally:
            g.close()
