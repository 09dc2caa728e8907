"""guest_memfd file operations on the sim (`kvm_gmem_create`, `kvm_gmem_fallocate`, `kvm_gmem_fops`, `kvm_gmem_mmap`,
`kvm_gmem_setattr`; selftest cases GM-n of guest_memfd_test.c)."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
from collections.abc import Callable

import pytest

from kvmgmem import KvmError, uapi
from kvmgmem.backends.sim import SIM_GUEST_MEMFD_FLAG_HUGEPAGE, SimSystem, SimVm
from kvmgmem.backends.sim.fault import Mapped
from kvmgmem.conformance._sigbus import touch_dies_of_sigbus

from .conftest import INIT_SHARED, M2, MMAP, P

KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE
GMEM = uapi.KVM_MEM_GUEST_MEMFD


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(KvmError) as info:
        fn()
    return info.value.errno


def test_GM_1_6_8_profile_accepts_no_flags(open_sim: Callable[..., SimSystem]) -> None:
    """`kvm_gmem_create` (6.8–6.17): every creation flag → EINVAL; GUEST_MEMFD_FLAGS is an unknown cap (0)."""
    with open_sim("6.8").create_vm(1) as vm:
        assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == 0
        for bit in range(64):
            assert errno_of(lambda b=bit: vm.create_guest_memfd(P, 1 << b)) == errno.EINVAL


def test_GM_3_huge_lazy_file(dvm: SimVm) -> None:
    """`kvm_gmem_create`: a 1 TiB guest_memfd is created lazily (as on this host)."""
    with dvm.create_guest_memfd(1 << 40, MMAP | INIT_SHARED) as g:
        assert g.stat().st_size == 1 << 40


def test_GM_4_pread_negative_offset(dvm: SimVm) -> None:
    """GM-4's pread beyond the conformance suite: a negative offset is EINVAL (`ksys_pread64`), before the
    ESPIPE a guest_memfd gives any positioned read."""
    with dvm.create_guest_memfd(4 * P) as g:
        assert errno_of(lambda: g.pread(64, -1)) == errno.EINVAL


def test_GM_6_last_byte_in_file_does_not_fault(dvm: SimVm) -> None:
    """GM-6's boundary from the other side (the conformance suite checks that byte 4p dies): in a 16p mapping
    of a 4p file, byte 4p-1 reads fine."""
    with dvm.create_guest_memfd(4 * P, MMAP | INIT_SHARED) as g, g.mmap(16 * P) as m:
        assert touch_dies_of_sigbus(m.address + 4 * P - 1, 1, write=False) == 0


def test_GM_8_private_mapping_sigbus(pvm: SimVm) -> None:
    """GM-8: MMAP without INIT_SHARED maps fine but every access dies of a real SIGBUS; no page of the file
    is touched (the host never reaches private memory)."""
    with pvm.create_guest_memfd(4 * P, MMAP) as g, g.mmap() as m:
        assert touch_dies_of_sigbus(m.address, 4 * P, write=True) == signal.SIGBUS
        assert touch_dies_of_sigbus(m.address, 1, write=False) == signal.SIGBUS
        assert touch_dies_of_sigbus(m.address + 3 * P, 1, write=False) == signal.SIGBUS
        assert g.introspect()["pages_present"] == 0


def test_GM_9c_6_8_has_no_mmap(open_sim: Callable[..., SimSystem]) -> None:
    """GM-9c on the 6.8 profile, which has no guest_memfd mmap at all: ENODEV."""
    with open_sim("6.8").create_vm() as old, old.create_guest_memfd(4 * P) as g:
        assert errno_of(lambda: g.mmap()) == errno.ENODEV


def test_GM_11_page_accounting(dvm: SimVm) -> None:
    """GM-11's successful steps, counted in the sim's page map (the conformance suite checks the errnos):
    allocate [0,T) makes 4 pages, punching one frees it, allocating it again brings it back."""
    T = 4 * P
    with dvm.create_guest_memfd(T) as g:
        g.fallocate(KEEP, 0, T)
        assert g.introspect()["pages_present"] == 4
        g.fallocate(KEEP | PUNCH, P, P)
        assert g.introspect()["pages_present"] == 3
        g.fallocate(KEEP, P, P)
        assert g.introspect()["pages_present"] == 4


@pytest.mark.parametrize(
    "mode, off, ln, err",
    [
        (0, 100, 5, errno.EOPNOTSUPP),
        (uapi.FALLOC_FL_NO_HIDE_STALE | KEEP, 0, P, errno.EOPNOTSUPP),
        (KEEP, (1 << 63) - P, 2 * P, errno.EFBIG),
        (0, (1 << 63) - P, 2 * P, errno.EFBIG),  # VFS EFBIG precedes guest_memfd's EOPNOTSUPP
    ],
)
def test_2_8_fallocate_errnos(dvm: SimVm, mode: int, off: int, ln: int, err: int) -> None:
    """`vfs_fallocate`'s checks, then `kvm_gmem_fallocate`'s, with the errnos measured on this host (the rows the
    conformance suite's ``test_fallocate_mode_errnos`` does not have)."""
    with dvm.create_guest_memfd(4 << 20, MMAP | INIT_SHARED) as g:
        assert errno_of(lambda: g.fallocate(mode, off, ln)) == err


def test_2_10_7_mmap_pins_file(dvm: SimVm) -> None:
    """`kvm_gmem_mmap`/`kvm_gmem_fault_user_mapping`: closing the fd keeps the memory while mapped; the fd number is no
    longer a guest_memfd."""
    g = dvm.create_guest_memfd(4 * P, MMAP | INIT_SHARED)
    m = g.mmap()
    m[0:4] = b"abcd"
    file = g.sim
    g.close()
    assert not file.released and m[0:4] == b"abcd"
    m.close()
    assert file.released and not file.inode.alive


def test_fd_is_real_and_unique(dvm: SimVm) -> None:
    """The sim's guest_memfd fd is a real open fd, released on close."""
    g = dvm.create_guest_memfd(P)
    fd = g.fd
    os.fstat(fd)
    g.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_5_6_hugepage_flag_sim_only(open_sim: Callable[..., SimSystem]) -> None:
    """the v12 RFC's KVM_GUEST_MEMFD_ALLOW_HUGEPAGE (sim option): the huge-page flag is reported and accepted only with
    ``hugepage=True``; sizes must be 2 MiB aligned."""
    with open_sim().create_vm() as vm:
        assert not vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & SIM_GUEST_MEMFD_FLAG_HUGEPAGE
        assert errno_of(lambda: vm.create_guest_memfd(M2, SIM_GUEST_MEMFD_FLAG_HUGEPAGE)) == errno.EINVAL
    s = open_sim(hugepage=True)
    assert s.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == 3 | SIM_GUEST_MEMFD_FLAG_HUGEPAGE
    with s.create_vm() as vm:
        vm.create_guest_memfd(M2, SIM_GUEST_MEMFD_FLAG_HUGEPAGE).close()
        assert errno_of(lambda: vm.create_guest_memfd(M2 + P, SIM_GUEST_MEMFD_FLAG_HUGEPAGE)) == errno.EINVAL


def test_poison_repoints_live_mappings_and_punch_heals(dvm: SimVm) -> None:
    """`kvm_gmem_error_folio` with `kvm_gmem_mmap`/`kvm_gmem_fault_user_mapping`: a hwpoisoned page SIGBUSes the host
    through every mapping — one mapped before the poison (re-pointed, as the kernel zaps user mappings) and one mapped
    after — while its neighbours keep their data; punching the page frees it with its poison mark, and both mappings
    read zero there."""
    with dvm.create_guest_memfd(4 * P, MMAP | INIT_SHARED) as g, g.mmap() as before:
        before[:] = b"\x11" * (4 * P)
        g.inject_poison(P)
        with g.mmap(2 * P, P) as after:
            for m, page in ((before, P), (after, 0)):
                assert touch_dies_of_sigbus(m.address + page, 1, write=False) == signal.SIGBUS
            assert before[:P] == b"\x11" * P and before[2 * P :] == b"\x11" * (2 * P) and after[P:] == b"\x11" * P
            g.punch_hole(P, P)
            assert before[P : 2 * P] == bytes(P) and after[:P] == bytes(P)
            after[:4] = b"heal"
            assert before[P : P + 4] == b"heal"


def test_host_writes_alias_guest_pages_and_count_as_allocated(dvm: SimVm) -> None:
    """A host write through the mapping lands in the page the guest maps (one page, two views), and the page
    counts as allocated (the kernel's host fault allocates it)."""
    with dvm.create_guest_memfd(4 * P, MMAP | INIT_SHARED) as g, g.mmap() as m:
        dvm.set_user_memory_region2(1, 1 << 32, 4 * P, m, GMEM, g, 0)
        assert g.allocated_bytes() == 0
        m[2 * P : 2 * P + 4] = b"host"
        assert g.allocated_bytes() == P
        r = dvm.sim.handle_fault((1 << 32) + 2 * P, False, False, None)
        assert isinstance(r, Mapped) and ctypes.string_at(r.host_ptr, 4) == b"host"
        dvm.set_user_memory_region2(1, 1 << 32, 0)


def test_guest_fault_in_file_above_32tib(dvm: SimVm) -> None:
    """A slot bound at the end of a 2^63-4096-byte guest_memfd: the guest's page is the host mapping's page
    (the sim maps that part of its storage lazily, on first use)."""
    size = 2**63 - P
    with dvm.create_guest_memfd(size, MMAP | INIT_SHARED) as g, g.mmap(P, size - P) as m:
        dvm.set_user_memory_region2(1, 1 << 32, P, None, GMEM, g, size - P)
        m[:4] = b"last"
        r = dvm.sim.handle_fault(1 << 32, True, False, None)
        assert isinstance(r, Mapped) and ctypes.string_at(r.host_ptr, 4) == b"last"
        ctypes.memmove(r.host_ptr + 4, b"!", 1)
        assert m[:5] == b"last!"
        dvm.set_user_memory_region2(1, 1 << 32, 0)


def test_repointing_races_with_mappings_coming_and_going(dvm: SimVm) -> None:
    """Poison and punch (which re-point pages of every live mapping) race with another thread mapping and
    unmapping the file: re-pointing only ever touches mappings still alive, and once every poisoned page is
    punched again the whole file reads zero through a fresh mapping."""
    with dvm.create_guest_memfd(16 * P, MMAP | INIT_SHARED) as g:
        stop = threading.Event()
        errors: list[BaseException] = []

        def churn() -> None:
            try:
                while not stop.is_set():
                    with g.mmap() as m:
                        assert m[0] == 0  # page 0 is never poisoned
            except BaseException as e:  # reported below, in the test's thread
                errors.append(e)

        thread = threading.Thread(target=churn)
        thread.start()
        try:
            for i in range(200):
                page = 1 + i % 15
                g.inject_poison(page * P)
                g.punch_hole(page * P, P)
        finally:
            stop.set()
            thread.join()
        assert not errors, errors
        with g.mmap() as m:
            assert m[:] == bytes(16 * P)
