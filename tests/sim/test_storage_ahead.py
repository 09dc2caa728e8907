"""The sim's guest_memfd storage for a file no host mapping can reach: anonymous memory, populated ahead of the
model in groups (``storage.py``). The host's memory may run ahead; the model's allocation, accounting and
punching stay per page."""

from __future__ import annotations

import ctypes

import pytest

from kvmgmem.backends.sim import SimVm
from kvmgmem.backends.sim import storage as storage_mod
from kvmgmem.backends.sim.fault import Mapped
from kvmgmem.backends.sim.storage import AHEAD_PAGES, GmemStorage
from kvmgmem.hostmem import resident_bytes

from .conftest import GMEM, INIT_SHARED, MMAP, PRIVATE, P

GPA = 1 << 32
GROUP = AHEAD_PAGES * P


def _private_slot(pvm: SimVm, groups: int) -> tuple[object, GmemStorage]:
    g = pvm.create_guest_memfd(groups * GROUP)
    pvm.set_user_memory_region2(1, GPA, groups * GROUP, None, GMEM, g, 0)
    pvm.set_memory_attributes(GPA, groups * GROUP, PRIVATE)
    storage = g.sim.inode.backing
    assert isinstance(storage, GmemStorage) and storage.anonymous and storage.base is not None
    return g, storage


def test_first_fault_makes_its_group_resident_but_allocates_one_page(pvm: SimVm) -> None:
    """A private fault allocates one page in the model (``allocated_bytes``, the page map) while the host
    pages of its whole group are made resident at once (mincore), zero-filled; other groups stay empty."""
    g, storage = _private_slot(pvm, 3)
    assert storage.fd < 0  # anonymous: no memfd behind it
    r = pvm.handle_fault(GPA + GROUP + 5 * P, True, False)
    assert isinstance(r, Mapped) and r.host_ptr == storage.base + GROUP + 5 * P
    assert resident_bytes(storage.base + GROUP, GROUP) == GROUP
    assert resident_bytes(storage.base, GROUP) == 0 and resident_bytes(storage.base + 2 * GROUP, GROUP) == 0
    assert ctypes.string_at(storage.base + GROUP, GROUP) == bytes(GROUP)
    assert g.allocated_bytes() == P
    pages = g.introspect()["pages"]
    assert [(a, b, v) for a, b, v in pages if v] == [(AHEAD_PAGES + 5, AHEAD_PAGES + 6, 1)]
    pvm.set_user_memory_region2(1, GPA, 0)


def test_punch_frees_the_host_pages_and_a_whole_group_is_populated_again(pvm: SimVm) -> None:
    """Punching part of a group frees those host pages, reading zero again (the rest stay resident, marked,
    and uncounted); punching the whole group frees all of it, and the next fault there populates it again."""
    g, storage = _private_slot(pvm, 1)
    for page in (0, 3):
        assert isinstance(pvm.handle_fault(GPA + page * P, True, False), Mapped)
    ctypes.memmove(storage.base, b"zero", 4)
    ctypes.memmove(storage.base + 3 * P, b"guest", 5)
    g.punch_hole(0, P)
    assert resident_bytes(storage.base, P) == 0 and ctypes.string_at(storage.base, 4) == bytes(4)
    assert resident_bytes(storage.base + P, GROUP - P) == GROUP - P
    assert g.allocated_bytes() == P  # page 3 only: the group's other resident pages are not the model's
    assert ctypes.string_at(storage.base + 3 * P, 5) == b"guest"
    assert storage.resident == {0}
    g.punch_hole(0, GROUP)
    assert resident_bytes(storage.base, GROUP) == 0 and g.allocated_bytes() == 0 and storage.resident == set()
    assert isinstance(pvm.handle_fault(GPA + 7 * P, False, False), Mapped)
    assert resident_bytes(storage.base, GROUP) == GROUP and g.allocated_bytes() == P
    pvm.set_user_memory_region2(1, GPA, 0)


def test_a_file_host_mappings_reach_keeps_its_memfd_and_is_not_populated_ahead(dvm: SimVm) -> None:
    """An INIT_SHARED file's pages are what host mappings touch, and ``allocated_bytes`` counts what they
    touched: a memfd, whose host pages the fault path leaves to the first touch, as before."""
    with dvm.create_guest_memfd(GROUP, MMAP | INIT_SHARED) as g:
        dvm.set_user_memory_region2(1, GPA, GROUP, None, GMEM, g, 0)
        storage = g.sim.inode.backing
        assert isinstance(storage, GmemStorage) and storage.base is not None
        assert not storage.anonymous and storage.fd >= 0
        assert isinstance(dvm.handle_fault(GPA, True, False), Mapped)
        assert resident_bytes(storage.base, GROUP) == 0
        assert g.allocated_bytes() == P
        dvm.set_user_memory_region2(1, GPA, 0)


def test_anonymous_storage_unit() -> None:
    """The storage alone: ``populated()`` reports nothing (no host mapping reaches it); punching covers a
    group whole to unmark it, and the file's last group counts as whole at the end of the file."""
    storage = GmemStorage(4 * GROUP - 4 * P, anonymous=True)
    try:
        assert storage.anonymous and storage.base is not None
        for pgoff in (3, 2 * AHEAD_PAGES + 9, 3 * AHEAD_PAGES):
            storage.prepare(pgoff)
        assert storage.resident == {0, 2, 3}
        assert resident_bytes(storage.base + 3 * GROUP, GROUP - 4 * P) == GROUP - 4 * P
        assert storage.populated() == []
        storage.discard(0, AHEAD_PAGES + 1)  # covers group 0 whole: unmarked; group 1 was never marked
        storage.discard(2 * AHEAD_PAGES + 1, 3 * AHEAD_PAGES)  # part of group 2: stays marked
        storage.discard(3 * AHEAD_PAGES, 4 * AHEAD_PAGES)  # the short last group, to the end of the file
        assert storage.resident == {2}
        assert resident_bytes(storage.base, 4 * GROUP - 4 * P) == P
    finally:
        storage.release()


def test_a_host_that_refuses_anonymous_memory_gets_a_memfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strict overcommit refuses a large private mapping: the storage falls back to a memfd, never
    populated ahead (``prepare`` is a no-op), with every other behaviour as before."""

    def refuse(length: int) -> int:
        raise OSError(12, "mmap refused")

    monkeypatch.setattr(storage_mod, "_map_anonymous", refuse)
    storage = GmemStorage(GROUP, anonymous=True)
    try:
        assert not storage.anonymous and storage.fd >= 0 and storage.base is not None
        storage.prepare(0)
        assert resident_bytes(storage.base, GROUP) == 0 and storage.resident == set()
        ctypes.memmove(storage.base + P, b"x", 1)
        assert storage.populated() == [(1, 2)]
    finally:
        storage.release()


def test_anonymous_file_above_32tib_maps_chunks_lazily(pvm: SimVm) -> None:
    """A private file larger than the whole-file view: anonymous chunks mapped on first use, populated
    ahead, and punched (freed) through the chunk that holds the page."""
    size = 2**63 - P
    g = pvm.create_guest_memfd(size)
    storage = g.sim.inode.backing
    assert isinstance(storage, GmemStorage) and storage.anonymous and storage.base is None
    pvm.set_user_memory_region2(1, GPA, GROUP, None, GMEM, g, size - GROUP)
    pvm.set_memory_attributes(GPA, GROUP, PRIVATE)
    r = pvm.handle_fault(GPA + GROUP - P, True, False)
    assert isinstance(r, Mapped)
    ctypes.memmove(r.host_ptr, b"last", 4)
    last_group = (AHEAD_PAGES - 1) * P  # the file's last group is one page short (its size is 2^63 - 4 KiB)
    assert resident_bytes(r.host_ptr + P - last_group, last_group) == last_group and g.allocated_bytes() == P
    g.punch_hole(size - P, P)
    assert resident_bytes(r.host_ptr, P) == 0 and ctypes.string_at(r.host_ptr, 4) == bytes(4)
    assert g.allocated_bytes() == 0
    pvm.set_user_memory_region2(1, GPA, 0)
    g.close()
