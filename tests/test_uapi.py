"""kvmgmem.uapi against the kernel's uAPI: struct layouts (include/uapi/linux/kvm.h; sizes also checked with a C
``sizeof`` on this host), ioctl numbers (_IOC, include/uapi/asm-generic/ioctl.h), constants (include/uapi/linux/kvm.h,
arch/x86/include/uapi/asm/kvm.h, Documentation/virt/kvm/x86/hypercalls.rst). Pure: no backend needed."""

from __future__ import annotations

import ctypes

import pytest

from kvmgmem import uapi

# --- include/uapi/linux/kvm.h struct layouts: (field, offset, size) exactly as the kernel headers lay them out ---

LAYOUTS: dict[str, tuple[int, list[tuple[str, int, int]]]] = {
    "kvm_userspace_memory_region": (
        32,
        [("slot", 0, 4), ("flags", 4, 4), ("guest_phys_addr", 8, 8), ("memory_size", 16, 8),
         ("userspace_addr", 24, 8)],
    ),
    "kvm_userspace_memory_region2": (
        160,
        [("slot", 0, 4), ("flags", 4, 4), ("guest_phys_addr", 8, 8), ("memory_size", 16, 8),
         ("userspace_addr", 24, 8), ("guest_memfd_offset", 32, 8), ("guest_memfd", 40, 4), ("pad1", 44, 4),
         ("pad2", 48, 112)],
    ),
    "kvm_memory_attributes": (
        32,
        [("address", 0, 8), ("size", 8, 8), ("attributes", 16, 8), ("flags", 24, 8)],
    ),
    "kvm_create_guest_memfd": (
        64,
        [("size", 0, 8), ("flags", 8, 8), ("reserved", 16, 48)],
    ),
    "kvm_enable_cap": (
        104,
        [("cap", 0, 4), ("flags", 4, 4), ("args", 8, 32), ("pad", 40, 64)],
    ),
    "kvm_pre_fault_memory": (
        64,
        [("gpa", 0, 8), ("size", 8, 8), ("flags", 16, 8), ("padding", 24, 40)],
    ),
    "kvm_run": (
        2352,
        [("request_interrupt_window", 0, 1), ("immediate_exit", 1, 1), ("padding1", 2, 6),
         ("exit_reason", 8, 4), ("ready_for_interrupt_injection", 12, 1), ("if_flag", 13, 1), ("flags", 14, 2),
         ("cr8", 16, 8), ("apic_base", 24, 8), ("exit", 32, 256), ("kvm_valid_regs", 288, 8),
         ("kvm_dirty_regs", 296, 8), ("s", 304, 2048)],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_struct_layout_matches_spec_1_3(name: str) -> None:
    """include/uapi/linux/kvm.h: every struct's size and every field's offset/size, in the table's order, no padding."""
    struct = getattr(uapi, name)
    size, fields = LAYOUTS[name]
    assert ctypes.sizeof(struct) == size
    assert [f[0] for f in struct._fields_] == [f[0] for f in fields], "field list/order differs from kvm.h"
    for field, offset, fsize in fields:
        desc = getattr(struct, field)
        assert (desc.offset, desc.size) == (offset, fsize), f"{name}.{field}"
    # natural alignment with no implicit padding: fields tile the struct exactly
    assert sum(f[2] for f in fields) == size


def test_struct_field_widths_region2_and_gmem() -> None:
    """include/uapi/linux/kvm.h: guest_memfd is a u32 (userspace passes -1 = 0xFFFFFFFF), offsets/sizes are u64 and
    little-endian."""
    r = uapi.kvm_userspace_memory_region2(guest_memfd=0xFFFFFFFF, guest_memfd_offset=(1 << 64) - 1)
    raw = bytes(r)
    assert raw[40:44] == b"\xff\xff\xff\xff"
    assert raw[32:40] == b"\xff" * 8
    r = uapi.kvm_userspace_memory_region2(slot=0x00010002, guest_phys_addr=0x1122334455667788)
    raw = bytes(r)
    assert raw[0:4] == bytes([2, 0, 1, 0])
    assert raw[8:16] == bytes.fromhex("8877665544332211")
    g = uapi.kvm_create_guest_memfd(size=0x1000, flags=3)
    assert bytes(g)[:16] == (0x1000).to_bytes(8, "little") + (3).to_bytes(8, "little")
    assert len(g.reserved) == 6
    cap = uapi.kvm_enable_cap()
    assert len(cap.args) == 4 and len(cap.pad) == 64
    assert len(uapi.kvm_userspace_memory_region2().pad2) == 14


def test_kvm_run_exit_union_members_1_3() -> None:
    """include/uapi/linux/kvm.h: memory_fault flags/gpa/size at 32/40/48 of kvm_run; hypercall nr @32, args[6] @40..87,
    ret @88, flags @96 (union with the legacy u32 longmode)."""
    base = uapi.kvm_run.exit.offset
    mf = uapi.kvm_run_exit.memory_fault.offset
    assert base + mf + uapi.kvm_run_memory_fault.flags.offset == 32
    assert base + mf + uapi.kvm_run_memory_fault.gpa.offset == 40
    assert base + mf + uapi.kvm_run_memory_fault.size.offset == 48
    hc = base + uapi.kvm_run_exit.hypercall.offset
    assert hc + uapi.kvm_run_hypercall.nr.offset == 32
    assert hc + uapi.kvm_run_hypercall.args.offset == 40
    assert uapi.kvm_run_hypercall.args.size == 48  # 6 x u64, ends at 88
    assert hc + uapi.kvm_run_hypercall.ret.offset == 88
    assert hc + uapi.kvm_run_hypercall.u.offset == 96
    assert uapi.kvm_run_hypercall.flags.size == 8 and uapi.kvm_run_hypercall.longmode.size == 4
    # writes through the struct land where the kernel puts them
    buf = bytearray(ctypes.sizeof(uapi.kvm_run))
    run = uapi.kvm_run.from_buffer(buf)
    run.exit_reason = 39
    run.exit.memory_fault.flags = 8
    run.exit.memory_fault.gpa = 0xC0000000
    run.exit.memory_fault.size = 4096
    del run
    assert buf[8:12] == (39).to_bytes(4, "little")
    assert buf[32:56] == (8).to_bytes(8, "little") + (0xC0000000).to_bytes(8, "little") + (4096).to_bytes(8, "little")


@pytest.mark.parametrize(
    ("name", "size"),
    [("kvm_regs", 144), ("kvm_sregs", 312), ("kvm_enable_cap", 104), ("kvm_userspace_memory_region2", 160),
     ("kvm_create_guest_memfd", 64)],
)  # fmt: skip
def test_struct_sizes_match_host_probes_1(name: str, size: int) -> None:
    """Sizes as a C ``sizeof`` gives them on this host (x86-64)."""
    assert ctypes.sizeof(getattr(uapi, name)) == size


# --- ioctl numbers (_IOC, include/uapi/asm-generic/ioctl.h) ---------------------------------------------------

IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_RUN": 0xAE80,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_PRE_FAULT_MEMORY": 0xC040AED5,
}


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_number_matches_spec_1_1(name: str) -> None:
    """_IOC (include/uapi/asm-generic/ioctl.h): the ioctl number equals the table value, and IOCTL_NAMES
    maps it back to its name."""
    value = getattr(uapi, name)
    assert value == IOCTLS[name], f"{name} = {value:#x}, the kernel header gives {IOCTLS[name]:#x}"
    assert uapi.IOCTL_NAMES[value] == name


def test_ioctl_encoding_1_1() -> None:
    """_IOC (include/uapi/asm-generic/ioctl.h): _IOC(dir, type, nr, size) = dir<<30 | size<<16 | type<<8 |
    nr (dir: IO 0, W 1, R 2, WR 3)."""
    assert uapi.KVMIO == 0xAE
    assert uapi._IOC(3, 0xAE, 0xD4, 64) == 0xC040AED4
    assert uapi._IOC(1, 0xAE, 0x49, 160) == 0x40A0AE49
    assert uapi._IO(0xAE, 0x80) == 0xAE80
    assert uapi._IOW(0xAE, 0xD2, uapi.kvm_memory_attributes) == 0x4020AED2
    assert uapi._IOWR(0xAE, 0xD5, uapi.kvm_pre_fault_memory) == 0xC040AED5
    # the v12 RFC's numbers must not be what we send
    assert uapi.KVM_SET_MEMORY_ATTRIBUTES != 0x4020AED3
    assert 0x8008AED2 not in uapi.IOCTL_NAMES


def test_ioctl_names_are_unique() -> None:
    """Every named ioctl has a distinct number (a layout mistake could make two collide)."""
    names = [n for n in dir(uapi) if n.startswith("KVM_") and n in set(uapi.IOCTL_NAMES.values())]
    values = [getattr(uapi, n) for n in names]
    assert len(set(values)) == len(values) == len(uapi.IOCTL_NAMES)


# --- include/uapi/linux/kvm.h numeric constants ---------------------------------------------------------------


def test_numeric_constants_1_2() -> None:
    """include/uapi/linux/kvm.h: page size, max pages per slot, slot counts, EHWPOISON, fallocate modes."""
    assert uapi.PAGE_SIZE == 4096 and uapi.PAGE_SHIFT == 12
    assert uapi.KVM_MEM_MAX_NR_PAGES == 2**31 - 1
    assert uapi.KVM_MEM_SLOTS_NUM == 32767
    assert uapi.KVM_USER_MEM_SLOTS == 32764
    assert uapi.EHWPOISON == 133
    assert (
        uapi.FALLOC_FL_KEEP_SIZE, uapi.FALLOC_FL_PUNCH_HOLE, uapi.FALLOC_FL_NO_HIDE_STALE,
        uapi.FALLOC_FL_COLLAPSE_RANGE, uapi.FALLOC_FL_ZERO_RANGE, uapi.FALLOC_FL_INSERT_RANGE,
        uapi.FALLOC_FL_UNSHARE_RANGE,
    ) == (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40)  # fmt: skip


# --- include/uapi/linux/kvm.h flag bits -----------------------------------------------------------------------

FLAGS = {
    "KVM_MEM_LOG_DIRTY_PAGES": 1 << 0,
    "KVM_MEM_READONLY": 1 << 1,
    "KVM_MEM_GUEST_MEMFD": 1 << 2,
    "KVM_SET_USER_MEMORY_REGION_V1_FLAGS": 0b11,
    "KVM_MEMORY_ATTRIBUTE_PRIVATE": 8,
    "KVM_MEMORY_EXIT_FLAG_PRIVATE": 8,
    "GUEST_MEMFD_FLAG_MMAP": 1 << 0,
    "GUEST_MEMFD_FLAG_INIT_SHARED": 1 << 1,
    "KVM_EXIT_HYPERCALL_LONG_MODE": 1 << 0,
}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_flag_bits_1_4(name: str) -> None:
    """include/uapi/linux/kvm.h flag bits (released ABI: MMAP = bit 0, INIT_SHARED = bit 1)."""
    assert getattr(uapi, name) == FLAGS[name]


# --- include/uapi/linux/kvm.h caps ----------------------------------------------------------------------------

CAPS = {
    "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_NR_MEMSLOTS": 10,
    "KVM_CAP_READONLY_MEM": 81,
    "KVM_CAP_CHECK_EXTENSION_VM": 105,
    "KVM_CAP_DISABLE_QUIRKS": 116,
    "KVM_CAP_MULTI_ADDRESS_SPACE": 118,
    "KVM_CAP_EXIT_HYPERCALL": 201,
    "KVM_CAP_DISABLE_QUIRKS2": 213,
    "KVM_CAP_USER_MEMORY2": 231,
    "KVM_CAP_MEMORY_FAULT_INFO": 232,
    "KVM_CAP_MEMORY_ATTRIBUTES": 233,
    "KVM_CAP_GUEST_MEMFD": 234,
    "KVM_CAP_VM_TYPES": 235,
    "KVM_CAP_PRE_FAULT_MEMORY": 236,
    "KVM_CAP_GUEST_MEMFD_FLAGS": 244,
}


@pytest.mark.parametrize("name", sorted(CAPS))
def test_cap_numbers_1_5(name: str) -> None:
    """include/uapi/linux/kvm.h capability numbers (merged numbering, not v12's 230–233)."""
    assert getattr(uapi, name) == CAPS[name]


def test_caps_table_is_spec_order_1_5() -> None:
    """uapi.CAPS (what `kvmgmem caps` reports) lists exactly the include/uapi/linux/kvm.h caps, by short name."""
    assert uapi.CAPS == {name.removeprefix("KVM_CAP_"): num for name, num in CAPS.items()}


# --- include/uapi/linux/kvm.h exit reasons --------------------------------------------------------------------

EXIT_REASONS = {
    "KVM_EXIT_UNKNOWN": 0,
    "KVM_EXIT_EXCEPTION": 1,
    "KVM_EXIT_IO": 2,
    "KVM_EXIT_HYPERCALL": 3,
    "KVM_EXIT_DEBUG": 4,
    "KVM_EXIT_HLT": 5,
    "KVM_EXIT_MMIO": 6,
    "KVM_EXIT_SHUTDOWN": 8,
    "KVM_EXIT_INTERNAL_ERROR": 17,
    "KVM_EXIT_SYSTEM_EVENT": 24,
    "KVM_EXIT_NOTIFY": 37,
    "KVM_EXIT_MEMORY_FAULT": 39,
}
# in include/uapi/linux/kvm.h but not needed by kvmgmem; checked only if defined
EXIT_REASONS_OPTIONAL = {
    "KVM_EXIT_LOONGARCH_IOCSR": 38,
    "KVM_EXIT_TDX": 40,
    "KVM_EXIT_ARM_SEA": 41,
    "KVM_EXIT_ARM_LDST64B": 42,
    "KVM_EXIT_SNP_REQ_CERTS": 43,
}


@pytest.mark.parametrize("name", sorted(EXIT_REASONS))
def test_exit_reasons_1_6(name: str) -> None:
    """include/uapi/linux/kvm.h exit reasons (MEMORY_FAULT is 39, not v12's 38)."""
    assert getattr(uapi, name) == EXIT_REASONS[name]


def test_optional_exit_reasons_consistent_1_6() -> None:
    """include/uapi/linux/kvm.h: any other KVM_EXIT_* uapi defines must not collide with a number listed here."""
    spec_values = {**EXIT_REASONS, **EXIT_REASONS_OPTIONAL}
    defined = {n: getattr(uapi, n) for n in dir(uapi) if n.startswith("KVM_EXIT_") and n in spec_values}
    assert set(EXIT_REASONS) <= set(defined)
    for name, value in defined.items():
        assert value == spec_values[name], name
    reasons = {n: getattr(uapi, n) for n in dir(uapi) if n.startswith("KVM_EXIT_") and n in spec_values}
    assert len(set(reasons.values())) == len(reasons), "two exit reasons share a number"


# --- arch/x86/include/uapi/asm/kvm.h VM types, Documentation/virt/kvm/x86/hypercalls.rst hypercall ------------


def test_vm_types_1_7() -> None:
    """arch/x86/include/uapi/asm/kvm.h: DEFAULT 0, SW_PROTECTED 1, SEV 2, SEV_ES 3, SNP 4, TDX 5; private-memory types
    SW_PROTECTED, SNP, TDX."""
    assert (
        uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM, uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM,
        uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM,
    ) == (0, 1, 2, 3, 4, 5)  # fmt: skip
    assert frozenset({1, 4, 5}) == uapi.PRIVATE_MEM_VM_TYPES


def test_map_gpa_range_constants_1_8() -> None:
    """Documentation/virt/kvm/x86/hypercalls.rst: hypercall 12, ENCRYPTED 0x10, guest error codes, CPUID feature bit
    16."""
    assert uapi.KVM_HC_MAP_GPA_RANGE == 12
    assert uapi.KVM_MAP_GPA_RANGE_ENCRYPTED == 0x10 and uapi.KVM_MAP_GPA_RANGE_DECRYPTED == 0
    assert (uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_4K, uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
            uapi.KVM_MAP_GPA_RANGE_PAGE_SZ_1G) == (0, 1, 2)  # fmt: skip
    assert (uapi.KVM_ENOSYS, uapi.KVM_EINVAL, uapi.KVM_EPERM) == (1000, 22, 1)
    assert uapi.KVM_FEATURE_HC_MAP_GPA_RANGE == 16
