"""Guest memory as the vCPU's Python side sees it: the software page walk and guest virtual reads and writes.

Why in software: unicorn's virtual-TLB mode walks no tables, so every fill the fast path (``fastwalk``) cannot
answer, every instruction the exit handling decodes and every exception delivery (``exc``) goes through
``walk`` here, with each entry read a guest-physical access through the page resolver. A dereference of guest
memory happens only under the request lock with no request pending: a flush or store removal that is being
requested cannot have its memory read here (the access is retried from the vCPU's safe point instead).
"""

from __future__ import annotations

import ctypes
import struct

from unicorn import UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE

from kvmgmem.backends.sim.cpu.exc import VEC_GP, VEC_PF, GuestException, MmioDuringAccess, NeedRetry, VmExitSignal
from kvmgmem.backends.sim.cpu.outcome import DataOutcome, FillOutcome, emulation_failure
from kvmgmem.backends.sim.cpu.pagewalk import (
    ACCESS_FETCH,
    ACCESS_READ,
    ACCESS_WRITE,
    NonCanonical,
    PageFault,
    Paging,
    Translation,
    walk,
)
from kvmgmem.backends.sim.cpu.requests import VcpuRequests
from kvmgmem.backends.sim.cpu.resolve import PageResolver
from kvmgmem.backends.sim.cpu.tlbcache import TranslationCache
from kvmgmem.backends.sim.cpu.types import PAGE_SIZE, FaultResult, MemoryFault, Mmio, Retry, fault_exit
from kvmgmem.backends.sim.cpu.uc import CpuState
from kvmgmem.uapi import MASK64

PAGE_MASK = ~(PAGE_SIZE - 1) & MASK64


class GuestMemoryAccess:
    """Walks, translates and dereferences guest addresses for one vCPU (``exc.GuestMemory``)."""

    def __init__(
        self,
        state: CpuState,
        requests: VcpuRequests,
        cache: TranslationCache,
        pages: PageResolver,
        private_bit: int | None,
    ) -> None:
        self._state = state
        self._rq = requests
        self._cache = cache
        self._stores = cache.stores
        self._pages = pages
        self._private_bit = private_bit

    def paging(self, cpl: int | None = None) -> Paging:
        st = self._state.load()
        return Paging(st.cr(0), st.cr(3), st.cr(4), st.efer, st.eflags, st.cpl if cpl is None else cpl)

    def read_pte(self, gpa: int) -> int | FaultResult:
        """One page-table entry for ``walk``: a guest-physical read through the (cached) page resolver."""
        page = gpa & PAGE_MASK
        host_page = self._cache.pt_cache.get(page)
        if host_page is None:
            res = self._pages.resolve_page(page, False, False)
            if not isinstance(res, tuple):
                return res
            host_page = res[0]
            rq = self._rq
            with rq.cond:
                self._cache.add_table(page, host_page, rq.req == rq.ack)  # live memory of a store (see deref)
        data = self.deref(host_page + (gpa & 0xFFF), 8)
        if data is None:
            return Retry()
        return int(struct.unpack("<Q", data)[0])

    def deref(self, host_addr: int, n: int, write_data: bytes | None = None) -> bytes | None:
        """Read (or write) host memory behind a translation, only while no request is pending."""
        rq = self._rq
        with rq.cond:
            if rq.req != rq.ack:
                return None
            if self._stores.find(host_addr, n) is None:
                raise emulation_failure(host_addr)
            if write_data is not None:
                ctypes.memmove(host_addr, write_data, n)
                return write_data
            return ctypes.string_at(host_addr, n)

    def translate(self, vaddr: int, acc: int, cpl: int | None = None) -> tuple[int, int, int, int] | FillOutcome:
        """For the TLB: (window address, unicorn perms, host page, gpa page), or the outcome that prevents it."""
        try:
            res = walk(vaddr, acc, self.paging(cpl), self.read_pte, self._private_bit)
            if not isinstance(res, Translation):
                return res
            gpa_page = res.gpa & PAGE_MASK
            page = self._pages.resolve_page(gpa_page, acc == ACCESS_WRITE, acc == ACCESS_FETCH, res.private)
            if not isinstance(page, tuple):
                return DataOutcome(gpa_page, page)
            host_page, host_writable = page
            store = self._stores.find(host_page, PAGE_SIZE)
            if store is None:
                return emulation_failure(host_page)
            perms = UC_PROT_READ
            if res.writable and host_writable:
                perms |= UC_PROT_WRITE
            if res.executable and acc == ACCESS_FETCH:
                # Only a fetch fill grants EXEC, so every page is scanned (fill.TlbFill.scan_code) before
                # unicorn translates code from it; a data fill of a code page costs one more fill on first fetch.
                perms |= UC_PROT_EXEC
            return (store.window + host_page - store.host_ptr, perms, host_page, gpa_page)
        except VmExitSignal as sig:
            return sig

    # --- guest virtual memory for Python-side emulation (exc.GuestMemory) ----------------------------------

    def host_for(self, va: int, acc: int, cpl: int | None) -> int:
        """The host address behind ``va``, or the exception / exit / retry the access ends in (raised)."""
        res = walk(va, acc, self.paging(cpl), self.read_pte, self._private_bit)
        if isinstance(res, PageFault):
            raise GuestException(VEC_PF, res.error_code, va)
        if isinstance(res, NonCanonical):
            raise GuestException(VEC_GP, 0)
        if not isinstance(res, Translation):
            raise self._outcome_signal(res, va & PAGE_MASK)
        page = self._pages.resolve_page(res.gpa & PAGE_MASK, acc == ACCESS_WRITE, acc == ACCESS_FETCH, res.private)
        if isinstance(page, Mmio):  # the exact gpa matters to event delivery (exc.ExceptionDelivery)
            raise MmioDuringAccess(emulation_failure(res.gpa & PAGE_MASK).exit, res.gpa, acc == ACCESS_WRITE)
        if not isinstance(page, tuple):
            raise self._outcome_signal(page, res.gpa & PAGE_MASK)
        return page[0] + (res.gpa & 0xFFF)

    @staticmethod
    def _outcome_signal(outcome: FaultResult, gpa_page: int) -> Exception:
        if isinstance(outcome, Retry):
            return NeedRetry()
        if isinstance(outcome, MemoryFault):
            return VmExitSignal(fault_exit(outcome))
        return emulation_failure(gpa_page)

    def read_virt(self, va: int, n: int, access: int = ACCESS_READ, cpl: int | None = None) -> bytes:
        out = b""
        while n > 0:
            chunk = min(n, PAGE_SIZE - (va & 0xFFF))
            data = self.deref(self.host_for(va, access, cpl), chunk)
            if data is None:
                raise NeedRetry()
            out += data
            va = (va + chunk) & MASK64
            n -= chunk
        return out

    def read(self, va: int, n: int, access: int, cpl: int) -> bytes:
        return self.read_virt(va, n, access, cpl)

    def write(self, va: int, data: bytes, cpl: int) -> None:
        while data:
            chunk = min(len(data), PAGE_SIZE - (va & 0xFFF))
            if self.deref(self.host_for(va, ACCESS_WRITE, cpl), chunk, data[:chunk]) is None:
                raise NeedRetry()
            va = (va + chunk) & MASK64
            data = data[chunk:]

    def fetch_insn(self, rip: int) -> bytes:
        """Up to 15 instruction bytes at ``rip`` (fewer when the next page cannot be fetched)."""
        room = PAGE_SIZE - (rip & 0xFFF)
        code = self.read_virt(rip, min(15, room), ACCESS_FETCH)
        if room < 15:
            try:
                code += self.read_virt(rip + room, 15 - room, ACCESS_FETCH)
            except GuestException:
                pass  # the instruction may well end on this page
        return code
