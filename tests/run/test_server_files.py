"""``kvmgmem.run.server``: guest_memfd file operations with the kernel's errnos, its mmap rules (real
mappings, real SIGBUS), the ioctls the API does not model (``run/gaps.py``), sysfs answers and the trace."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
from pathlib import Path

import pytest

from kvmgmem import uapi
from kvmgmem.conformance._sigbus import touch_dies_of_sigbus
from kvmgmem.libc import MADV_COLLAPSE
from kvmgmem.run import abi, sysfs
from kvmgmem.run.server import Server

from .server_program import Program, program

PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
MMAP_SHARED_FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


def errno_of(call, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        call(*args)
    return int(info.value.errno or 0)


def test_guest_memfd_file_operations() -> None:
    """read/write EINVAL, pread/pwrite/lseek ESPIPE, ftruncate EINVAL, fallocate as kvm_gmem_fallocate,
    fstat a regular 0600 file of the creation size; the fd has no FD_CLOEXEC (measured on 6.18)."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        gmem = prog.create_gmem(vm, 1 << 20)
        assert os.get_inheritable(gmem)
        buf = ctypes.create_string_buffer(16)
        assert errno_of(srv.read, gmem, ctypes.addressof(buf), 1) == errno.EINVAL
        assert errno_of(srv.write, gmem, ctypes.addressof(buf), 1) == errno.EINVAL
        assert errno_of(srv.pread, gmem, ctypes.addressof(buf), 1, 0) == errno.ESPIPE
        assert errno_of(srv.pwrite, gmem, ctypes.addressof(buf), 1, 0) == errno.ESPIPE
        assert errno_of(srv.lseek, gmem, 0, os.SEEK_SET) == errno.ESPIPE
        assert errno_of(srv.ftruncate, gmem, 1 << 20) == errno.EINVAL
        keep = uapi.FALLOC_FL_KEEP_SIZE
        assert srv.fallocate(gmem, keep, 0, 8192) == 0
        assert srv.fallocate(gmem, keep | uapi.FALLOC_FL_PUNCH_HOLE, 0, 4096) == 0
        assert errno_of(srv.fallocate, gmem, 0, 0, 4096) == errno.EOPNOTSUPP
        assert errno_of(srv.fallocate, gmem, keep, 0, 4097) == errno.EINVAL
        assert errno_of(srv.fallocate, gmem, keep, 1 << 20, 4096) == errno.EINVAL  # past EOF
        st = ctypes.create_string_buffer(144)
        srv.fstat(gmem, ctypes.addressof(st))
        mode = int.from_bytes(st.raw[24:28], "little")
        size = int.from_bytes(st.raw[48:56], "little")
        assert (mode, size, int.from_bytes(st.raw[56:64], "little")) == (0o100600, 1 << 20, 4096)


def test_create_guest_memfd_errors_and_reserved() -> None:
    """Bad size / flags are EINVAL; the reserved words are ignored (kvm_gmem_create does not check them)."""
    with program() as prog:
        vm = prog.create_vm(prog.kvm)
        assert errno_of(prog.create_gmem, vm, 4097) == errno.EINVAL
        assert errno_of(prog.create_gmem, vm, 4096, 1 << 40) == errno.EINVAL
        args = uapi.kvm_create_guest_memfd(size=4096)
        args.reserved[0] = 0xDEAD
        fd = prog.ioctl(vm, uapi.KVM_CREATE_GUEST_MEMFD, args)
        assert fd >= 0
        assert errno_of(prog.srv.ioctl, vm, uapi.KVM_CREATE_GUEST_MEMFD, 8) == errno.EFAULT


def test_guest_memfd_mmap_rules() -> None:
    """mmap: ENODEV without GUEST_MEMFD_FLAG_MMAP, EINVAL for MAP_PRIVATE; a shared mapping is real memory the
    program reads and writes; MADV_COLLAPSE is EINVAL, MADV_REMOVE punches; munmap releases it (returns 1)."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        plain = prog.create_gmem(vm, 1 << 20)
        assert errno_of(srv.mmap, 0, 4096, PROT_RW, mmap.MAP_SHARED, plain, 0) == errno.ENODEV
        gmem = prog.create_gmem(vm, 1 << 20, MMAP_SHARED_FLAGS)
        assert errno_of(srv.mmap, 0, 4096, PROT_RW, mmap.MAP_PRIVATE, gmem, 0) == errno.EINVAL
        address = srv.mmap(0, 1 << 20, PROT_RW, mmap.MAP_SHARED, gmem, 0)
        ctypes.memmove(address, b"abc", 3)
        assert ctypes.string_at(address, 3) == b"abc"
        assert errno_of(srv.madvise, address, 1 << 20, MADV_COLLAPSE) == errno.EINVAL
        assert srv.madvise(address, 4096, mmap.MADV_REMOVE) == 0
        assert ctypes.string_at(address, 3) == bytes(3)
        assert srv.munmap(address, 1 << 20) == 1
        # a mapping keeps working after the fd closed (it holds the file)
        address = srv.mmap(0, 8192, PROT_RW, mmap.MAP_SHARED, gmem, 0)
        srv.close(gmem)
        ctypes.memmove(address, b"z", 1)
        assert srv.munmap(address, 8192) == 1


def test_guest_memfd_mmap_sigbus_private_and_past_eof() -> None:
    """A guest_memfd without INIT_SHARED is private memory: touching its mapping is a real SIGBUS; past EOF
    too (kvm_gmem_fault_user_mapping)."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        private = prog.create_gmem(vm, 1 << 20, uapi.GUEST_MEMFD_FLAG_MMAP)
        address = srv.mmap(0, 4096, PROT_RW, mmap.MAP_SHARED, private, 0)
        assert touch_dies_of_sigbus(address, 1, write=False) == signal.SIGBUS
        assert srv.munmap(address, 4096) == 1
        shared = prog.create_gmem(vm, 4096, MMAP_SHARED_FLAGS)
        address = srv.mmap(0, 8192, PROT_RW, mmap.MAP_SHARED, shared, 0)
        assert touch_dies_of_sigbus(address, 1, write=True) == 0
        assert touch_dies_of_sigbus(address + 4096, 1, write=False) == signal.SIGBUS
        assert srv.munmap(address, 8192) == 1


def test_guest_memfd_mapping_as_memslot_userspace() -> None:
    """A memslot whose userspace is the program's guest_memfd mapping (as the 6.18+ selftests do), then
    the program unmaps it while the slot exists: the unmap is deferred to the slot's deletion."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        gmem = prog.create_gmem(vm, 2 << 20, MMAP_SHARED_FLAGS)
        address = srv.mmap(0, 2 << 20, PROT_RW, mmap.MAP_SHARED, gmem, 0)
        prog.set_region(vm, 0, 1 << 30, 2 << 20, address, uapi.KVM_MEM_GUEST_MEMFD, gmem, 0)
        assert srv.munmap(address, 2 << 20) == 1
        prog.set_region(vm, 0, 1 << 30, 0, 0)


def test_memslot_errors() -> None:
    """Memslot ioctls with the kernel's errnos: overlap EEXIST, unaligned EINVAL, a non-gmem fd EINVAL, a
    closed fd EBADF, a bad struct pointer EFAULT."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        mem = mmap.mmap(-1, 2 << 20, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        view = (ctypes.c_char * (2 << 20)).from_buffer(mem)
        hva = ctypes.addressof(view)
        try:
            prog.set_region(vm, 0, 0, 2 << 20, hva)
            assert errno_of(prog.set_region, vm, 1, 0x100000, 2 << 20, hva) == errno.EEXIST
            assert errno_of(prog.set_region, vm, 1, 0x1000_0001, 4096, hva) == errno.EINVAL
            flags = uapi.KVM_MEM_GUEST_MEMFD
            assert errno_of(prog.set_region, vm, 2, 1 << 30, 4096, hva, flags, vm) == errno.EINVAL
            gmem = prog.create_gmem(vm, 4096)
            srv.close(gmem)
            assert errno_of(prog.set_region, vm, 2, 1 << 30, 4096, hva, flags, gmem) == errno.EBADF
            assert errno_of(srv.ioctl, vm, uapi.KVM_SET_USER_MEMORY_REGION2, 8) == errno.EFAULT
            r = uapi.kvm_userspace_memory_region(slot=3, guest_phys_addr=1 << 32, memory_size=4096, userspace_addr=hva)
            assert prog.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, r) == 0
            r.memory_size = 0
            prog.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, r)
            prog.set_region(vm, 0, 0, 0, 0)
        finally:
            srv.munmap(hva, 2 << 20)
            del view
            mem.close()


def test_set_memory_attributes_errors() -> None:
    """SET_MEMORY_ATTRIBUTES: EINVAL for flags, unaligned ranges, attributes a DEFAULT VM does not have."""
    with program() as prog:
        vm = prog.create_vm(prog.kvm)
        assert errno_of(prog.set_attributes, vm, 0, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE) == errno.EINVAL
        pvm = prog.create_vm(prog.kvm, uapi.KVM_X86_SW_PROTECTED_VM)
        assert prog.set_attributes(pvm, 0, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0
        assert errno_of(prog.set_attributes, pvm, 1, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE) == errno.EINVAL


def test_unmodelled_vm_ioctls() -> None:
    """IRQCHIP (EEXIST twice, EINVAL after a vCPU), TSC kHz, NR_MMU_PAGES (EINVAL below 64), TSS addr."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        assert srv.ioctl(vm, uapi.KVM_CREATE_IRQCHIP, 0) == 0
        assert errno_of(srv.ioctl, vm, uapi.KVM_CREATE_IRQCHIP, 0) == errno.EEXIST
        assert srv.ioctl(vm, uapi.KVM_GET_TSC_KHZ, 0) > 0
        assert srv.ioctl(vm, uapi.KVM_SET_NR_MMU_PAGES, 1000) == 0
        assert errno_of(srv.ioctl, vm, uapi.KVM_SET_NR_MMU_PAGES, 10) == errno.EINVAL
        assert srv.ioctl(vm, abi.KVM_SET_TSS_ADDR, 0xFFFBD000) == 0
        vm2 = prog.create_vm(prog.kvm)
        prog.create_vcpu(vm2)
        assert errno_of(srv.ioctl, vm2, uapi.KVM_CREATE_IRQCHIP, 0) == errno.EINVAL


def test_unmodelled_vcpu_ioctls() -> None:
    """MP_STATE, TSC kHz, MSRs (count processed, EFER through the sregs), FPU, XCRS, LAPIC, GET_CPUID2."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        srv.ioctl(vm, uapi.KVM_CREATE_IRQCHIP, 0)
        vcpu, _run = prog.create_vcpu(vm)
        mp = uapi.kvm_mp_state(uapi.KVM_MP_STATE_HALTED)
        assert prog.ioctl(vcpu, uapi.KVM_SET_MP_STATE, mp) == 0
        mp.mp_state = 0
        prog.ioctl(vcpu, uapi.KVM_GET_MP_STATE, mp)
        assert mp.mp_state == uapi.KVM_MP_STATE_HALTED
        assert srv.ioctl(vcpu, uapi.KVM_GET_TSC_KHZ, 0) == srv.ioctl(vm, uapi.KVM_GET_TSC_KHZ, 0)

        class Msrs(ctypes.Structure):
            _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("entries", abi.kvm_msr_entry * 3)]

        msrs = Msrs(nmsrs=3)
        msrs.entries[0].index, msrs.entries[0].data = 0xC0000082, 0x1234  # LSTAR
        msrs.entries[1].index, msrs.entries[1].data = 0xC0000080, 0x500  # EFER: LME|LMA
        msrs.entries[2].index = 0xDEAD  # no such MSR: processing stops here
        assert prog.ioctl(vcpu, abi.KVM_SET_MSRS, msrs) == 2
        msrs.entries[0].data = msrs.entries[1].data = 0
        assert prog.ioctl(vcpu, abi.KVM_GET_MSRS, msrs) == 2
        assert (msrs.entries[0].data, msrs.entries[1].data) == (0x1234, 0x500)
        sregs = uapi.kvm_sregs()
        prog.ioctl(vcpu, uapi.KVM_GET_SREGS, sregs)
        assert sregs.efer == 0x500
        fpu = abi.kvm_fpu()
        prog.ioctl(vcpu, abi.KVM_GET_FPU, fpu)
        assert fpu.mxcsr == 0x1F80
        xcrs = abi.kvm_xcrs()
        prog.ioctl(vcpu, abi.KVM_GET_XCRS, xcrs)
        assert xcrs.nr_xcrs == 0
        assert errno_of(prog.ioctl, vcpu, abi.KVM_SET_XCRS, xcrs) == errno.EINVAL
        lapic = abi.kvm_lapic_state()
        lapic.regs[0x20] = 1
        prog.ioctl(vcpu, abi.KVM_SET_LAPIC, lapic)
        lapic.regs[0x20] = 0
        prog.ioctl(vcpu, abi.KVM_GET_LAPIC, lapic)
        assert lapic.regs[0x20] == 1
        # GET_CPUID2 returns what SET_CPUID2 set; E2BIG when nent is too small
        cpuid = uapi.cpuid2_type(64)()
        cpuid.nent = 64
        prog.ioctl(prog.kvm, uapi.KVM_GET_SUPPORTED_CPUID, cpuid)
        n = cpuid.nent
        prog.ioctl(vcpu, uapi.KVM_SET_CPUID2, cpuid)
        back = uapi.cpuid2_type(64)()
        back.nent = 64
        prog.ioctl(vcpu, uapi.KVM_GET_CPUID2, back)
        assert back.nent == n and bytes(back.entries[0]) == bytes(cpuid.entries[0])
        back.nent = 1
        assert errno_of(prog.ioctl, vcpu, uapi.KVM_GET_CPUID2, back) == errno.E2BIG
        big = uapi.cpuid2_type(1)()
        big.nent = 257
        assert errno_of(prog.ioctl, vcpu, uapi.KVM_SET_CPUID2, big) == errno.E2BIG


def test_mp_state_without_irqchip() -> None:
    """Without an in-kernel LAPIC only RUNNABLE is accepted (kvm_arch_vcpu_ioctl_set_mpstate)."""
    with program() as prog:
        vm = prog.create_vm(prog.kvm)
        vcpu, _run = prog.create_vcpu(vm)
        assert prog.ioctl(vcpu, uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state(0)) == 0
        assert errno_of(prog.ioctl, vcpu, uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state(3)) == errno.EINVAL
        assert errno_of(prog.ioctl, vcpu, abi.KVM_GET_LAPIC, abi.kvm_lapic_state()) == errno.EINVAL


def test_msr_index_list() -> None:
    """KVM_GET_MSR_INDEX_LIST: E2BIG with nmsrs set to the count, then the list."""
    with program() as prog:

        class List(ctypes.Structure):
            _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * 64)]

        lst = List(nmsrs=1)
        assert errno_of(prog.ioctl, prog.kvm, abi.KVM_GET_MSR_INDEX_LIST, lst) == errno.E2BIG
        assert lst.nmsrs > 1
        prog.ioctl(prog.kvm, abi.KVM_GET_MSR_INDEX_LIST, lst)
        assert 0xC0000080 in list(lst.indices[: lst.nmsrs])


def test_sysfs_answers() -> None:
    """Module parameters the sim models are answered (this host has no kvm_amd/kvm_intel module); a path the
    sim has no opinion on is the host's; opens for writing are the host's."""
    with program() as prog:
        srv = prog.srv
        for path, want in (
            ("/sys/module/kvm/parameters/force_emulation_prefix", b"0\n"),
            ("/sys/module/kvm_amd/parameters/npt", b"Y\n"),
            ("/sys/module/kvm_intel/parameters/ept", b"Y\n"),
        ):
            fd = srv.open_path(path.encode(), os.O_RDONLY, 0)
            assert fd >= 0
            try:
                assert os.read(fd, 100) == want
            finally:
                os.close(fd)
        assert srv.open_path(b"/sys/module/kvm/parameters/tdp_mmu", os.O_WRONLY, 0) == -1
        assert srv.open_path(b"/sys/module/kvm/parameters/halt_poll_ns", os.O_RDONLY, 0) == -1
        pmd = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
        assert (sysfs.content(pmd) is None) == os.path.exists(pmd)


def test_trace_file(tmp_path: Path) -> None:
    """KVMGMEM_RUN_TRACE: the program's KVM calls and KVM_RUN exits as a Chrome/Perfetto trace, written when
    the last KVM fd closes."""
    from kvmgmem.guest import Asm, GuestImage

    from .server_program import guest

    out = tmp_path / "trace.json"
    srv = Server("7.2", str(out))
    prog = Program(srv)
    prog.mapped = []
    prog.kvm = prog.open_kvm()
    try:
        with guest(prog, GuestImage(Asm().hlt())) as (_vm, vcpu, _run, _mem):
            prog.run(vcpu)
    finally:
        from kvmgmem.libc import munmap

        for area, size in prog.mapped:
            srv.munmap(area, size)
            munmap(area, size)
        for fd in srv.table.fds():
            srv.close(fd)
        srv.system.close()
    trace = json.loads(out.read_text())
    names = [e["name"] for e in trace["traceEvents"]]
    assert "KVM_CREATE_VM" in names and "KVM_SET_USER_MEMORY_REGION2" in names
    runs = [e for e in trace["traceEvents"] if e["name"] == "KVM_RUN"]
    assert runs and runs[0]["args"]["exit"] == "HltExit" and runs[0]["tid"] == 0


def test_guest_memfd_map_fixed_over_a_reservation() -> None:
    """guest_memfd_test's test_collapse: MAP_FIXED|MAP_SHARED of a guest_memfd over a PROT_NONE reservation,
    MADV_COLLAPSE EINVAL, MADV_DONTNEED fine, then one munmap of the reservation around it; private files
    still SIGBUS at the fixed address."""
    from kvmgmem.libc import PROT_NONE, c_mmap, munmap

    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        gmem = prog.create_gmem(vm, 2 << 20, MMAP_SHARED_FLAGS)
        reserved = c_mmap(None, 4 << 20, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        at = (reserved + (2 << 20) - 1) & ~((2 << 20) - 1)
        fixed = mmap.MAP_SHARED | 0x10  # MAP_FIXED
        assert srv.mmap(at, 2 << 20, PROT_RW, fixed, gmem, 0) == at
        ctypes.memmove(at, b"xy", 2)
        assert errno_of(srv.madvise, at, 2 << 20, MADV_COLLAPSE) == errno.EINVAL
        assert srv.madvise(at, 2 << 20, mmap.MADV_DONTNEED) == -2  # the real call, on the program's range
        assert ctypes.string_at(at, 2) == b"xy"  # shared file pages survive DONTNEED
        assert srv.munmap(reserved, 4 << 20) == 0
        munmap(reserved, 4 << 20)
        private = prog.create_gmem(vm, 1 << 20, uapi.GUEST_MEMFD_FLAG_MMAP)
        reserved = c_mmap(None, 1 << 20, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert srv.mmap(reserved, 1 << 20, PROT_RW, fixed, private, 0) == reserved
        assert touch_dies_of_sigbus(reserved, 1, write=False) == signal.SIGBUS
        assert srv.munmap(reserved, 1 << 20) == 0
        munmap(reserved, 1 << 20)


def test_tsc_khz_set_then_get() -> None:
    """KVM_SET_TSC_KHZ on the VM sets the default of vCPUs created later (EINVAL once one exists); on a
    vCPU, that vCPU's; 0 means the host's frequency."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        assert srv.ioctl(vm, abi.KVM_SET_TSC_KHZ, 1_500_000) == 0
        assert srv.ioctl(vm, uapi.KVM_GET_TSC_KHZ, 0) == 1_500_000
        vcpu, _run = prog.create_vcpu(vm)
        assert srv.ioctl(vcpu, uapi.KVM_GET_TSC_KHZ, 0) == 1_500_000
        assert srv.ioctl(vcpu, abi.KVM_SET_TSC_KHZ, 1_000_000) == 0
        assert srv.ioctl(vcpu, uapi.KVM_GET_TSC_KHZ, 0) == 1_000_000
        assert errno_of(srv.ioctl, vm, abi.KVM_SET_TSC_KHZ, 900_000) == errno.EINVAL
        assert srv.ioctl(vm, uapi.KVM_GET_TSC_KHZ, 0) == 1_500_000
        assert srv.ioctl(vcpu, abi.KVM_SET_TSC_KHZ, 0) == 0
        assert srv.ioctl(vcpu, uapi.KVM_GET_TSC_KHZ, 0) > 0
