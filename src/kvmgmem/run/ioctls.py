"""The ioctl tables: one handler per request number, per kind of fd.

Each handler does what the kernel's ioctl does at the ABI: read the struct at ``arg`` (``copy_from_user``,
EFAULT for a bad pointer), call the API, write the results back, and return the ioctl's value. A request
no table knows gets the errno of the kernel's ``default:`` case for that kind of fd, measured on a 6.18
host: ``/dev/kvm`` EINVAL (``kvm_arch_dev_ioctl``), VM fd ENOTTY (``kvm_arch_vm_ioctl``), vCPU fd EINVAL
(``kvm_arch_vcpu_ioctl``), guest_memfd ENOTTY (no ``unlocked_ioctl``: ``vfs_ioctl``).

ioctls the Python API does not model are in ``gaps.py``, a separate table merged in at the end: the server
keeps their state itself.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmgmem import uapi
from kvmgmem.api import Pending, awaited_reply
from kvmgmem.errors import KvmError
from kvmgmem.exits import MemoryFaultExit

from . import gaps
from .fds import FileKind, placeholder
from .kvm_run_area import VCPU_MMAP_SIZE, KvmRunArea
from .objects import GmemState, VcpuState, VmRef
from .user import copy_from_user, copy_to_user, read_bytes, read_u32, write_field

if TYPE_CHECKING:
    from .server import Server

Handler = Callable[["Server", Any, int], int]

KVM_API_VERSION = 12


def _no_arg(arg: int, op: str) -> None:
    """ioctls that take no argument refuse a non-zero one with EINVAL (``if (arg) goto out``)."""
    if arg:
        raise KvmError(errno.EINVAL, op, "argument must be 0")


# --- /dev/kvm -------------------------------------------------------------------------------------------


def get_api_version(srv: Server, system: Any, arg: int) -> int:
    """KVM_GET_API_VERSION: 12 (EINVAL for a non-zero argument)."""
    _no_arg(arg, "KVM_GET_API_VERSION")
    return KVM_API_VERSION


def check_extension(srv: Server, obj: Any, arg: int) -> int:
    """KVM_CHECK_EXTENSION on /dev/kvm or a VM fd: the capability's value, 0 for caps not modelled."""
    target = obj.vm if isinstance(obj, VmRef) else obj
    return int(target.check_extension(arg))


def get_vcpu_mmap_size(srv: Server, system: Any, arg: int) -> int:
    """KVM_GET_VCPU_MMAP_SIZE: the run page, the PIO page and the coalesced MMIO page."""
    _no_arg(arg, "KVM_GET_VCPU_MMAP_SIZE")
    return VCPU_MMAP_SIZE


def create_vm(srv: Server, system: Any, arg: int) -> int:
    """KVM_CREATE_VM(type): a VM fd (O_CLOEXEC, as ``kvm_dev_ioctl_create_vm``'s anon inode)."""
    vm = system.create_vm(arg)
    try:
        fd = placeholder("kvm-vm")
    except OSError:
        vm.close()
        raise
    ref = VmRef(vm)
    srv.table.install(fd, FileKind.VM, ref, ref.put)
    srv.add_vm(ref)
    return fd


def get_supported_cpuid(srv: Server, system: Any, arg: int) -> int:
    """KVM_GET_SUPPORTED_CPUID: E2BIG when ``nent`` is too small (nent then unchanged), else the entries and
    the count written back (``kvm_dev_ioctl_get_cpuid``)."""
    op = "KVM_GET_SUPPORTED_CPUID"
    nent = read_u32(arg, op)
    entries = system.get_supported_cpuid()
    if nent < len(entries):
        raise KvmError(errno.E2BIG, op, f"nent {nent} < {len(entries)} entries")
    _write_cpuid(arg, entries, op)
    return 0


def _write_cpuid(arg: int, entries: list[uapi.kvm_cpuid_entry2], op: str) -> None:
    """Fill a ``struct kvm_cpuid2`` at ``arg``: the entries, then ``nent``."""
    array = (uapi.kvm_cpuid_entry2 * len(entries))(*entries)
    copy_to_user(arg + ctypes.sizeof(uapi.kvm_cpuid2), array, op)
    write_field(arg, len(entries), 4, op)


# --- VM fd ----------------------------------------------------------------------------------------------


def set_user_memory_region(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_SET_USER_MEMORY_REGION with the program's own address as userspace (see ``guest_memory``)."""
    r = copy_from_user(uapi.kvm_userspace_memory_region, arg, "KVM_SET_USER_MEMORY_REGION")
    user = srv.memory.userspace_for(r.userspace_addr, r.memory_size, r.flags)
    ref.vm.set_user_memory_region(r.slot, r.guest_phys_addr, r.memory_size, user, r.flags)
    return 0


def set_user_memory_region2(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_SET_USER_MEMORY_REGION2: as v1, plus the guest_memfd fd number and offset (the program's fd)."""
    r = copy_from_user(uapi.kvm_userspace_memory_region2, arg, "KVM_SET_USER_MEMORY_REGION2")
    user = srv.memory.userspace_for(r.userspace_addr, r.memory_size, r.flags)
    gmem = ctypes.c_int32(r.guest_memfd).value  # the kernel reads the __u32 as an int fd
    ref.vm.set_user_memory_region2(r.slot, r.guest_phys_addr, r.memory_size, user, r.flags, gmem, r.guest_memfd_offset)
    return 0


def create_guest_memfd(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_CREATE_GUEST_MEMFD: a guest_memfd fd without O_CLOEXEC (``kvm_gmem_create``); the reserved words
    are not checked, as on the kernel."""
    args = copy_from_user(uapi.kvm_create_guest_memfd, arg, "KVM_CREATE_GUEST_MEMFD")
    gmem = ref.vm.create_guest_memfd(args.size, args.flags)
    try:
        fd = srv.dup_noexec(gmem.fd)
    except OSError:
        gmem.close()
        raise
    srv.table.install(fd, FileKind.GMEM, GmemState(gmem), gmem.close)
    return fd


def set_memory_attributes(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_SET_MEMORY_ATTRIBUTES."""
    a = copy_from_user(uapi.kvm_memory_attributes, arg, "KVM_SET_MEMORY_ATTRIBUTES")
    ref.vm.set_memory_attributes(a.address, a.size, a.attributes, a.flags)
    return 0


def enable_cap_vm(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_ENABLE_CAP on the VM fd: ``KVM_CAP_EXIT_HYPERCALL`` and ``KVM_CAP_DISABLE_QUIRKS``/``DISABLE_QUIRKS2``;
    others EINVAL."""
    cap = copy_from_user(uapi.kvm_enable_cap, arg, "KVM_ENABLE_CAP")
    ref.vm.enable_cap(cap.cap, *cap.args, flags=cap.flags)
    return 0


def create_irqchip(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_CREATE_IRQCHIP (the argument is not read, as ``kvm_arch_vm_ioctl``)."""
    ref.vm.create_irqchip()
    return 0


def set_nr_mmu_pages(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_SET_NR_MMU_PAGES(pages)."""
    ref.vm.set_nr_mmu_pages(arg)
    return 0


def create_vcpu(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_CREATE_VCPU(id): a vCPU fd whose file is also its ``kvm_run`` area; the vCPU holds the VM."""
    vcpu = ref.vm.create_vcpu(arg)
    ref.created_vcpus += 1  # the id stays taken even if the fd below cannot be made
    try:
        fd = placeholder(f"kvm-vcpu:{arg}", VCPU_MMAP_SIZE)
    except OSError:
        vcpu.close()
        raise
    try:
        area = KvmRunArea(fd)
    except OSError:
        vcpu.close()
        srv.os_close(fd)
        raise
    ref.get()
    state = VcpuState(vcpu, ref, area)
    if "tsc_khz" in ref.extra:  # kvm_arch_vcpu_create: the VM's default frequency at creation
        state.extra["tsc_khz"] = ref.extra["tsc_khz"]
    srv.table.install(fd, FileKind.VCPU, state, state.release)
    return fd


# --- vCPU fd --------------------------------------------------------------------------------------------


def run(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_RUN as ``kvm_arch_vcpu_ioctl_run``: sync_regs are not modelled (EINVAL for any
    ``kvm_valid_regs``/``kvm_dirty_regs`` bit, as for bits outside the supported set), complete the reply the
    last exit waited for (``complete_userspace_io``), then ``immediate_exit`` fails with EINTR *without*
    touching ``exit_reason`` (the selftests' ``vcpu_run_complete_io`` relies on it), then ``vcpu_run``: reset
    ``exit_reason`` to KVM_EXIT_UNKNOWN (so a failure with no exit, such as a bare EFAULT, leaves 0 there, not
    the previous exit), run, and write the exit into ``kvm_run``. A signal or kick during the run is EINTR with
    ``KVM_EXIT_INTR``
    (``kvm_handle_signal_exit``). A memory fault fails with EFAULT or EHWPOISON with the exit filled
    (``kvm_prepare_memory_fault_exit``)."""
    op = "KVM_RUN"
    _no_arg(arg, op)
    vcpu, area = state.vcpu, state.area
    if area.run.kvm_valid_regs or area.run.kvm_dirty_regs:
        raise KvmError(errno.EINVAL, op, "kvm_valid_regs/kvm_dirty_regs: sync_regs is not modelled")
    if state.pending is not None:
        kind, length = state.pending, state.pending_length
        state.pending = None
        if kind == Pending.IO_IN:
            vcpu.complete_io(area.io_in_data(length))
        elif kind == Pending.MMIO_READ:
            vcpu.complete_mmio(area.mmio_read_data(length))
        else:
            vcpu.complete_hypercall(area.hypercall_ret())
    if area.immediate_exit:
        raise KvmError(errno.EINTR, op, "immediate_exit")
    state.extra["ran"] = True
    area.run.exit_reason = uapi.KVM_EXIT_UNKNOWN
    start = srv.trace_now()
    srv.kicks.enter(state)
    try:
        exit = vcpu.run()
    except KvmError as e:
        if e.errno == errno.EINTR:
            area.write_intr()
        srv.trace_exit(vcpu.vcpu_id, start, {"error": errno.errorcode.get(e.errno or 0, e.errno)})
        raise
    finally:
        srv.kicks.leave(state)
    srv.trace_exit(vcpu.vcpu_id, start, _exit_args(exit))
    area.write_exit(exit)
    if isinstance(exit, MemoryFaultExit):
        raise KvmError(exit.errno, op, f"memory fault at gpa {exit.gpa:#x}")
    state.pending, state.pending_length = awaited_reply(exit)
    return 0


def _exit_args(exit: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"exit": type(exit).__name__}
    for name in ("port", "phys_addr", "gpa", "nr", "suberror", "type", "flags"):
        value = getattr(exit, name, None)
        if isinstance(value, int):
            args[name] = hex(value)
    return args


def get_regs(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_GET_REGS."""
    copy_to_user(arg, state.vcpu.get_regs(), "KVM_GET_REGS")
    return 0


def set_regs(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_SET_REGS."""
    state.vcpu.set_regs(copy_from_user(uapi.kvm_regs, arg, "KVM_SET_REGS"))
    return 0


def get_sregs(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_GET_SREGS."""
    copy_to_user(arg, state.vcpu.get_sregs(), "KVM_GET_SREGS")
    return 0


def set_sregs(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_SET_SREGS."""
    state.vcpu.set_sregs(copy_from_user(uapi.kvm_sregs, arg, "KVM_SET_SREGS"))
    return 0


def set_cpuid2(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_SET_CPUID2: E2BIG past KVM_MAX_CPUID_ENTRIES (``kvm_vcpu_ioctl_set_cpuid2``), else the entries."""
    op = "KVM_SET_CPUID2"
    nent = read_u32(arg, op)
    if nent > uapi.KVM_MAX_CPUID_ENTRIES:
        raise KvmError(errno.E2BIG, op, f"nent {nent} > {uapi.KVM_MAX_CPUID_ENTRIES}")
    size = ctypes.sizeof(uapi.kvm_cpuid_entry2)
    raw = read_bytes(arg + ctypes.sizeof(uapi.kvm_cpuid2), nent * size, op)
    entries = [uapi.kvm_cpuid_entry2.from_buffer_copy(raw, i * size) for i in range(nent)]
    state.vcpu.set_cpuid(entries)
    return 0


def get_cpuid2(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_GET_CPUID2: the entries last set; E2BIG (nent unchanged) when ``nent`` is too small."""
    op = "KVM_GET_CPUID2"
    _write_cpuid(arg, state.vcpu.get_cpuid(read_u32(arg, op)), op)
    return 0


def pre_fault_memory(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_PRE_FAULT_MEMORY: map the range as a fault would; ``gpa``/``size`` written back as it goes."""
    op = "KVM_PRE_FAULT_MEMORY"
    r = copy_from_user(uapi.kvm_pre_fault_memory, arg, op)
    r.gpa, r.size = state.vcpu.pre_fault_memory(r.gpa, r.size, r.flags)
    copy_to_user(arg, r, op)
    return 0


def get_mp_state(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_GET_MP_STATE."""
    copy_to_user(arg, uapi.kvm_mp_state(state.vcpu.get_mp_state()), "KVM_GET_MP_STATE")
    return 0


def set_mp_state(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_SET_MP_STATE."""
    state.vcpu.set_mp_state(copy_from_user(uapi.kvm_mp_state, arg, "KVM_SET_MP_STATE").mp_state)
    return 0


SYSTEM: dict[int, Handler] = {
    uapi.KVM_GET_API_VERSION: get_api_version,
    uapi.KVM_CHECK_EXTENSION: check_extension,
    uapi.KVM_GET_VCPU_MMAP_SIZE: get_vcpu_mmap_size,
    uapi.KVM_CREATE_VM: create_vm,
    uapi.KVM_GET_SUPPORTED_CPUID: get_supported_cpuid,
}

VM: dict[int, Handler] = {
    uapi.KVM_CHECK_EXTENSION: check_extension,
    uapi.KVM_SET_USER_MEMORY_REGION: set_user_memory_region,
    uapi.KVM_SET_USER_MEMORY_REGION2: set_user_memory_region2,
    uapi.KVM_CREATE_GUEST_MEMFD: create_guest_memfd,
    uapi.KVM_SET_MEMORY_ATTRIBUTES: set_memory_attributes,
    uapi.KVM_ENABLE_CAP: enable_cap_vm,
    uapi.KVM_CREATE_VCPU: create_vcpu,
    uapi.KVM_CREATE_IRQCHIP: create_irqchip,
    uapi.KVM_SET_NR_MMU_PAGES: set_nr_mmu_pages,
}

VCPU: dict[int, Handler] = {
    uapi.KVM_RUN: run,
    uapi.KVM_GET_REGS: get_regs,
    uapi.KVM_SET_REGS: set_regs,
    uapi.KVM_GET_SREGS: get_sregs,
    uapi.KVM_SET_SREGS: set_sregs,
    uapi.KVM_SET_CPUID2: set_cpuid2,
    uapi.KVM_GET_CPUID2: get_cpuid2,
    uapi.KVM_PRE_FAULT_MEMORY: pre_fault_memory,
    uapi.KVM_GET_MP_STATE: get_mp_state,
    uapi.KVM_SET_MP_STATE: set_mp_state,
}

for _table, _extra in ((SYSTEM, gaps.SYSTEM), (VM, gaps.VM), (VCPU, gaps.VCPU)):
    assert not _table.keys() & _extra.keys(), "one handler per ioctl"
    _table.update(_extra)

TABLES: dict[FileKind, dict[int, Handler]] = {
    FileKind.SYSTEM: SYSTEM,
    FileKind.VM: VM,
    FileKind.VCPU: VCPU,
    FileKind.GMEM: {},
    FileKind.SYSFS: {},
}

#: The errno of each kind's ``default:`` case (module docstring).
UNKNOWN_ERRNO: dict[FileKind, int] = {
    FileKind.SYSTEM: errno.EINVAL,
    FileKind.VM: errno.ENOTTY,
    FileKind.VCPU: errno.EINVAL,
    FileKind.GMEM: errno.ENOTTY,
    FileKind.SYSFS: errno.ENOTTY,
}
