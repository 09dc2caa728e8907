"""``kvmgmem.run.server``: KVM_RUN through the kvm_run area — every exit written as the kernel writes it,
completions read back on re-entry, immediate_exit, memory faults as -1/EFAULT with the exit filled, a
conversion, and the mmu notifier: guest memory the program unmaps is never touched again (EFAULT)."""

from __future__ import annotations

import ctypes
import errno

import pytest

from kvmgmem import uapi
from kvmgmem.guest import Asm, GuestImage
from kvmgmem.guest.operands import al, eax, qword, rax, rsi
from kvmgmem.run.kvm_run_area import PIO_DATA_OFFSET

from .server_program import AnonMemory, guest, program

MMIO_GPA = 0xF000_0000  # mapped by the image's page tables, covered by no memslot
OUT, IN = uapi.KVM_EXIT_IO_OUT, uapi.KVM_EXIT_IO_IN


def pio(run: uapi.kvm_run, n: int) -> bytes:
    return ctypes.string_at(ctypes.addressof(run) + run.exit.io.data_offset, n)


def test_io_mmio_hlt_exits_and_completions() -> None:
    """OUT data at data_offset in the same mapping, IN answered through the PIO page, MMIO write/read with
    the read answered in mmio.data, HLT: the guest echoes every answer back."""
    a = Asm()
    a.mov(eax, 0x11223344).out(0x10, eax)
    a.in_(al, 0x20).out(0x21, al)
    a.mov(rsi, MMIO_GPA).mov(qword[rsi], rax).mov(rax, qword[rsi]).out(0x24, eax)
    a.hlt()
    with program() as prog, guest(prog, GuestImage(a)) as (_vm, vcpu, run, _mem):
        assert prog.run(vcpu) == 0
        assert run.exit_reason == uapi.KVM_EXIT_IO
        io = run.exit.io
        assert (io.direction, io.port, io.size, io.count, io.data_offset) == (OUT, 0x10, 4, 1, PIO_DATA_OFFSET)
        assert pio(run, 4) == bytes.fromhex("44332211")
        prog.run(vcpu)
        assert (run.exit_reason, run.exit.io.direction, run.exit.io.port) == (uapi.KVM_EXIT_IO, IN, 0x20)
        ctypes.memmove(ctypes.addressof(run) + run.exit.io.data_offset, b"\xa5", 1)
        prog.run(vcpu)
        assert (run.exit.io.port, pio(run, 1)) == (0x21, b"\xa5")
        prog.run(vcpu)
        mmio = run.exit.mmio
        assert run.exit_reason == uapi.KVM_EXIT_MMIO
        assert (mmio.phys_addr, mmio.len, mmio.is_write) == (MMIO_GPA, 8, 1)
        assert bytes(mmio.data)[0] == 0xA5
        prog.run(vcpu)
        assert (run.exit_reason, mmio.is_write, mmio.len) == (uapi.KVM_EXIT_MMIO, 0, 8)
        ctypes.memmove(mmio.data, bytes(range(0xB0, 0xB8)), 8)
        prog.run(vcpu)
        assert (run.exit.io.port, pio(run, 4)) == (0x24, bytes(range(0xB0, 0xB4)))
        prog.run(vcpu)
        assert run.exit_reason == uapi.KVM_EXIT_HLT


def test_immediate_exit_is_eintr_and_completes_first() -> None:
    """immediate_exit: KVM_RUN fails with EINTR and leaves exit_reason alone (the selftests read the ucall
    again afterwards); a pending IN is still completed (the kernel completes userspace I/O before checking
    it), so the next run sees the answer."""
    a = Asm()
    a.in_(al, 0x20).out(0x21, al).hlt()
    with program() as prog, guest(prog, GuestImage(a)) as (_vm, vcpu, run, _mem):
        prog.run(vcpu)
        ctypes.memmove(ctypes.addressof(run) + run.exit.io.data_offset, b"\x5a", 1)
        run.immediate_exit = 1
        with pytest.raises(OSError) as info:
            prog.run(vcpu)
        assert info.value.errno == errno.EINTR and run.exit_reason == uapi.KVM_EXIT_IO
        run.immediate_exit = 0
        prog.run(vcpu)
        assert (run.exit.io.port, pio(run, 1)) == (0x21, b"\x5a")


def test_hypercall_exit_and_ret() -> None:
    """KVM_HC_MAP_GPA_RANGE with KVM_CAP_EXIT_HYPERCALL: the exit's nr/args/flags, and hypercall.ret
    written by the program reaches the guest's RAX."""
    from kvmgmem.guest import routines as R

    a = Asm()
    R.map_gpa_range(a, 1 << 30, 1, uapi.KVM_MAP_GPA_RANGE_ENCRYPTED, expect=None)
    a.out(0x10, eax)
    a.hlt()
    with program() as prog, guest(prog, GuestImage(a), uapi.KVM_X86_SW_PROTECTED_VM) as (vm, vcpu, run, _mem):
        cap = uapi.kvm_enable_cap(cap=uapi.KVM_CAP_EXIT_HYPERCALL)
        cap.args[0] = 1 << uapi.KVM_HC_MAP_GPA_RANGE
        prog.ioctl(vm, uapi.KVM_ENABLE_CAP, cap)
        prog.run(vcpu)
        hc = run.exit.hypercall
        assert run.exit_reason == uapi.KVM_EXIT_HYPERCALL
        assert (hc.nr, hc.args[0], hc.args[1]) == (uapi.KVM_HC_MAP_GPA_RANGE, 1 << 30, 1)
        assert hc.flags & uapi.KVM_EXIT_HYPERCALL_LONG_MODE
        hc.ret = 0x77
        prog.run(vcpu)
        assert (run.exit.io.port, pio(run, 4)) == (0x10, b"\x77\0\0\0")


def test_private_access_memory_fault_then_conversion() -> None:
    """A private gpa in a slot without guest_memfd: KVM_RUN fails with EFAULT and kvm_run describes the
    fault (MEMORY_FAULT, PRIVATE flag, gpa, 4096); after the program converts the page to shared the guest's
    access completes and reads the program's memory."""
    gpa = 1 << 30
    a = Asm()
    a.mov(rsi, gpa).mov(rax, qword[rsi]).out(0x10, eax)
    a.hlt()
    with program() as prog, guest(prog, GuestImage(a), uapi.KVM_X86_SW_PROTECTED_VM) as (vm, vcpu, run, _mem):
        data = AnonMemory(2 << 20)
        try:
            ctypes.memmove(data.address, b"\x11\x22\x33\x44", 4)
            prog.set_region(vm, 1, gpa, data.size, data.address)
            prog.set_attributes(vm, gpa, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            with pytest.raises(OSError) as info:
                prog.run(vcpu)
            assert info.value.errno == errno.EFAULT
            fault = run.exit.memory_fault
            assert run.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT
            assert (fault.flags, fault.gpa, fault.size) == (uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa, 4096)
            prog.set_attributes(vm, gpa, 4096, 0)  # the conversion
            prog.run(vcpu)
            assert (run.exit.io.port, pio(run, 4)) == (0x10, b"\x11\x22\x33\x44")
            prog.set_region(vm, 1, gpa, 0, 0)
        finally:
            prog.srv.munmap(data.address, data.size)
            data.unmap()


def test_private_memory_in_guest_memfd_and_dup_binding() -> None:
    """A guest_memfd slot bound through a *dup* of the gmem fd (the original closed): private writes land in
    the guest_memfd, never in the program's memory; shared reads come from the program's memory."""
    gpa = 1 << 30
    a = Asm()
    a.mov(rsi, gpa).mov(rax, 0x5A5A).mov(qword[rsi], rax)  # page 0: private
    a.mov(rax, qword[rsi + 4096]).out(0x10, eax)  # page 1: shared
    a.hlt()
    with program() as prog, guest(prog, GuestImage(a), uapi.KVM_X86_SW_PROTECTED_VM) as (vm, vcpu, run, _mem):
        srv = prog.srv
        data = AnonMemory(2 << 20)
        try:
            ctypes.memmove(data.address + 4096, b"\x99\x88", 2)
            gmem = prog.create_gmem(vm, 2 << 20)
            import os

            copy = os.dup(gmem)
            srv.dup(gmem, copy)
            srv.close(gmem)
            prog.set_region(vm, 1, gpa, data.size, data.address, uapi.KVM_MEM_GUEST_MEMFD, copy, 0)
            prog.set_attributes(vm, gpa, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            prog.run(vcpu)
            assert (run.exit.io.port, pio(run, 2)) == (0x10, b"\x99\x88")
            assert ctypes.string_at(data.address, 8) == bytes(8)  # the private write is not in host memory
            prog.set_region(vm, 1, gpa, 0, 0)
            srv.close(copy)
        finally:
            srv.munmap(data.address, data.size)
            data.unmap()


def test_munmap_of_slot_memory_faults_next_access() -> None:
    """The program unmaps memory under a memslot: the server's mmu notifier zaps it first, and the guest's
    next access fails KVM_RUN with EFAULT instead of touching unmapped memory. It is not a KVM_EXIT_MEMORY_FAULT:
    `kvm_handle_error_pfn` prepares none for an hva with nothing mapped (KVM_PFN_ERR_FAULT), and `vcpu_run`
    reset `exit_reason` to KVM_EXIT_UNKNOWN on entry, so the previous exit (IO) is gone too (as on this host's
    6.18 kernel)."""
    gpa = 1 << 30
    a = Asm()
    top = a.new_label("top")
    a.label(top).mov(rsi, gpa).mov(rax, qword[rsi]).out(0x10, eax).jmp(top)
    with program() as prog, guest(prog, GuestImage(a)) as (vm, vcpu, run, _mem):
        data = AnonMemory(2 << 20)
        ctypes.memmove(data.address, b"\x01\x02\x03\x04", 4)
        prog.set_region(vm, 1, gpa, data.size, data.address)
        prog.run(vcpu)
        assert pio(run, 4) == b"\x01\x02\x03\x04"
        assert prog.srv.munmap(data.address, data.size) == 0  # not the server's: the program unmaps
        data.unmap()
        with pytest.raises(OSError) as info:
            prog.run(vcpu)
        assert info.value.errno == errno.EFAULT
        assert run.exit_reason == uapi.KVM_EXIT_UNKNOWN
        with pytest.raises(OSError) as info:  # nothing was mapped: the next run faults the same way
            prog.run(vcpu)
        assert info.value.errno == errno.EFAULT
        prog.set_region(vm, 1, gpa, 0, 0)


def test_madvise_dontneed_zaps_and_refaults_zero() -> None:
    """MADV_DONTNEED of slot memory: the notifier zaps the SPTEs, the real madvise drops the pages, and the
    guest's next read sees the new (zero) page, as on the kernel."""
    gpa = 1 << 30
    a = Asm()
    top = a.new_label("top")
    a.label(top).mov(rsi, gpa).mov(rax, qword[rsi]).out(0x10, eax).jmp(top)
    with program() as prog, guest(prog, GuestImage(a)) as (vm, vcpu, run, _mem):
        import mmap

        data = AnonMemory(2 << 20)
        try:
            data.map[:4] = b"\x01\x02\x03\x04"
            prog.set_region(vm, 1, gpa, data.size, data.address)
            prog.run(vcpu)
            assert pio(run, 4) == b"\x01\x02\x03\x04"
            assert prog.srv.madvise(data.address, 4096, mmap.MADV_REMOVE) == -2
            data.map.madvise(mmap.MADV_REMOVE, 0, 4096)
            prog.run(vcpu)
            assert pio(run, 4) == bytes(4)
            prog.set_region(vm, 1, gpa, 0, 0)
        finally:
            prog.srv.munmap(data.address, data.size)
            data.unmap()


def test_run_arg_and_bad_fd_errors() -> None:
    """KVM_RUN with a non-zero argument is EINVAL; GET_REGS to a bad pointer EFAULT."""
    a = Asm().hlt()
    with program() as prog, guest(prog, GuestImage(a)) as (_vm, vcpu, _run, _mem):
        with pytest.raises(OSError) as info:
            prog.srv.ioctl(vcpu, uapi.KVM_RUN, 1)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            prog.srv.ioctl(vcpu, uapi.KVM_GET_REGS, 16)
        assert info.value.errno == errno.EFAULT


def test_kvm_run_after_the_vm_fd_closed() -> None:
    """A vCPU holds its VM: after the program closed the VM fd, KVM_RUN still runs the guest."""
    a = Asm().out(0x10, al).hlt()
    with program() as prog, guest(prog, GuestImage(a)) as (vm, vcpu, run, _mem):
        prog.srv.close(vm)
        prog.run(vcpu)
        assert (run.exit_reason, run.exit.io.port) == (uapi.KVM_EXIT_IO, 0x10)
        prog.run(vcpu)
        assert run.exit_reason == uapi.KVM_EXIT_HLT


def test_close_of_a_running_vcpu_fd_waits_for_the_run() -> None:
    """The program closes a vCPU fd while another thread is in KVM_RUN on it: the run finishes normally
    (the call holds the file, as fdget does) and the vCPU is released after it."""
    import threading

    a = Asm()
    top = a.new_label("top")
    a.mov(eax, 0).label(top).add(eax, 1).cmp(eax, 3_000_000).jne(top).out(0x10, eax).hlt()
    with program() as prog, guest(prog, GuestImage(a)) as (_vm, vcpu, run, _mem):
        started = threading.Event()
        result: list[object] = []

        def runner() -> None:
            started.set()
            try:
                result.append(prog.run(vcpu))
            except OSError as e:
                result.append(e)

        thread = threading.Thread(target=runner)
        thread.start()
        started.wait()
        file = prog.srv.table.lookup(vcpu)
        prog.srv.close(vcpu)
        thread.join(60)
        assert result == [0] and run.exit.io.port == 0x10
        assert file is not None and file.released


def test_pre_fault_memory() -> None:
    """KVM_PRE_FAULT_MEMORY through the struct (``Vcpu.pre_fault_memory``): a range inside a slot is mapped and
    written back as (end, 0), a range without a slot is ENOENT with the struct unchanged."""
    a = Asm().hlt()
    with program() as prog, guest(prog, GuestImage(a)) as (_vm, vcpu, _run, _mem):
        r = uapi.kvm_pre_fault_memory(gpa=0x200000, size=0x2000)
        assert prog.ioctl(vcpu, uapi.KVM_PRE_FAULT_MEMORY, r) == 0
        assert (r.gpa, r.size) == (0x202000, 0)
        r.gpa, r.size = 1 << 40, 0x1000
        with pytest.raises(OSError) as info:
            prog.ioctl(vcpu, uapi.KVM_PRE_FAULT_MEMORY, r)
        assert info.value.errno == errno.ENOENT and (r.gpa, r.size) == (1 << 40, 0x1000)


def test_immediate_exit_set_during_a_run_ends_it() -> None:
    """A VMM's kick: another thread (a signal handler, in a real VMM) sets immediate_exit while the guest
    spins; KVM_RUN returns EINTR with KVM_EXIT_INTR soon after, and the vCPU resumes where it was."""
    import threading
    import time

    a = Asm()
    top = a.new_label("top")
    a.label(top).jmp(top)
    with program() as prog, guest(prog, GuestImage(a)) as (_vm, vcpu, run, _mem):
        errors: list[int] = []

        def runner() -> None:
            try:
                prog.run(vcpu)
            except OSError as e:
                errors.append(e.errno or 0)

        thread = threading.Thread(target=runner)
        thread.start()
        time.sleep(0.05)
        run.immediate_exit = 1
        thread.join(30)
        assert not thread.is_alive() and errors == [errno.EINTR]
        assert run.exit_reason == uapi.KVM_EXIT_INTR
        run.immediate_exit = 0
        regs = uapi.kvm_regs()
        prog.ioctl(vcpu, uapi.KVM_GET_REGS, regs)
        assert regs.rip >= 0x10000  # still in the image's code, in the loop


def test_kvm_run_encoding_of_every_exit_kind() -> None:
    """KvmRunArea writes each typed exit as KVM leaves kvm_run: internal error (suberror, ndata, data),
    shutdown, system event, memory fault, an exit reason kvmgmem has no type for."""
    import os

    from kvmgmem.exits import InternalErrorExit, MemoryFaultExit, ShutdownExit, SystemEventExit, UnknownExit
    from kvmgmem.run.kvm_run_area import VCPU_MMAP_SIZE, KvmRunArea

    fd = os.memfd_create("kvm-vcpu:0")
    try:
        os.ftruncate(fd, VCPU_MMAP_SIZE)
        area = KvmRunArea(fd)
        run = area.run
        area.write_exit(InternalErrorExit(suberror=3, data=(0x80000B0D, 0x30, 0x181, 0xC00000D0, 0)))
        internal = run.exit.internal
        assert (run.exit_reason, internal.suberror, internal.ndata) == (uapi.KVM_EXIT_INTERNAL_ERROR, 3, 5)
        assert internal.data[3] == 0xC00000D0
        area.write_exit(ShutdownExit())
        assert run.exit_reason == uapi.KVM_EXIT_SHUTDOWN
        area.write_exit(SystemEventExit(type=1, data=(7,)))
        event = run.exit.system_event
        assert (run.exit_reason, event.type, event.ndata, event.data[0]) == (uapi.KVM_EXIT_SYSTEM_EVENT, 1, 1, 7)
        area.write_exit(MemoryFaultExit(flags=8, gpa=0x1000, size=4096, errno=uapi.EHWPOISON))
        fault = run.exit.memory_fault
        assert (run.exit_reason, fault.flags, fault.gpa, fault.size) == (uapi.KVM_EXIT_MEMORY_FAULT, 8, 0x1000, 4096)
        area.write_exit(UnknownExit(reason=99))
        assert run.exit_reason == 99
        del run, internal, event, fault
        area.close()
    finally:
        os.close(fd)


def test_hwpoisoned_private_page_is_ehwpoison() -> None:
    """A private page whose guest_memfd page is poisoned: KVM_RUN fails with EHWPOISON and the exit is
    KVM_EXIT_MEMORY_FAULT for that page (the sim's inject_poison stands in for a memory failure)."""
    gpa = 1 << 30
    a = Asm()
    a.mov(rsi, gpa).mov(rax, qword[rsi]).out(0x10, eax).hlt()
    with program() as prog, guest(prog, GuestImage(a), uapi.KVM_X86_SW_PROTECTED_VM) as (vm, vcpu, run, _mem):
        srv = prog.srv
        data = AnonMemory(2 << 20)
        try:
            gmem = prog.create_gmem(vm, 2 << 20)
            prog.set_region(vm, 1, gpa, data.size, data.address, uapi.KVM_MEM_GUEST_MEMFD, gmem, 0)
            prog.set_attributes(vm, gpa, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            srv.table.get(gmem, "test").obj.gmem.inject_poison(0)
            with pytest.raises(OSError) as info:
                prog.run(vcpu)
            fault = run.exit.memory_fault
            assert info.value.errno == uapi.EHWPOISON and run.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT
            assert (fault.gpa, fault.size, fault.flags) == (gpa, 4096, uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)
            prog.set_region(vm, 1, gpa, 0, 0)
            srv.close(gmem)
        finally:
            srv.munmap(data.address, data.size)
            data.unmap()
