"""Guests on a real backend: ucalls, exceptions, GM-13, hypercalls, vCPU threads, big fills.

Every test runs once per backend (tests/conftest.py); an unusable backend or missing capability is a skip
that names it. CPL0 guest code is emulated on this host (~1.7 M instr/s), so CPL0 work stays tiny and the
big loops run at CPL3.
"""

from __future__ import annotations

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.guest import (
    Asm,
    Done,
    GuestAssertionError,
    GuestFaultError,
    GuestImage,
    qword,
)
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.guest.operands import rax, rdi, rsi

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
    """Spec §4.1 GM-13 with the hva = the gmem's own mapping (host-probes §2: CPL0 goes through the hva)."""
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
