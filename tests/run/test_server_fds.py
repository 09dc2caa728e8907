"""``kvmgmem.run.server``: the fd table and ``/dev/kvm`` — real fds, dup/close reference rules, the kernel's
errnos for fds of the wrong kind, bad pointers and unknown requests."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from kvmgmem import uapi
from kvmgmem.run import abi, server
from kvmgmem.run.kvm_run_area import VCPU_MMAP_SIZE

from .server_program import Program, program


def errno_of(call, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        call(*args)
    return int(info.value.errno or 0)


def test_dev_kvm_ioctls() -> None:
    """GET_API_VERSION 12, CHECK_EXTENSION (unmodelled caps 0), GET_VCPU_MMAP_SIZE 3 pages, non-zero
    arguments EINVAL, GET_SUPPORTED_CPUID with nent and E2BIG (nent left alone)."""
    with program("7.2") as prog:
        kvm, srv = prog.kvm, prog.srv
        assert srv.ioctl(kvm, uapi.KVM_GET_API_VERSION, 0) == 12
        assert errno_of(srv.ioctl, kvm, uapi.KVM_GET_API_VERSION, 1) == errno.EINVAL
        assert srv.ioctl(kvm, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_GUEST_MEMFD) == 1
        assert srv.ioctl(kvm, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_VM_TYPES) & (1 << uapi.KVM_X86_SW_PROTECTED_VM)
        assert srv.ioctl(kvm, uapi.KVM_CHECK_EXTENSION, 123456) == 0
        assert srv.ioctl(kvm, uapi.KVM_GET_VCPU_MMAP_SIZE, 0) == VCPU_MMAP_SIZE == 3 * 4096
        assert errno_of(srv.ioctl, kvm, uapi.KVM_GET_VCPU_MMAP_SIZE, 1) == errno.EINVAL
        cpuid = uapi.cpuid2_type(100)()
        cpuid.nent = 100
        assert prog.ioctl(kvm, uapi.KVM_GET_SUPPORTED_CPUID, cpuid) == 0
        assert 0 < cpuid.nent < 100 and any(cpuid.entries[i].function == 0 for i in range(cpuid.nent))
        n = cpuid.nent
        cpuid.nent = 1
        assert errno_of(prog.ioctl, kvm, uapi.KVM_GET_SUPPORTED_CPUID, cpuid) == errno.E2BIG
        assert cpuid.nent == 1 and n > 1
        assert errno_of(srv.ioctl, kvm, uapi.KVM_GET_SUPPORTED_CPUID, 8) == errno.EFAULT


def test_create_vm_types() -> None:
    """CREATE_VM takes types 0 and 1 on the sim; an unsupported type is EINVAL; fds are real and named."""
    with program("7.2") as prog:
        vm0 = prog.create_vm(prog.kvm, 0)
        vm1 = prog.create_vm(prog.kvm, uapi.KVM_X86_SW_PROTECTED_VM)
        assert "kvm-vm" in os.readlink(f"/proc/self/fd/{vm0}")
        assert os.get_inheritable(vm0) is False  # O_CLOEXEC, as the kernel's anon inode
        assert errno_of(prog.create_vm, prog.kvm, 7) == errno.EINVAL
        assert prog.srv.ioctl(vm1, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_MEMORY_ATTRIBUTES) == (
            uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
        )


def test_unknown_requests_and_wrong_kinds() -> None:
    """The errno of each kind's default case (measured on a 6.18 host): /dev/kvm EINVAL, VM ENOTTY, vCPU
    EINVAL, guest_memfd ENOTTY; an ioctl of one kind on another kind's fd gives the same."""
    with program() as prog:
        srv, kvm = prog.srv, prog.kvm
        vm = prog.create_vm(kvm)
        vcpu, _run = prog.create_vcpu(vm)
        gmem = prog.create_gmem(vm, 1 << 20)
        bogus = uapi._IO(uapi.KVMIO, 0xEE)
        assert errno_of(srv.ioctl, kvm, bogus, 0) == errno.EINVAL
        assert errno_of(srv.ioctl, vm, bogus, 0) == errno.ENOTTY
        assert errno_of(srv.ioctl, vcpu, bogus, 0) == errno.EINVAL
        assert errno_of(srv.ioctl, gmem, bogus, 0) == errno.ENOTTY
        assert errno_of(srv.ioctl, kvm, uapi.KVM_RUN, 0) == errno.EINVAL
        assert errno_of(srv.ioctl, vm, uapi.KVM_RUN, 0) == errno.ENOTTY
        assert errno_of(srv.ioctl, vm, uapi.KVM_GET_API_VERSION, 0) == errno.ENOTTY
        assert errno_of(srv.ioctl, vcpu, uapi.KVM_CREATE_VCPU, 1) == errno.EINVAL
        assert errno_of(srv.ioctl, vcpu, uapi.KVM_CHECK_EXTENSION, 3) == errno.EINVAL
        assert errno_of(srv.ioctl, kvm, uapi.KVM_CREATE_VCPU, 0) == errno.EINVAL
        assert errno_of(srv.ioctl, gmem, uapi.KVM_CREATE_VCPU, 0) == errno.ENOTTY


def test_bad_and_closed_fds() -> None:
    """A number that is not a server fd (never opened, or closed) is EBADF; close is idempotent per fd."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        srv.close(vm)
        assert errno_of(srv.ioctl, vm, uapi.KVM_CHECK_EXTENSION, 3) == errno.EBADF
        assert errno_of(srv.close, vm) == errno.EBADF
        assert errno_of(srv.ioctl, 10_000, uapi.KVM_GET_API_VERSION, 0) == errno.EBADF
        assert errno_of(os.fstat, vm) == errno.EBADF  # the real fd is gone too


def test_dup_shares_the_file() -> None:
    """A dup'd VM fd works after the original closes; the VM goes with the last fd."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        copy = os.dup(vm)
        srv.dup(vm, copy)
        srv.close(vm)
        vcpu, _run = prog.create_vcpu(copy)  # still a working VM fd
        assert srv.ioctl(copy, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_USER_MEMORY) == 1
        srv.close(copy)
        regs = uapi.kvm_regs()
        prog.ioctl(vcpu, uapi.KVM_GET_REGS, regs)  # the vCPU holds the VM
        assert regs.rip == 0xFFF0


def test_vcpu_after_vm_close_keeps_working() -> None:
    """Closing the VM fd does not close its vCPUs: KVM_RUN, GET/SET_REGS still behave as on the kernel."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        vcpu, _run = prog.create_vcpu(vm)
        gmem = prog.create_gmem(vm, 1 << 20)
        srv.close(vm)
        regs = uapi.kvm_regs()
        prog.ioctl(vcpu, uapi.KVM_GET_REGS, regs)
        regs.rax = 7
        prog.ioctl(vcpu, uapi.KVM_SET_REGS, regs)
        prog.ioctl(vcpu, uapi.KVM_GET_REGS, regs)
        assert regs.rax == 7
        # a guest_memfd outlives the VM fd too (it holds the VM, kvm_gmem_create)
        srv.fallocate(gmem, uapi.FALLOC_FL_KEEP_SIZE, 0, 4096)


def test_dev_kvm_opens_are_cheap_and_independent() -> None:
    """Programs open /dev/kvm once per capability check: many opens and closes, each a real fd."""
    with program() as prog:
        srv = prog.srv
        fds = [prog.open_kvm() for _ in range(200)]
        assert len(set(fds)) == 200
        for fd in fds:
            assert srv.ioctl(fd, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_USER_MEMORY2) == 1
            srv.close(fd)


def test_open_paths_not_ours() -> None:
    """Paths the server does not serve are passed through (-1)."""
    with program() as prog:
        assert prog.srv.open_path(b"/etc/hostname", 0, 0) == -1
        assert prog.srv.open_path(b"/sys/module/kvm/parameters/no_such_param", 0, 0) == -1


def test_file_operations_on_kvm_fds() -> None:
    """read/write EINVAL, pread ESPIPE (VM, vCPU) or EINVAL (/dev/kvm), lseek 0, ftruncate EINVAL,
    fallocate ENODEV, mmap of /dev/kvm and a VM fd ENODEV; fstat reports an anon inode / char device."""
    with program() as prog:
        srv, kvm = prog.srv, prog.kvm
        vm = prog.create_vm(kvm)
        vcpu, _run = prog.create_vcpu(vm)
        buf = ctypes.create_string_buffer(16)
        for fd in (kvm, vm, vcpu):
            assert errno_of(srv.read, fd, ctypes.addressof(buf), 1) == errno.EINVAL
            assert errno_of(srv.write, fd, ctypes.addressof(buf), 1) == errno.EINVAL
            assert srv.lseek(fd, 0, os.SEEK_CUR) == 0
            assert errno_of(srv.ftruncate, fd, 0) == errno.EINVAL
            assert errno_of(srv.fallocate, fd, 0, 0, 4096) == errno.ENODEV
        assert errno_of(srv.pread, kvm, ctypes.addressof(buf), 1, 0) == errno.EINVAL
        assert errno_of(srv.pread, vm, ctypes.addressof(buf), 1, 0) == errno.ESPIPE
        assert errno_of(srv.pwrite, vcpu, ctypes.addressof(buf), 1, 0) == errno.ESPIPE
        assert errno_of(srv.mmap, 0, 4096, 3, 1, kvm, 0) == errno.ENODEV
        assert errno_of(srv.mmap, 0, 4096, 3, 1, vm, 0) == errno.ENODEV
        st = ctypes.create_string_buffer(144)
        srv.fstat(vm, ctypes.addressof(st))
        assert int.from_bytes(st.raw[24:28], "little") == 0o600
        srv.fstat(kvm, ctypes.addressof(st))
        assert int.from_bytes(st.raw[24:28], "little") & 0o170000 == 0o020000  # S_IFCHR
        assert errno_of(srv.fstat, vm, 8) == errno.EFAULT


def test_module_level_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """The functions the preload library calls: start() opens the sim with KVMGMEM_RUN_PROFILE."""
    monkeypatch.setenv("KVMGMEM_RUN_PROFILE", "6.8")
    monkeypatch.delenv("KVMGMEM_RUN_TRACE", raising=False)
    monkeypatch.setattr(server, "_server", None)
    server.start()
    srv = server._server
    assert srv is not None
    try:
        fd = server.open_path(b"/dev/kvm", os.O_RDWR, 0)
        assert server.ioctl(fd, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == 0  # 6.8: no flags
        assert errno_of(server.ioctl, fd, abi.KVM_GET_MSR_INDEX_LIST, 8) == errno.EFAULT
        assert server.close(fd) == 0
    finally:
        srv.close_all()


def test_program_helper_is_clean() -> None:
    """The test harness itself leaves nothing behind (the autouse leak check covers every test)."""
    with program() as prog:
        assert isinstance(prog, Program)


def test_vfs_ioctls_on_kvm_fds() -> None:
    """FIOCLEX/FIONCLEX/FIONBIO are the VFS's (do_vfs_ioctl), on any KVM fd, before KVM's own table."""
    with program() as prog:
        srv = prog.srv
        vm = prog.create_vm(prog.kvm)
        assert srv.ioctl(vm, 0x5450, 0) == 0  # FIONCLEX
        assert os.get_inheritable(vm)
        assert srv.ioctl(vm, 0x5451, 0) == 0  # FIOCLEX
        assert not os.get_inheritable(vm)
        one = ctypes.c_int(1)
        assert srv.ioctl(vm, 0x5421, ctypes.addressof(one)) == 0  # FIONBIO
        assert not os.get_blocking(vm)
        assert errno_of(srv.ioctl, vm, 0x5421, 8) == errno.EFAULT
