"""Issue 2: a guest running entirely from guest_memfd-backed memory, with IO and HLT exits, and vCPU kicks.

The whole image (page tables, GDT/IDT, code, stacks) lives in a guest_memfd created with MMAP|INIT_SHARED;
its memslot takes the guest_memfd's own mapping as userspace address (on this host CPL0 accesses go
through the hva and CPL3 ones through the guest_memfd, docs/conformance.md — with one mapping both agree).
"""

from __future__ import annotations

import errno
import threading
import time

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.exits import HltExit, IoExit
from kvmgmem.guest import Asm, GuestImage
from kvmgmem.guest.operands import al, eax

FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED


def _boot_from_gmem(vm: kvmgmem.Vm, image: GuestImage) -> tuple[kvmgmem.GuestMemfd, kvmgmem.HostMemory]:
    size = (image.end + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    gmem = vm.create_guest_memfd(size, FLAGS)
    view = gmem.mmap()
    image.load(view, 0)
    vm.set_user_memory_region2(0, 0, size, view, uapi.KVM_MEM_GUEST_MEMFD, gmem, 0)
    return gmem, view


def test_guest_from_guest_memfd_io_and_hlt(system: kvmgmem.System, backend: str) -> None:
    if not system.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & FLAGS == FLAGS:
        pytest.skip(f"backend {backend}: KVM_CAP_GUEST_MEMFD_FLAGS lacks MMAP|INIT_SHARED")
    a = Asm()
    a.mov(eax, 0x1234ABCD).out(0x10, eax)  # an OUT exit carrying a value
    a.mov(eax, 0x42).out(0x11, al)
    a.hlt()
    image = GuestImage(a)
    with system.create_vm() as vm:
        gmem, view = _boot_from_gmem(vm, image)
        try:
            vcpu = vm.create_vcpu()
            image.setup_vcpu(vcpu)
            first = vcpu.run()
            assert first == IoExit(direction=uapi.KVM_EXIT_IO_OUT, port=0x10, size=4, count=1,
                                   data=(0x1234ABCD).to_bytes(4, "little"))  # fmt: skip
            second = vcpu.run()
            assert isinstance(second, IoExit) and (second.port, second.size, second.value) == (0x11, 1, 0x42)
            assert isinstance(vcpu.run(), HltExit)
            assert vcpu.get_regs().rip == image.address(image.entry) + len(a.assemble(0).code)
        finally:
            vm.set_user_memory_region2(0, 0, 0)
            view.close()
            gmem.close()


def test_kick_interrupts_a_running_vcpu(system: kvmgmem.System, backend: str) -> None:
    """kick() from another thread makes a vCPU spinning in the guest return KvmError(EINTR, "KVM_RUN");
    the next run() enters the guest again."""
    a = Asm()
    spin = a.new_label("spin")
    a.label(spin).jmp(spin)
    image = GuestImage(a, user=True)  # CPL3 runs natively on this host's KVM
    with system.create_vm() as vm:
        gmem, view = _boot_from_gmem(vm, image)
        try:
            vcpu = vm.create_vcpu()
            image.setup_vcpu(vcpu)
            for _ in range(2):
                timer = threading.Timer(0.2, vcpu.kick)
                timer.start()
                start = time.monotonic()
                with pytest.raises(kvmgmem.KvmError) as info:
                    vcpu.run()
                timer.join()
                assert (info.value.errno, info.value.op) == (errno.EINTR, "KVM_RUN")
                assert 0.1 < time.monotonic() - start < 10
        finally:
            vm.set_user_memory_region2(0, 0, 0)
            view.close()
            gmem.close()
