"""The TLB-fill fast path's page walk: the plain case of ``pagewalk.walk``, in Python and (when built) C.

Why two: a warm TLB refill is the sim's most frequent fill and the walk is half of it in Python. The C
extension ``_walk`` (``_walk.c``, built by setup.py, optional) does the same walk; ``tests/sim/cpu`` checks
that both agree. Set ``KVMGMEM_NO_CEXT=1`` to use the Python path. Either answers only when every entry is
present and cached, without reserved bits, and the access is allowed; otherwise None, and the caller takes
the full walk, which decides #PF, exits and caching.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kvmgmem.backends.sim.cpu.pagewalk import (
    CR0_WP,
    CR4_SMAP,
    EFER_NXE,
    EFLAGS_AC,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
)
from kvmgmem.backends.sim.cpu.uc import OFF_CR, OFF_EFER, OFF_EFLAGS, OFF_HFLAGS, PagingView

CR0_PG = 1 << 31

#: ``walk(ctx_address, tables: {table gpa: host address}, va, mask, c_bit, write)`` or None when not built
walk_c: Callable[..., Any] | None = None
if not os.environ.get("KVMGMEM_NO_CEXT"):
    try:
        from kvmgmem.backends.sim import _walk
    except ImportError:  # pragma: no cover - no C compiler at install time
        pass
    else:
        _walk.set_layout(OFF_CR, OFF_EFER, OFF_EFLAGS, OFF_HFLAGS)
        walk_c = _walk.walk


def fast_walk_py(
    q: memoryview, tables: dict[int, memoryview], va: int, mask: int, c_bit: int, write: bool
) -> tuple[int, bool, bool | None] | None:
    """(gpa page, guest-writable, private) of a data access whose walk the cached table pages answer and
    which the guest's tables allow, else None (the full walk decides). ``private`` is the leaf's private
    access bit, None without one (as ``pagewalk.walk``: the bit is no address bit in any entry).

    ``q``: the CPU state just saved (``PagingView.load``); ``tables``: table gpa -> that cached page as u64s;
    ``mask``: the frame bits of an entry; ``c_bit``: the private access bit or 0. The caller holds the vCPU's
    request lock (``requests.VcpuRequests.lock``) with no request pending, so cached table pages are live store
    memory. The four levels are unrolled and entries read through memoryviews: a loop with ctypes indexing took
    twice as long."""
    pv = PagingView
    cr0 = q[pv.CR0]
    if not cr0 & CR0_PG:
        return None
    top = va >> 47
    if top and top != 0x1FFFF:
        return None
    nxe = q[pv.EFER] & EFER_NXE
    # PML4E
    entries = tables.get(q[pv.CR3] & mask)
    if entries is None:
        return None
    pte = entries[(va >> 39) & 0x1FF]
    if not pte & PTE_P or pte & PTE_PS or (pte & PTE_NX and not nxe):
        return None
    acc = pte  # R/W and U/S ANDed over the levels (data accesses ignore NX)
    # PDPTE
    entries = tables.get(pte & mask)
    if entries is None:
        return None
    pte = entries[(va >> 30) & 0x1FF]
    if not pte & PTE_P or (pte & PTE_NX and not nxe):
        return None
    acc &= pte
    if pte & PTE_PS:
        if pte & mask & 0x3FFFE000:
            return None  # reserved bits below the frame: #PF(RSVD), the full walk reports it
        gpa_page = (pte & mask & ~0x3FFFFFFF) | (va & 0x3FFFF000)
    else:
        # PDE
        entries = tables.get(pte & mask)
        if entries is None:
            return None
        pte = entries[(va >> 21) & 0x1FF]
        if not pte & PTE_P or (pte & PTE_NX and not nxe):
            return None
        acc &= pte
        if pte & PTE_PS:
            if pte & mask & 0x1FE000:
                return None
            gpa_page = (pte & mask & ~0x1FFFFF) | (va & 0x1FF000)
        else:
            # PTE
            entries = tables.get(pte & mask)
            if entries is None:
                return None
            pte = entries[(va >> 12) & 0x1FF]
            if not pte & PTE_P or (pte & PTE_NX and not nxe):
                return None
            acc &= pte
            gpa_page = pte & mask
    if q[pv.HFLAGS] & 3 == 3:
        if not acc & PTE_US:
            return None
        writable = bool(acc & PTE_RW)
    else:
        if acc & PTE_US and q[pv.CR4] & CR4_SMAP and not q[pv.EFLAGS] & EFLAGS_AC:
            return None
        writable = bool(acc & PTE_RW) or not cr0 & CR0_WP
    if write and not writable:
        return None
    return (gpa_page, writable, bool(pte & c_bit) if c_bit else None)
