"""Guest-running conformance cases: GM-13 (guest_memfd_test.c), PK-1/PK-2 (x86/private_mem_kvm_exits_test.c), PC-1/PC-2
(x86/private_mem_conversions_test.c), the hypercall error returns of `kvm_emulate_hypercall` (KVM_HC_MAP_GPA_RANGE),
a guest access after its guest_memfd was closed (`kvm_gmem_release`), and one through a memslot whose userspace
address has nothing mapped (`kvm_handle_error_pfn`).

Guests are built with :mod:`kvmgmem.guest`. PK/PC need KVM_X86_SW_PROTECTED_VM: on a kernel without it (this
host) they skip naming it. The hypercall cases and the CPL0 unmapped-address cases meet this host's defects
(``HOST_DEVIATIONS`` in the sim's profile module) on kvm and report them as strict expected failures; on the sim they
always run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.exits import HypercallExit, MemoryFaultExit, MmioExit
from kvmgmem.guest import (
    Asm,
    Done,
    GuestFaultError,
    GuestImage,
    GuestTimeoutError,
    GuestVcpu,
    GuestVm,
    Sync,
    UnexpectedExitError,
)
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.guest.operands import qword, r12, r13, rax, rdi, rsi
from kvmgmem.hostmem import HostMemory

from ._util import GMEM, INIT_SHARED, KEEP, MMAP, PUNCH, HostDefect, P, expect_host_defect, require_cap
from .fixtures import MakeGuest, require_vm_type

GIB, MIB = 1 << 30, 1 << 20
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
HC_BIT = 1 << uapi.KVM_HC_MAP_GPA_RANGE


def run(v: GuestVcpu, backend: str, timeout: float = 30.0) -> Any:
    return v.run(timeout)


# --- GM-13 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", [False, True], ids=["cpl0", "cpl3"])
def test_gm13_guest_round_trip(system: kvmgmem.System, backend: str, make_guest: MakeGuest, user: bool) -> None:
    """GM-13 (guest_memfd_test.c, 6.18+): DEFAULT VM with MMAP and INIT_SHARED; gmem(p, MMAP|INIT_SHARED) bound at
    slot 1, gpa 4 GiB; the host fills 0xaa through an mmap; the guest checks every byte is 0xaa and writes
    0xff; a fresh host mapping reads 0xff. The slot's hva is the gmem's own mapping (on this host
    emulated CPL0 accesses go through the hva: `gmem_only_slot_hva_at_cpl0` in docs/conformance.md)."""
    want = MMAP | INIT_SHARED
    require_cap(system, uapi.KVM_CAP_GUEST_MEMFD_FLAGS, "KVM_CAP_GUEST_MEMFD_FLAGS", backend, mask=want)
    gpa = 4 * GIB
    a = Asm()
    R.verify(a, gpa, P, 0xAA, "gm13 reads 0xaa")
    R.fill(a, gpa, P, 0xFF)
    U.done(a)
    g = make_guest(GuestImage(a, user=user))
    assert g.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & want == want
    with g.vm.create_guest_memfd(P, want) as gmem:
        mapping = gmem.mmap()
        try:
            g.add_memory(1, gpa, mapping, flags=GMEM, guest_memfd=gmem)
            mapping[:] = b"\xaa" * P
            got = run(g.vcpus[0], backend)
            assert isinstance(got, Done), got
            again = gmem.mmap()
            try:
                assert again[:] == b"\xff" * P
            finally:
                again.close()
        finally:
            g.close()
            mapping.close()


# --- PK-1, PK-2 (private_mem_kvm_exits_test.c) -----------------------------------------------------------------

PK_GPA, PK_SLOT = 0xC0000000, 10


# PK-1 deletes a memslot while a vCPU thread runs: on the sim that once deadlocked (unicorn's ``mem_unmap``
# re-entered the TLB-fill hook while the vCPU's lock was held), so the case stays as its regression test.
def _read_loop_guest() -> GuestImage:
    a = Asm()
    R.read_loop(a, PK_GPA)  # gva == gpa through the identity map
    return GuestImage(a)


def _expect_private_fault(got: object) -> None:
    """x86/private_mem_kvm_exits_test.c: KVM_RUN → -1/EFAULT, exit 39, flags PRIVATE, gpa 0xc0000000, size 4096."""
    assert got == MemoryFaultExit(uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, PK_GPA, P, errno.EFAULT), got


def test_pk1_memslot_deleted(backend: str, make_guest: MakeGuest) -> None:
    """PK-1 (x86/private_mem_kvm_exits_test.c): SW_PROTECTED VM, slot 10 with GUEST_MEMFD (hva + 1-page gmem), PRIVATE
    on the page; a vCPU thread loops reading it; the host deletes slot 10; the thread's KVM_RUN returns -1/EFAULT with
    KVM_EXIT_MEMORY_FAULT, flags PRIVATE, gpa 0xc0000000, size 4096."""
    g = make_guest(_read_loop_guest(), vm_type=uapi.KVM_X86_SW_PROTECTED_VM)
    with HostMemory(P) as mem, g.vm.create_guest_memfd(P, 0) as gmem:
        try:
            g.vm.set_user_memory_region2(PK_SLOT, PK_GPA, P, mem, GMEM, gmem, 0)
            g.vm.set_memory_attributes(PK_GPA, P, PRIVATE)
            v = g.vcpus[0]
            with pytest.raises(GuestTimeoutError):
                run(v, backend, timeout=0.3)  # it reads private memory happily
            threads = g.threads(lambda gv: gv.run(timeout=30)).start()
            time.sleep(0.05)
            g.vm.set_user_memory_region2(PK_SLOT, PK_GPA, 0, None, GMEM, None, 0)
            (got,) = threads.join(30.0)
            _expect_private_fault(got)
        finally:
            g.close()


def test_pk2_private_access_without_gmem(backend: str, make_guest: MakeGuest) -> None:
    """PK-2 (x86/private_mem_kvm_exits_test.c): slot 10 without GUEST_MEMFD, PRIVATE on the page → the first read
    faults: -1/EFAULT, KVM_EXIT_MEMORY_FAULT, flags PRIVATE, gpa 0xc0000000, size 4096."""
    g = make_guest(_read_loop_guest(), vm_type=uapi.KVM_X86_SW_PROTECTED_VM)
    with HostMemory(P) as mem:
        try:
            g.vm.set_user_memory_region(PK_SLOT, PK_GPA, P, mem)
            g.vm.set_memory_attributes(PK_GPA, P, PRIVATE)
            _expect_private_fault(run(g.vcpus[0], backend))
        finally:
            g.close()


def test_gmem_closed_while_bound_then_private_access(backend: str, make_guest: MakeGuest) -> None:
    """`kvm_gmem_release` / `kvm_mmu_faultin_pfn`/`kvm_mmu_prepare_memory_fault_exit`: closing the guest_memfd while
    slot 10 is bound (and the page PRIVATE) leaves the slot without private backing: the guest's next private access →
    -1/EFAULT, KVM_EXIT_MEMORY_FAULT (PRIVATE); deleting the slot afterwards still works."""
    g = make_guest(_read_loop_guest(), vm_type=uapi.KVM_X86_SW_PROTECTED_VM)
    with HostMemory(P) as mem:
        try:
            gmem = g.vm.create_guest_memfd(P, 0)
            g.vm.set_user_memory_region2(PK_SLOT, PK_GPA, P, mem, GMEM, gmem, 0)
            g.vm.set_memory_attributes(PK_GPA, P, PRIVATE)
            gmem.close()
            _expect_private_fault(run(g.vcpus[0], backend))
            g.vm.set_user_memory_region2(PK_SLOT, PK_GPA, 0, None, GMEM, None, 0)  # delete works (`kvm_gmem_release`)
        finally:
            g.close()


# --- a memslot whose userspace_addr has nothing mapped (`kvm_handle_error_pfn`) -------------------------------

HOLE_GPA, HOLE_SLOT, HOLE_SIZE = 0xC0000000, 1, 2 * MIB
HOLE_OFFSET = 0x18  # the accessed byte's offset in the slot
HOLE_MARK = 0x1122334455667788  # RAX before the access (the value a write stores)
_MAPPED_BELOW = 1 << 32  # the kernel's top-down mmap places nothing this low on its own
MAP_FIXED_NOREPLACE = 0x100000  # Linux 4.17; not in Python's mmap module before 3.13


def _mapped_ranges() -> list[tuple[int, int]]:
    with open("/proc/self/maps") as f:
        return [(int(lo, 16), int(hi, 16)) for lo, hi in (line.split(None, 1)[0].split("-") for line in f)]


def _overlaps(lo: int, hi: int) -> list[tuple[int, int]]:
    return [(a, b) for a, b in _mapped_ranges() if a < hi and lo < b]


@contextlib.contextmanager
def _munmapped_range(size: int) -> Iterator[int]:
    """The address of ``size`` bytes that were mapped (MAP_FIXED_NOREPLACE at a free address below 4 GiB, written)
    and then munmap'ed. On leaving, checks that nothing was mapped there meanwhile: the guest met an unmapped hva."""
    from kvmgmem import libc

    start = 1 << 28
    while _overlaps(start, start + size):
        start += size
        assert start + size <= _MAPPED_BELOW, "no free range below 4 GiB"
    addr = libc.c_mmap(start, size, libc.PROT_RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    assert addr == start, f"mmap placed the range at {addr:#x}, not {start:#x}"
    ctypes.memset(addr, 0x5A, size)
    assert libc.munmap(addr, size) == 0
    assert not _overlaps(addr, addr + size)
    yield addr
    assert not _overlaps(addr, addr + size), "something was mapped in the hole while the guest ran"


def _is_unmapped_hva_mmio(exit: object, write: bool) -> bool:
    """This host's symptom (`unmapped_hva_mmio_at_cpl0`): the access exits as MMIO at its exact gpa, 8 bytes,
    carrying RAX for a write."""
    if not isinstance(exit, MmioExit):
        return False
    data_ok = not write or exit.data == HOLE_MARK.to_bytes(8, "little")
    return (exit.phys_addr, exit.length, exit.is_write) == (HOLE_GPA + HOLE_OFFSET, 8, write) and data_ok


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("user", [False, True], ids=["cpl0", "cpl3"])
def test_unmapped_hva_efault(request: pytest.FixtureRequest, backend: str, make_guest: MakeGuest, user: bool,
                             write: bool) -> None:  # fmt: skip
    """`kvm_handle_error_pfn`: a plain memslot (KVM_SET_USER_MEMORY_REGION) whose userspace_addr was munmap'ed; the
    guest reads (or writes) 8 bytes in it. `hva_to_pfn` finds no vma (KVM_PFN_ERR_FAULT), so KVM_RUN fails with
    EFAULT, and without a KVM_EXIT_MEMORY_FAULT: only the private/shared paths (`kvm_mmu_faultin_pfn`) prepare
    one, so the API raises ``KvmError(EFAULT, "KVM_RUN")``. Nothing was mapped or executed: running again fails
    the same way, at the same RIP.

    On this host (kvm_pvm) the access at CPL0, which kvm_pvm emulates, exits with KVM_EXIT_MMIO at the gpa
    instead: exactly that exit is a strict expected failure; CPL3 (native) must give EFAULT like any KVM."""
    defect = not user and expect_host_defect(request, backend, "unmapped_hva_mmio_at_cpl0")
    a = Asm()
    a.mov(rax, HOLE_MARK).mov(rsi, HOLE_GPA + HOLE_OFFSET)
    a.label("access")
    if write:
        a.mov(qword[rsi], rax)
    else:
        a.mov(rax, qword[rsi])
    U.done(a)
    image = GuestImage(a, user=user)
    g = make_guest(image)
    v = g.vcpus[0].vcpu
    with _munmapped_range(HOLE_SIZE) as hva:
        g.vm.set_user_memory_region(HOLE_SLOT, HOLE_GPA, HOLE_SIZE, hva)
        for attempt in range(2):
            try:
                got = v.run()
            except kvmgmem.KvmError as e:
                assert (e.errno, e.op) == (errno.EFAULT, "KVM_RUN"), e
                assert v.get_regs().rip == image.address("access"), f"run {attempt}: RIP moved"
                continue
            if defect and _is_unmapped_hva_mmio(got, write):
                raise HostDefect(f"KVM_RUN gave {got} instead of failing with EFAULT")
            pytest.fail(f"run {attempt}: KVM_RUN gave {got} instead of failing with EFAULT")
        g.vm.set_user_memory_region(HOLE_SLOT, HOLE_GPA, 0)


# --- PC-1, PC-2 (private_mem_conversions_test.c) --------------------------------------------------------------

PC_BASE = 4 * GIB
PER_CPU_SHIFT = 22  # per_cpu = align_up(2M + 4K, 2M) = 4 MiB
PER_CPU = 1 << PER_CPU_SHIFT
DATA = 2 * MIB + P
RANGES = [(0, P), (0, 2 * MIB), (P, P), (P, 2 * MIB), (2 * MIB, P)]
# MAP_GPA_RANGE a2 bits as the selftest uses them (KVM does not check bits 63:5 nor give 0-2 a meaning).
SET_ATTRS, SHARED, DO_FALLOCATE = 1, 2, 4
SYNC_SHARED, SYNC_PRIVATE = 1, 2


class PcGuest:
    """Emits the x86/private_mem_conversions_test.c guest program; r12 = this vCPU's base (4 GiB + index * 4 MiB), r13 =
    scratch address."""

    def __init__(self) -> None:
        self.a = Asm()
        a = self.a
        a.mov(r12, rdi).shl(r12, PER_CPU_SHIFT).mov(rax, PC_BASE).add(r12, rax)

    def at(self, offset: int) -> Any:
        self.a.mov(r13, r12)
        if offset:
            self.a.mov(rax, offset).add(r13, rax)
        return r13

    def fill(self, offset: int, size: int, value: int) -> None:
        R.fill(self.a, self.at(offset), size, value)

    def verify(self, offset: int, size: int, value: int, check: str) -> None:
        if size:
            R.verify(self.a, self.at(offset), size, value, check)

    def map(self, offset: int, size: int, flags: int) -> None:
        R.map_gpa_range(self.a, self.at(offset), size // P, flags, expect=0)

    def sync_shared(self, offset: int, size: int, cur: int, new: int) -> None:
        U.sync(self.a, SYNC_SHARED, self.at(offset), size, cur, new)

    def sync_private(self, offset: int, size: int, pattern: int) -> None:
        U.sync(self.a, SYNC_PRIVATE, self.at(offset), size, pattern)


def _pc1_program(g: PcGuest, falloc: bool) -> None:
    f = DO_FALLOCATE if falloc else 0
    g.fill(0, DATA, 0xAA)
    g.verify(0, DATA, 0xAA, "pc1 shared 0xaa")
    g.sync_shared(0, DATA, 0xAA, 0xCC)
    g.verify(0, DATA, 0xCC, "pc1 host wrote 0xcc")
    for o, s in RANGES:
        g.fill(o, s, 0x11)
        g.map(o, s, SET_ATTRS | f)  # → private
        if s > P:
            g.fill(o, P, 0x22)
        else:
            g.fill(o, s, 0x22)
            g.sync_private(o, s, 0x11)  # the hva view must still hold the shared 0x11
            g.verify(o, s, 0x22, f"pc1 private 0x22 at +{o:#x}")
            g.verify(0, o, 0xCC, "pc1 0xcc before the range")
            g.verify(o + s, DATA - o - s, 0xCC, "pc1 0xcc after the range")
        g.map(o, s, SET_ATTRS | SHARED | f)  # → shared
        g.fill(o, s, 0x33)
        g.sync_shared(o, s, 0x33, 0x44)
        g.verify(o, s, 0x44, f"pc1 host wrote 0x44 at +{o:#x}")
        g.fill(o, s, 0xCC)
        g.map(0, DATA, SET_ATTRS | SHARED | DO_FALLOCATE)


def _pc2_program(g: PcGuest, precise: bool) -> None:
    g.map(0, DATA, SET_ATTRS)  # everything private, nothing allocated
    for o, s in RANGES:
        g.map(0, DATA, SHARED | DO_FALLOCATE)  # punch everything; attributes stay private
        lo, size = (o, s) if precise else (0, DATA)
        g.fill(lo, size, 0xCC)
        g.verify(lo, size, 0xCC, "pc2 private 0xcc")
        g.map(o, s, SHARED | DO_FALLOCATE)  # punch just the range
        g.verify(o, s, 0x00, f"pc2 punched range reads zero at +{o:#x}")


class PcHost:
    """The VMM side: memslots 10+i over one gmem, hypercall handling (attributes and fallocate), SYNCs."""

    def __init__(self, g: GuestVm, nvcpus: int, nslots: int) -> None:
        self.g, self.vm = g, g.vm
        self.total = PER_CPU * nvcpus
        self.slot_size = self.total // nslots
        self.gmem = g.vm.create_guest_memfd(self.total, 0)
        self.mems: list[HostMemory] = []
        for i in range(nslots):
            mem = HostMemory(self.slot_size)
            self.mems.append(mem)
            g.add_memory(10 + i, PC_BASE + i * self.slot_size, mem, flags=GMEM, guest_memfd=self.gmem,
                         guest_memfd_offset=i * self.slot_size)  # fmt: skip

    def hva(self, gpa: int, size: int) -> bytes:
        out = b""
        while size:
            off = gpa - PC_BASE
            i, within = divmod(off, self.slot_size)
            n = min(size, self.slot_size - within)
            out += self.mems[i][within : within + n]
            gpa, size = gpa + n, size - n
        return out

    def hva_write(self, gpa: int, size: int, value: int) -> None:
        while size:
            i, within = divmod(gpa - PC_BASE, self.slot_size)
            n = min(size, self.slot_size - within)
            self.mems[i][within : within + n] = bytes([value]) * n
            gpa, size = gpa + n, size - n

    def handle_hypercall(self, ex: HypercallExit) -> None:
        assert ex.nr == uapi.KVM_HC_MAP_GPA_RANGE, ex
        gpa, size, flags = ex.args[0], ex.args[1] * P, ex.args[2]
        if flags & DO_FALLOCATE:
            mode = KEEP | PUNCH if flags & SHARED else KEEP
            self.gmem.fallocate(mode, gpa - PC_BASE, size)
        if flags & SET_ATTRS:
            self.vm.set_memory_attributes(gpa, size, 0 if flags & SHARED else PRIVATE)

    def drive(self, v: GuestVcpu) -> None:
        while True:
            got = v.run(timeout=120)
            if isinstance(got, Done):
                return
            if isinstance(got, HypercallExit):
                self.handle_hypercall(got)
                v.vcpu.complete_hypercall(0)
                continue
            if not isinstance(got, Sync):
                raise UnexpectedExitError(got, v.index)
            kind, gpa, size, *rest = got.args
            view = self.hva(gpa, size)
            if kind == SYNC_SHARED:
                cur, new = rest[:2]
                assert view == bytes([cur]) * size, f"vCPU {v.index}: shared view at {gpa:#x} is not {cur:#x}"
                self.hva_write(gpa, size, new)
            else:
                (pattern,) = rest[:1]
                assert view == bytes([pattern]) * size, (
                    f"vCPU {v.index}: private writes leaked into the shared view at {gpa:#x} (want {pattern:#x})"
                )

    def close(self) -> None:
        self.gmem.close()
        for mem in self.mems:
            mem.close()


PC_SHAPES = [
    pytest.param(1, 1, id="1vcpu-1slot"),
    pytest.param(4, 1, id="4vcpu-1slot"),
    pytest.param(1, 4, id="1vcpu-4slots"),
    pytest.param(4, 4, id="4vcpu-4slots"),
]


def _run_pc(system: kvmgmem.System, backend: str, make_guest: MakeGuest, nvcpus: int, nslots: int,
            program: Callable[[PcGuest, bool], None]) -> None:  # fmt: skip
    require_vm_type(system, backend, uapi.KVM_X86_SW_PROTECTED_VM)
    require_cap(system, uapi.KVM_CAP_EXIT_HYPERCALL, "KVM_CAP_EXIT_HYPERCALL", backend, mask=HC_BIT)
    pg = PcGuest()
    program(pg, False)
    program(pg, True)
    U.done(pg.a)
    g = make_guest(GuestImage(pg.a, nvcpus=nvcpus), vcpus=nvcpus, vm_type=uapi.KVM_X86_SW_PROTECTED_VM)
    g.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, HC_BIT)
    host = PcHost(g, nvcpus, nslots)
    try:
        g.run_vcpus(host.drive, timeout=300)
        g.close()  # the VM is freed; the gmem outlives it (the guest_memfd's VM reference (`kvm_gmem_create`))
        host.gmem.fallocate(KEEP | PUNCH, 0, host.total)
        host.gmem.fallocate(KEEP, 0, host.total)
    finally:
        g.close()
        host.close()


@pytest.mark.parametrize(("nvcpus", "nslots"), PC_SHAPES)
def test_pc1_explicit_conversions(system: kvmgmem.System, backend: str, make_guest: MakeGuest, nvcpus: int,
                                  nslots: int) -> None:  # fmt: skip
    """PC-1 (x86/private_mem_conversions_test.c), run without then with fallocate: shared writes reach the host view;
    converting a range to private (MAP_GPA_RANGE → KVM_EXIT_HYPERCALL → KVM_SET_MEMORY_ATTRIBUTES [+ fallocate])
    gives the guest private memory whose writes do not leak into the hva view; converting back shows the shared data
    again; ranges (0,p) (0,2M) (p,p) (p,2M) (2M,p), per vCPU, N vCPUs over M memslots of one guest_memfd."""
    _run_pc(system, backend, make_guest, nvcpus, nslots, _pc1_program)


@pytest.mark.parametrize(("nvcpus", "nslots"), PC_SHAPES)
def test_pc2_punch_hole(system: kvmgmem.System, backend: str, make_guest: MakeGuest, nvcpus: int,
                        nslots: int) -> None:  # fmt: skip
    """PC-2 (x86/private_mem_conversions_test.c), imprecise then precise: with everything private, PUNCH_HOLE zaps the
    guest's private mappings and the range re-faults as zero pages; the gmem outlives the VM (punch/allocate after
    close)."""
    _run_pc(system, backend, make_guest, nvcpus, nslots, _pc2_program)


# --- `kvm_emulate_hypercall` (KVM_HC_MAP_GPA_RANGE) hypercall error returns -----------------------------------


def _hc_guest(*calls: tuple[int, int, int, int], user: bool = False) -> GuestImage:
    a = Asm()
    for gpa, npages, attrs, expect in calls:
        R.map_gpa_range(a, gpa, npages, attrs, expect=expect, check=f"MAP_GPA_RANGE({gpa:#x}, {npages})")
    U.done(a)
    return GuestImage(a, user=user)


def _hc_vm(system: kvmgmem.System, backend: str, make_guest: MakeGuest, image: GuestImage, enable: bool) -> GuestVm:
    vm_type = (
        uapi.KVM_X86_SW_PROTECTED_VM
        if uapi.KVM_X86_SW_PROTECTED_VM in system.supported_vm_types
        else uapi.KVM_X86_DEFAULT_VM
    )
    g = make_guest(image, vm_type=vm_type)
    if enable:
        require_cap(system, uapi.KVM_CAP_EXIT_HYPERCALL, "KVM_CAP_EXIT_HYPERCALL", backend, mask=HC_BIT)
        g.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, HC_BIT)
    return g


def _run_hc(v: GuestVcpu, defect: bool) -> object:
    """Run the vCPU until its next exit. With ``defect`` (kvm under kvm_pvm, where VMCALL spins in KVM_RUN until
    a signal) a kick after 1 s is that defect and raises :class:`HostDefect`; everywhere else the hypercall
    returns within the normal timeout, and a timeout is a failure like any other."""
    if not defect:
        return v.run(30.0)
    try:
        return v.run(1.0)
    except GuestTimeoutError as e:
        raise HostDefect(f"VMCALL did not return to the VMM: {e}") from e


def test_hypercall_einval_bad_args(
    request: pytest.FixtureRequest, system: kvmgmem.System, backend: str, make_guest: MakeGuest
) -> None:
    """`kvm_emulate_hypercall` (KVM_HC_MAP_GPA_RANGE) (enabled): a0 not page aligned, a1 == 0, gfn(a0) + a1 wrapping →
    RAX = -KVM_EINVAL and the guest continues (no exit); a well-formed call afterwards still exits with
    KVM_EXIT_HYPERCALL.

    On this host KVM_CAP_EXIT_HYPERCALL is advertised but VMCALL never returns: a strict expected failure."""
    defect = expect_host_defect(request, backend, "vmcall_never_returns")
    bad = -uapi.KVM_EINVAL
    image = _hc_guest(
        (4 * GIB + 1, 1, 0, bad),
        (4 * GIB, 0, 0, bad),
        (4 * GIB, (1 << 64) - 1, 0, bad),  # gfn + npages wraps u64
        (4 * GIB, 1, uapi.KVM_MAP_GPA_RANGE_ENCRYPTED, 0),
    )
    g = _hc_vm(system, backend, make_guest, image, enable=True)
    v = g.vcpus[0]
    got = _run_hc(v, defect)
    assert isinstance(got, HypercallExit), got
    assert got.args[:3] == (4 * GIB, 1, uapi.KVM_MAP_GPA_RANGE_ENCRYPTED)
    v.vcpu.complete_hypercall(0)
    assert isinstance(run(v, backend), Done)


def test_hypercall_enosys_when_not_enabled(
    request: pytest.FixtureRequest, system: kvmgmem.System, backend: str, make_guest: MakeGuest
) -> None:
    """`kvm_emulate_hypercall` (KVM_HC_MAP_GPA_RANGE): without KVM_CAP_EXIT_HYPERCALL bit 12, MAP_GPA_RANGE → RAX =
    -KVM_ENOSYS (-1000), no exit. Needs no capability; where the cap exists, enabling then disabling it again (args[0] =
    0) first, which must restore that answer. On this host VMCALL never returns: a strict expected failure."""
    defect = expect_host_defect(request, backend, "vmcall_never_returns")
    g = _hc_vm(system, backend, make_guest, _hc_guest((4 * GIB, 1, 0, -uapi.KVM_ENOSYS)), enable=False)
    if system.check_extension(uapi.KVM_CAP_EXIT_HYPERCALL) & HC_BIT:
        g.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, HC_BIT)
        g.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0)
    assert isinstance(_run_hc(g.vcpus[0], defect), Done)


def test_hypercall_eperm_at_cpl3(
    request: pytest.FixtureRequest, system: kvmgmem.System, backend: str, make_guest: MakeGuest
) -> None:
    """`kvm_emulate_hypercall` (KVM_HC_MAP_GPA_RANGE): a hypercall from CPL3 → RAX = -KVM_EPERM (-1), even with the exit
    enabled — no exit.

    On this host (kvm_pvm) CPL3 guest code runs natively and a VMCALL there is delivered to the guest as #GP(0)
    at the VMCALL instead of reaching kvm_emulate_hypercall: exactly that #GP is a strict expected failure
    naming the deviation; anything else, and any other KVM's failure to return -KVM_EPERM, is a failure."""
    defect = expect_host_defect(request, backend, "vmcall_at_cpl3_gp")
    image = _hc_guest((4 * GIB, 1, 0, -uapi.KVM_EPERM), user=True)
    g = _hc_vm(system, backend, make_guest, image, enable=True)
    try:
        got = _run_hc(g.vcpus[0], defect)
    except GuestFaultError as e:
        ev = e.event
        at_vmcall = g.memory.read(ev.rip, 3) == b"\x0f\x01\xc1"
        if defect and (ev.vector, ev.error_code, ev.cpl) == (13, 0, 3) and at_vmcall:
            raise HostDefect(f"#GP(0) at the CPL3 VMCALL instead of -KVM_EPERM: {e}") from e
        raise
    assert isinstance(got, Done), got
