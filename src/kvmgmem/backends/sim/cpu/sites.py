"""Where a sim vCPU must stop exactly: the code-hook sites of the guest code it has fetched.

Unicorn honours ``emu_stop`` only at a translation-block boundary or before an instruction a code hook
covers, and its ``helper_uc_tracecode`` walks the whole code-hook list each time a hooked instruction runs
(``uc.CodeHooks``). So a hook on an instruction the guest runs often costs O(hooks) per run of it, and
hooks must sit only on instructions whose run ends ``emu_start`` anyway. x86 code cannot be decoded
without knowing where instructions start; what *is* known is that every IN/OUT/INS/OUTS starts with its
opcode byte or a run of prefixes right before it. Hence three kinds of site, per fetched code page:

* **pending IN/OUT** (``PENDING``): each byte that could be an IN/OUT/INS/OUTS opcode, each position of the
  prefix run before it, and the trailing prefix run of the page (its opcode may be on the next page). Its
  hook *stops before* the instruction. A false candidate is a byte inside another instruction, which is
  never run as an instruction start, so its hook is never called. A real start is decided once: the vCPU
  decodes it (``io_length``); an IN/OUT gets an **after** site on the instruction that follows it, and the
  pending hook is retired either way (the vCPU then flushes translated code, so the decision takes effect).
* **after** (``AFTER``): the IN/OUT hook requests the stop and it lands exactly here. Runs of it that
  follow the IN/OUT cost one check (the helper returns at once when a stop is already requested).
* **mark** (``MARK``): every possible HLT and INT3/INT n/INTO/INT1 byte, hooked on itself so the slot says
  which one ran last. Like a false pending site, a false mark is inside another instruction.

So an ordinary instruction is never hooked: a hooked instruction start is a real IN/OUT (once), the
instruction after a real IN/OUT, or a real HLT/INT. A page whose bytes changed since its last scan loses its
old sites and decisions, and so do the decided sites at the end of the page before it, whose instructions
may run into it (the host announces rewritten code with ``invalidate_code``; the next fetch fill rescans).
Code the guest rewrites after its page was scanned is not rescanned; an IN/OUT there ends with a stop
elsewhere, which the vCPU refuses as an emulation failure instead of completing it silently.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import iced_x86 as ix

from kvmgmem.backends.sim.cpu.uc import CodeHooks, Engine
from kvmgmem.uapi import MASK64, PAGE_SIZE

HLT = 0xF4
# IN/OUT imm8 (E4-E7), IN/OUT dx (EC-EF), INS/OUTS (6C-6F)
_IO_OPCODES = re.compile(rb"[\xe4-\xe7\xec-\xef\x6c-\x6f]")
# HLT (F4), INT3/INT n/INTO/INT1 (CC CD CE F1)
_MARK_BYTES = re.compile(rb"[\xf4\xcc-\xce\xf1]")
_INT_LENGTHS = {0xCC: 1, 0xCD: 2, 0xCE: 1, 0xF1: 1}
#: legacy prefixes an IN/OUT may carry (LOCK makes it #UD) and REX
IO_PREFIXES = frozenset({0x66, 0x67, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, *range(0x40, 0x50)})
MAX_PREFIXES = 14  # an instruction is at most 15 bytes
_INS_MNEMONICS = frozenset({ix.Mnemonic.INSB, ix.Mnemonic.INSW, ix.Mnemonic.INSD})
_IO_MNEMONICS = _INS_MNEMONICS | {ix.Mnemonic.IN, ix.Mnemonic.OUT, ix.Mnemonic.OUTSB, ix.Mnemonic.OUTSW,
                                  ix.Mnemonic.OUTSD}  # fmt: skip


@dataclass(frozen=True)
class IoInsn:
    """What decoding a pending site found: an IN/OUT/INS/OUTS of ``length`` bytes (0: the bytes ended first)."""

    length: int
    ins: bool = False


def decode_io(code: bytes, bitness: int, rip: int) -> IoInsn | None:
    """The IN/OUT/INS/OUTS at the start of ``code``; None if it is something else; length 0 if ``code`` ends
    before the instruction does (its next page could not be fetched)."""
    decoder = ix.Decoder(bitness, code, ip=rip)
    insn = decoder.decode()
    if decoder.last_error == ix.DecoderError.NO_MORE_BYTES:
        return IoInsn(0)
    if insn.mnemonic not in _IO_MNEMONICS:
        return None
    return IoInsn(insn.len, insn.mnemonic in _INS_MNEMONICS)


def scan_page(vpage: int, code: bytes) -> tuple[list[int], dict[int, int]]:
    """(pending IN/OUT sites, marks: address -> INT length, 0 for HLT) of one code page's bytes."""
    pending: set[int] = set()
    for m in _IO_OPCODES.finditer(code):
        i = m.start()
        pending.add(i)
        j = i - 1
        while j >= 0 and i - j <= MAX_PREFIXES and code[j] in IO_PREFIXES:
            pending.add(j)
            j -= 1
    j = len(code) - 1
    while j >= 0 and len(code) - j <= MAX_PREFIXES and code[j] in IO_PREFIXES:
        pending.add(j)
        j -= 1
    marks = {(vpage + m.start()) & MASK64: _INT_LENGTHS.get(code[m.start()], 0) for m in _MARK_BYTES.finditer(code)}
    return sorted((vpage + i) & MASK64 for i in pending), marks


@dataclass
class _Page:
    vpage: int
    code: bytes
    pending: list[int]
    marks: dict[int, int]
    decided: dict[int, int | None] = field(default_factory=dict)  # pending site -> after site (None: not I/O)


class CodeSites:
    """The hooked addresses of one vCPU's engine, by role (see the module docstring)."""

    def __init__(self, uc: Engine) -> None:
        self.hooks = CodeHooks(uc)
        self._pages: dict[int, _Page] = {}  # vpage -> its last scan
        self._pending: set[int] = set()
        self._pending_page: dict[int, int] = {}  # pending site -> its vpage
        self._marks: dict[int, int] = {}
        self._after: Counter[int] = Counter()
        self._ins: set[int] = set()  # decided sites holding an INS
        self._hook: dict[int, int] = {}  # live address -> hook id

    @property
    def last(self) -> int:
        """Address of the hooked instruction that ran last (0: none since ``clear_last``)."""
        return int(self.hooks.slot.value)

    def clear_last(self) -> None:
        self.hooks.slot.value = 0

    def scan(self, vpage: int, code: bytes) -> bool:
        """Sites of a code page about to be translated; nothing to do if its bytes did not change.

        Returns True if decided sites at the end of the page before were made pending again: an instruction
        there that runs into this page may be mid-translation (this scan comes from its fetch), its hook
        lookup already done, so the caller has the block translated again.
        """
        old = self._pages.get(vpage)
        if old is not None and old.code == code:
            return False
        if old is not None:
            self._forget(old)
        prev = self._pages.get((vpage - PAGE_SIZE) & MASK64)
        # decisions on instructions that run into this page were made on other bytes
        reopened = prev is not None and self._reopen(prev, (vpage - MAX_PREFIXES - 1) & MASK64)
        pending, marks = scan_page(vpage, code)
        self._pages[vpage] = _Page(vpage, code, pending, marks)
        touched = set(pending) | set(marks)
        self._pending.update(pending)
        self._pending_page.update(dict.fromkeys(pending, vpage))
        self._marks.update(marks)
        for address in touched:
            self._sync(address)
        return reopened

    def _forget(self, page: _Page) -> None:
        touched = set(page.pending) | set(page.marks)
        for address in page.pending:
            self._pending.discard(address)
            self._pending_page.pop(address, None)
        for address, after in page.decided.items():
            self._ins.discard(address)
            if after is not None:
                self._after[after] -= 1
                touched.add(after)
        for address in page.marks:
            self._marks.pop(address, None)
        for address in touched:
            self._sync(address)

    def _reopen(self, page: _Page, first: int) -> bool:
        """Make the decided sites of ``page`` at or after ``first`` pending again; True if there were any."""
        reopen = [a for a in page.decided if a >= first]
        for address in reopen:
            after = page.decided.pop(address)
            self._ins.discard(address)
            if after is not None:
                self._after[after] -= 1
                self._sync(after)
            self._pending.add(address)
            self._pending_page[address] = page.vpage
            self._sync(address)
        return bool(reopen)

    def is_pending(self, address: int) -> bool:
        return address in self._pending

    def decide(self, address: int, io: IoInsn | None) -> None:
        """Record what the pending site at ``address`` (an instruction start) holds: an IN/OUT, or (None)
        something else. The caller flushes translated code."""
        page = self._pages[self._pending_page.pop(address)]
        self._pending.discard(address)
        after = None if io is None else (address + io.length) & MASK64
        page.decided[address] = after
        if io is not None and io.ins:
            self._ins.add(address)
        if after is not None:
            self._after[after] += 1
            self._sync(after)
        self._sync(address)

    def is_after_io(self, address: int) -> bool:
        """Whether a stop requested by an IN/OUT hook lands exactly at ``address``."""
        return self._after[address] > 0

    def is_ins(self, address: int) -> bool:
        """Whether the decided IN/OUT at ``address`` is an INS (known without reading guest memory)."""
        return address in self._ins

    def is_hlt(self, address: int) -> bool:
        """Whether ``address`` held a HLT byte when its page was scanned (a mark of length 0)."""
        return self._marks.get(address) == 0

    def int_length(self, address: int) -> int:
        """Length of the INT3/INT n/INTO/INT1 whose byte is at ``address`` (0: none there)."""
        return self._marks.get(address, 0)

    def live(self) -> dict[int, bool]:
        """Hooked addresses -> whether the hook stops before the instruction (for tests and diagnostics)."""
        return {a: a in self._pending for a in self._hook}

    def _sync(self, address: int) -> None:
        needed = address in self._pending or address in self._marks or self._after[address] > 0
        if self._after[address] <= 0:
            del self._after[address]
        hid = self._hook.get(address)
        if needed and hid is None:
            self._hook[address] = self.hooks.place(address, address in self._pending)
        elif needed and hid is not None:
            self.hooks.set_stop(hid, address in self._pending)
        elif hid is not None:
            del self._hook[address]
            self.hooks.retire(hid)
