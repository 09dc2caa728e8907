"""The code sites of one vCPU engine: where an exit must be exact, hooked before unicorn translates them.

Why (see ``cpu.py``'s mechanism notes): unicorn honours ``emu_stop`` only at a block boundary or before a
hooked instruction, so every byte that could start IN/OUT/INS/OUTS gets a native code hook on the address
just after that instruction (its *landing* site: the IN/OUT hook's stop lands exactly there), and every
possible HLT/INT n a hook on itself (an *exact* site: the hook's slot then says it ran last).

Why hot landing sites are retired: x86 cannot be decoded without knowing where instructions start, so most
candidates are false — 0xEC–0xEF is also the ModRM byte of every ``op %ebp/%r13`` register form, e.g.
``cmp %rbp,%r13`` (``49 39 ed``) — and a false landing site that is a real instruction start runs its hook
every time. unicorn dispatches code hooks by walking the engine's whole hook list
(``helper_uc_tracecode``), so such a site costs O(hooks) per execution: with the ~440 sites of a
selftest's five code pages, a byte loop in compiled guest code ran about ten times slower than without.
Each hook therefore counts its executions (the native stub increments a per-hook cell, and stops the
engine when a landing site's count reaches ``HOT``), and a landing site that ran ``HOT`` times without ever
being where a real IN/OUT ended is unhooked (the translated code is then flushed so no block calls it any
more). A real IN/OUT confirms its landing site at its first exit, which keeps the site forever. Should a
real IN/OUT ever end at a retired site, its stop lands past it; :meth:`CodeSites.ran_past` detects that (a
retired site between the IN/OUT and where the engine stopped), the CPU layer reports an emulation failure
instead of a wrong exit, and the site is hooked again. Exact sites are never retired: their hook runs only
when the HLT/INT there really executes.
"""

from __future__ import annotations

import ctypes
import re

from unicorn import Uc

from kvmgmem.backends.sim.cpu_uc import EMU_STOP, HookCell, add_counting_code_hook, remove_hook

MASK64 = (1 << 64) - 1
HLT = 0xF4
#: Bytes that may start an instruction that must be seen exactly: IN/OUT imm8 (E4-E7), IN/OUT dx (EC-EF),
#: INS/OUTS (6C-6F), HLT (F4), INT3/INT n/INTO/INT1 (CC CD CE F1).
CODE_SITES = re.compile(rb"[\xe4-\xe7\xec-\xef\x6c-\x6f\xf4\xcc-\xce\xf1]")
INT_LENGTHS = {0xCC: 1, 0xCD: 2, 0xCE: 1, 0xF1: 1}
#: Executions after which an unconfirmed landing site is unhooked.
HOT = 20_000
_BLOCK = 256  # counter cells allocated per block (cells must never move: hooks point at them)
_NEVER = (1 << 64) - 1


class CodeSites:
    """The hooked sites of one engine; used only by its vCPU thread, with the engine stopped or translating."""

    def __init__(self, uc: Uc, slot: ctypes.c_uint64) -> None:
        self._uc = uc
        self._slot_address = ctypes.addressof(slot)
        #: every site that has (or had, if retired) a hook; scanning never hooks one twice
        self.hooked: set[int] = set()
        #: per code page (as last scanned): hooked address whose byte is INT3/INT n/INTO/INT1 -> its length
        self.int_sites: dict[int, dict[int, int]] = {}
        self._landing: dict[int, tuple[int, HookCell]] = {}  # live landing site -> (hook handle, its cell)
        self._exact: set[int] = set()
        self._confirmed: set[int] = set()
        self.retired: set[int] = set()
        self._blocks: list[ctypes.Array[HookCell]] = []  # kept alive with the engine
        self._used = _BLOCK
        self._hot = ctypes.c_uint64(0)  # set by a hook whose count reached HOT (it also stopped the engine)
        self._flushes_due = 0

    def _cell(self, landing: bool) -> HookCell:
        if self._used == _BLOCK:
            self._blocks.append((HookCell * _BLOCK)())
            self._used = 0
        cell = self._blocks[-1][self._used]
        self._used += 1
        cell.slot = self._slot_address
        cell.threshold = HOT if landing else _NEVER
        cell.flag = ctypes.addressof(self._hot)
        cell.stop = EMU_STOP
        return cell

    def scan(self, vpage: int, code: bytes) -> None:
        """Hook the sites of the code page at guest-virtual ``vpage`` (``code``: its 4 KiB), before any of it
        is translated."""
        ints: dict[int, int] = {}
        for m in CODE_SITES.finditer(code):
            i = m.start()
            op = code[i]
            if 0xE4 <= op <= 0xE7:
                site, landing = (vpage + i + 2) & MASK64, True
            elif 0xEC <= op <= 0xEF or 0x6C <= op <= 0x6F:
                site, landing = (vpage + i + 1) & MASK64, True
            else:
                site, landing = vpage + i, False
                if op != HLT:
                    ints[site] = INT_LENGTHS[op]
            if not landing:
                self._exact.add(site)
            if site in self.hooked:
                continue
            self.hooked.add(site)
            cell = self._cell(landing)
            handle = add_counting_code_hook(self._uc, cell, site)
            if landing:
                self._landing[site] = (handle, cell)
        self.int_sites[vpage] = ints  # replaces what an older content of this page said

    def confirm(self, site: int) -> None:
        """A real IN/OUT ended at ``site``: its hook stays."""
        if site not in self._confirmed:
            self._confirmed.add(site)
            self._landing.pop(site, None)

    def retire_hot(self) -> bool:
        """Unhook every unconfirmed landing site that ran ``HOT`` times; True if any was (see
        :meth:`take_flush`). Call with the engine stopped, after every stop: a landing hook whose count reaches
        ``HOT`` stops the engine there and raises a flag, so the counts are read only then."""
        if not self._hot.value:
            return False
        self._hot.value = 0
        hot = [s for s, (_h, cell) in self._landing.items() if cell.count >= HOT and s not in self._exact]
        for site in hot:
            handle, _cell = self._landing.pop(site)
            remove_hook(self._uc, handle)
            self.retired.add(site)
        if hot:
            # uc_hook_del only marks a hook; unicorn drops it when the next emu_start ends, and code translated
            # until then still calls it (its translation-time check ignores the mark): flush after that too.
            self._flushes_due = 2
        return bool(hot)

    def take_flush(self) -> bool:
        """Whether translated code must be flushed before this entry (twice after a retirement)."""
        if not self._flushes_due:
            return False
        self._flushes_due -= 1
        return True

    def ran_past(self, io_rip: int, stopped_at: int) -> bool:
        """Whether an IN/OUT at ``io_rip`` may have ended at a retired site before the engine stopped at
        ``stopped_at`` (its stop then landed late): a retired site within the 15 bytes after ``io_rip`` and
        before ``stopped_at``. Every such site is hooked again, for good; the caller flushes translated code."""
        if not self.retired:
            return False
        # (stopped at or before the IN/OUT: the guest looped back to it, so any of the 15 bytes after it)
        span = min(stopped_at - io_rip, 16) if stopped_at > io_rip else 16
        found = [io_rip + d for d in range(1, span) if io_rip + d in self.retired]
        for site in found:
            self.retired.discard(site)
            add_counting_code_hook(self._uc, self._cell(False), site)
            self._confirmed.add(site)
        return bool(found)
