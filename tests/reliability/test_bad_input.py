"""Bad input on every public method of System, Vm, Vcpu, GuestMemfd and HostMemory, on both backends.

One table: each row is (class, method, label, call, expected). ``expected`` is an errno (a ``KvmError`` with
exactly that errno), ``TypeError``/``ValueError``, ``ANY`` (any of the three), or ``OK`` (must not raise:
e.g. ``close()`` twice). Whatever is raised must *name the operation*: ``KvmError.op`` is one of the
method's operation names, a ``TypeError``/``ValueError`` message starts with one. Any other exception
(``OverflowError``, a bare ``OSError``, ctypes' messages) fails the row, and so does accepting bad input.

Rows come from three sources: generated wrong-type and overflow mutations of every integer parameter of a
valid base call; hand-written semantic rows (negative, unaligned, wrapping, beyond EOF, objects of another VM
or of the wrong kind); and the closed-object rows (every method on a closed object → EBADF).
"""

from __future__ import annotations

import errno
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import kvmgmem
from kvmgmem import HostMemory, KvmError, uapi
from kvmgmem.api import GuestMemfd, System, Vcpu, Vm
from kvmgmem.conformance.fixtures import open_backend

P = uapi.PAGE_SIZE
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE
GMEM = uapi.KVM_MEM_GUEST_MEMFD
HC = uapi.KVM_CAP_EXIT_HYPERCALL


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


ANY = _Sentinel("ANY")  # KvmError, TypeError or ValueError, naming the operation
OK = _Sentinel("OK")  # must succeed


class World:
    """Live and closed objects of one backend for the table's calls."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._close: list[Any] = []
        self.sys = self._keep(open_backend(backend))
        self.vm = self._keep(self.sys.create_vm())
        self.vm2 = self._keep(self.sys.create_vm())
        self.gflags = self.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & (
            uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
        )
        self.gmem = self._keep(self.vm.create_guest_memfd(16 * P, self.gflags))
        self.gmem2 = self._keep(self.vm2.create_guest_memfd(16 * P))
        self.vcpu = self._keep(self.vm.create_vcpu(0))
        self.mem = HostMemory(16 * P)
        # a guest_memfd whose VM fd is closed (the VM lives on, pinned by the file)
        orphan_vm = self.sys.create_vm()
        self.orphan_gmem = self._keep(orphan_vm.create_guest_memfd(16 * P))
        orphan_vm.close()
        # closed objects of every kind
        self.csys = open_backend(backend)
        self.csys.close()
        self.cvm = self.sys.create_vm()
        self.cgmem = self.cvm.create_guest_memfd(16 * P, self.gflags)
        self.cvcpu = self.cvm.create_vcpu(0)
        self.cgmem.close()
        self.cvcpu.close()
        self.cvm.close()
        self.cmem = HostMemory(P)
        self.cmem.close()

    def _keep(self, obj: Any) -> Any:
        self._close.append(obj)
        return obj

    def close(self) -> None:
        for obj in reversed(self._close):
            obj.close()
        self.mem.close()


@dataclass(frozen=True)
class Row:
    cls: str
    method: str
    label: str
    call: Callable[[World], Any]
    expected: Any

    @property
    def id(self) -> str:
        return f"{self.cls}.{self.method}[{self.label}]"


#: The operation names each method may report.
OPS: dict[tuple[str, str], tuple[str, ...]] = {
    ("System", "check_extension"): ("KVM_CHECK_EXTENSION",),
    ("System", "create_vm"): ("KVM_CREATE_VM",),
    ("System", "get_supported_cpuid"): ("KVM_GET_SUPPORTED_CPUID",),
    ("System", "supported_vm_types"): ("KVM_CHECK_EXTENSION",),
    ("Vm", "check_extension"): ("KVM_CHECK_EXTENSION",),
    ("Vm", "create_guest_memfd"): ("KVM_CREATE_GUEST_MEMFD",),
    ("Vm", "set_user_memory_region"): ("KVM_SET_USER_MEMORY_REGION",),
    ("Vm", "set_user_memory_region2"): ("KVM_SET_USER_MEMORY_REGION2",),
    ("Vm", "set_memory_attributes"): ("KVM_SET_MEMORY_ATTRIBUTES",),
    ("Vm", "enable_cap"): ("KVM_ENABLE_CAP",),
    ("Vm", "create_vcpu"): ("KVM_CREATE_VCPU",),
    ("Vcpu", "get_regs"): ("KVM_GET_REGS",),
    ("Vcpu", "set_regs"): ("KVM_SET_REGS",),
    ("Vcpu", "get_sregs"): ("KVM_GET_SREGS",),
    ("Vcpu", "set_sregs"): ("KVM_SET_SREGS",),
    ("Vcpu", "set_cpuid"): ("KVM_SET_CPUID2",),
    ("Vcpu", "run"): ("KVM_RUN",),
    ("Vcpu", "complete_io"): ("complete_io",),
    ("Vcpu", "complete_mmio"): ("complete_mmio",),
    ("Vcpu", "complete_hypercall"): ("complete_hypercall",),
    ("Vcpu", "pre_fault_memory"): ("KVM_PRE_FAULT_MEMORY",),
    ("Vcpu", "get_cpuid"): ("KVM_GET_CPUID2",),
    ("Vcpu", "get_mp_state"): ("KVM_GET_MP_STATE",),
    ("Vcpu", "set_mp_state"): ("KVM_SET_MP_STATE",),
    ("Vcpu", "get_tsc_khz"): ("KVM_GET_TSC_KHZ",),
    ("Vm", "create_irqchip"): ("KVM_CREATE_IRQCHIP",),
    ("Vm", "get_tsc_khz"): ("KVM_GET_TSC_KHZ",),
    ("Vm", "set_nr_mmu_pages"): ("KVM_SET_NR_MMU_PAGES",),
    ("GuestMemfd", "fallocate"): ("fallocate",),
    ("GuestMemfd", "allocate"): ("fallocate",),
    ("GuestMemfd", "punch_hole"): ("fallocate",),
    ("GuestMemfd", "mmap"): ("mmap",),
    ("GuestMemfd", "read"): ("read",),
    ("GuestMemfd", "write"): ("write",),
    ("GuestMemfd", "pread"): ("pread",),
    ("GuestMemfd", "pwrite"): ("pwrite",),
    ("GuestMemfd", "truncate"): ("ftruncate", "truncate"),
    ("GuestMemfd", "stat"): ("fstat", "stat"),
    ("HostMemory", "HostMemory"): ("HostMemory",),
    ("HostMemory", "close"): ("HostMemory.close",),
    ("HostMemory", "resize"): ("HostMemory.resize",),
    ("HostMemory", "size"): ("HostMemory", "mmap closed"),
}

# --- generated rows: every integer parameter, wrong type and overflow ------------------------------------

#: (class, method, base call taking the parameter list, [(param name, index, bits)], base args)
INT_PARAMS: list[tuple[str, str, Callable[[World, list[Any]], Any], list[tuple[str, int, int]], list[Any]]] = [
    # KVM_CHECK_EXTENSION, KVM_CREATE_VM and KVM_CREATE_VCPU take the ioctl's unsigned long: the kernel sees
    # all 64 bits (unknown caps answer 0, other types and ids are EINVAL)
    ("System", "check_extension", lambda w, a: w.sys.check_extension(*a), [("cap", 0, 64)], [1]),
    ("System", "create_vm", lambda w, a: w.sys.create_vm(*a), [("vm_type", 0, 64)], [0]),
    ("Vm", "check_extension", lambda w, a: w.vm.check_extension(*a), [("cap", 0, 64)], [1]),
    (
        "Vm",
        "create_guest_memfd",
        lambda w, a: w.vm.create_guest_memfd(*a),
        [("size", 0, 64), ("flags", 1, 64)],
        [P, 0],
    ),
    (
        "Vm",
        "set_user_memory_region",
        lambda w, a: w.vm.set_user_memory_region(a[0], a[1], a[2], w.mem, a[3]),
        [("slot", 0, 32), ("guest_phys_addr", 1, 64), ("memory_size", 2, 64), ("flags", 3, 32)],
        [0, 0, P, 0],
    ),
    (
        "Vm",
        "set_user_memory_region2",
        lambda w, a: w.vm.set_user_memory_region2(a[0], a[1], a[2], w.mem, a[3], w.gmem, a[4]),
        [("slot", 0, 32), ("guest_phys_addr", 1, 64), ("memory_size", 2, 64), ("flags", 3, 32), ("offset", 4, 64)],
        [0, 0, P, GMEM, 0],
    ),
    (
        "Vm",
        "set_memory_attributes",
        lambda w, a: w.vm.set_memory_attributes(*a),
        [("address", 0, 64), ("size", 1, 64), ("attributes", 2, 64), ("flags", 3, 64)],
        [0, P, 0, 0],
    ),
    (
        "Vm",
        "enable_cap",
        lambda w, a: w.vm.enable_cap(a[0], a[1], flags=a[2]),
        [("cap", 0, 32), ("args[0]", 1, 64), ("flags", 2, 32)],
        [HC, 0, 0],
    ),
    ("Vm", "create_vcpu", lambda w, a: w.vm.create_vcpu(*a), [("vcpu_id", 0, 64)], [1]),
    (
        "GuestMemfd",
        "fallocate",
        lambda w, a: w.gmem.fallocate(*a),
        [("mode", 0, 32), ("offset", 1, 64), ("length", 2, 64)],
        [KEEP, 0, P],
    ),
    ("GuestMemfd", "allocate", lambda w, a: w.gmem.allocate(*a), [("offset", 0, 64), ("length", 1, 64)], [0, P]),
    ("GuestMemfd", "punch_hole", lambda w, a: w.gmem.punch_hole(*a), [("offset", 0, 64), ("length", 1, 64)], [0, P]),
    ("GuestMemfd", "mmap", lambda w, a: w.gmem.mmap(*a), [("length", 0, 64), ("offset", 1, 64)], [P, 0]),
    ("GuestMemfd", "read", lambda w, a: w.gmem.read(*a), [("n", 0, 64)], [1]),
    ("GuestMemfd", "pread", lambda w, a: w.gmem.pread(*a), [("n", 0, 64), ("offset", 1, 64)], [1, 0]),
    ("GuestMemfd", "pwrite", lambda w, a: w.gmem.pwrite(b"x", *a), [("offset", 0, 64)], [0]),
    ("GuestMemfd", "truncate", lambda w, a: w.gmem.truncate(*a), [("length", 0, 64)], [P]),
    ("Vcpu", "complete_hypercall", lambda w, a: w.vcpu.complete_hypercall(*a), [("ret", 0, 64)], [0]),
    (
        "Vcpu",
        "pre_fault_memory",
        lambda w, a: w.vcpu.pre_fault_memory(*a),
        [("gpa", 0, 64), ("size", 1, 64), ("flags", 2, 64)],
        [0, P, 0],
    ),
    ("Vcpu", "set_mp_state", lambda w, a: w.vcpu.set_mp_state(*a), [("mp_state", 0, 32)], [0]),
    ("Vcpu", "get_cpuid", lambda w, a: w.vcpu.get_cpuid(*a), [("max_entries", 0, 32)], [256]),
    ("Vm", "set_nr_mmu_pages", lambda w, a: w.vm.set_nr_mmu_pages(*a), [("pages", 0, 64)], [64]),
    ("HostMemory", "HostMemory", lambda w, a: HostMemory(*a), [("size", 0, 64)], [P]),
]

WRONG_TYPES: list[tuple[str, Any]] = [("str", "4096"), ("float", 4096.0), ("None", None), ("bool", True)]


def _generated() -> Iterator[Row]:
    for cls, method, call, params, base in INT_PARAMS:
        for name, index, bits in params:
            # Expected: refused with an error naming the operation. Usually the marshalling's TypeError or
            # ValueError; a KvmError is as good where the operation fails whatever its arguments (e.g. read)
            # or the backend passes a wider field to the kernel (the sim's u64 vm_type).
            # (``mmap(length=None)`` means "the file size", ``get_cpuid(None)`` "room for the maximum": None is
            # not a wrong type there.)
            none_ok = (method, name) in (("mmap", "length"), ("get_cpuid", "max_entries"))
            wrong = [(k, v) for k, v in WRONG_TYPES if not (v is None and none_ok)]
            bad: list[tuple[str, Any, Any]] = [(f"{name}={k}", v, ANY) for k, v in wrong]
            bad.append((f"{name}=2**{bits}", 1 << bits, ANY))
            bad.append((f"{name}=-2**{bits - 1}-1", -(1 << (bits - 1)) - 1, ANY))
            for label, value, expected in bad:
                args = list(base)
                args[index] = value

                def run(w: World, _call: Callable[[World, list[Any]], Any] = call, _args: list[Any] = args) -> Any:
                    return _call(w, _args)

                yield Row(cls, method, label, run, expected)


# --- hand-written semantic rows ----------------------------------------------------------------------------


def _region(w: World, **kw: Any) -> Any:
    args: dict[str, Any] = {"slot": 0, "guest_phys_addr": 0, "memory_size": P, "userspace": w.mem, "flags": 0}
    args.update(kw)
    return w.vm.set_user_memory_region(**args)


def _region2(w: World, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "slot": 0,
        "guest_phys_addr": 0,
        "memory_size": P,
        "userspace": w.mem,
        "flags": GMEM,
        "guest_memfd": w.gmem,
        "guest_memfd_offset": 0,
    }
    args.update(kw)
    return w.vm.set_user_memory_region2(**args)


EINVAL, EBADF, EEXIST, EFAULT = errno.EINVAL, errno.EBADF, errno.EEXIST, errno.EFAULT

SEMANTIC: list[Row] = [
    # System
    Row("System", "create_vm", "type -1", lambda w: w.sys.create_vm(-1), EINVAL),
    Row("System", "create_vm", "type 31", lambda w: w.sys.create_vm(31), EINVAL),
    Row("System", "create_vm", "type 2**32", lambda w: w.sys.create_vm(1 << 32), EINVAL),
    # Vm.create_guest_memfd
    Row("Vm", "create_guest_memfd", "size 0", lambda w: w.vm.create_guest_memfd(0), EINVAL),
    Row("Vm", "create_guest_memfd", "size -4096", lambda w: w.vm.create_guest_memfd(-P), EINVAL),
    Row("Vm", "create_guest_memfd", "size unaligned", lambda w: w.vm.create_guest_memfd(P + 1), EINVAL),
    Row("Vm", "create_guest_memfd", "size 2**63", lambda w: w.vm.create_guest_memfd(1 << 63), EINVAL),
    Row("Vm", "create_guest_memfd", "flags unknown bit", lambda w: w.vm.create_guest_memfd(P, 1 << 40), EINVAL),
    Row("Vm", "create_guest_memfd", "flags -1", lambda w: w.vm.create_guest_memfd(P, -1), EINVAL),
    # Vm.set_user_memory_region
    Row("Vm", "set_user_memory_region", "slot -1", lambda w: _region(w, slot=-1), EINVAL),
    Row("Vm", "set_user_memory_region", "slot 40000", lambda w: _region(w, slot=40000), EINVAL),
    Row("Vm", "set_user_memory_region", "as_id 5", lambda w: _region(w, slot=5 << 16), EINVAL),
    Row("Vm", "set_user_memory_region", "gpa unaligned", lambda w: _region(w, guest_phys_addr=1), EINVAL),
    Row("Vm", "set_user_memory_region", "size unaligned", lambda w: _region(w, memory_size=P - 1), EINVAL),
    Row("Vm", "set_user_memory_region", "size -4096", lambda w: _region(w, memory_size=-P), EINVAL),
    Row(
        "Vm",
        "set_user_memory_region",
        "gpa+size wraps",
        lambda w: _region(w, guest_phys_addr=-P, memory_size=2 * P),
        EINVAL,
    ),
    Row("Vm", "set_user_memory_region", "hva unaligned int", lambda w: _region(w, userspace=1), EINVAL),
    Row("Vm", "set_user_memory_region", "hva -4096", lambda w: _region(w, userspace=-P), EINVAL),
    Row("Vm", "set_user_memory_region", "hva 2**64", lambda w: _region(w, userspace=1 << 64), ValueError),
    Row("Vm", "set_user_memory_region", "GUEST_MEMFD via v1", lambda w: _region(w, flags=GMEM), EINVAL),
    Row("Vm", "set_user_memory_region", "delete missing slot", lambda w: _region(w, slot=7, memory_size=0), EINVAL),
    Row("Vm", "set_user_memory_region", "userspace bytes", lambda w: _region(w, userspace=b"\0" * P), TypeError),
    Row("Vm", "set_user_memory_region", "userspace str", lambda w: _region(w, userspace="mem"), TypeError),
    Row("Vm", "set_user_memory_region", "userspace bool", lambda w: _region(w, userspace=True), TypeError),
    Row("Vm", "set_user_memory_region", "userspace float", lambda w: _region(w, userspace=4096.0), TypeError),
    Row("Vm", "set_user_memory_region", "userspace GuestMemfd", lambda w: _region(w, userspace=w.gmem), TypeError),
    Row("Vm", "set_user_memory_region", "userspace Vm", lambda w: _region(w, userspace=w.vm2), TypeError),
    Row(
        "Vm",
        "set_user_memory_region",
        "userspace empty bytearray",
        lambda w: _region(w, userspace=bytearray()),
        ValueError,
    ),
    Row("Vm", "set_user_memory_region", "userspace closed HostMemory", lambda w: _region(w, userspace=w.cmem), EFAULT),
    Row("Vm", "set_user_memory_region", "slot is a Vm", lambda w: _region(w, slot=w.vm2), TypeError),
    # Vm.set_user_memory_region2: guest_memfd of the wrong kind, closed, of another VM
    Row("Vm", "set_user_memory_region2", "gmem of another VM", lambda w: _region2(w, guest_memfd=w.gmem2), EINVAL),
    Row(
        "Vm", "set_user_memory_region2", "gmem of a closed VM", lambda w: _region2(w, guest_memfd=w.orphan_gmem), EINVAL
    ),
    Row("Vm", "set_user_memory_region2", "gmem closed", lambda w: _region2(w, guest_memfd=w.cgmem), EBADF),
    Row("Vm", "set_user_memory_region2", "gmem None", lambda w: _region2(w, guest_memfd=None), EBADF),
    Row("Vm", "set_user_memory_region2", "gmem fd -1", lambda w: _region2(w, guest_memfd=-1), EBADF),
    Row("Vm", "set_user_memory_region2", "gmem fd 2**31-1", lambda w: _region2(w, guest_memfd=(1 << 31) - 1), EBADF),
    Row("Vm", "set_user_memory_region2", "gmem fd 2**32", lambda w: _region2(w, guest_memfd=1 << 32), ValueError),
    Row("Vm", "set_user_memory_region2", "gmem = VM fd", lambda w: _region2(w, guest_memfd=w.vm2.fd), EINVAL),
    Row("Vm", "set_user_memory_region2", "gmem = /dev/kvm fd", lambda w: _region2(w, guest_memfd=w.sys.fd), EINVAL),
    Row("Vm", "set_user_memory_region2", "gmem = vCPU fd", lambda w: _region2(w, guest_memfd=w.vcpu.fd), EINVAL),
    Row("Vm", "set_user_memory_region2", "gmem = stdin", lambda w: _region2(w, guest_memfd=0), EINVAL),
    Row("Vm", "set_user_memory_region2", "gmem HostMemory", lambda w: _region2(w, guest_memfd=w.mem), TypeError),
    Row("Vm", "set_user_memory_region2", "gmem str", lambda w: _region2(w, guest_memfd="3"), TypeError),
    Row("Vm", "set_user_memory_region2", "offset unaligned", lambda w: _region2(w, guest_memfd_offset=1), EINVAL),
    Row("Vm", "set_user_memory_region2", "offset -4096", lambda w: _region2(w, guest_memfd_offset=-P), EINVAL),
    Row("Vm", "set_user_memory_region2", "offset beyond EOF", lambda w: _region2(w, guest_memfd_offset=16 * P), EINVAL),
    Row("Vm", "set_user_memory_region2", "size beyond EOF", lambda w: _region2(w, memory_size=17 * P), EINVAL),
    Row(
        "Vm",
        "set_user_memory_region2",
        "offset+size wraps",
        lambda w: _region2(w, guest_memfd_offset=-P, memory_size=2 * P),
        EINVAL,
    ),
    Row("Vm", "set_user_memory_region2", "unknown flag", lambda w: _region2(w, flags=GMEM | (1 << 20)), EINVAL),
    Row("Vm", "set_user_memory_region2", "GMEM|LOG_DIRTY", lambda w: _region2(w, flags=GMEM | 1), EINVAL),
    # Vm.set_memory_attributes (ENOTTY where the kernel lacks them, else EINVAL)
    Row("Vm", "set_memory_attributes", "flags 1", lambda w: w.vm.set_memory_attributes(0, P, 0, 1), ANY),
    Row("Vm", "set_memory_attributes", "unknown attribute", lambda w: w.vm.set_memory_attributes(0, P, 1 << 60), ANY),
    Row("Vm", "set_memory_attributes", "size 0", lambda w: w.vm.set_memory_attributes(0, 0, 0), ANY),
    Row("Vm", "set_memory_attributes", "unaligned", lambda w: w.vm.set_memory_attributes(1, P, 0), ANY),
    Row("Vm", "set_memory_attributes", "wraps", lambda w: w.vm.set_memory_attributes(-P, 2 * P, 0), ANY),
    # Vm.enable_cap
    Row("Vm", "enable_cap", "unknown cap", lambda w: w.vm.enable_cap(0xFFFF), EINVAL),
    Row("Vm", "enable_cap", "cap -1", lambda w: w.vm.enable_cap(-1), EINVAL),
    Row("Vm", "enable_cap", "flags 1", lambda w: w.vm.enable_cap(HC, 0, flags=1), EINVAL),
    Row("Vm", "enable_cap", "args[0] bad bits", lambda w: w.vm.enable_cap(HC, 1), EINVAL),
    Row("Vm", "enable_cap", "5 args", lambda w: w.vm.enable_cap(HC, 0, 0, 0, 0, 0), ValueError),
    Row("Vm", "enable_cap", "args[3] str", lambda w: w.vm.enable_cap(HC, 0, 0, 0, "x"), TypeError),
    # Vm.create_vcpu
    Row("Vm", "create_vcpu", "id -1", lambda w: w.vm.create_vcpu(-1), EINVAL),
    Row("Vm", "create_vcpu", "id 2**20", lambda w: w.vm.create_vcpu(1 << 20), EINVAL),
    Row("Vm", "create_vcpu", "id 2**32 (not vCPU 0)", lambda w: w.vm.create_vcpu(1 << 32), EINVAL),
    Row("Vm", "create_vcpu", "duplicate id", lambda w: w.vm.create_vcpu(0), EEXIST),
    # GuestMemfd
    Row("GuestMemfd", "fallocate", "mode 0 (no KEEP_SIZE)", lambda w: w.gmem.fallocate(0, 0, P), errno.EOPNOTSUPP),
    Row("GuestMemfd", "fallocate", "PUNCH without KEEP", lambda w: w.gmem.fallocate(PUNCH, 0, P), errno.EOPNOTSUPP),
    Row("GuestMemfd", "fallocate", "ZERO_RANGE", lambda w: w.gmem.fallocate(KEEP | 0x10, 0, P), errno.EOPNOTSUPP),
    Row("GuestMemfd", "fallocate", "mode -1", lambda w: w.gmem.fallocate(-1, 0, P), errno.EOPNOTSUPP),
    Row("GuestMemfd", "fallocate", "offset -4096", lambda w: w.gmem.fallocate(KEEP, -P, P), EINVAL),
    Row("GuestMemfd", "fallocate", "length 0", lambda w: w.gmem.fallocate(KEEP, 0, 0), EINVAL),
    Row("GuestMemfd", "fallocate", "length -1", lambda w: w.gmem.fallocate(KEEP, 0, -1), EINVAL),
    Row("GuestMemfd", "fallocate", "unaligned", lambda w: w.gmem.fallocate(KEEP, 1, P), EINVAL),
    Row("GuestMemfd", "fallocate", "beyond EOF", lambda w: w.gmem.fallocate(KEEP, 16 * P, P), EINVAL),
    Row(
        "GuestMemfd",
        "fallocate",
        "offset+len > max file size",
        lambda w: w.gmem.fallocate(KEEP, 1 << 62, 1 << 62),
        errno.EFBIG,
    ),
    Row("GuestMemfd", "allocate", "unaligned length", lambda w: w.gmem.allocate(0, 1), EINVAL),
    Row("GuestMemfd", "allocate", "straddles EOF", lambda w: w.gmem.allocate(15 * P, 2 * P), EINVAL),
    Row("GuestMemfd", "punch_hole", "length 0", lambda w: w.gmem.punch_hole(0, 0), EINVAL),
    Row("GuestMemfd", "punch_hole", "offset -4096", lambda w: w.gmem.punch_hole(-P, P), EINVAL),
    Row("GuestMemfd", "mmap", "length 0", lambda w: w.gmem.mmap(0), ANY),
    Row("GuestMemfd", "mmap", "length -1", lambda w: w.gmem.mmap(-1), ANY),
    Row("GuestMemfd", "mmap", "length 2**62", lambda w: w.gmem.mmap(1 << 62), ANY),
    Row("GuestMemfd", "mmap", "offset unaligned", lambda w: w.gmem.mmap(P, 1), EINVAL),
    Row("GuestMemfd", "mmap", "offset -4096", lambda w: w.gmem.mmap(P, -P), ANY),
    Row("GuestMemfd", "mmap", "MAP_PRIVATE", lambda w: w.gmem.mmap(P, 0, False), EINVAL),
    Row("GuestMemfd", "read", "n -1", lambda w: w.gmem.read(-1), EINVAL),
    Row("GuestMemfd", "write", "data str", lambda w: w.gmem.write("x"), ANY),  # type: ignore[arg-type]
    Row("GuestMemfd", "write", "data int", lambda w: w.gmem.write(5), ANY),  # type: ignore[arg-type]
    Row("GuestMemfd", "write", "data None", lambda w: w.gmem.write(None), ANY),  # type: ignore[arg-type]
    Row("GuestMemfd", "pread", "offset -1", lambda w: w.gmem.pread(1, -1), EINVAL),
    Row("GuestMemfd", "pread", "n -1", lambda w: w.gmem.pread(-1, 0), ANY),
    Row("GuestMemfd", "pwrite", "offset -1", lambda w: w.gmem.pwrite(b"x", -1), EINVAL),
    Row("GuestMemfd", "pwrite", "data int", lambda w: w.gmem.pwrite(5, 0), ANY),  # type: ignore[arg-type]
    Row("GuestMemfd", "truncate", "length -1", lambda w: w.gmem.truncate(-1), EINVAL),
    Row("GuestMemfd", "truncate", "current size", lambda w: w.gmem.truncate(16 * P), EINVAL),
    # Vcpu: register structs of the wrong kind
    Row("Vcpu", "set_regs", "None", lambda w: w.vcpu.set_regs(None), TypeError),  # type: ignore[arg-type]
    Row("Vcpu", "set_regs", "kvm_sregs", lambda w: w.vcpu.set_regs(uapi.kvm_sregs()), TypeError),  # type: ignore[arg-type]
    Row("Vcpu", "set_regs", "bytes", lambda w: w.vcpu.set_regs(bytes(1024)), TypeError),  # type: ignore[arg-type]
    Row("Vcpu", "set_sregs", "kvm_regs", lambda w: w.vcpu.set_sregs(uapi.kvm_regs()), TypeError),  # type: ignore[arg-type]
    Row("Vcpu", "set_sregs", "dict", lambda w: w.vcpu.set_sregs({}), TypeError),  # type: ignore[arg-type]
    Row("Vcpu", "set_cpuid", "int", lambda w: w.vcpu.set_cpuid(5), TypeError),  # type: ignore[arg-type]
    Row("Vcpu", "set_cpuid", "[int]", lambda w: w.vcpu.set_cpuid([1]), TypeError),  # type: ignore[list-item]
    Row("Vcpu", "set_cpuid", "[kvm_regs]", lambda w: w.vcpu.set_cpuid([uapi.kvm_regs()]), TypeError),  # type: ignore[list-item]
    # Vcpu: completions without a pending exit (KVM_RUN has not returned one)
    Row("Vcpu", "complete_io", "no pending IN exit", lambda w: w.vcpu.complete_io(b"\0"), EINVAL),
    Row("Vcpu", "complete_io", "data int", lambda w: w.vcpu.complete_io(5), ANY),  # type: ignore[arg-type]
    Row("Vcpu", "complete_mmio", "no pending MMIO exit", lambda w: w.vcpu.complete_mmio(b"\0" * 4), EINVAL),
    Row("Vcpu", "complete_hypercall", "no pending hypercall", lambda w: w.vcpu.complete_hypercall(0), EINVAL),
    # Vcpu: KVM_PRE_FAULT_MEMORY, KVM_SET_MP_STATE, KVM_GET_CPUID2
    Row("Vcpu", "pre_fault_memory", "flags 1", lambda w: w.vcpu.pre_fault_memory(0, P, 1), EINVAL),
    Row("Vcpu", "pre_fault_memory", "gpa unaligned", lambda w: w.vcpu.pre_fault_memory(1, P), EINVAL),
    Row("Vcpu", "pre_fault_memory", "size 0", lambda w: w.vcpu.pre_fault_memory(0, 0), EINVAL),
    Row("Vcpu", "pre_fault_memory", "wraps", lambda w: w.vcpu.pre_fault_memory(-P, 2 * P), EINVAL),
    Row("Vcpu", "set_mp_state", "unknown state", lambda w: w.vcpu.set_mp_state(5), EINVAL),
    Row("Vcpu", "set_mp_state", "HALTED without LAPIC", lambda w: w.vcpu.set_mp_state(3), EINVAL),
    Row("Vcpu", "set_mp_state", "-1", lambda w: w.vcpu.set_mp_state(-1), EINVAL),
    Row("Vcpu", "get_cpuid", "no room", lambda w: (w.vcpu.set_cpuid(), w.vcpu.get_cpuid(0)), errno.E2BIG),
    # Vm: set-up ioctls
    Row("Vm", "create_irqchip", "after a vCPU", lambda w: w.vm.create_irqchip(), EINVAL),
    Row("Vm", "set_nr_mmu_pages", "63", lambda w: w.vm.set_nr_mmu_pages(63), EINVAL),
    Row("Vm", "set_nr_mmu_pages", "0", lambda w: w.vm.set_nr_mmu_pages(0), EINVAL),
    # HostMemory
    Row("HostMemory", "HostMemory", "size 0", lambda w: HostMemory(0), ValueError),
    Row("HostMemory", "HostMemory", "size -1", lambda w: HostMemory(-1), ValueError),
    Row("HostMemory", "HostMemory", "size 2**70", lambda w: HostMemory(1 << 70), ANY),
    Row("HostMemory", "HostMemory", "size 2**60 (no memory)", lambda w: HostMemory(1 << 60), ANY),
    Row("HostMemory", "close", "pinned by a memslot", lambda w: (_region(w, slot=3), w.mem.close()), errno.EBUSY),
    Row("HostMemory", "resize", "size 0", lambda w: w.mem.resize(0), ValueError),
    Row("HostMemory", "resize", "size -1", lambda w: w.mem.resize(-1), ValueError),
    Row("HostMemory", "resize", "size 2**70", lambda w: w.mem.resize(1 << 70), ValueError),
    Row("HostMemory", "resize", "size str", lambda w: w.mem.resize("4096"), TypeError),  # type: ignore[arg-type]
    Row("HostMemory", "resize", "size bool", lambda w: w.mem.resize(True), TypeError),
    Row("HostMemory", "resize", "size 2**60 (past the address space)", lambda w: w.mem.resize(1 << 60), errno.EINVAL),
    # last of the resize rows: it leaves slot 3 pinning w.mem
    Row("HostMemory", "resize", "pinned", lambda w: (_region(w, slot=3), w.mem.resize(32 * P)), errno.EBUSY),
]

# --- closed objects: every method → EBADF (close() stays idempotent, kick() a no-op) ---------------------

CLOSED: list[Row] = [
    Row("System", "check_extension", "closed", lambda w: w.csys.check_extension(1), EBADF),
    Row("System", "create_vm", "closed", lambda w: w.csys.create_vm(), EBADF),
    Row("System", "get_supported_cpuid", "closed", lambda w: w.csys.get_supported_cpuid(), EBADF),
    Row("System", "supported_vm_types", "closed", lambda w: w.csys.supported_vm_types, EBADF),
    Row("System", "close", "twice", lambda w: w.csys.close(), OK),
    Row("System", "closed", "closed", lambda w: w.csys.closed or 1 / 0, OK),
    # the sim-only options describe the configuration, not a live fd: they answer after close() (None here)
    Row("System", "private_access_bit", "closed", lambda w: w.csys.private_access_bit is None or 1 / 0, OK),
    Row("Vm", "check_extension", "closed", lambda w: w.cvm.check_extension(1), EBADF),
    Row("Vm", "create_guest_memfd", "closed", lambda w: w.cvm.create_guest_memfd(P), EBADF),
    Row("Vm", "set_user_memory_region", "closed", lambda w: w.cvm.set_user_memory_region(0, 0, P, w.mem), EBADF),
    Row("Vm", "set_user_memory_region2", "closed", lambda w: w.cvm.set_user_memory_region2(0, 0, P, w.mem), EBADF),
    Row("Vm", "set_memory_attributes", "closed", lambda w: w.cvm.set_memory_attributes(0, P, 0), EBADF),
    Row("Vm", "enable_cap", "closed", lambda w: w.cvm.enable_cap(HC, 0), EBADF),
    Row("Vm", "create_vcpu", "closed", lambda w: w.cvm.create_vcpu(1), EBADF),
    Row("Vm", "close", "twice", lambda w: w.cvm.close(), OK),
    Row("Vm", "has_private_mem", "closed", lambda w: w.cvm.has_private_mem is False or 1 / 0, OK),
    Row("Vm", "private_access_bit", "closed", lambda w: w.cvm.private_access_bit is None or 1 / 0, OK),
    Row("Vm", "introspect", "closed", lambda w: w.cvm.introspect(), OK),  # what the VM's release left
    Row("Vcpu", "get_regs", "closed", lambda w: w.cvcpu.get_regs(), EBADF),
    Row("Vcpu", "set_regs", "closed", lambda w: w.cvcpu.set_regs(uapi.kvm_regs()), EBADF),
    Row("Vcpu", "get_sregs", "closed", lambda w: w.cvcpu.get_sregs(), EBADF),
    Row("Vcpu", "set_sregs", "closed", lambda w: w.cvcpu.set_sregs(uapi.kvm_sregs()), EBADF),
    Row("Vcpu", "set_cpuid", "closed", lambda w: w.cvcpu.set_cpuid(), EBADF),
    Row("Vcpu", "run", "closed", lambda w: w.cvcpu.run(), EBADF),
    Row("Vcpu", "complete_io", "closed", lambda w: w.cvcpu.complete_io(b"\0"), EBADF),
    Row("Vcpu", "complete_mmio", "closed", lambda w: w.cvcpu.complete_mmio(b"\0"), EBADF),
    Row("Vcpu", "complete_hypercall", "closed", lambda w: w.cvcpu.complete_hypercall(0), EBADF),
    Row("Vcpu", "kick", "closed (no-op)", lambda w: w.cvcpu.kick(), OK),
    Row("Vcpu", "pre_fault_memory", "closed", lambda w: w.cvcpu.pre_fault_memory(0, P), EBADF),
    Row("Vcpu", "get_cpuid", "closed", lambda w: w.cvcpu.get_cpuid(), EBADF),
    Row("Vcpu", "get_mp_state", "closed", lambda w: w.cvcpu.get_mp_state(), EBADF),
    Row("Vcpu", "set_mp_state", "closed", lambda w: w.cvcpu.set_mp_state(0), EBADF),
    Row("Vcpu", "get_tsc_khz", "closed", lambda w: w.cvcpu.get_tsc_khz(), EBADF),
    Row("Vm", "create_irqchip", "closed", lambda w: w.cvm.create_irqchip(), EBADF),
    Row("Vm", "get_tsc_khz", "closed", lambda w: w.cvm.get_tsc_khz(), EBADF),
    Row("Vm", "set_nr_mmu_pages", "closed", lambda w: w.cvm.set_nr_mmu_pages(64), EBADF),
    Row("Vcpu", "close", "twice", lambda w: w.cvcpu.close(), OK),
    Row("GuestMemfd", "fallocate", "closed", lambda w: w.cgmem.fallocate(KEEP, 0, P), EBADF),
    Row("GuestMemfd", "allocate", "closed", lambda w: w.cgmem.allocate(0, P), EBADF),
    Row("GuestMemfd", "punch_hole", "closed", lambda w: w.cgmem.punch_hole(0, P), EBADF),
    Row("GuestMemfd", "mmap", "closed", lambda w: w.cgmem.mmap(), EBADF),
    Row("GuestMemfd", "read", "closed", lambda w: w.cgmem.read(1), EBADF),
    Row("GuestMemfd", "write", "closed", lambda w: w.cgmem.write(b"x"), EBADF),
    Row("GuestMemfd", "pread", "closed", lambda w: w.cgmem.pread(1, 0), EBADF),
    Row("GuestMemfd", "pwrite", "closed", lambda w: w.cgmem.pwrite(b"x", 0), EBADF),
    Row("GuestMemfd", "truncate", "closed", lambda w: w.cgmem.truncate(P), EBADF),
    Row("GuestMemfd", "stat", "closed", lambda w: w.cgmem.stat(), EBADF),
    Row("Vm", "closed", "closed", lambda w: w.cvm.closed or 1 / 0, OK),
    Row("Vcpu", "closed", "closed", lambda w: w.cvcpu.closed or 1 / 0, OK),
    Row("GuestMemfd", "closed", "closed", lambda w: w.cgmem.closed or 1 / 0, OK),
    Row("GuestMemfd", "allocated_bytes", "closed", lambda w: w.cgmem.allocated_bytes(), OK),
    Row("GuestMemfd", "close", "twice", lambda w: w.cgmem.close(), OK),
    Row("HostMemory", "close", "twice", lambda w: w.cmem.close(), OK),
    Row("HostMemory", "size", "closed", lambda w: w.cmem.size, ValueError),
    Row("HostMemory", "resize", "closed", lambda w: w.cmem.resize(P), ValueError),
    Row("HostMemory", "pinned_by", "closed", lambda w: w.cmem.pinned_by == [] or 1 / 0, OK),
    Row("HostMemory", "closed", "closed", lambda w: w.cmem.closed or 1 / 0, OK),
]

ROWS: list[Row] = [*_generated(), *SEMANTIC, *CLOSED]


def _ops(row: Row) -> tuple[str, ...]:
    return OPS.get((row.cls, row.method), (row.method,))


def check_row(row: Row, w: World) -> None:
    """Run one row; fail with a precise message if the outcome is not the expected, op-naming one."""
    ops = _ops(row)
    try:
        result = row.call(w)
    except KvmError as e:
        if row.expected is OK:
            pytest.fail(f"{row.id}: raised {e!r}, expected success")
        assert e.op in ops, f"{row.id}: KvmError names op {e.op!r}, expected one of {ops}: {e}"
        if isinstance(row.expected, int) and not isinstance(row.expected, bool):
            assert e.errno == row.expected, (
                f"{row.id}: errno {errno.errorcode.get(e.errno or 0)}, expected {errno.errorcode[row.expected]}: {e}"
            )
        elif isinstance(row.expected, type):
            pytest.fail(f"{row.id}: raised KvmError ({e}), expected {row.expected.__name__}")
    except (TypeError, ValueError) as e:
        if row.expected is OK:
            pytest.fail(f"{row.id}: raised {type(e).__name__}: {e}, expected success")
        assert str(e).startswith(ops), (
            f"{row.id}: {type(e).__name__} does not name the operation (expected a message starting with one "
            f"of {ops}): {type(e).__name__}: {e}"
        )
        if isinstance(row.expected, type):
            assert isinstance(e, row.expected), f"{row.id}: {type(e).__name__}: {e}, expected {row.expected.__name__}"
        elif row.expected is not ANY:
            pytest.fail(f"{row.id}: {type(e).__name__}: {e}, expected KvmError {errno.errorcode[row.expected]}")
    except Exception as e:
        pytest.fail(f"{row.id}: {type(e).__name__} escaped (not KvmError/TypeError/ValueError): {e}")
    else:
        for obj in result if isinstance(result, tuple) else (result,):
            close = getattr(obj, "close", None)
            if callable(close):
                close()
        if row.expected is not OK:
            pytest.fail(f"{row.id}: bad input accepted (returned {result!r}), expected {row.expected}")


@pytest.fixture
def world(backend: str) -> Iterator[World]:
    w = World(backend)
    try:
        yield w
    finally:
        w.close()


GROUPS: dict[str, list[Row]] = {}
for _row in ROWS:
    GROUPS.setdefault(f"{_row.cls}.{_row.method}", []).append(_row)


@pytest.mark.parametrize("method", sorted(GROUPS))
def test_bad_input(world: World, method: str) -> None:
    """Every row of one method, on one fresh World; the failure lists every row that misbehaved."""
    failures = []
    for row in GROUPS[method]:
        try:
            check_row(row, world)
        except (AssertionError, pytest.fail.Exception) as e:
            failures.append(str(e).splitlines()[0])
    if failures:
        pytest.fail(
            f"{len(failures)} of {len(GROUPS[method])} bad inputs mishandled:\n" + "\n".join(failures), pytrace=False
        )


# --- the table covers the whole public API ---------------------------------------------------------------

DATA_ATTRIBUTES = {"backend", "selection_reason", "system", "vm_type", "vm", "vcpu_id", "size", "flags", "fd"}
#: Methods the table does not call with bad input, and why.
EXEMPT = {
    ("GuestMemfd", "stat"): None,  # no arguments: only the closed row applies (present)
}


def public_methods() -> set[tuple[str, str]]:
    """Every public method and property of the four API classes, and HostMemory's own additions."""
    out: set[tuple[str, str]] = set()
    for cls in (System, Vm, Vcpu, GuestMemfd):
        for name, value in inspect.getmembers(cls):
            if name.startswith("_") or name in DATA_ATTRIBUTES:
                continue
            if callable(value) or isinstance(value, property):
                out.add((cls.__name__, name))
    for name in ("close", "resize", "size", "pinned_by", "closed"):
        out.add(("HostMemory", name))
    out.add(("HostMemory", "HostMemory"))  # the constructor
    return out


def test_table_covers_every_public_method() -> None:
    covered = {(r.cls, r.method) for r in ROWS}
    missing = sorted(public_methods() - covered)
    assert not missing, f"public methods without a bad-input row: {missing}"


def test_table_size() -> None:
    """The counts docs/reliability.md quotes."""
    methods = {(r.cls, r.method) for r in ROWS}
    assert len(methods) >= 40 and len(ROWS) >= 250, (len(methods), len(ROWS))


def test_gmem_of_the_other_backend(backend: str) -> None:
    """A guest_memfd object of the *other* backend is not a guest_memfd of this VM: EINVAL/EBADF, no crash."""
    other = {"kvm": "sim", "sim": "kvm"}[backend]
    with open_backend(backend) as s1, open_backend(other) as s2, s1.create_vm() as vm, s2.create_vm() as vm2:
        with vm2.create_guest_memfd(P) as foreign, HostMemory(P) as mem:
            with pytest.raises(KvmError) as info:
                vm.set_user_memory_region2(0, 0, P, mem, GMEM, foreign, 0)
            assert info.value.errno in (errno.EINVAL, errno.EBADF)
            assert info.value.op == "KVM_SET_USER_MEMORY_REGION2"
            assert mem.pinned_by == []


def test_kvmgmem_open_unknown_backend() -> None:
    with pytest.raises(ValueError, match=r"^kvmgmem\.open: unknown backend"):
        kvmgmem.open("nope")
