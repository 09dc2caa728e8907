"""A "C program" written in Python for the server tests: raw ioctls on raw fds with ctypes structs at raw
addresses, exactly what the preload library hands ``kvmgmem.run.server`` (no C compiler needed)."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvmgmem import uapi
from kvmgmem.guest import GuestImage
from kvmgmem.run import abi
from kvmgmem.run.server import Server

PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


def addr(obj: Any) -> int:
    """The address of a ctypes object, as a C program would pass ``&obj``."""
    return ctypes.addressof(obj)


class AnonMemory:
    """``mmap(NULL, size, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_ANONYMOUS)`` with a raw address."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, PROT_RW)
        self.view = (ctypes.c_char * size).from_buffer(self.map)
        self.address = ctypes.addressof(self.view)
        self.size = size

    def unmap(self) -> None:
        """``munmap`` the whole mapping (after the caller told the server)."""
        del self.view
        self.map.close()


class Program:
    """One program's view of KVM through a ``Server``: every call is a server entry point."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv

    def open_kvm(self) -> int:
        return self.srv.open_path(b"/dev/kvm", 0o2 | 0o2000000, 0)  # O_RDWR | O_CLOEXEC

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        return self.srv.ioctl(fd, request, addr(arg) if isinstance(arg, ctypes.Structure | ctypes.Array) else arg)

    def create_vm(self, kvm: int, vm_type: int = 0) -> int:
        return self.ioctl(kvm, uapi.KVM_CREATE_VM, vm_type)

    def set_region(self, vm: int, slot: int, gpa: int, size: int, hva: int, flags: int = 0,
                   gmem: int = 0, gmem_offset: int = 0) -> int:  # fmt: skip
        r = uapi.kvm_userspace_memory_region2(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva,
            guest_memfd=gmem, guest_memfd_offset=gmem_offset,
        )  # fmt: skip
        return self.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION2, r)

    def create_gmem(self, vm: int, size: int, flags: int = 0) -> int:
        return self.ioctl(vm, uapi.KVM_CREATE_GUEST_MEMFD, uapi.kvm_create_guest_memfd(size=size, flags=flags))

    def set_attributes(self, vm: int, gpa: int, size: int, attributes: int) -> int:
        a = uapi.kvm_memory_attributes(address=gpa, size=size, attributes=attributes)
        return self.ioctl(vm, uapi.KVM_SET_MEMORY_ATTRIBUTES, a)

    def create_vcpu(self, vm: int, vcpu_id: int = 0) -> tuple[int, uapi.kvm_run]:
        """KVM_CREATE_VCPU and mmap of its kvm_run area (the size from KVM_GET_VCPU_MMAP_SIZE)."""
        fd = self.ioctl(vm, uapi.KVM_CREATE_VCPU, vcpu_id)
        size = self.srv.ioctl(self._kvm_for_size(), uapi.KVM_GET_VCPU_MMAP_SIZE, 0)
        area = self.srv.mmap(0, size, PROT_RW, mmap.MAP_SHARED, fd, 0)
        self.mapped.append((area, size))
        return fd, uapi.kvm_run.from_address(area)

    mapped: list[tuple[int, int]]

    def _kvm_for_size(self) -> int:
        return self.kvm

    kvm: int

    def run(self, vcpu: int) -> int:
        return self.srv.ioctl(vcpu, uapi.KVM_RUN, 0)


class IoctlVcpu:
    """What ``GuestImage.setup_vcpu`` needs of a vCPU, done with the server's ioctls."""

    def __init__(self, prog: Program, kvm: int, fd: int) -> None:
        self.prog, self.kvm, self.fd = prog, kvm, fd

    def set_cpuid(self) -> None:
        cpuid = uapi.cpuid2_type(64)()
        cpuid.nent = 64
        self.prog.ioctl(self.kvm, uapi.KVM_GET_SUPPORTED_CPUID, cpuid)
        self.prog.ioctl(self.fd, uapi.KVM_SET_CPUID2, cpuid)

    def get_sregs(self) -> uapi.kvm_sregs:
        sregs = uapi.kvm_sregs()
        self.prog.ioctl(self.fd, uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        self.prog.ioctl(self.fd, uapi.KVM_SET_SREGS, sregs)

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        self.prog.ioctl(self.fd, uapi.KVM_SET_REGS, regs)


@contextmanager
def program(profile: str = "7.2") -> Iterator[Program]:
    """A fresh server and program; everything is closed at the end (fds, mappings, the sim)."""
    srv = Server(profile)
    prog = Program(srv)
    prog.mapped = []
    prog.kvm = prog.open_kvm()
    try:
        yield prog
    finally:
        for area, size in prog.mapped:
            srv.munmap(area, size)
            from kvmgmem.libc import munmap

            munmap(area, size)
        srv.close_all()


@contextmanager
def guest(
    prog: Program, image: GuestImage, vm_type: int = 0, size: int = 4 << 20
) -> Iterator[tuple[int, int, uapi.kvm_run, AnonMemory]]:
    """A VM with ``image`` loaded into slot 0 (gpa 0, anonymous memory) and one vCPU set up to run it.
    Yields (vm fd, vCPU fd, kvm_run, slot 0's memory)."""
    memory = AnonMemory(size)
    try:
        image.load(memory.map)
        vm = prog.create_vm(prog.kvm, vm_type)
        prog.set_region(vm, 0, 0, size, memory.address)
        vcpu, run = prog.create_vcpu(vm)
        image.setup_vcpu(IoctlVcpu(prog, prog.kvm, vcpu))  # type: ignore[arg-type]
        yield vm, vcpu, run, memory
        if prog.srv.table.lookup(vm) is not None:  # the test may have closed the VM fd
            prog.set_region(vm, 0, 0, 0, 0)
    finally:
        prog.srv.munmap(memory.address, memory.size)
        memory.unmap()


__all__ = ["AnonMemory", "IoctlVcpu", "Program", "abi", "guest", "program"]
