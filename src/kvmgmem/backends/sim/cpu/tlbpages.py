"""Which virtual pages a vCPU's unicorn TLB holds for each gfn, so that a ranged flush drops only those.

Why: unicorn's API only flushes the whole TLB (``UC_CTL_TLB_FLUSH``). A vCPU that must forget one zapped gfn
then refilled every page it used next — its code page through the full walk and code scan, its stack, its
data — one Python callback each, and with several vCPU threads each callback is one more hand-over of the
GIL. Bench 7's implicit conversions took 3.75 fills per conversion that way and take 2 (the faulting fill
and the refault) with page flushes (``uc.PageFlush``, QEMU's ``tlb_flush_page``).

Every install of a TLB entry is noted here with its gfn (``note``); a ranged flush takes the noted pages of
its gfns (``take``) and drops them (``drop``). What the record cannot vouch for drops everything, as before:
a flushed page-table page (any translation may have walked it; the caller decides), more gfns or aliases
than remembered (``TRACKED``, ``ALIASES``: the record stays small however much memory the guest touches),
or an engine without ``tlb_flush_page``.

Used by the vCPU thread only (installs happen in its fill hook, flushes at its safe points).
"""

from __future__ import annotations

from kvmgmem.backends.sim.cpu.types import PAGE_SIZE
from kvmgmem.backends.sim.cpu.uc import Engine, PageFlush, tlb_flush

TRACKED = 4096  # gfns whose installed pages are remembered; past that the next ranged flush drops everything
ALIASES = 8  # virtual pages remembered per gfn (likewise)
#: Most pages one ranged flush drops one at a time; past that it drops the whole TLB. A page drop is a ctypes call
#: (~1-2 µs with its Python); a whole-TLB drop costs the refills of what the vCPU uses next (code, stack, data:
#: a few fills of 2-10 µs). A 2 MiB conversion's 512 page drops made the PC workload (bench 6) 20% slower than
#: one whole flush; a 4 KiB conversion's one drop saves bench 7's refills of code and stack.
PAGE_FLUSH_MAX = 16
_PAGE_MASK = ~(PAGE_SIZE - 1)


class InstalledPages:
    """gfn → the virtual pages installed for it in one engine's TLB since its last full flush."""

    def __init__(self, uc: Engine) -> None:
        self._uc = uc
        self._page_flush = PageFlush(uc)
        self._by_page = self._page_flush.available
        self.vpages: dict[int, list[int]] = {}  # read directly by the fill fast path (fill.TlbFill.fill)
        self.untracked = not self._by_page  # something was installed that is not in vpages

    def note(self, gpa_page: int, vaddr: int) -> None:
        """Remember that the TLB now maps ``vaddr``'s page to ``gpa_page``."""
        gfn, vpage = gpa_page >> 12, vaddr & _PAGE_MASK
        installed = self.vpages.get(gfn)
        if installed is None:
            if len(self.vpages) < TRACKED:
                self.vpages[gfn] = [vpage]
            else:
                self.untracked = True
        elif vpage not in installed:
            if len(installed) < ALIASES:
                installed.append(vpage)
            else:
                self.untracked = True

    def take(self, start: int, end: int) -> list[int]:
        """Forget and return the pages installed for gfns ``[start, end)``: O(min(range, remembered))."""
        vpages = self.vpages
        if not vpages:
            return []
        if end - start > len(vpages):
            gfns = [g for g in vpages if start <= g < end]
        else:
            gfns = [g for g in range(start, end) if g in vpages]
        out: list[int] = []
        for g in gfns:
            out += vpages.pop(g)
        return out

    def drop(self, vpages: list[int], everything: bool) -> None:
        """Drop ``vpages`` from the TLB, or the whole TLB if ``everything`` or the record is incomplete."""
        if everything or self.untracked or len(vpages) > PAGE_FLUSH_MAX:
            self.flush_all()
            return
        for vpage in vpages:
            self._page_flush(vpage)

    def flush_all(self) -> None:
        """Drop the whole TLB, and the record with it."""
        tlb_flush(self._uc)
        self.vpages.clear()
        self.untracked = not self._by_page
