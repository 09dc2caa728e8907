"""ioctls the Python API does not model, answered at the ABI with the kernel's semantics.

Why a separate table: these are kernel features the sim has no model of (setting the TSC frequency,
MSR/FPU/XCR/LAPIC state the sim's CPU does not take from the VMM, the real-mode TSS). A C program's library
(the KVM selftests' ``kvm_util``) sends them while setting a vCPU up, so they must answer as the kernel does:
state a VMM sets is kept here, in the server's ``VmRef``/``VcpuState``, and read back; values the kernel
would refuse get its errno. ioctls the API has (``KVM_CREATE_IRQCHIP``, ``KVM_GET_MP_STATE``, ...) are plain
translations in ``ioctls.py``, which merges this table into its own.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from . import abi
from .user import copy_from_user, copy_to_user, read_bytes, read_u32, write_field

if TYPE_CHECKING:
    from .objects import VcpuState, VmRef
    from .server import Server

Handler = Callable[["Server", Any, int], int]

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103

#: MSRs a vCPU has (KVM_GET_MSR_INDEX_LIST) and their reset values.
MSR_RESET: dict[int, int] = {
    MSR_IA32_TSC: 0,
    MSR_IA32_APICBASE: 0xFEE00900,
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_IA32_MISC_ENABLE: 1,  # fast strings, as kvm_vcpu_reset
    MSR_IA32_CR_PAT: 0x0007040600070406,
    MSR_EFER: 0,
    MSR_STAR: 0,
    MSR_LSTAR: 0,
    MSR_CSTAR: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_FS_BASE: 0,
    MSR_GS_BASE: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_TSC_AUX: 0,
}
#: MSRs the sim's CPU holds in its segment/control state (read from and written to the sregs).
_SREGS_MSRS = {MSR_EFER: ("efer", None), MSR_FS_BASE: ("fs", "base"), MSR_GS_BASE: ("gs", "base")}


# --- /dev/kvm -------------------------------------------------------------------------------------------


def _msr_list(arg: int, indices: list[int], op: str) -> int:
    """``kvm_msr_list``: E2BIG (with ``nmsrs`` set to the count) when the caller's room is too small."""
    room = read_u32(arg, op)
    write_field(arg, len(indices), 4, op)
    if room < len(indices):
        raise KvmError(errno.E2BIG, op, f"nmsrs {room} < {len(indices)}")
    copy_to_user(arg + 4, (ctypes.c_uint32 * len(indices))(*indices), op)
    return 0


def get_msr_index_list(srv: Server, system: Any, arg: int) -> int:
    """KVM_GET_MSR_INDEX_LIST: the MSRs a vCPU saves/restores (``kvm_arch_dev_ioctl``)."""
    return _msr_list(arg, sorted(MSR_RESET), "KVM_GET_MSR_INDEX_LIST")


def get_msr_feature_index_list(srv: Server, system: Any, arg: int) -> int:
    """KVM_GET_MSR_FEATURE_INDEX_LIST: the sim exposes no feature MSRs."""
    return _msr_list(arg, [], "KVM_GET_MSR_FEATURE_INDEX_LIST")


def get_feature_msrs(srv: Server, system: Any, arg: int) -> int:
    """KVM_GET_MSRS on /dev/kvm (feature MSRs): none exist, so 0 entries are processed."""
    op = "KVM_GET_MSRS"
    header = copy_from_user(abi.kvm_msrs, arg, op)
    if header.nmsrs > abi.KVM_MAX_MSR_ENTRIES:
        raise KvmError(errno.E2BIG, op, f"nmsrs {header.nmsrs}")
    return 0


# --- VM fd ----------------------------------------------------------------------------------------------


def vm_get_tsc_khz(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_GET_TSC_KHZ on the VM fd: the default frequency of new vCPUs (as last set, else the sim's)."""
    if "tsc_khz" in ref.extra:
        return int(ref.extra["tsc_khz"])
    return ref.vm.get_tsc_khz()


def vm_set_tsc_khz(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_SET_TSC_KHZ on the VM fd: the default of vCPUs created later; the u32 argument, 0 meaning the
    host's frequency; EINVAL once a vCPU exists (``kvm_arch_vm_ioctl``). TSC scaling has no upper limit here."""
    khz = arg & 0xFFFFFFFF
    if ref.created_vcpus:
        raise KvmError(errno.EINVAL, "KVM_SET_TSC_KHZ", "vCPUs already created")
    ref.extra["tsc_khz"] = khz or ref.vm.get_tsc_khz()  # the model's nominal frequency (the kernel's tsc_khz)
    return 0


def set_tss_addr(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_SET_TSS_ADDR: recorded (the sim's CPU needs no real-mode TSS)."""
    ref.extra["tss_addr"] = arg
    return 0


def set_identity_map_addr(srv: Server, ref: VmRef, arg: int) -> int:
    """KVM_SET_IDENTITY_MAP_ADDR: reads the u64 (EFAULT for a bad pointer), EINVAL once vCPUs exist."""
    op = "KVM_SET_IDENTITY_MAP_ADDR"
    value = int.from_bytes(read_bytes(arg, 8, op), "little")
    if ref.created_vcpus:
        raise KvmError(errno.EINVAL, op, "vCPUs already created")
    ref.extra["identity_map_addr"] = value
    return 0


# --- vCPU fd --------------------------------------------------------------------------------------------


def vcpu_get_tsc_khz(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_GET_TSC_KHZ on a vCPU: its frequency (as last set, else the VM's default when it was created)."""
    if "tsc_khz" in state.extra:
        return int(state.extra["tsc_khz"])
    return state.vcpu.get_tsc_khz()


def vcpu_set_tsc_khz(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_SET_TSC_KHZ on a vCPU: the u32 argument, 0 meaning the host's frequency."""
    state.extra["tsc_khz"] = (arg & 0xFFFFFFFF) or state.vcpu.get_tsc_khz()
    return 0


def _msrs(state: VcpuState) -> dict[int, int]:
    msrs: dict[int, int] = state.extra.setdefault("msrs", dict(MSR_RESET))
    return msrs


def _msr_io(state: VcpuState, arg: int, op: str, write: bool) -> int:
    """``msr_io``: E2BIG past MAX_IO_MSRS; processes entries until the first MSR it cannot access and
    returns how many it processed (``__msr_io``)."""
    header = copy_from_user(abi.kvm_msrs, arg, op)
    n = header.nmsrs
    if n > abi.KVM_MAX_MSR_ENTRIES:
        raise KvmError(errno.E2BIG, op, f"nmsrs {n} > {abi.KVM_MAX_MSR_ENTRIES}")
    base = arg + ctypes.sizeof(abi.kvm_msrs)
    entries = copy_from_user(abi.kvm_msr_entry * n, base, op) if n else (abi.kvm_msr_entry * 0)()
    msrs = _msrs(state)
    done = 0
    sregs = None
    for entry in entries:
        if entry.index not in msrs:
            break
        where = _SREGS_MSRS.get(entry.index)
        if where is not None:
            sregs = sregs or state.vcpu.get_sregs()
            holder = getattr(sregs, where[0]) if where[1] else sregs
            field = where[1] or where[0]
            if write:
                setattr(holder, field, entry.data)
            else:
                entry.data = getattr(holder, field)
        elif write:
            msrs[entry.index] = entry.data
        else:
            entry.data = msrs[entry.index]
        done += 1
    if write and sregs is not None:
        state.vcpu.set_sregs(sregs)
    if not write and n:
        copy_to_user(base, entries, op)
    return done


def get_msrs(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_GET_MSRS: the number of MSRs read."""
    return _msr_io(state, arg, "KVM_GET_MSRS", write=False)


def set_msrs(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_SET_MSRS: the number of MSRs written (EFER, FS/GS base go to the CPU's state)."""
    return _msr_io(state, arg, "KVM_SET_MSRS", write=True)


def _blob_get(name: str, ctype: Any, default: Callable[[], Any], op: str) -> Handler:
    def handler(srv: Server, state: VcpuState, arg: int) -> int:
        value = state.extra.get(name)
        copy_to_user(arg, value if value is not None else default(), op)
        return 0

    handler.__doc__ = f"{op}: the state last set (reset state before), read back unchanged."
    return handler


def _blob_set(name: str, ctype: Any, op: str, needs_lapic: bool = False) -> Handler:
    def handler(srv: Server, state: VcpuState, arg: int) -> int:
        if needs_lapic and not state.vm.vm.irqchip:
            raise KvmError(errno.EINVAL, op, "no in-kernel LAPIC (KVM_CREATE_IRQCHIP first)")
        state.extra[name] = copy_from_user(ctype, arg, op)
        return 0

    handler.__doc__ = f"{op}: stored for the matching GET (the sim's CPU does not take it)."
    return handler


def _fpu_reset() -> abi.kvm_fpu:
    fpu = abi.kvm_fpu()
    fpu.fcw[0], fpu.fcw[1] = 0x7F, 0x03  # FCW 0x37f after RESET
    fpu.mxcsr = 0x1F80
    return fpu


def _lapic_get(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_GET_LAPIC: EINVAL without an in-kernel LAPIC, else the register page last set."""
    op = "KVM_GET_LAPIC"
    if not state.vm.vm.irqchip:
        raise KvmError(errno.EINVAL, op, "no in-kernel LAPIC (KVM_CREATE_IRQCHIP first)")
    copy_to_user(arg, state.extra.get("lapic") or abi.kvm_lapic_state(), op)
    return 0


XFEATURE_MASK_FP = 1


def _has_xsave(srv: Server) -> bool:
    """``boot_cpu_has(X86_FEATURE_XSAVE)`` for the sim: CPUID.1:ECX bit 26 of its supported table."""
    return any(e.function == 1 and e.ecx >> 26 & 1 for e in srv.system.get_supported_cpuid())


def get_xcrs(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_GET_XCRS (``kvm_vcpu_ioctl_x86_get_xcrs``): no XCRs without XSAVE, else XCR0."""
    xcrs = abi.kvm_xcrs()
    if _has_xsave(srv):
        xcrs.nr_xcrs = 1
        xcrs.xcrs[0].value = state.extra.get("xcr0", XFEATURE_MASK_FP)
    copy_to_user(arg, xcrs, "KVM_GET_XCRS")
    return 0


def set_xcrs(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_SET_XCRS (``kvm_vcpu_ioctl_x86_set_xcrs``): EINVAL without XSAVE, for more than 16 XCRs or
    flags, and for an XCR0 without x87 (``__kvm_set_xcr``); XCR0 is stored, not given to the sim's CPU."""
    op = "KVM_SET_XCRS"
    xcrs = copy_from_user(abi.kvm_xcrs, arg, op)
    if not _has_xsave(srv):
        raise KvmError(errno.EINVAL, op, "no XSAVE in the sim's CPUID")
    if xcrs.nr_xcrs > 16 or xcrs.flags:
        raise KvmError(errno.EINVAL, op, f"nr_xcrs {xcrs.nr_xcrs}, flags {xcrs.flags:#x}")
    for i in range(xcrs.nr_xcrs):
        if xcrs.xcrs[i].xcr == 0:
            if not xcrs.xcrs[i].value & XFEATURE_MASK_FP:
                raise KvmError(errno.EINVAL, op, "XCR0 without x87")
            state.extra["xcr0"] = xcrs.xcrs[i].value
            break
    return 0


def enable_cap_vcpu(srv: Server, state: VcpuState, arg: int) -> int:
    """KVM_ENABLE_CAP on a vCPU: no per-vCPU capability is modelled (EINVAL, ``kvm_vcpu_ioctl_enable_cap``)."""
    cap = copy_from_user(uapi.kvm_enable_cap, arg, "KVM_ENABLE_CAP")
    raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"vCPU capability {cap.cap} is not modelled")


SYSTEM: dict[int, Handler] = {
    abi.KVM_GET_MSR_INDEX_LIST: get_msr_index_list,
    abi.KVM_GET_MSR_FEATURE_INDEX_LIST: get_msr_feature_index_list,
    abi.KVM_GET_MSRS: get_feature_msrs,
}

VM: dict[int, Handler] = {
    uapi.KVM_GET_TSC_KHZ: vm_get_tsc_khz,
    abi.KVM_SET_TSC_KHZ: vm_set_tsc_khz,
    abi.KVM_SET_TSS_ADDR: set_tss_addr,
    abi.KVM_SET_IDENTITY_MAP_ADDR: set_identity_map_addr,
}

VCPU: dict[int, Handler] = {
    uapi.KVM_GET_TSC_KHZ: vcpu_get_tsc_khz,
    abi.KVM_SET_TSC_KHZ: vcpu_set_tsc_khz,
    abi.KVM_GET_MSRS: get_msrs,
    abi.KVM_SET_MSRS: set_msrs,
    abi.KVM_GET_FPU: _blob_get("fpu", abi.kvm_fpu, _fpu_reset, "KVM_GET_FPU"),
    abi.KVM_SET_FPU: _blob_set("fpu", abi.kvm_fpu, "KVM_SET_FPU"),
    abi.KVM_GET_LAPIC: _lapic_get,
    abi.KVM_SET_LAPIC: _blob_set("lapic", abi.kvm_lapic_state, "KVM_SET_LAPIC", needs_lapic=True),
    abi.KVM_GET_DEBUGREGS: _blob_get("debugregs", abi.kvm_debugregs, abi.kvm_debugregs, "KVM_GET_DEBUGREGS"),
    abi.KVM_SET_DEBUGREGS: _blob_set("debugregs", abi.kvm_debugregs, "KVM_SET_DEBUGREGS"),
    abi.KVM_GET_VCPU_EVENTS: _blob_get("events", abi.kvm_vcpu_events, abi.kvm_vcpu_events, "KVM_GET_VCPU_EVENTS"),
    abi.KVM_SET_VCPU_EVENTS: _blob_set("events", abi.kvm_vcpu_events, "KVM_SET_VCPU_EVENTS"),
    abi.KVM_GET_XSAVE: _blob_get("xsave", abi.kvm_xsave, abi.kvm_xsave, "KVM_GET_XSAVE"),
    abi.KVM_GET_XSAVE2: _blob_get("xsave", abi.kvm_xsave, abi.kvm_xsave, "KVM_GET_XSAVE2"),
    abi.KVM_SET_XSAVE: _blob_set("xsave", abi.kvm_xsave, "KVM_SET_XSAVE"),
    abi.KVM_GET_XCRS: get_xcrs,
    abi.KVM_SET_XCRS: set_xcrs,
    uapi.KVM_ENABLE_CAP: enable_cap_vcpu,
}
