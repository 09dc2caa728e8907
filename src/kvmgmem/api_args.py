"""Argument marshalling for the public API: Python values turned into the fields a C caller would pass.

One rule for every ioctl: a value reaches the "kernel" the way a C caller's would — a negative int becomes its
two's complement, a byte count is clamped as the kernel clamps it — so the backend returns the kernel's errno
for out-of-range values. Only what no C caller could express (wrong Python type, more bits than the field has)
is refused here, with a ``TypeError``/``ValueError`` naming the operation. ``kvmgmem.api`` and its per-area
mixins (``kvmgmem.api_x86``) share these helpers; ``kvmgmem.api`` re-exports them.
"""

from __future__ import annotations

from typing import Any

from kvmgmem import uapi


def as_uint(value: Any, bits: int, name: str, op: str) -> int:
    """``value`` as the unsigned ``bits``-wide field a C caller would pass (negative → two's complement)."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, not bool")
    if not isinstance(value, int):
        try:
            value = value.__index__()
        except AttributeError:
            raise TypeError(f"{op}: {name} must be an int, not {type(value).__name__}") from None
    lo, hi = -(1 << (bits - 1)), (1 << bits) - 1
    if not lo <= value <= hi:
        raise ValueError(f"{op}: {name}={value} does not fit in a {bits}-bit field")
    return value & hi


def u64(value: Any, name: str, op: str) -> int:
    """``value`` as a C caller's ``__u64`` field (``as_uint`` with 64 bits)."""
    return as_uint(value, 64, name, op)


def u32(value: Any, name: str, op: str) -> int:
    """``value`` as a C caller's ``__u32`` field (``as_uint`` with 32 bits)."""
    return as_uint(value, 32, name, op)


def ulong(value: Any, name: str, op: str) -> int:
    """Convert an ioctl's integer argument: the ``unsigned long`` of ``ioctl(2)``, 64 bits on x86-64.

    ``KVM_CHECK_EXTENSION``, ``KVM_CREATE_VM`` and ``KVM_CREATE_VCPU`` take their value this way and the
    kernel looks at all 64 bits (``kvm_vm_ioctl_check_extension_generic`` switches on a ``long``,
    ``kvm_is_vm_type_supported`` and ``kvm_vm_ioctl_create_vcpu`` compare an ``unsigned long``): on 6.18
    ``KVM_CHECK_EXTENSION(1 << 32 | KVM_CAP_USER_MEMORY)`` answers 0 and ``KVM_CREATE_VCPU(1 << 32)`` fails
    with EINVAL (a 32-bit conversion would refuse both, or truncate them to cap 3 and vCPU 0).
    """
    return as_uint(value, 64, name, op)


#: The kernel's MAX_RW_COUNT: a single read/write transfers at most this many bytes (larger counts are clamped).
MAX_RW_COUNT = 0x7FFFF000


def count_arg(value: Any, name: str, op: str) -> int:
    """Convert a byte count as C would pass it (size_t; negative → two's complement), clamped to MAX_RW_COUNT.

    The kernel clamps it the same way, so the kernel's own errno comes back for any value.
    """
    return min(as_uint(value, 64, name, op), MAX_RW_COUNT)


def bytes_arg(data: Any, op: str) -> bytes:
    """Any bytes-like object as bytes, or TypeError naming the operation."""
    try:
        return bytes(memoryview(data))
    except TypeError:
        raise TypeError(f"{op}: data must be a bytes-like object, not {type(data).__name__}") from None


def cpuid_entries(entries: Any, op: str = "KVM_SET_CPUID2") -> list[uapi.kvm_cpuid_entry2]:
    """Copy ``entries``, each a ``uapi.kvm_cpuid_entry2`` (TypeError naming the operation otherwise)."""
    try:
        items = list(entries)
    except TypeError:
        raise TypeError(f"{op}: entries must be an iterable of uapi.kvm_cpuid_entry2") from None
    out = []
    for i, entry in enumerate(items):
        if not isinstance(entry, uapi.kvm_cpuid_entry2):
            raise TypeError(f"{op}: entries[{i}] is a {type(entry).__name__}, not uapi.kvm_cpuid_entry2")
        out.append(uapi.kvm_cpuid_entry2.from_buffer_copy(entry))
    return out
