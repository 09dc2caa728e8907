"""KVM uAPI numbers and struct layouts (include/uapi/linux/kvm.h) — the single source of truth.

Every ioctl number is computed from the struct it carries with the kernel's ``_IOC`` encoding, never typed
in, so a layout mistake shows up as a wrong ioctl number in the tests instead of a silent EINVAL at run time.
Both backends import from here: the kvm backend marshals these structs into ioctls, the sim backend reads
the same structs so that raw-struct callers (fuzzers, differential tests) see one ABI.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    Structure,
    Union,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    sizeof,
)
from typing import Any

# --- ioctl encoding (_IOC, include/uapi/asm-generic/ioctl.h) --------------------------------------------------

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOW(type_: int, nr: int, struct: Any) -> int:
    return _IOC(_IOC_WRITE, type_, nr, sizeof(struct))


def _IOR(type_: int, nr: int, struct: Any) -> int:
    return _IOC(_IOC_READ, type_, nr, sizeof(struct))


def _IOWR(type_: int, nr: int, struct: Any) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, sizeof(struct))


# --- constants (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h, x86/hypercalls.rst) -------------

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MASK64 = (1 << 64) - 1  # a u64's bits: wraps an address or a register value as the hardware does
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
KVM_USER_MEM_SLOTS = 32764
KVM_MEM_SLOTS_NUM = 32767

# memslot flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_SET_USER_MEMORY_REGION_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY

# memory attributes
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# guest_memfd creation flags (6.18+)
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0

# fallocate modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_NO_HIDE_STALE = 0x04
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40

# capabilities (include/uapi/linux/kvm.h)
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_DISABLE_QUIRKS = 116
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_DISABLE_QUIRKS2 = 213
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_GUEST_MEMFD_FLAGS = 244

#: The caps `kvmgmem caps` reports, in include/uapi/linux/kvm.h order, by name.
CAPS: dict[str, int] = {
    "USER_MEMORY": KVM_CAP_USER_MEMORY,
    "NR_MEMSLOTS": KVM_CAP_NR_MEMSLOTS,
    "READONLY_MEM": KVM_CAP_READONLY_MEM,
    "CHECK_EXTENSION_VM": KVM_CAP_CHECK_EXTENSION_VM,
    "DISABLE_QUIRKS": KVM_CAP_DISABLE_QUIRKS,
    "MULTI_ADDRESS_SPACE": KVM_CAP_MULTI_ADDRESS_SPACE,
    "EXIT_HYPERCALL": KVM_CAP_EXIT_HYPERCALL,
    "DISABLE_QUIRKS2": KVM_CAP_DISABLE_QUIRKS2,
    "USER_MEMORY2": KVM_CAP_USER_MEMORY2,
    "MEMORY_FAULT_INFO": KVM_CAP_MEMORY_FAULT_INFO,
    "MEMORY_ATTRIBUTES": KVM_CAP_MEMORY_ATTRIBUTES,
    "GUEST_MEMFD": KVM_CAP_GUEST_MEMFD,
    "VM_TYPES": KVM_CAP_VM_TYPES,
    "PRE_FAULT_MEMORY": KVM_CAP_PRE_FAULT_MEMORY,
    "GUEST_MEMFD_FLAGS": KVM_CAP_GUEST_MEMFD_FLAGS,
}

# exit reasons (include/uapi/linux/kvm.h)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_NOTIFY = 37
KVM_EXIT_MEMORY_FAULT = 39

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.internal.suberror
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

# kvm_mp_state.mp_state (x86 uses RUNNABLE..SIPI_RECEIVED and AP_RESET_HOLD)
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_MP_STATE_AP_RESET_HOLD = 9

#: kvm_cpuid_entry2.flags: the entry applies only to its ``index`` (the kernel's spelling, sic).
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0

#: Entries a KVM_SET_CPUID2 / KVM_GET_SUPPORTED_CPUID table may have (arch/x86/include/asm/kvm_host.h).
KVM_MAX_CPUID_ENTRIES = 256
#: KVM_SET_NR_MMU_PAGES' minimum (KVM_MIN_ALLOC_MMU_PAGES, arch/x86/include/asm/kvm_host.h).
KVM_MIN_ALLOC_MMU_PAGES = 64

# x86 VM types (arch/x86/include/uapi/asm/kvm.h)
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5
VM_TYPE_NAMES: dict[int, str] = {
    KVM_X86_DEFAULT_VM: "DEFAULT",
    KVM_X86_SW_PROTECTED_VM: "SW_PROTECTED",
    KVM_X86_SEV_VM: "SEV",
    KVM_X86_SEV_ES_VM: "SEV_ES",
    KVM_X86_SNP_VM: "SNP",
    KVM_X86_TDX_VM: "TDX",
}
#: VM types whose memory can be private (arch/x86/include/uapi/asm/kvm.h).
PRIVATE_MEM_VM_TYPES = frozenset({KVM_X86_SW_PROTECTED_VM, KVM_X86_SNP_VM, KVM_X86_TDX_VM})

# x86 quirks, the bits of KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2)'s args[0] (arch/x86/include/uapi/asm/kvm.h)
KVM_X86_QUIRK_LINT0_REENABLED = 1 << 0
KVM_X86_QUIRK_CD_NW_CLEARED = 1 << 1
KVM_X86_QUIRK_LAPIC_MMIO_HOLE = 1 << 2
KVM_X86_QUIRK_OUT_7E_INC_RIP = 1 << 3
KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT = 1 << 4
KVM_X86_QUIRK_FIX_HYPERCALL_INSN = 1 << 5
KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS = 1 << 6
KVM_X86_QUIRK_SLOT_ZAP_ALL = 1 << 7
KVM_X86_QUIRK_STUFF_FEATURE_MSRS = 1 << 8
KVM_X86_QUIRK_IGNORE_GUEST_PAT = 1 << 9
KVM_X86_QUIRK_VMCS12_ALLOW_FREEZE_IN_SMM = 1 << 10
KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT = 1 << 11

# hypercalls (Documentation/virt/kvm/x86/hypercalls.rst)
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 2
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0
KVM_ENOSYS = 1000
KVM_EINVAL = 22
KVM_EPERM = 1
KVM_FEATURE_HC_MAP_GPA_RANGE = 16

# errnos the kernel returns here that Python's errno module may lack
EHWPOISON = 133


# --- how the kernel reads a field -----------------------------------------------------------------------


def signed64(value: int) -> int:
    """Read a u64 field (or 64-bit register) as the kernel's signed 64-bit ``loff_t``/``long``.

    It lives here, with the ABI, because both sides use it: ``kvmgmem.api`` to pass values as a C caller
    would, and the sim's kernel model (``backends/sim/core``, which imports nothing above this layer) to read
    them as the kernel does (``kvm_gmem_create`` refuses a size that is negative as an ``loff_t``).
    """
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


# --- structs (include/uapi/linux/kvm.h) -----------------------------------------------------------------------


class kvm_userspace_memory_region(Structure):
    """``struct kvm_userspace_memory_region``: the argument of KVM_SET_USER_MEMORY_REGION (32 bytes)."""

    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_userspace_memory_region2(Structure):
    """``struct kvm_userspace_memory_region2``: KVM_SET_USER_MEMORY_REGION2, adds the guest_memfd fd and offset."""

    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
        ("guest_memfd_offset", c_uint64),
        ("guest_memfd", c_uint32),
        ("pad1", c_uint32),
        ("pad2", c_uint64 * 14),
    ]


class kvm_memory_attributes(Structure):
    """``struct kvm_memory_attributes``: the argument of KVM_SET_MEMORY_ATTRIBUTES (gpa range and attributes)."""

    _fields_ = [
        ("address", c_uint64),
        ("size", c_uint64),
        ("attributes", c_uint64),
        ("flags", c_uint64),
    ]


class kvm_create_guest_memfd(Structure):
    """``struct kvm_create_guest_memfd``: KVM_CREATE_GUEST_MEMFD's size and flags (reserved words ignored)."""

    _fields_ = [
        ("size", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 6),
    ]


class kvm_enable_cap(Structure):
    """``struct kvm_enable_cap``: KVM_ENABLE_CAP's capability, flags and four argument words."""

    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


class kvm_pre_fault_memory(Structure):
    """``struct kvm_pre_fault_memory``: KVM_PRE_FAULT_MEMORY's gpa/size, updated as it progresses."""

    _fields_ = [
        ("gpa", c_uint64),
        ("size", c_uint64),
        ("flags", c_uint64),
        ("padding", c_uint64 * 5),
    ]


class kvm_mp_state(Structure):
    """``struct kvm_mp_state``: KVM_GET_MP_STATE/KVM_SET_MP_STATE's one word (``KVM_MP_STATE_*``)."""

    _fields_ = [("mp_state", c_uint32)]


class kvm_regs(Structure):
    """``struct kvm_regs``: KVM_GET_REGS/KVM_SET_REGS, the general-purpose registers, RIP and RFLAGS."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(Structure):
    """``struct kvm_segment``: one segment register as ``kvm_sregs`` carries it."""

    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(Structure):
    """``struct kvm_dtable``: a descriptor-table register (GDTR, IDTR)."""

    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint16),
        ("padding", c_uint16 * 3),
    ]


class kvm_sregs(Structure):
    """``struct kvm_sregs``: KVM_GET_SREGS/KVM_SET_SREGS, segments, control registers, EFER, APIC base."""

    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class kvm_cpuid_entry2(Structure):
    """``struct kvm_cpuid_entry2``: one CPUID leaf/subleaf as KVM_GET_SUPPORTED_CPUID and KVM_SET_CPUID2 pass it."""

    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(Structure):
    """Header of the variable-length ``struct kvm_cpuid2``; see :func:`cpuid2_type` for a sized one."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


def cpuid2_type(nent: int) -> type[Structure]:
    """Build the type of a ``struct kvm_cpuid2`` with room for ``nent`` entries (it ends in a flexible array)."""

    class kvm_cpuid2_n(Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * nent)]

    return kvm_cpuid2_n


# kvm_run exit-union members


class kvm_run_io(Structure):
    """``kvm_run.io``: a KVM_EXIT_IO's direction, size, port, count and data offset in the run page."""

    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class kvm_run_mmio(Structure):
    """``kvm_run.mmio``: a KVM_EXIT_MMIO's gpa, data, length and direction."""

    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class _hypercall_flags(Union):
    _fields_ = [("longmode", c_uint32), ("flags", c_uint64)]


class kvm_run_hypercall(Structure):
    """``kvm_run.hypercall``: a KVM_EXIT_HYPERCALL's number, arguments, return value and flags."""

    _anonymous_ = ("u",)
    _fields_ = [
        ("nr", c_uint64),
        ("args", c_uint64 * 6),
        ("ret", c_uint64),
        ("u", _hypercall_flags),
    ]


class kvm_run_internal(Structure):
    """``kvm_run.internal``: a KVM_EXIT_INTERNAL_ERROR's suberror and data words."""

    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _system_event_data(Union):
    _fields_ = [("flags", c_uint64), ("data", c_uint64 * 16)]


class kvm_run_system_event(Structure):
    """``kvm_run.system_event``: a KVM_EXIT_SYSTEM_EVENT's type and data."""

    _anonymous_ = ("u",)
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("u", _system_event_data)]


class kvm_run_memory_fault(Structure):
    """``kvm_run.memory_fault``: a KVM_EXIT_MEMORY_FAULT's flags (PRIVATE), gpa and size."""

    _fields_ = [("flags", c_uint64), ("gpa", c_uint64), ("size", c_uint64)]


class kvm_run_fail_entry(Structure):
    """``kvm_run.fail_entry``: a KVM_EXIT_FAIL_ENTRY's hardware reason and CPU."""

    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_ex(Structure):
    """``kvm_run.ex``: a KVM_EXIT_EXCEPTION's exception and error code."""

    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class kvm_run_exit(Union):
    """The exit-reason union of ``struct kvm_run``: which member is valid depends on ``exit_reason``."""

    _fields_ = [
        ("hw", c_uint64),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("memory_fault", kvm_run_memory_fault),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(Structure):
    """``struct kvm_run``: the mmap'ed page KVM_RUN fills with the exit and reads completions from."""

    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", ctypes.c_char * 2048),
    ]


# --- ioctl numbers ---------------------------------------------------------------------------------------

KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_NR_MMU_PAGES = _IO(KVMIO, 0x44)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_USER_MEMORY_REGION2 = _IOW(KVMIO, 0x49, kvm_userspace_memory_region2)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_SET_MEMORY_ATTRIBUTES = _IOW(KVMIO, 0xD2, kvm_memory_attributes)
KVM_CREATE_GUEST_MEMFD = _IOWR(KVMIO, 0xD4, kvm_create_guest_memfd)
KVM_PRE_FAULT_MEMORY = _IOWR(KVMIO, 0xD5, kvm_pre_fault_memory)

#: ioctl number -> name, for error messages.
IOCTL_NAMES: dict[int, str] = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_")
    and isinstance(value, int)
    and name
    in {
        "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
        "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION",
        "KVM_SET_USER_MEMORY_REGION2", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS",
        "KVM_SET_SREGS", "KVM_SET_CPUID2", "KVM_ENABLE_CAP", "KVM_SET_MEMORY_ATTRIBUTES",
        "KVM_CREATE_GUEST_MEMFD", "KVM_PRE_FAULT_MEMORY", "KVM_SET_NR_MMU_PAGES", "KVM_CREATE_IRQCHIP",
        "KVM_GET_CPUID2", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_GET_TSC_KHZ",
    }
}  # fmt: skip
