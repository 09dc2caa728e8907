"""Marshal once (issue 12): both backends see the same arguments, so they give the same answers.

Every public method of ``System``, ``Vm``, ``GuestMemfd`` and ``Vcpu`` is called on real KVM and on the sim
(``profile="host"``, which mirrors this host's kernel) with the same out-of-range and sign-edge values for
each integer parameter, one parameter at a time, in the same order, and the outcomes — the value returned,
or the exception with its errno and operation — must be identical. Marshalling that drifts between backends
shows up here: when ``check_extension`` took 32 bits on kvm and 64 on the sim, ``cap | 1 << 32`` was a
ValueError on one and 0 on the other.

The values are derived from a valid base value (adding 2**31, 2**32, 2**63, or subtracting 2**32 and 2**64,
which keep or flip the low bits a narrower field would keep) plus the absolute edges of the 32- and 64-bit
signed and unsigned ranges and one past them. Two tests pin the widths themselves against the kernel: the
ioctl arguments are 64-bit (``unsigned long``), probed on this host through raw ctypes ioctls.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import kvmgmem
from kvmgmem import HostMemory, KvmError, uapi
from kvmgmem.api import GuestMemfd, System, Vcpu, Vm
from kvmgmem.conformance.fixtures import open_backend
from kvmgmem.libc import ioctl_int

P = uapi.PAGE_SIZE
GMEM = uapi.KVM_MEM_GUEST_MEMFD
HC = uapi.KVM_CAP_EXIT_HYPERCALL
KEEP = uapi.FALLOC_FL_KEEP_SIZE
MMAP_FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED

#: Absolute edges: the ends of the signed/unsigned 32- and 64-bit ranges and one past each.
EDGES = (
    -1,
    (1 << 31) - 1,
    1 << 31,
    -(1 << 31),
    -(1 << 31) - 1,
    (1 << 32) - 1,
    1 << 32,
    (1 << 63) - 1,
    1 << 63,
    -(1 << 63),
    -(1 << 63) - 1,
    (1 << 64) - 1,
    1 << 64,
)


def edge_values(base: int) -> list[int]:
    """``base`` with high bits added or flipped (a narrower field would see ``base`` again), then EDGES."""
    derived = [base + (1 << 31), base + (1 << 32), base + (1 << 63), base - (1 << 32), base - (1 << 64)]
    out: list[int] = []
    for value in (*derived, *EDGES):
        if value not in out and value != base:
            out.append(value)
    return out


class World:
    """One backend's live objects; every call below runs against it in the same order on both backends."""

    def __init__(self, backend: str) -> None:
        self.sys = open_backend(backend) if backend == "kvm" else open_backend("sim", profile="host")
        self.vm = self.sys.create_vm()
        self.gmem = self.vm.create_guest_memfd(16 * P, MMAP_FLAGS)
        self.vcpu = self.vm.create_vcpu(0)
        self.mem = HostMemory(16 * P)

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()
        self.gmem.close()
        self.mem.close()


Call = Callable[[World, list[Any]], Any]

#: (name, call taking the argument list, [(parameter, index)], valid base arguments)
INT_CALLS: list[tuple[str, Call, list[tuple[str, int]], list[int]]] = [
    ("System.check_extension", lambda w, a: w.sys.check_extension(*a), [("cap", 0)], [uapi.KVM_CAP_GUEST_MEMFD]),
    ("System.create_vm", lambda w, a: w.sys.create_vm(*a), [("vm_type", 0)], [0]),
    ("Vm.check_extension", lambda w, a: w.vm.check_extension(*a), [("cap", 0)], [uapi.KVM_CAP_GUEST_MEMFD_FLAGS]),
    (
        "Vm.create_guest_memfd",
        lambda w, a: w.vm.create_guest_memfd(*a),
        [("size", 0), ("flags", 1)],
        [P, uapi.GUEST_MEMFD_FLAG_MMAP],
    ),
    (
        "Vm.set_user_memory_region",
        lambda w, a: (w.vm.set_user_memory_region(a[0], a[1], a[2], w.mem, a[3]), _delete(w, a[0], a[2])),
        [("slot", 0), ("guest_phys_addr", 1), ("memory_size", 2), ("flags", 3)],
        [1, 1 << 32, P, 0],
    ),
    (
        "Vm.set_user_memory_region2",
        lambda w, a: (
            w.vm.set_user_memory_region2(a[0], a[1], a[2], w.mem, a[3], a[4] if a[4] != -2 else w.gmem, a[5]),
            _delete(w, a[0], a[2]),
        ),
        [("slot", 0), ("guest_phys_addr", 1), ("memory_size", 2), ("flags", 3), ("guest_memfd", 4), ("offset", 5)],
        [2, 1 << 33, P, GMEM, -2, 0],  # guest_memfd -2 stands for the World's GuestMemfd object
    ),
    (
        "Vm.set_memory_attributes",
        lambda w, a: w.vm.set_memory_attributes(*a),
        [("address", 0), ("size", 1), ("attributes", 2), ("flags", 3)],
        [0, P, 0, 0],
    ),
    (
        "Vm.enable_cap",
        lambda w, a: w.vm.enable_cap(a[0], a[1], flags=a[2]),
        [("cap", 0), ("args[0]", 1), ("flags", 2)],
        [HC, 1 << uapi.KVM_HC_MAP_GPA_RANGE, 0],
    ),
    ("Vm.create_vcpu", lambda w, a: w.vm.create_vcpu(*a), [("vcpu_id", 0)], [1]),
    (
        "GuestMemfd.fallocate",
        lambda w, a: w.gmem.fallocate(*a),
        [("mode", 0), ("offset", 1), ("length", 2)],
        [KEEP, 0, P],
    ),
    ("GuestMemfd.allocate", lambda w, a: w.gmem.allocate(*a), [("offset", 0), ("length", 1)], [P, P]),
    ("GuestMemfd.punch_hole", lambda w, a: w.gmem.punch_hole(*a), [("offset", 0), ("length", 1)], [P, P]),
    ("GuestMemfd.mmap", lambda w, a: w.gmem.mmap(*a), [("length", 0), ("offset", 1)], [P, 0]),
    ("GuestMemfd.read", lambda w, a: w.gmem.read(*a), [("n", 0)], [1]),
    ("GuestMemfd.pread", lambda w, a: w.gmem.pread(*a), [("n", 0), ("offset", 1)], [1, 0]),
    ("GuestMemfd.pwrite", lambda w, a: w.gmem.pwrite(b"x", *a), [("offset", 0)], [0]),
    ("GuestMemfd.truncate", lambda w, a: w.gmem.truncate(*a), [("length", 0)], [16 * P]),
    ("Vcpu.complete_hypercall", lambda w, a: w.vcpu.complete_hypercall(*a), [("ret", 0)], [0]),
    ("Vm.set_nr_mmu_pages", lambda w, a: w.vm.set_nr_mmu_pages(*a), [("pages", 0)], [64]),
    (
        "Vcpu.pre_fault_memory",
        lambda w, a: w.vcpu.pre_fault_memory(*a),
        [("gpa", 0), ("size", 1), ("flags", 2)],
        [0, P, 0],
    ),
    ("Vcpu.set_mp_state", lambda w, a: w.vcpu.set_mp_state(*a), [("mp_state", 0)], [uapi.KVM_MP_STATE_RUNNABLE]),
    ("Vcpu.get_cpuid", lambda w, a: len(w.vcpu.get_cpuid(*a)), [("max_entries", 0)], [0]),  # before set_cpuid
]

#: Methods without integer parameters (or whose integers are not the kernel's), called once each.
OTHER_CALLS: list[tuple[str, Callable[[World], Any]]] = [
    ("System.supported_vm_types", lambda w: w.sys.supported_vm_types),
    ("System.get_supported_cpuid", lambda w: len(w.sys.get_supported_cpuid()) > 0),
    ("Vm.has_private_mem", lambda w: w.vm.has_private_mem),
    ("System.private_access_bit", lambda w: w.sys.private_access_bit),  # None on both (sim option off)
    ("Vm.private_access_bit", lambda w: w.vm.private_access_bit),
    ("GuestMemfd.write", lambda w: w.gmem.write(b"x")),
    ("GuestMemfd.stat", lambda w: (w.gmem.stat().st_size, w.gmem.stat().st_blksize, w.gmem.stat().st_nlink)),
    ("Vcpu.get_regs", lambda w: (w.vcpu.get_regs().rip, w.vcpu.get_regs().rflags)),
    ("Vcpu.set_regs", lambda w: w.vcpu.set_regs(w.vcpu.get_regs())),
    ("Vcpu.set_regs(wrong type)", lambda w: w.vcpu.set_regs(w.vcpu.get_sregs())),  # type: ignore[arg-type]
    ("Vcpu.get_sregs", lambda w: (w.vcpu.get_sregs().cr0, w.vcpu.get_sregs().cs.selector)),
    ("Vcpu.set_sregs", lambda w: w.vcpu.set_sregs(w.vcpu.get_sregs())),
    ("Vcpu.set_cpuid", lambda w: w.vcpu.set_cpuid()),
    ("Vcpu.complete_io", lambda w: w.vcpu.complete_io(b"\0")),
    ("Vcpu.complete_io(int)", lambda w: w.vcpu.complete_io(5)),  # type: ignore[arg-type]
    ("Vcpu.complete_mmio", lambda w: w.vcpu.complete_mmio(b"\0" * 4)),
    ("Vcpu.kick", lambda w: w.vcpu.kick()),
    ("Vm.create_irqchip", lambda w: w.vm.create_irqchip()),  # EINVAL: the World's VM has vCPUs
    ("Vm.get_tsc_khz", lambda w: w.vm.get_tsc_khz() > 0),  # the frequency itself is the host's
    ("Vcpu.get_tsc_khz", lambda w: w.vcpu.get_tsc_khz() == w.vm.get_tsc_khz()),
    ("Vcpu.get_mp_state", lambda w: w.vcpu.get_mp_state()),
]

#: Public methods this test does not call, and why.
NOT_CALLED = {
    # A fresh vCPU is in real-mode RESET state: KVM runs it (into whatever the BIOS area holds), the sim
    # follows it only to the first fetch (no memory there: the emulation-failure exit); run() takes no
    # arguments to marshal.
    "Vcpu.run",
    "System.close",
    "Vm.close",
    "GuestMemfd.close",
    "Vcpu.close",
    "System.closed",
    "Vm.closed",
    "GuestMemfd.closed",
    "Vcpu.closed",
    "GuestMemfd.allocated_bytes",  # not a kernel API (accounting), measured differently by design
    "GuestMemfd.fd",  # a number, different per process state
    "Vm.introspect",  # the sim's snapshot, None on kvm by design (tests/test_sim_only_options.py)
}


def _delete(w: World, slot: int, size: int) -> None:
    """Delete a memslot a call created, so the next call starts from the same memslots on both backends."""
    if size:
        w.vm.set_user_memory_region2(slot, 0, 0)


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """What a call did, comparable across backends: its result, or its exception's kind, errno and op."""
    try:
        result = call()
    except KvmError as e:
        return ("KvmError", errno.errorcode.get(e.errno or 0, e.errno), e.op)
    except (TypeError, ValueError) as e:
        return (type(e).__name__, str(e))
    close = getattr(result, "close", None)
    if callable(close):  # a new VM, vCPU, guest_memfd or mapping: which one is in the label
        close()
        return ("ok", "created")
    if isinstance(result, tuple) and all(r is None for r in result):  # a memslot call and its deletion
        return ("ok", None)
    if isinstance(result, frozenset):
        return ("ok", tuple(sorted(result)))
    return ("ok", result)


def calls() -> Iterator[tuple[str, Callable[[World], Any]]]:
    for name, call, params, base in INT_CALLS:
        yield f"{name}(base)", lambda w, _c=call, _a=list(base): _c(w, _a)
        for param, index in params:
            for value in edge_values(base[index]):
                args = list(base)
                args[index] = value
                yield f"{name}({param}={value:#x})", lambda w, _c=call, _a=args: _c(w, _a)
    yield from OTHER_CALLS


def run_all(backend: str) -> dict[str, tuple[Any, ...]]:
    w = World(backend)
    try:
        return {label: outcome(functools.partial(call, w)) for label, call in calls()}
    finally:
        w.close()


def test_every_public_method_is_called() -> None:
    called = {label.split("(")[0] for label, _ in calls()}
    public = set()
    for cls in (System, Vm, Vcpu, GuestMemfd):
        for name in dir(cls):
            if not name.startswith("_") and name not in ("backend", "selection_reason"):
                public.add(f"{cls.__name__}.{name}")
    missing = public - called - NOT_CALLED
    assert not missing, f"public methods this test never calls: {sorted(missing)}"


def test_both_backends_marshal_alike() -> None:
    """Same calls, same outcomes, on real KVM and on the sim imitating this host."""
    kvm = run_all("kvm")
    sim = run_all("sim")
    differ = [f"{label}: kvm {kvm[label]} / sim {sim[label]}" for label in kvm if kvm[label] != sim[label]]
    assert not differ, f"{len(differ)} of {len(kvm)} calls differ:\n" + "\n".join(differ)


def test_edge_values_catch_width_drift() -> None:
    """The derived values include one a 32-bit field would read as the base value, and one it refuses."""
    values = edge_values(uapi.KVM_CAP_GUEST_MEMFD)
    assert any(v != uapi.KVM_CAP_GUEST_MEMFD and v & 0xFFFFFFFF == uapi.KVM_CAP_GUEST_MEMFD for v in values)
    assert any(v >= 1 << 32 for v in values) and any(v < -(1 << 31) for v in values)


# --- the widths themselves, against the kernel ------------------------------------------------------------


def _raw(fd: int, request: int, arg: int) -> int:
    """A raw ioctl with a full 64-bit argument: its result, or -errno."""
    ret = ioctl_int(fd, request, arg & ((1 << 64) - 1))
    return ret if ret >= 0 else -ctypes.get_errno()


@pytest.fixture
def dev_kvm() -> Iterator[int]:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        pytest.skip(f"no usable /dev/kvm: {e}")
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", ["kvm", "sim"])
def test_ioctl_int_arguments_are_64_bit(dev_kvm: int, backend: str) -> None:
    """KVM_CHECK_EXTENSION, KVM_CREATE_VM and KVM_CREATE_VCPU read all 64 bits of their argument on this
    host's kernel, and both backends answer what it answers."""
    high = 1 << 32
    cap = uapi.KVM_CAP_USER_MEMORY
    assert _raw(dev_kvm, uapi.KVM_CHECK_EXTENSION, high | cap) == 0
    assert _raw(dev_kvm, uapi.KVM_CREATE_VM, high) == -errno.EINVAL
    vm_fd = _raw(dev_kvm, uapi.KVM_CREATE_VM, 0)
    assert vm_fd >= 0
    try:
        assert _raw(vm_fd, uapi.KVM_CREATE_VCPU, high) == -errno.EINVAL
    finally:
        os.close(vm_fd)

    system = open_backend(backend) if backend == "kvm" else kvmgmem.open("sim", profile="host")
    with system, system.create_vm() as vm:
        assert system.check_extension(high | cap) == 0
        assert vm.check_extension(high | cap) == 0
        for make in (lambda: system.create_vm(high), lambda: vm.create_vcpu(high)):
            with pytest.raises(KvmError) as info:
                make()
            assert info.value.errno == errno.EINVAL
