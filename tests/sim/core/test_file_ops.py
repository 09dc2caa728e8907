"""The core's guest_memfd file operations (``GmemFile``: ``kvm_gmem_fops``, ``kvm_gmem_mmap``,
``kvm_gmem_setattr``, ``ksys_pread64``), on plain objects: no fd, no mapping, no unicorn.

The adapter (``backends/sim/gmem.py``, ``mapping.py``) only forwards to these; the conformance suite checks
the same errnos end to end on both backends.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

import pytest

from kvmgmem import uapi
from kvmgmem.backends.sim.core import NullBacking, create_vm, get_profile
from kvmgmem.backends.sim.core.gmem import GmemFile
from kvmgmem.errors import KvmError

P = uapi.PAGE_SIZE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED


@pytest.fixture
def make_file() -> Iterator[Callable[..., GmemFile]]:
    """Factory: ``make_file(flags=0, profile="6.18", vm_type=DEFAULT)``, a 4-page file over a NullBacking."""
    files: list[GmemFile] = []

    def make(flags: int = 0, profile: str = "6.18", vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> GmemFile:
        vm = create_vm(get_profile(profile), vm_type)
        file = vm.create_guest_memfd(4 * P, flags, lambda size: NullBacking())
        vm.put()  # the file holds the VM now
        files.append(file)
        return file

    yield make
    for file in files:
        file.put()


def errno_of(fn: Callable[[], object], op: str) -> int:
    with pytest.raises(KvmError) as info:
        fn()
    assert info.value.op == op
    return info.value.errno


@pytest.mark.parametrize("flags", [0, MMAP, MMAP | INIT_SHARED])
def test_read_write_einval_positioned_espipe(make_file: Callable[..., GmemFile], flags: int) -> None:
    f = make_file(flags)
    assert errno_of(f.read, "read") == errno.EINVAL
    assert errno_of(f.write, "write") == errno.EINVAL
    for offset in (0, P, (1 << 63) - 1):
        assert errno_of(lambda o=offset: f.pread(o), "pread") == errno.ESPIPE
        assert errno_of(lambda o=offset: f.pwrite(o), "pwrite") == errno.ESPIPE


@pytest.mark.parametrize("offset", [1 << 63, (1 << 64) - 1])
def test_negative_offset_einval_before_espipe(make_file: Callable[..., GmemFile], offset: int) -> None:
    """The u64 offsets a caller's negative loff_t arrives as."""
    f = make_file()
    assert errno_of(lambda: f.pread(offset), "pread") == errno.EINVAL
    assert errno_of(lambda: f.pwrite(offset), "pwrite") == errno.EINVAL


def test_every_size_change_einval(make_file: Callable[..., GmemFile]) -> None:
    f = make_file()
    for length in (0, 4 * P, 8 * P, 1):
        assert errno_of(lambda n=length: f.setattr_size(n), "ftruncate") == errno.EINVAL
    assert f.inode.size == 4 * P


def test_mmap_needs_the_flag_then_map_shared(make_file: Callable[..., GmemFile]) -> None:
    """ENODEV without GUEST_MEMFD_FLAG_MMAP (INIT_SHARED alone too), checked before MAP_PRIVATE's EINVAL."""
    for flags in (0, INIT_SHARED):
        f = make_file(flags)
        assert errno_of(lambda f=f: f.mmap(True), "mmap") == errno.ENODEV
        assert errno_of(lambda f=f: f.mmap(False), "mmap") == errno.ENODEV
    for flags in (MMAP, MMAP | INIT_SHARED):
        f = make_file(flags)
        f.mmap(True)
        assert errno_of(lambda f=f: f.mmap(False), "mmap") == errno.EINVAL
    f = make_file(MMAP, vm_type=uapi.KVM_X86_SW_PROTECTED_VM)
    f.mmap(True)


def test_mmap_enodev_on_a_kernel_without_gmem_mmap(make_file: Callable[..., GmemFile]) -> None:
    """The 6.8 profile has no guest_memfd mmap at all (and accepts no creation flag to ask for it)."""
    f = make_file(0, profile="6.8", vm_type=uapi.KVM_X86_SW_PROTECTED_VM)
    assert errno_of(lambda: f.mmap(True), "mmap") == errno.ENODEV


def test_madvise_collapse_einval(make_file: Callable[..., GmemFile]) -> None:
    f = make_file(MMAP | INIT_SHARED)
    assert errno_of(f.madvise_collapse, "madvise") == errno.EINVAL
