"""The sim's guest_memfd storage populates host pages ahead of the model, in groups (``storage.py``): the host's
memory may run ahead, the model's allocation, accounting and punching stay per page."""

from __future__ import annotations

import ctypes

from kvmgmem.backends.sim import SimVm
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
    assert isinstance(storage, GmemStorage) and storage.base is not None
    return g, storage


def test_first_fault_makes_its_group_resident_but_allocates_one_page(pvm: SimVm) -> None:
    """A private fault allocates one page in the model (``allocated_bytes``, the page map) while the host
    pages of its whole group are made resident at once (mincore), zero-filled; other groups stay empty."""
    g, storage = _private_slot(pvm, 3)
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
    """Punching part of a group frees those host pages (the rest stay resident, marked, and uncounted);
    punching the whole group frees all of it, and the next fault there populates it again."""
    g, storage = _private_slot(pvm, 1)
    for page in (0, 3):
        assert isinstance(pvm.handle_fault(GPA + page * P, True, False), Mapped)
    ctypes.memmove(storage.base + 3 * P, b"guest", 5)
    g.punch_hole(0, P)
    assert resident_bytes(storage.base, P) == 0
    assert resident_bytes(storage.base, GROUP) == GROUP - P
    assert g.allocated_bytes() == P  # page 3 only: the group's other resident pages are not the model's
    assert ctypes.string_at(storage.base + 3 * P, 5) == b"guest"
    g.punch_hole(0, GROUP)
    assert resident_bytes(storage.base, GROUP) == 0 and g.allocated_bytes() == 0
    assert isinstance(pvm.handle_fault(GPA + 7 * P, False, False), Mapped)
    assert resident_bytes(storage.base, GROUP) == GROUP and g.allocated_bytes() == P
    pvm.set_user_memory_region2(1, GPA, 0)


def test_a_file_host_mappings_reach_is_not_populated_ahead(dvm: SimVm) -> None:
    """An INIT_SHARED file's pages are what host mappings touch, and ``allocated_bytes`` counts what they
    touched: the fault path leaves its host pages to the first touch, as before."""
    with dvm.create_guest_memfd(GROUP, MMAP | INIT_SHARED) as g:
        dvm.set_user_memory_region2(1, GPA, GROUP, None, GMEM, g, 0)
        storage = g.sim.inode.backing
        assert isinstance(storage, GmemStorage) and storage.base is not None and not storage.ahead
        assert isinstance(dvm.handle_fault(GPA, True, False), Mapped)
        assert resident_bytes(storage.base, GROUP) == 0
        assert g.allocated_bytes() == P
        dvm.set_user_memory_region2(1, GPA, 0)


def test_populated_leaves_groups_populated_ahead_out() -> None:
    """``populated()`` (what host accesses materialised) reports pages outside the marked groups only."""
    storage = GmemStorage(4 * GROUP, ahead=True)
    try:
        assert storage.base is not None
        storage.prepare(3)
        ctypes.memmove(storage.base + 2 * GROUP + P, b"x", 1)  # a touch outside any group
        assert storage.populated() == [(2 * AHEAD_PAGES + 1, 2 * AHEAD_PAGES + 2)]
        storage.prepare(2 * AHEAD_PAGES + 9)  # that group is populated ahead now: all of it left out
        storage.prepare(3 * AHEAD_PAGES)
        assert storage.populated() == []
        assert storage.resident == {0, 2, 3}
        storage.discard(0, AHEAD_PAGES + 1)  # covers group 0 whole: unmarked; group 1 was never marked
        storage.discard(3 * AHEAD_PAGES + 4, 4 * AHEAD_PAGES)  # part of the file's last group: stays marked
        assert storage.resident == {2, 3}
        assert storage.populated() == []
    finally:
        storage.release()


def test_no_ahead_without_the_option() -> None:
    """A storage made without ``ahead`` never populates: ``prepare`` is a no-op."""
    storage = GmemStorage(GROUP)
    try:
        assert storage.base is not None
        storage.prepare(0)
        assert resident_bytes(storage.base, GROUP) == 0 and storage.resident == set()
    finally:
        storage.release()
