"""The uAPI ``kvmgmem run`` serves beyond ``kvmgmem.uapi``: x86 vCPU state structs and their ioctl numbers.

Why here and not in ``uapi``: these are ioctls a C program sends that the Python API does not model (MSRs,
FPU, XCRs, LAPIC, ...); only the server reads their structs. Numbers are computed from the structs with the
kernel's ``_IOC`` encoding, as in ``uapi`` (arch/x86/include/uapi/asm/kvm.h, include/uapi/linux/kvm.h).
"""

from __future__ import annotations

from ctypes import Structure, c_uint8, c_uint32, c_uint64, sizeof

from kvmgmem import uapi
from kvmgmem.uapi import _IO, _IOR, _IOW, _IOWR, KVMIO


class kvm_msr_list(Structure):
    """Header of ``struct kvm_msr_list``: ``nmsrs`` then ``__u32 indices[]``."""

    _fields_ = [("nmsrs", c_uint32)]


class kvm_msr_entry(Structure):
    """``struct kvm_msr_entry``: one MSR index and value."""

    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(Structure):
    """Header of ``struct kvm_msrs``: ``nmsrs``, padding, then ``struct kvm_msr_entry entries[]``."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_fpu(Structure):
    """``struct kvm_fpu`` (416 bytes): x87/SSE state for KVM_GET_FPU/KVM_SET_FPU."""

    _fields_ = [
        ("fpr", c_uint8 * 128),
        ("fcw", c_uint8 * 2),
        ("fsw", c_uint8 * 2),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint8 * 2),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", c_uint8 * 256),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_xcr(Structure):
    """``struct kvm_xcr``: one extended control register."""

    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(Structure):
    """``struct kvm_xcrs`` (392 bytes): KVM_GET_XCRS/KVM_SET_XCRS."""

    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", kvm_xcr * 16), ("padding", c_uint64 * 16)]


class kvm_lapic_state(Structure):
    """``struct kvm_lapic_state``: the 1 KiB APIC register page."""

    _fields_ = [("regs", c_uint8 * 1024)]


class kvm_debugregs(Structure):
    """``struct kvm_debugregs`` (128 bytes)."""

    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class kvm_vcpu_events(Structure):
    """``struct kvm_vcpu_events`` (64 bytes), kept as bytes: the sim injects no events."""

    _fields_ = [("raw", c_uint8 * 64)]


class kvm_xsave(Structure):
    """``struct kvm_xsave``: the 4 KiB legacy XSAVE area (KVM_GET_XSAVE2 may use more)."""

    _fields_ = [("region", c_uint32 * 1024)]


assert sizeof(kvm_fpu) == 416 and sizeof(kvm_xcrs) == 392 and sizeof(kvm_vcpu_events) == 64

KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, kvm_msr_list)
KVM_GET_NR_MMU_PAGES = _IO(KVMIO, 0x45)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, kvm_xsave)

KVM_MAX_MSR_ENTRIES = 255  # MAX_IO_MSRS: msr_io refuses more with E2BIG

#: Names of every ioctl the server knows, for traces and messages.
NAMES: dict[int, str] = dict(uapi.IOCTL_NAMES)
NAMES.update({value: name for name, value in dict(globals()).items() if name.startswith("KVM_") and name.isupper()
              and isinstance(value, int) and value > 0xFFFF})  # fmt: skip
NAMES.update({
    KVM_GET_NR_MMU_PAGES: "KVM_GET_NR_MMU_PAGES", KVM_SET_TSS_ADDR: "KVM_SET_TSS_ADDR",
    KVM_SET_TSC_KHZ: "KVM_SET_TSC_KHZ",
})  # fmt: skip


def ioctl_name(request: int) -> str:
    """The ioctl's name (``KVM_RUN``), or its number in hex."""
    return NAMES.get(request, f"ioctl {request:#x}")
