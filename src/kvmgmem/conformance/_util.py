"""Helpers shared by the conformance tests (not collected: no ``test_`` prefix)."""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
from collections.abc import Iterator
from typing import Any

import pytest

from kvmgmem import KvmError, uapi
from kvmgmem.errors import errno_name

P = uapi.PAGE_SIZE
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD

# set_memory_region_test.c constants
MEM_REGION_SIZE = 0x200000
MEM_REGION_GPA = 0xC0000000
MEM_REGION_SLOT = 10


class Raised:
    """Filled in by :func:`raises_kvm` with the caught error."""

    error: KvmError | None = None


@contextlib.contextmanager
def raises_kvm(expected_errno: int, op: str) -> Iterator[Raised]:
    """Assert the block raises ``KvmError`` with exactly this errno and this ``op``."""
    box = Raised()
    with pytest.raises(KvmError) as info:
        yield box
    err = info.value
    box.error = err
    assert err.errno == expected_errno, (
        f"{op}: expected {errno_name(expected_errno)}, got {errno_name(err.errno or 0)} ({err})"
    )
    assert err.op == op, f"expected KvmError.op == {op!r}, got {err.op!r} ({err})"


def require_cap(obj: Any, cap: int, name: str, backend: str, mask: int | None = None) -> int:
    """``obj.check_extension(cap)``; skip naming the capability when it is 0 (or lacks ``mask`` bits)."""
    value = int(obj.check_extension(cap))
    if value == 0 or (mask is not None and value & mask != mask):
        want = f" with bits {mask:#x}" if mask is not None else ""
        pytest.skip(f"{name}{want} not supported on backend {backend} ({name} = {value:#x})")
    return value


def gmem_flag_sets(vm: Any) -> list[int]:
    """F ∈ {0} ∪ {MMAP if supported} ∪ {MMAP|INIT_SHARED if supported} (guest_memfd_test.c)."""
    valid = int(vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS))
    sets = [0]
    if valid & MMAP:
        sets.append(MMAP)
        if valid & INIT_SHARED:
            sets.append(MMAP | INIT_SHARED)
    return sets


EINVAL = errno_mod.EINVAL
EEXIST = errno_mod.EEXIST


# --- host defects ----------------------------------------------------------------------------------------------


class HostDefect(AssertionError):
    """The kvm backend did what a documented defect of this host's KVM does, not what the kernel rule says.

    Raised by a test only after it saw the defect's exact symptom, so ``expect_host_defect`` can mark just that
    outcome as an expected failure: any other failure still fails, and a host without the defect passes the
    test, which the strict marker turns into a failure that asks for the marker to go."""


def kvm_is_pvm() -> bool:
    """Whether the host's KVM is the paravirtual kvm_pvm module (loaded), the KVM whose defects
    ``HOST_DEVIATIONS`` lists: CPL3 guest code runs natively, CPL0 code is emulated."""
    return os.path.isdir("/sys/module/kvm_pvm")


def expect_host_defect(request: pytest.FixtureRequest, backend: str, deviation: str) -> bool:
    """On kvm under kvm_pvm, mark the running test a strict expected failure naming ``deviation`` (a key of the
    sim profile module's ``HOST_DEVIATIONS``) that only a :class:`HostDefect` satisfies. True if marked."""
    from kvmgmem.backends.sim import HOST_DEVIATIONS

    if backend != "kvm" or not kvm_is_pvm():
        return False
    reason = f"host defect ({deviation}, kvm_pvm): {HOST_DEVIATIONS[deviation]}"
    request.applymarker(pytest.mark.xfail(strict=True, raises=HostDefect, reason=reason))
    return True
