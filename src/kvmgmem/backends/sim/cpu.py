"""The sim's vCPUs: unicorn as a KVM vCPU, with our TLB-fill hook as the EPT.

Interface for the sim VM
========================

``CpuSet(resolver)`` — one per VM (KVM's ``struct kvm`` as far as vCPUs are concerned):

* ``resolver``: a ``GpaResolver`` (``handle_fault(gpa, write, fetch) -> Mapped | MemoryFault | Mmio | Retry``,
  see ``cpu_types``) — the VM's TDP fault handler.
* ``private_access_bit`` (sim-only, default None): bit N of a leaf guest PTE marks the access private, like
  SEV's C-bit (``cpu_pagewalk``). The bit is stripped from the frame address and every data access resolves
  with ``handle_fault(..., private=True/False)``; a mismatch with the gfn's attribute is then a
  ``MemoryFaultExit`` whose re-run re-executes the instruction — the guest-driven *implicit* conversion.
  Data translations are cached per (gpa, private), so the same gpa reached through a private and a shared
  alias never shares a cache entry.
* ``add_store(host_ptr, size) -> window`` / ``remove_store(host_ptr)``: declare a backing store (a memslot's
  userspace buffer, a guest_memfd's page storage; page aligned, one mmap each). Every ``Mapped.host_ptr``
  must lie inside a registered store. Each store is mapped once per engine with ``mem_map_ptr``; a vCPU
  maps new stores before its next guest entry (a running one is stopped, maps, resumes).
  ``remove_store`` returns once no engine can touch the memory any more, so the VM may unmap it then.
  Call it without holding locks ``handle_fault`` takes.
* ``flush(gfn_start=None, gfn_end=None)``: the remote TLB flush after a zap (``kvm_flush_remote_tlbs``). Every
  vCPU that cached a translation in the range drops it (and its whole unicorn TLB, which has no per-page
  flush); those executing guest code are stopped and the call returns only after each acknowledged. vCPUs
  that cached nothing there are left running: none of their TLB entries can point into the range, and a
  translation one of them resolves across the flush is refused (``CpuSet.stale_since``). Callable from any
  thread, including a vCPU's own thread inside ``handle_fault`` (the flush then takes effect before that
  vCPU executes another instruction).
* ``exit_hypercall_mask``: KVM_CAP_EXIT_HYPERCALL's argument (bit 12 = KVM_HC_MAP_GPA_RANGE); the VM sets it
  on ``enable_cap``. The CPL check is the CPU's (from SS.DPL, as KVM's ``get_cpl``).
* ``create_cpu(vcpu_id) -> SimCpu``, ``close()``.

``SimCpu`` — one unicorn engine (``UC_MODE_64``, virtual-TLB mode) per vCPU, driven by one thread at a time:

* ``get_regs/set_regs/get_sregs/set_sregs`` with ``uapi.kvm_regs``/``uapi.kvm_sregs`` and KVM semantics
  (hidden segment state loaded as given, CPL = SS.DPL, EFER verbatim; see ``cpu_regs``).
* ``run() -> exits.Exit``: IoExit, MmioExit, HltExit, HypercallExit, MemoryFaultExit, ShutdownExit,
  InternalErrorExit. Raises ``KvmError(EINTR, "KVM_RUN")`` when kicked.
* ``complete_io(data)``, ``complete_mmio(data)``, ``complete_hypercall(ret)``: answers applied on the next run.
* ``kick()``: KVM's ``immediate_exit`` + signal: the running (or next) ``run()`` raises EINTR once.
* ``flush(...)``: this vCPU only; ``invalidate_code()``: drop translated code after the host rewrote guest
  code that already ran (real KVM needs nothing; unicorn caches translations). ``set_regs``/``set_sregs``
  do it implicitly.

Mechanism
=========

* **EPT = TLB-fill hook.** In ``UC_TLB_VIRTUAL`` mode unicorn asks ``_fill(vaddr, access)`` for every TLB
  miss (per 4 KiB page). A data access whose table pages are cached takes the fast path (``_fill``,
  ``cpu_walk``: the plain-case walk in C or Python, then the data cache or the fault path); everything else
  the full walk below. We walk the guest's page tables in software (``cpu_pagewalk``; each entry read is
  a guest-physical access through the resolver), resolve the data gpa through ``handle_fault``, and point
  the entry at ``window + offset`` with permissions = guest PTE ∧ ``Mapped.writable``. Page-table pages and
  data pages resolved once are cached per vCPU until the next flush, like a paging-structure cache.
* **Exits from the hook.** Returning False from the hook stops the engine at the faulting instruction with
  ``UC_ERR_EXCEPTION``; the run loop then returns ``MemoryFaultExit`` (re-running re-executes the
  instruction), decodes the instruction for ``MmioExit``, delivers #PF (with CR2 from the decoded operand
  and the architectural error code) through the guest IDT (``cpu_exc``; unicorn never delivers exceptions),
  or retries.
* **IN/OUT** hooks record the access and stop the engine. Unicorn honours a stop only at a block boundary or
  before an instruction a code hook covers, so every fetch TLB fill scans the code page (``_scan_code``,
  ``cpu_sites``): each byte that could start an IN/OUT/INS/OUTS (with its prefix run) gets a native hook
  (``cpu_uc``) that stops *before* it; the first time one really runs as an instruction, the vCPU decodes
  it (``_decide_io_site``), moves the hook to the instruction after it and drops translated code, so the
  IN/OUT hook's stop lands exactly after the instruction. A false candidate sits inside another
  instruction and is never called; no ordinary instruction carries a hook, so steady-state code runs with
  no per-instruction call. (Only a fetch fill grants EXEC, so no page is translated unscanned; a stop that
  lands elsewhere, which only code the guest rewrote after translation could cause, is an
  emulation-failure exit, not silent.) As in KVM, the exit shows RIP *at* the IN/OUT (and RAX unchanged
  for IN); the next ``run()`` loads the IN data into AL/AX/EAX and steps over the instruction.
* **HLT**: ``emu_start`` returns normally; every possible HLT and INT n byte also carries a native hook that
  writes its address into a slot cleared before each ``emu_start``: HLT iff the slot is RIP-1 and that
  byte was 0xF4 when scanned (an external stop never leaves it there, as executing a HLT ends
  ``emu_start``). Likewise an
  interrupt is a software INT n/INT3 iff the slot names an INT whose end is the reported RIP.
* **VMCALL/VMMCALL** reach the invalid-instruction hook and are handled as ``kvm_emulate_hypercall`` does
(KVM_HC_MAP_GPA_RANGE); other #UD, #GP,
  INT n... are delivered through the IDT; a fault while delivering #DF is a triple fault → ``ShutdownExit``.
* **Requests and acks** (KVM's ``kvm_make_all_cpus_request``). A vCPU is *in guest mode* while unicorn executes
  guest code, and leaves it whenever it is in Python (fault hook, exit handling). Requests (flush, store
  changes) bump ``_req``; the requester stops a vCPU in guest mode with ``emu_stop`` (repeated until it
  took, since a stop racing with ``emu_start``'s setup is lost) and waits for ``_ack`` from every vCPU that is
  inside ``run()`` on another thread — except one inside ``handle_fault``, which may be blocked on a lock the
  requester holds (KVM likewise only waits for vCPUs in guest mode). Such a vCPU cannot use a stale
  translation: every TLB install and every Python-side dereference of guest memory happens under the
  request lock and only while ``_req == _ack``; otherwise the access is retried from the vCPU's safe point,
  where requests are serviced.
* **Flush scaling.** Cached translations are indexed by 2 MiB region of gfns, so a ranged flush costs
  O(pages cached in the range), and ``CpuSet.flush`` can ask each vCPU (under its request lock) whether it
  cached anything in the range at all. Pending ranges of a vCPU that is not running merge, and past
  ``MAX_PENDING_RANGES`` become one full flush. Every flush is numbered and logged; a resolver result is
  cached only if no flush since the resolution began covered it, which is what lets a flush skip vCPUs.
* **Signals.** CPython runs signal handlers only on the main thread between bytecodes; while a vCPU runs
  guest code on the main thread, ``_SignalTicker`` stops its engine every 20 ms so Ctrl-C raises
  ``KeyboardInterrupt`` out of ``run()`` (KVM_RUN returns EINTR on a signal).
* **Stores.** Unicorn sends every store through a TLB entry that is writable *and* executable down its
  self-modifying-code slow path (``notdirty_write``: a TB lookup per store), and never clears it. A fill
  grants EXEC only for an instruction fetch, so data pages keep the inline fast path (bench 5 store rows).
Measured costs (this 2-vCPU VM, Python 3.11, unicorn 2.1.4; noisy — real numbers belong to bench/)
-----------------------------------------------------------------------------------------------------

* guest ``dec rcx; jnz``: 80-95% of a bare unicorn engine by CPU time (bench 5; it was ~22% with the former
  per-instruction native hook, ~450 → ~100 M instructions/s). Steady-state guest code runs with no Python
  callback and no native call at all.
* TLB fill (bench 8, thread CPU time per 4 KiB page): a warm refill ~2.5 µs with the C walk (~4-5 µs with
  the Python one), of which ~0.75 µs is the ctypes callback and unicorn's own fill; a refault after a zap
  ~7-8 µs and a first touch ~11 µs (2.6-3 µs of it the host allocating the memfd page), the VM's fault path
  (``core/mmu.py``) ~3 µs of it. Before issue 15's fault work: ~12 / 27 / 32 µs.
* exit round trip (guest OUT → ``run()`` returns → ``run()`` again): ~21 µs; a hypercall answered in the
  "kernel" (ENOSYS): ~65 µs (invalid-opcode stop + instruction fetch through the software walk).
* ``emu_start`` without exit work: ~3-4 µs; unicorn TLB flush ~1.4 µs; TB-cache flush ~10 µs; context
  save+restore ~3 µs; one ``reg_read`` ~2 µs.
* remote flush of a vCPU spinning in guest code (stop, flush, ack, resume): ~14 µs; of a vCPU with nothing
  cached in the range: none. Servicing a 4 KiB ranged flush: ~17 µs with 1k to 262k cached pages (bench 7).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

from unicorn import UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, UcError
from unicorn.unicorn_const import UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UC_MEM_FETCH, UC_MEM_WRITE
from unicorn.x86_const import (
    UC_X86_INS_CPUID,
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_REG_CR4,
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDX,
    UC_X86_REG_RIP,
)

from kvmgmem import uapi
from kvmgmem.api import Pending
from kvmgmem.backends.sim import cpu_regs, cpuid
from kvmgmem.backends.sim.cpu_emul import MmioAccess, decode, decode_mmio, memory_operands
from kvmgmem.backends.sim.cpu_exc import (
    VEC_GP,
    VEC_PF,
    VEC_UD,
    Event,
    ExceptionDelivery,
    GuestException,
    MmioDuringAccess,
    NeedRetry,
    VmExitSignal,
)
from kvmgmem.backends.sim.cpu_pagewalk import (
    ACCESS_FETCH,
    ACCESS_READ,
    ACCESS_WRITE,
    PTE_ADDR,
    NonCanonical,
    PageFault,
    Paging,
    Translation,
    walk,
)
from kvmgmem.backends.sim.cpu_sites import CodeSites, decode_io
from kvmgmem.backends.sim.cpu_stores import Store, StoreMap
from kvmgmem.backends.sim.cpu_types import (
    PAGE_SIZE,
    FaultResult,
    GpaResolver,
    Mapped,
    MemoryFault,
    Mmio,
    Retry,
)
from kvmgmem.backends.sim.cpu_uc import (
    HF_CS32_MASK,
    HF_CS64_MASK,
    CpuState,
    Engine,
    PageFlush,
    PagingView,
    TlbEntry,
    add_tlb_fill_hook,
    new_engine,
    tlb_flush,
)
from kvmgmem.backends.sim.cpu_walk import fast_walk_py, walk_c
from kvmgmem.errors import KvmError
from kvmgmem.exits import (
    Exit,
    HltExit,
    HypercallExit,
    InternalErrorExit,
    IoExit,
    MemoryFaultExit,
    MmioExit,
    ShutdownExit,
)

MASK64 = (1 << 64) - 1
PAGE_MASK = ~(PAGE_SIZE - 1) & MASK64
UNTIL = 1 << 63  # non-canonical: the guest can never reach it, so emu_start never ends on "until"
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_HC_VAPIC_POLL_IRQ = 1
HYPERCALL_INSNS = (b"\x0f\x01\xc1", b"\x0f\x01\xd9")  # VMCALL, VMMCALL
_UC_ACCESS = {16: ACCESS_READ, 17: ACCESS_WRITE, 18: ACCESS_FETCH}  # UC_MEM_READ/WRITE/FETCH

__all__ = [
    "CpuSet",
    "GpaResolver",
    "Mapped",
    "MemoryFault",
    "Mmio",
    "Retry",
    "SimCpu",
]


_HUGE_SIZES = (2 << 20, 1 << 30)
REGION_SHIFT = 9  # a vCPU indexes its cached gfns by 2 MiB region: range lookups cost O(regions + hits)
MAX_PENDING_RANGES = 32  # more pending flush ranges than this degrade to one full flush
FLUSH_LOG = 256  # recent flushes CpuSet remembers, so a racing fill can tell whether its result is stale
TLB_TRACKED = 4096  # gfns whose unicorn TLB pages a vCPU remembers; past that a ranged flush drops the whole TLB
TLB_ALIASES = 8  # virtual pages remembered per gfn (likewise)
_MAIN_THREAD = threading.main_thread().ident
SIGNAL_TICK_S = 0.02  # how long a main-thread vCPU may stay in unicorn before Python can run signal handlers


class _SignalTicker:
    """Lets CPython run signal handlers (Ctrl-C) while a vCPU runs guest code on the main thread.

    Why: CPython runs Python signal handlers only on the main thread, between bytecodes. ``emu_start`` is one
    long C call, so a guest loop on the main thread would never return to the interpreter and SIGINT would
    wait for SIGKILL. Real KVM returns EINTR from KVM_RUN when a signal arrives. Here one daemon thread stops
    the main thread's engine every ``SIGNAL_TICK_S`` while it is in guest mode (``emu_stop``, as a request
    does); the run loop then passes through Python, where a pending handler runs and its exception
    (KeyboardInterrupt) propagates out of ``run()``. A stop costs one ``emu_start`` re-entry (a few µs per
    20 ms); vCPUs on other threads are never stopped (their signals are handled by the main thread anyway).
    ``arm``/``disarm`` run on every ``run()``, so they are plain attribute writes: the thread polls, and goes
    idle (an Event) after about a second without an armed vCPU.
    """

    IDLE_TICKS = 50

    def __init__(self) -> None:
        self.cpu: SimCpu | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, cpu: SimCpu) -> None:
        self.cpu = cpu
        if not self._wake.is_set():  # the thread is idle, or not started yet
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="kvmgmem-sim-signal-tick", daemon=True)
                    self._thread.start()
            self._wake.set()

    def disarm(self) -> None:
        self.cpu = None

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            idle = 0
            while idle < self.IDLE_TICKS:
                time.sleep(SIGNAL_TICK_S)
                cpu = self.cpu
                if cpu is None:
                    idle += 1
                    continue
                idle = 0
                cpu._stop_if_in_guest()
            self._wake.clear()
            if self.cpu is not None:  # armed while we were deciding to sleep: keep ticking
                self._wake.set()


_ticker = _SignalTicker()


def _emulation_failure(*data: int) -> VmExitSignal:
    return VmExitSignal(InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, tuple(data)))


@dataclass
class _IoEvent:
    direction: int
    port: int
    size: int
    data: bytes
    rip: int
    rax: int = 0


@dataclass(frozen=True)
class _DataOutcome:
    """The data page (not a page-table page) could not be mapped: what the resolver said instead."""

    gpa_page: int
    result: FaultResult


@dataclass
class _Completion:
    """What the next ``run()`` finishes before entering the guest (KVM's ``complete_userspace_io``)."""

    kind: Pending | None  # the reply the exit waits for (the base Vcpu's vocabulary); None: only skip it
    next_rip: int
    size: int = 0
    mmio: MmioAccess | None = None
    data: bytes = b""
    ret: int = 0


class CpuSet:
    """The vCPUs of one VM, the store windows they share, and VM-wide CPU settings."""

    def __init__(self, resolver: GpaResolver, private_access_bit: int | None = None) -> None:
        self.resolver = resolver
        self.private_access_bit = private_access_bit
        self.stores = StoreMap()
        self.exit_hypercall_mask = 0
        # replaced, never mutated (under _lock): a flush iterates a snapshot without taking the lock
        self._cpus: tuple[SimCpu, ...] = ()
        self._lock = threading.Lock()
        # Every flush gets a sequence number, logged with its gfn range (None: everything). A vCPU that did
        # not cache any translation in a range is not interrupted by its flush; a translation it resolves
        # concurrently is checked against the log before it is cached (see SimCpu._cache_result).
        self._flush_lock = threading.Lock()
        self.flush_seq = 0
        self._flush_log: collections.deque[tuple[int, tuple[int, int] | None]] = collections.deque(maxlen=FLUSH_LOG)

    @property
    def cpus(self) -> list[SimCpu]:
        with self._lock:
            return list(self._cpus)

    def create_cpu(self, vcpu_id: int = 0) -> SimCpu:
        cpu = SimCpu(self, vcpu_id)
        with self._lock:
            self._cpus = (*self._cpus, cpu)
        return cpu

    def _forget(self, cpu: SimCpu) -> None:
        with self._lock:
            self._cpus = tuple(c for c in self._cpus if c is not cpu)

    def add_store(self, host_ptr: int, size: int) -> int:
        """Register a store; returns its window (unicorn physical address of ``host_ptr``)."""
        store = self.stores.add(host_ptr, size)
        self._request_all(None)
        return store.window

    def remove_store(self, host_ptr: int) -> None:
        """Unregister a store; on return no vCPU can access it (the memory may be unmapped)."""
        self.stores.remove(host_ptr)
        self._request_all(None)

    def flush(self, gfn_start: int | None = None, gfn_end: int | None = None) -> None:
        """Flush every vCPU's TLB for ``[gfn_start, gfn_end)`` (everything if None); waits for the acks.

        Only vCPUs that cached a translation in the range are asked (and waited for), as KVM only needs to
        flush TLBs that may hold the zapped SPTEs; the others cannot hold one (every TLB entry comes from a
        cached translation, and a translation resolved across this flush is refused, ``stale_since``)."""
        rng = None if gfn_start is None or gfn_end is None else (gfn_start, gfn_end)
        with self._flush_lock:
            self.flush_seq += 1
            self._flush_log.append((self.flush_seq, rng))
        tickets = []
        for cpu in self._cpus:
            ticket = cpu._post_flush(rng)
            if ticket is not None:
                tickets.append((cpu, ticket))
        for cpu, ticket in tickets:
            cpu._wait_ack(ticket)

    def stale_since(self, seq: int, gfn_start: int, gfn_end: int) -> bool:
        """Whether a flush after ``seq`` covered any of ``[gfn_start, gfn_end)`` (or the log lost track)."""
        with self._flush_lock:
            if self.flush_seq == seq:
                return False
            log = self._flush_log
            if not log or log[0][0] > seq + 1:
                return True
            for n, rng in reversed(log):
                if n <= seq:
                    break
                if rng is None or (rng[0] < gfn_end and gfn_start < rng[1]):
                    return True
            return False

    def kick_all(self) -> None:
        for cpu in self.cpus:
            cpu.kick()

    def _request_all(self, flush: tuple[int | None, int | None] | None) -> None:
        tickets = [(cpu, cpu._post_request(flush)) for cpu in self.cpus]
        for cpu, ticket in tickets:
            cpu._wait_ack(ticket)

    def close(self) -> None:
        for cpu in self.cpus:
            cpu.close()


class SimCpu:
    """One vCPU. See the module docstring for the interface and the mechanism."""

    def __init__(self, cpuset: CpuSet, vcpu_id: int) -> None:
        self.cpuset = cpuset
        self.vcpu_id = vcpu_id
        self._resolver = cpuset.resolver
        self._private_bit = cpuset.private_access_bit
        self._c_bit = 0 if self._private_bit is None else 1 << self._private_bit
        self._addr_mask = PTE_ADDR & ~self._c_bit  # frame bits of every entry (cpu_pagewalk.walk)
        self._stores: StoreMap = cpuset.stores
        self._uc: Engine = new_engine()
        self._state = CpuState(self._uc)
        self._sites = CodeSites(self._uc)  # where exits must be precise (cpu_sites); outlives the engine
        self._paging_view = PagingView(self._uc)
        self._fill_cb = add_tlb_fill_hook(self._uc, self._fill)  # kept alive with the engine
        self._uc.hook_add(UC_HOOK_INSN, self._hook_out, None, 1, 0, UC_X86_INS_OUT)
        self._uc.hook_add(UC_HOOK_INSN, self._hook_in, None, 1, 0, UC_X86_INS_IN)
        self._uc.hook_add(UC_HOOK_INTR, self._hook_intr)
        self._uc.hook_add(UC_HOOK_INSN_INVALID, self._hook_insn_invalid)
        self._uc.hook_add(UC_HOOK_INSN, self._hook_cpuid, None, 1, 0, UC_X86_INS_CPUID)
        self._cpuid: list[uapi.kvm_cpuid_entry2] = []  # KVM_SET_CPUID2's table (empty: every leaf reads 0)
        self._delivery = ExceptionDelivery(self._uc, self._state, self)

        # KVM's vcpu->mutex: held by run() and by register access, never by requesters
        self._mutex = threading.RLock()
        # request state (KVM's vcpu->requests + vcpu->mode), guarded by _cond
        self._lock = threading.Lock()  # _cond's lock, taken directly where a fill's microseconds count
        self._cond = threading.Condition(self._lock)
        self._in_guest = False
        self._in_resolver = False
        self._owner: int | None = None  # thread ident inside run()
        self._req = 0
        self._ack = 0
        self._flush_all = False
        self._flush_ranges: list[tuple[int, int]] = []
        self._kick = False
        # The signal half of a kick (KVM_RUN takes both halves; KVM_PRE_FAULT_MEMORY only sees this one)
        self._signal = False
        self._closed = False

        # per-vCPU caches, valid until the next flush (vCPU thread only)
        self._pt_cache: dict[int, int] = {}  # gpa page -> host address of that 4 KiB page
        self._pt_entries: dict[int, memoryview] = {}  # the same pages as 512 u64 entries
        # gfns with a _pt_cache/_data_cache entry, by 2 MiB region (REGION_SHIFT); changed under _cond, so a
        # flusher can ask (under _cond) whether this vCPU cached anything in a range
        self._touched: dict[int, set[int]] = {}
        # data translations are keyed by (gpa page, private): with a private access bit the same gpa has a
        # private and a shared translation (None: no such bit, the attribute decides)
        self._data_cache: dict[tuple[int, bool | None], tuple[int, bool]] = {}  # -> (host page, writable)
        # Huge mappings (Mapped.size > 4 KiB) by their aligned gpa: every 4 KiB page inside resolves from here
        # without asking the resolver again (one fault per 2 MiB, as with a huge SPTE).
        self._changing_map = False  # inside _sync_stores (see _hook_tlb_fill)
        self._huge_cache: dict[tuple[int, bool | None], tuple[int, bool, int]] = {}  # -> (host, writable, size)
        self._mapped: dict[int, Store] = {}  # window -> store mapped into this engine
        self._stores_gen = -1
        self._last_store: Store | None = None  # the store the last fill found (_window)
        # The virtual pages unicorn's TLB got for each gfn since its last full flush, so that a ranged flush
        # drops just those (_clear_translations); "untracked" when more were installed than remembered.
        self._page_flush = PageFlush(self._uc)
        self._tlb_vpages: dict[int, list[int]] = {}
        self._tlb_untracked = not self._page_flush.available
        self._code_stale = False

        # events recorded by hooks during one emu_start
        self._io: _IoEvent | None = None
        self._intr: tuple[int, int] | None = None  # (vector, rip)
        self._tlb_event: tuple[int, int, object] | None = None  # (vaddr page, access, outcome)
        self._invalid_insn = False
        # cross-run state
        self._completion: _Completion | None = None
        self._pending_event: Event | None = None
        self.cr8 = 0
        self.apic_base = 0xFEE00000 | 0x800 | (0x100 if vcpu_id == 0 else 0)

    @contextlib.contextmanager
    def loaded(self, op: str) -> Iterator[None]:
        """``vcpu_load`` for a vCPU ioctl other than KVM_RUN: holds the vCPU mutex (a KVM_RUN on another
        thread finishes first, as ``kvm_vcpu_ioctl`` waits on ``vcpu->mutex``); EBADF once closed."""
        with self._mutex:
            if self._closed:
                raise KvmError(errno.EBADF, op, "vCPU is closed")
            yield

    # --- registers (KVM_GET/SET_REGS, KVM_GET/SET_SREGS) ---------------------------------------------------

    def get_regs(self) -> uapi.kvm_regs:
        with self._mutex:
            return cpu_regs.get_regs(self._uc)

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        with self._mutex:
            cpu_regs.set_regs(self._uc, regs)
            self._code_stale = True

    def get_sregs(self) -> uapi.kvm_sregs:
        with self._mutex:
            return cpu_regs.get_sregs(self._uc, self._state, self.cr8, self.apic_base)

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        with self._mutex:
            cpu_regs.set_sregs(self._uc, self._state, sregs)
            self.cr8 = sregs.cr8
            self.apic_base = sregs.apic_base
            with self._cond:
                self._clear_translations()
            self._code_stale = True

    # --- completions --------------------------------------------------------------------------------------

    def complete_io(self, data: bytes) -> None:
        c = self._completion
        if c is not None and c.kind == Pending.IO_IN:
            c.data = bytes(data)

    def complete_mmio(self, data: bytes) -> None:
        c = self._completion
        if c is not None and c.kind == Pending.MMIO_READ:
            c.data = bytes(data)

    def complete_hypercall(self, ret: int) -> None:
        c = self._completion
        if c is not None and c.kind == Pending.HYPERCALL:
            c.ret = ret & MASK64

    # --- requests: flush, kick, store changes -------------------------------------------------------------

    def flush(self, gfn_start: int | None = None, gfn_end: int | None = None) -> None:
        """Flush this vCPU's TLB (range in gfns, None = all) and wait for its acknowledgement."""
        self._wait_ack(self._post_request((gfn_start, gfn_end)))

    def invalidate_code(self) -> None:
        """Drop translated code before the next entry (after the host rewrote guest code that already ran)."""
        with self._cond:
            self._code_stale = True
        self._wait_ack(self._post_request(None))

    def kick(self) -> None:
        """Make the running (or next) ``run()`` raise ``KvmError(EINTR)``; waits until it left the guest."""
        with self._cond:
            self._kick = self._signal = True
            self._cond.notify_all()  # a vCPU blocked in block() wakes now
            while self._kick and self._must_wait_locked():
                if self._in_guest:
                    self._uc.emu_stop()
                self._cond.wait(0.0005)

    def take_kick(self) -> bool:
        """Consume a pending kick (KVM's ``immediate_exit`` checked before anything else in KVM_RUN)."""
        if not self._kick:  # unlocked fast path: run() checks again under the lock
            return False
        with self._cond:
            kicked, self._kick = self._kick, False
            if kicked:
                self._signal = False  # delivered on the way out of KVM_RUN
                self._cond.notify_all()
            return kicked

    def block(self, op: str) -> NoReturn:
        """``kvm_vcpu_block`` when nothing can wake the vCPU but a signal (no interrupt controller is modelled):
        wait for a kick, consume it and fail ``op`` with EINTR. A kicker waits for this, as for a running vCPU."""
        with self._mutex, self._cond:
            self._owner = threading.get_ident()
            try:
                while not self._kick:
                    if self._closed:
                        raise KvmError(errno.EBADF, op, "vCPU is closed")
                    self._cond.wait(SIGNAL_TICK_S)  # wakes for a kick, and lets the main thread see Ctrl-C
                self._kick = self._signal = False
            finally:
                self._owner = None
                self._cond.notify_all()
        raise KvmError(errno.EINTR, op, "blocked vCPU woken by a signal")

    def take_signal(self) -> bool:
        """Consume the signal a kick sent (``signal_pending(current)`` for an ioctl other than KVM_RUN, e.g.
        KVM_PRE_FAULT_MEMORY): the ioctl fails with EINTR and the signal is delivered on its way out, while
        ``immediate_exit`` stays set for the next ``run()``, as a VMM's kick leaves both."""
        if not self._signal:
            return False
        with self._cond:
            signalled, self._signal = self._signal, False
            return signalled

    def _stop_if_in_guest(self) -> None:
        with self._cond:
            if self._in_guest:
                self._uc.emu_stop()

    def _post_request(self, flush: tuple[int | None, int | None] | None) -> int:
        with self._cond:
            if flush is not None:
                start, end = flush
                if start is None or end is None:
                    self._flush_all = True
                else:
                    self._add_flush_range_locked(start, end)
            return self._bump_locked()

    def _bump_locked(self) -> int:
        self._req += 1
        if self._in_guest:
            self._uc.emu_stop()
        return self._req

    def _post_flush(self, rng: tuple[int, int] | None) -> int | None:
        """A CpuSet flush: request it only if this vCPU cached something in ``rng``; returns the ticket."""
        with self._lock:  # _cond's lock, taken directly: once per vCPU per flush
            if rng is None:
                self._flush_all = True
            elif self._flush_all:
                pass  # a full flush is already pending
            elif not self._touches_locked(*rng):
                return None
            else:
                self._add_flush_range_locked(*rng)
            return self._bump_locked()

    def _add_flush_range_locked(self, start: int, end: int) -> None:
        """Queue a ranged flush, merging it into an overlapping or adjacent one; past MAX_PENDING_RANGES
        (a vCPU outside run() collecting one range per zap) everything degrades to one full flush."""
        if self._flush_all:
            return
        ranges = self._flush_ranges
        for i, (s, e) in enumerate(ranges):
            if s <= end and start <= e:
                ranges[i] = (min(s, start), max(e, end))
                return
        if len(ranges) >= MAX_PENDING_RANGES:
            self._flush_all = True
            ranges.clear()
        else:
            ranges.append((start, end))

    def _touches_locked(self, start: int, end: int) -> bool:
        """Whether any cached translation (4 KiB page, page-table page or huge mapping) lies in the range."""
        if start >= end:
            return False
        for (gpa, _private), (_host, _w, size) in self._huge_cache.items():
            first = gpa >> 12
            if first < end and start < first + (size >> 12):
                return True
        touched = self._touched
        if not touched:
            return False
        region = start >> REGION_SHIFT
        if region == (end - 1) >> REGION_SHIFT:  # the common case: a range inside one 2 MiB region
            gfns = touched.get(region)
            if not gfns:
                return False
            if end - start < len(gfns):
                return any(g in gfns for g in range(start, end))
            return any(start <= g < end for g in gfns)
        for gfns in self._regions_in(start, end):
            if any(start <= g < end for g in gfns):
                return True
        return False

    def _regions_in(self, start: int, end: int) -> list[set[int]]:
        """The _touched sets of the regions overlapping [start, end): O(min(regions in range, regions))."""
        touched = self._touched
        first, last = start >> REGION_SHIFT, (end - 1) >> REGION_SHIFT
        if last - first < len(touched):
            return [t for t in (touched.get(r) for r in range(first, last + 1)) if t]
        return [t for r, t in touched.items() if first <= r <= last and t]

    def _must_wait_locked(self) -> bool:
        """Whether a requester has to wait for this vCPU's ack: it is inside ``run()`` on another thread and
        not inside the resolver (which may be blocked on a lock the requester holds)."""
        owner = self._owner
        return owner is not None and owner != threading.get_ident() and not self._in_resolver

    def _wait_ack(self, ticket: int) -> None:
        with self._cond:
            while self._ack < ticket and self._must_wait_locked():
                if self._in_guest:
                    self._uc.emu_stop()
                self._cond.wait(0.0005)

    def _service_locked(self) -> None:
        """At a safe point on the vCPU thread (engine stopped): apply every pending request, then ack."""
        if self._req == self._ack and self._stores.generation == self._stores_gen:
            return
        if self._flush_all or self._flush_ranges:
            self._clear_translations(None if self._flush_all else self._flush_ranges)
            self._flush_all = False
            self._flush_ranges = []
        self._sync_stores()
        self._ack = self._req
        self._cond.notify_all()

    def _clear_translations(self, ranges: list[tuple[int, int]] | None = None) -> None:
        """Drop the unicorn TLB (it has no per-page flush) and the cached translations in ``ranges`` (all if
        None). Cost O(cached pages in the ranges + regions), not O(cache size × ranges). Caller holds _cond or
        is the only thread that can touch this vCPU.

        Unicorn's TLB loses only the virtual pages installed for the gfns in the ranges and in the huge
        mappings dropped (``_tlb_vpages``) when that is enough: not when a page-table page is in a range (any
        translation may have used it), nor when more pages were installed than remembered
        (``_tlb_untracked``)."""
        if ranges is None:
            self._flush_tlb()
            self._huge_cache.clear()
            self._pt_cache.clear()
            self._pt_entries.clear()
            self._data_cache.clear()
            self._touched.clear()
            return
        full = self._tlb_untracked
        vpages: list[int] = []
        for key in list(self._huge_cache):  # few entries
            first, size = key[0] >> 12, self._huge_cache[key][2] >> 12
            if any(first < e and s < first + size for s, e in ranges):
                del self._huge_cache[key]
                vpages += self._take_installed(first, first + size)
        pt, data, pte = self._pt_cache, self._data_cache, self._pt_entries
        for s, e in ranges:
            vpages += self._take_installed(s, e)
            for gfns in self._regions_in(s, e):
                hit = [g for g in gfns if s <= g < e]
                for g in hit:
                    gpa = g << 12
                    if pt.pop(gpa, None) is not None:
                        full = True
                    pte.pop(gpa, None)
                    data.pop((gpa, None), None)
                    data.pop((gpa, True), None)
                    data.pop((gpa, False), None)
                gfns.difference_update(hit)
        if full:
            self._flush_tlb()
        else:
            for vpage in vpages:
                self._page_flush(vpage)

    def _flush_tlb(self) -> None:
        """Drop unicorn's whole TLB and what ``_tlb_vpages`` remembered of it."""
        tlb_flush(self._uc)
        self._tlb_vpages.clear()
        self._tlb_untracked = not self._page_flush.available

    def _take_installed(self, start: int, end: int) -> list[int]:
        """Forget and return the virtual pages installed for gfns ``[start, end)``: O(min(range, remembered))."""
        tlb = self._tlb_vpages
        if not tlb:
            return []
        if end - start > len(tlb):
            gfns = [g for g in tlb if start <= g < end]
        else:
            gfns = [g for g in range(start, end) if g in tlb]
        out: list[int] = []
        for g in gfns:
            out += tlb.pop(g)
        return out

    def _note_tlb(self, gpa_page: int, vaddr: int) -> None:
        """Remember that unicorn's TLB maps ``vaddr``'s page to ``gpa_page`` (vCPU thread, at an install)."""
        gfn, vpage = gpa_page >> 12, vaddr & PAGE_MASK
        installed = self._tlb_vpages.get(gfn)
        if installed is None:
            if len(self._tlb_vpages) < TLB_TRACKED:
                self._tlb_vpages[gfn] = [vpage]
            else:
                self._tlb_untracked = True
        elif vpage not in installed:
            if len(installed) < TLB_ALIASES:
                installed.append(vpage)
            else:
                self._tlb_untracked = True

    def _note_cached_locked(self, gpa_page: int) -> None:
        gfn = gpa_page >> 12
        region = self._touched.get(gfn >> REGION_SHIFT)
        if region is None:
            self._touched[gfn >> REGION_SHIFT] = {gfn}
        else:
            region.add(gfn)

    def _sync_stores(self) -> None:
        gen, stores = self._stores.snapshot()
        if gen == self._stores_gen:
            return
        wanted = {s.window: s for s in stores}
        removed = [w for w in self._mapped if w not in wanted]
        if removed:
            self._clear_translations()
            self._code_stale = True
        self._last_store = None
        self._changing_map = True
        try:
            for window in removed:
                store = self._mapped.pop(window)
                self._uc.mem_unmap(window, store.size)
            for window, store in wanted.items():
                if window not in self._mapped:
                    self._uc.mem_map_ptr(window, store.size, UC_PROT_ALL, store.host_ptr)
                    self._mapped[window] = store
        finally:
            self._changing_map = False
        self._stores_gen = gen

    # --- run (KVM_RUN) ------------------------------------------------------------------------------------

    def run(self) -> Exit:
        with self._mutex:
            with self._cond:
                if self._closed:
                    raise KvmError(errno.EBADF, "KVM_RUN", "vCPU is closed")
                self._owner = threading.get_ident()
                self._service_locked()
                if self._kick:
                    self._kick = self._signal = False
                    self._owner = None
                    self._cond.notify_all()
                    raise KvmError(errno.EINTR, "KVM_RUN")
            on_main = self._owner == _MAIN_THREAD
            if on_main:
                _ticker.arm(self)
            try:
                self._finish_completion()
                return self._run_loop()
            finally:
                if on_main:
                    _ticker.disarm()
                with self._cond:
                    self._owner = None
                    self._in_guest = False
                    self._cond.notify_all()

    def _finish_completion(self) -> None:
        c, self._completion = self._completion, None
        if c is None:
            return
        uc = self._uc
        if c.kind == Pending.IO_IN:
            rax = uc.reg_read(UC_X86_REG_RAX)
            value = int.from_bytes(c.data[: c.size].ljust(c.size, b"\0"), "little")
            if c.size == 4:
                rax = value
            else:
                mask = (1 << (8 * c.size)) - 1
                rax = (rax & ~mask) | value
            uc.reg_write(UC_X86_REG_RAX, rax & MASK64)
        elif c.kind == Pending.MMIO_READ and c.mmio is not None:
            from kvmgmem.backends.sim.cpu_emul import UC_GPR, ix

            reg_id = UC_GPR[ix.RegisterExt.full_register(c.mmio.dest)]
            uc.reg_write(reg_id, c.mmio.load_result(uc.reg_read(reg_id), c.data))
        elif c.kind == Pending.HYPERCALL:
            uc.reg_write(UC_X86_REG_RAX, c.ret)
        uc.reg_write(UC_X86_REG_RIP, c.next_rip)

    def _run_loop(self) -> Exit:
        uc = self._uc
        while True:
            with self._cond:
                self._service_locked()
                if self._kick:
                    self._kick = self._signal = False
                    self._cond.notify_all()
                    raise KvmError(errno.EINTR, "KVM_RUN")
            try:
                if self._pending_event is not None:
                    if not self._delivery.deliver(self._pending_event):
                        self._pending_event = None
                        return ShutdownExit()
                    self._pending_event = None
            except NeedRetry:
                time.sleep(0)
                continue
            except VmExitSignal as sig:
                return sig.exit

            if self._code_stale:
                uc.ctl_flush_tb()
                self._flush_tlb()  # rewritten code pages are re-scanned on their next fetch fill (_scan_code)
                self._code_stale = False
            self._io = self._intr = self._tlb_event = None
            self._invalid_insn = False
            self._sites.clear_last()
            rip = uc.reg_read(UC_X86_REG_RIP)
            with self._cond:
                if self._req != self._ack:
                    continue
                self._in_guest = True
            err: UcError | None = None
            try:
                uc.emu_start(rip, UNTIL)
            except UcError as e:
                err = e
            finally:
                with self._cond:
                    self._in_guest = False
                    self._service_locked()
            try:
                result = self._after_stop(err)
            except NeedRetry:
                time.sleep(0)
                continue
            except VmExitSignal as sig:
                return sig.exit
            except GuestException as exc:
                self._pending_event = Event(exc.vector, exc.error_code, exc.cr2)
                continue
            if result is not None:
                return result

    def _after_stop(self, err: UcError | None) -> Exit | None:
        uc = self._uc
        if err is None:
            if self._io is not None:
                return self._io_exit(self._io)
            if self._intr is not None:
                vector, fault_rip = self._intr
                # INT n/INT3/INTO/INT1 leave RIP after the instruction, and one of them ran last iff the
                # hook slot names its address (they are all hooked); a fault leaves RIP at the instruction
                last = self._sites.last
                length = self._sites.int_length(last)
                soft = length > 0 and (last + length) & MASK64 == fault_rip
                self._pending_event = Event(vector, 0, None, soft)
                return None
            rip = uc.reg_read(UC_X86_REG_RIP)
            # A HLT ran iff the hooked instruction that ran last is the HLT byte right before RIP. Known from
            # the scan, not read from guest memory: a read may have to be retried, and retrying from here
            # would run on past the HLT.
            if self._sites.last == (rip - 1) & MASK64 and self._sites.is_hlt(self._sites.last):
                return HltExit()
            if self._sites.is_pending(rip):
                self._decide_io_site(rip)
            return None  # stopped for a request or a kick: serviced at the top of the loop
        if self._invalid_insn:
            return self._invalid_opcode()
        if self._tlb_event is not None:
            return self._tlb_exit(*self._tlb_event)
        return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (err.errno,))

    # --- hooks (vCPU thread, inside emu_start) ------------------------------------------------------------

    def _hook_out(self, uc: Engine, port: int, size: int, value: int, _ud: object) -> None:
        if self._io is None:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self._io = _IoEvent(uapi.KVM_EXIT_IO_OUT, port, size, data, uc.reg_read(UC_X86_REG_RIP))
        uc.emu_stop()

    def _hook_in(self, uc: Engine, port: int, size: int, _ud: object) -> int:
        if self._io is None:
            rip, rax = uc.reg_read_batch([UC_X86_REG_RIP, UC_X86_REG_RAX])
            self._io = _IoEvent(uapi.KVM_EXIT_IO_IN, port, size, bytes(size), rip, rax)
        uc.emu_stop()
        return 0

    def _hook_intr(self, uc: Engine, intno: int, _ud: object) -> None:
        if self._intr is None:
            self._intr = (intno, uc.reg_read(UC_X86_REG_RIP))
        uc.emu_stop()

    def _hook_cpuid(self, uc: Engine, _ud: object) -> int:
        """CPUID exits on KVM: ``kvm_emulate_cpuid`` answers from the KVM_SET_CPUID2 table (``cpuid.py``) and
        writes the four results zero-extended. Returning 1 skips the emulator's own CPUID model."""
        rax, rcx, cr4 = uc.reg_read_batch([UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_CR4])
        table = cpuid.runtime_entries(self._cpuid, cr4, self.apic_base)
        eax, ebx, ecx, edx = cpuid.kvm_cpuid(table, rax & 0xFFFFFFFF, rcx & 0xFFFFFFFF)
        uc.reg_write_batch([(UC_X86_REG_RAX, eax), (UC_X86_REG_RBX, ebx), (UC_X86_REG_RCX, ecx), (UC_X86_REG_RDX, edx)])
        return 1

    def set_cpuid(self, entries: list[uapi.kvm_cpuid_entry2]) -> None:
        """Load the KVM_SET_CPUID2 table the guest's CPUID answers from."""
        with self._mutex:
            self._cpuid = list(entries)

    def cpuid_entries(self) -> list[uapi.kvm_cpuid_entry2]:
        """The table with KVM's runtime bits refreshed from the current CR4 and APIC base (KVM_GET_CPUID2)."""
        with self._mutex:
            return cpuid.runtime_entries(self._cpuid, self._uc.reg_read(UC_X86_REG_CR4), self.apic_base)

    def _hook_insn_invalid(self, uc: Engine, _ud: object) -> bool:
        self._invalid_insn = True
        return False  # ends emu_start with UC_ERR_INSN_INVALID, RIP at the instruction

    def _fill(self, _uch: int, vaddr: int, access: int, entry: int, _ud: int) -> bool:
        """The TLB-fill hook (``cpu_uc.add_tlb_fill_hook``): a refill the per-vCPU caches can answer is done
        here, in one hold of ``_cond`` with the GIL never released, and everything else takes
        ``_hook_tlb_fill``.

        Why a second walk: a warm refill (unicorn evicted an entry; every table page and the data page are
        cached) is the sim's most frequent fill, and ``cpu_pagewalk.walk`` with its callbacks, result objects
        and per-entry lock costs ~4× this. The fast path only takes the plain case — paging on, a data
        access, every entry present without reserved bits, the access allowed — and
        hands anything else, unchanged, to the full walk, which decides #PF, exits and caching; so it can
        only answer what the full walk would answer the same way. A data page missing from ``_data_cache``
        then goes through ``_resolve_page`` exactly as ``_translate`` does after its walk (first touch,
        refault, spurious). Holding ``_cond`` with ``_req == _ack`` is the slow path's install rule.
        """
        try:
            if access != UC_MEM_FETCH and not self._changing_map:
                write = access == UC_MEM_WRITE
                with self._lock:
                    if self._req == self._ack and not self._kick and self._stores.generation == self._stores_gen:
                        pv = self._paging_view
                        if walk_c is not None:
                            pv.load()
                            walked = walk_c(pv.address, self._pt_cache, vaddr, self._addr_mask, self._c_bit, write)
                        else:
                            walked = fast_walk_py(pv.load(), self._pt_entries, vaddr, self._addr_mask, self._c_bit,
                                                  write)  # fmt: skip
                        if walked is not None:
                            cached = self._cached(walked[0], write, walked[2])
                            if cached is not None:
                                hit = self._window(cached[0], walked[1] and cached[1])
                                if hit is not None:
                                    e = TlbEntry.from_address(entry)
                                    e.paddr, e.perms = hit
                                    installed = self._tlb_vpages.get(walked[0] >> 12)
                                    if installed is None or vaddr & PAGE_MASK not in installed:
                                        self._note_tlb(walked[0], vaddr)
                                    return True
                            return self._fill_resolve(vaddr, access, entry, walked, cached)
            return self._hook_tlb_fill(self._uc, vaddr, access, TlbEntry.from_address(entry), None)
        except BaseException as e:  # what the binding's hook wrapper does: emu_start re-raises it
            uc = self._uc
            if uc._hook_exception is None:
                uc._hook_exception = e
            uc.emu_stop()
            return False

    def _fill_resolve(
        self,
        vaddr: int,
        access: int,
        entry: int,
        walked: tuple[int, bool, bool | None],
        cached: tuple[int, bool] | None,
    ) -> bool:
        """The rest of a fast-path fill whose data page needs the fault path. Called holding ``_lock`` (it
        is released across the resolver: the fault may block on VM locks that a flusher holds)."""
        self._in_guest = False  # into "the kernel": requesters need not wait for us
        seq = None
        if cached is None:  # what _resolve_page would do first, in the caller's hold
            seq = self.cpuset.flush_seq
            self._in_resolver = True
        self._lock.release()
        try:
            return self._fill_resolve_unlocked(vaddr, access, entry, walked, seq)
        finally:
            self._lock.acquire()

    def _fill_resolve_unlocked(
        self, vaddr: int, access: int, entry: int, walked: tuple[int, bool, bool | None], seq: int | None
    ) -> bool:
        gpa_page, writable, private = walked
        write = access == UC_MEM_WRITE
        outcome: object
        page: tuple[int, bool] | FaultResult | VmExitSignal
        try:
            if seq is None:
                page = self._resolve_page(gpa_page, write, False, private, seq)
            else:
                res = self._call_resolver(gpa_page, write, False, private)
                if (  # the common case: one 4 KiB mapping the access may use
                    type(res) is Mapped
                    and res.size == PAGE_SIZE
                    and not res.host_ptr & (PAGE_SIZE - 1)
                    and (res.writable or not write)
                ):
                    return self._fill_install(vaddr, access, entry, walked, res.host_ptr, res.writable, seq)
                page = self._resolved(gpa_page, write, private, seq, res)
        except VmExitSignal as sig:
            page = sig
        if isinstance(page, tuple):
            host_page, host_writable = page
            with self._lock:
                if self._req == self._ack:
                    outcome = self._install_locked(entry, host_page, writable and host_writable, gpa_page, vaddr)
                    if outcome is None:
                        return True
                else:
                    outcome = Retry()
        elif isinstance(page, VmExitSignal):
            outcome = page
        else:
            outcome = _DataOutcome(gpa_page, page)
        self._tlb_event = (vaddr, _UC_ACCESS.get(access, ACCESS_READ), outcome)
        return False

    def _fill_install(
        self,
        vaddr: int,
        access: int,
        entry: int,
        walked: tuple[int, bool, bool | None],
        host_page: int,
        host_writable: bool,
        seq: int,
    ) -> bool:
        """A 4 KiB mapping the fault path just made: cached (``_resolved``) and installed in the TLB entry
        (``_fill_resolve_unlocked``) in one hold of ``_lock`` instead of two, with the same checks: not stale
        since ``seq``, no request pending, a store holding the page."""
        gpa_page, writable, private = walked
        outcome: object
        cpuset = self.cpuset
        with self._lock:
            self._in_resolver = False
            if cpuset.flush_seq != seq and cpuset.stale_since(seq, gpa_page >> 12, (gpa_page >> 12) + 1):
                outcome = _DataOutcome(gpa_page, Retry())
            else:
                self._data_cache[(gpa_page, private)] = (host_page, host_writable)
                self._note_cached_locked(gpa_page)
                if self._req != self._ack:
                    outcome = Retry()
                else:
                    outcome = self._install_locked(entry, host_page, writable and host_writable, gpa_page, vaddr)
                    if outcome is None:
                        return True
        self._tlb_event = (vaddr, _UC_ACCESS.get(access, ACCESS_READ), outcome)
        return False

    def _install_locked(self, entry: int, host_page: int, writable: bool, gpa_page: int, vaddr: int) -> object | None:
        """Point unicorn's TLB ``entry`` for ``vaddr`` at ``host_page``, the page of ``gpa_page`` (caller holds
        ``_lock``, no request pending).

        Returns None once installed — the vCPU is back in guest mode — or the emulation-failure outcome when
        the page lies in no store the engine has mapped (never expected: the resolver returns store pages).
        """
        hit = self._window(host_page, writable)
        if hit is None:
            return _emulation_failure(host_page)
        e = TlbEntry.from_address(entry)
        e.paddr, e.perms = hit
        self._note_tlb(gpa_page, vaddr)
        self._in_guest = True
        if self._kick:  # a kick that found us outside guest mode did not stop the engine
            self._uc.emu_stop()
        return None

    def _window(self, host_page: int, writable: bool) -> tuple[int, int] | None:
        """(window address, perms) of a data page for the TLB entry; None if no store holds it. Caller holds
        ``_lock`` with the store map synced (``_sync_stores`` forgets ``_last_store``)."""
        store = self._last_store
        if store is None or not store.host_ptr <= host_page < store.host_ptr + store.size:
            store = self._stores.find(host_page, PAGE_SIZE)
            if store is None:
                return None
            self._last_store = store
        return (store.window + host_page - store.host_ptr, UC_PROT_READ | UC_PROT_WRITE if writable else UC_PROT_READ)

    def _hook_tlb_fill(self, uc: Engine, vaddr: int, access: int, entry: object, _ud: object) -> bool:
        if self._changing_map:
            # unicorn's own mem_unmap/mem_map_ptr probe addresses through this hook while we hold _cond
            # to change the store map: no guest access is in flight, so there is nothing to translate.
            return False
        acc = _UC_ACCESS.get(access, ACCESS_READ)
        with self._cond:
            self._in_guest = False  # in "the kernel" now: requesters need not wait for us
        outcome = self._translate(vaddr, acc)
        if isinstance(outcome, tuple):
            with self._cond:
                if self._req == self._ack:
                    paddr, perms, host_page, gpa_page = outcome
                    if acc != ACCESS_FETCH or not self._scan_code(vaddr & PAGE_MASK, host_page):
                        entry.paddr, entry.perms = paddr, perms  # type: ignore[attr-defined]
                        self._note_tlb(gpa_page, vaddr)
                        self._in_guest = True
                        if self._kick:  # a kick that found us outside guest mode did not stop the engine
                            uc.emu_stop()
                        return True
                    # an instruction being translated may run into this page, and its site was decided on
                    # other bytes: translate again with the site pending (cpu_sites.CodeSites.scan)
                    self._code_stale = True
            outcome = Retry()
        self._tlb_event = (vaddr, acc, outcome)
        return False

    def _scan_code(self, vpage: int, host_page: int) -> bool:
        """Hook the sites where an exit must be precise (``cpu_sites``) before unicorn translates code on
        ``vpage``; True if translated code must go first (``CodeSites.scan``). Caller holds ``_cond`` with
        no request pending, so ``host_page`` is live memory of a registered store."""
        return self._sites.scan(vpage, ctypes.string_at(host_page, PAGE_SIZE))

    def _decide_io_site(self, rip: int) -> None:
        """The engine stopped before a possible IN/OUT (a pending site, ``cpu_sites``): decode it once, hook
        the instruction after it if it is one, and drop the translations made with the old hooks."""
        hflags = self._state.load().hflags
        bitness = 64 if hflags & HF_CS64_MASK else 32 if hflags & HF_CS32_MASK else 16
        code = self._fetch_insn(rip)
        io = decode_io(code, bitness, rip)
        if io is not None and io.length == 0:  # the instruction runs into a page the fetch cannot reach:
            self.read_virt(rip + len(code), 1, ACCESS_FETCH)  # take the CPU's fault
            io = None  # pragma: no cover - the page became reachable meanwhile; a late stop stays loud
        self._sites.decide(rip, io)
        self._uc.ctl_flush_tb()

    # --- translation ---------------------------------------------------------------------------------------

    def _paging(self, cpl: int | None = None) -> Paging:
        st = self._state.load()
        return Paging(st.cr(0), st.cr(3), st.cr(4), st.efer, st.eflags, st.cpl if cpl is None else cpl)

    def _cached(self, gpa_page: int, write: bool, private: bool | None) -> tuple[int, bool] | None:
        """(host page, writable) from this vCPU's data or huge-mapping cache, if it allows the access."""
        cached = self._data_cache.get((gpa_page, private))
        if cached is not None and (cached[1] or not write):
            return cached
        if not self._huge_cache:  # the common case: no huge mapping cached at all
            return None
        for size in _HUGE_SIZES:
            huge = self._huge_cache.get((gpa_page & ~(size - 1), private))
            if huge is not None and huge[2] == size and (huge[1] or not write):
                return (huge[0] + (gpa_page & (size - 1)), huge[1])
        return None

    def _resolve_page(
        self, gpa_page: int, write: bool, fetch: bool, private: bool | None = None, entered: int | None = None
    ) -> tuple[int, bool] | FaultResult:
        """``private`` None: the resolver decides from the attribute (page-table reads, no private bit).

        ``entered``: the caller (the fill fast path) already missed the caches, read ``cpuset.flush_seq``
        (passed here) and set ``_in_resolver``, all in its own hold of ``_cond``; this saves a hold."""
        if entered is None:
            cached = self._cached(gpa_page, write, private)
            if cached is not None:
                return cached
            seq = self.cpuset.flush_seq  # read before resolving: a flush after this may make the result stale
            with self._cond:
                self._in_resolver = True  # may block on VM locks a flusher holds: flushers must not wait for us
        else:
            seq = entered
        return self._resolved(gpa_page, write, private, seq, self._call_resolver(gpa_page, write, fetch, private))

    def _call_resolver(self, gpa_page: int, write: bool, fetch: bool, private: bool | None) -> FaultResult:
        """The VM's fault handler, entered with ``_in_resolver`` set (cleared here if it raises)."""
        try:
            if private is None:  # the three-argument form every GpaResolver understands
                return self._resolver.handle_fault(gpa_page, write, fetch)
            return self._resolver.handle_fault(gpa_page, write, fetch, private=private)
        except BaseException:
            with self._cond:
                self._in_resolver = False
            raise

    def _resolved(
        self, gpa_page: int, write: bool, private: bool | None, seq: int, res: FaultResult
    ) -> tuple[int, bool] | FaultResult:
        """What ``_resolve_page`` makes of the resolver's answer: cache it unless a flush since ``seq`` made it
        stale, and clear ``_in_resolver``."""
        if not isinstance(res, Mapped):
            with self._cond:
                self._in_resolver = False
            return res
        size, host, writable = res.size, res.host_ptr, res.writable
        base = gpa_page & ~(size - 1)
        bad = size < PAGE_SIZE or size & (size - 1) or host & (PAGE_SIZE - 1)
        usable = not bad and (writable or not write)
        result = (host + (gpa_page & (size - 1)), writable)
        cpuset = self.cpuset
        with self._lock:  # _cond's lock, taken directly (once per fault)
            self._in_resolver = False
            # A flusher that skipped this vCPU (nothing cached in its range) relies on this check: a result
            # resolved before a zap of its gfns is never cached nor installed. With no flush numbered since
            # ``seq`` (read unlocked: a flush numbered after this read sees what we cache under this lock, as
            # _post_flush takes it) nothing can be stale.
            stale = usable and cpuset.flush_seq != seq and cpuset.stale_since(seq, base >> 12, (base + size) >> 12)
            if usable and not stale:
                if size > PAGE_SIZE:
                    self._huge_cache[(base, private)] = (host, writable, size)
                else:
                    self._data_cache[(gpa_page, private)] = result
                    self._note_cached_locked(gpa_page)
        if bad:
            raise _emulation_failure(gpa_page)  # a resolver bug; refusing beats dereferencing garbage
        if write and not writable:
            return Mmio()  # a write the backing refuses is an MMIO write (read-only memslot)
        if stale:
            return Retry()
        return result

    def _read_pte(self, gpa: int) -> int | FaultResult:
        page = gpa & PAGE_MASK
        host_page = self._pt_cache.get(page)
        if host_page is None:
            res = self._resolve_page(page, False, False)
            if not isinstance(res, tuple):
                return res
            host_page = res[0]
            with self._cond:
                self._pt_cache[page] = host_page
                if self._req == self._ack:  # live memory of a registered store (see _deref)
                    self._pt_entries[page] = (
                        memoryview((ctypes.c_uint64 * 512).from_address(host_page)).cast("B").cast("Q")
                    )
                self._note_cached_locked(page)  # also when it came from a huge mapping
        data = self._deref(host_page + (gpa & 0xFFF), 8)
        if data is None:
            return Retry()
        return int(struct.unpack("<Q", data)[0])

    def _deref(self, host_addr: int, n: int, write_data: bytes | None = None) -> bytes | None:
        """Read (or write) host memory behind a translation, only while no request is pending."""
        with self._cond:
            if self._req != self._ack:
                return None
            if self._stores.find(host_addr, n) is None:
                raise _emulation_failure(host_addr)
            if write_data is not None:
                ctypes.memmove(host_addr, write_data, n)
                return write_data
            return ctypes.string_at(host_addr, n)

    def _translate(self, vaddr: int, acc: int, cpl: int | None = None) -> tuple[int, int, int, int] | object:
        """For the TLB: (window address, unicorn perms, host page, gpa page), or the outcome that prevents it."""
        try:
            res = walk(vaddr, acc, self._paging(cpl), self._read_pte, self._private_bit)
            if not isinstance(res, Translation):
                return res
            page = self._resolve_page(res.gpa & PAGE_MASK, acc == ACCESS_WRITE, acc == ACCESS_FETCH, res.private)
            if not isinstance(page, tuple):
                return _DataOutcome(res.gpa & PAGE_MASK, page)
            host_page, host_writable = page
            store = self._stores.find(host_page, PAGE_SIZE)
            if store is None:
                return _emulation_failure(host_page)
            perms = UC_PROT_READ
            if res.writable and host_writable:
                perms |= UC_PROT_WRITE
            if res.executable and acc == ACCESS_FETCH:
                # Only a fetch fill grants EXEC, so every page is scanned (_scan_code) before unicorn
                # translates code from it; a data fill of a code page costs one more fill on first fetch.
                perms |= UC_PROT_EXEC
            return (store.window + host_page - store.host_ptr, perms, host_page, res.gpa & PAGE_MASK)
        except VmExitSignal as sig:
            return sig

    # --- guest virtual memory for Python-side emulation (GuestMemory protocol) ------------------------------

    def _host_for(self, va: int, acc: int, cpl: int | None) -> int:
        res = walk(va, acc, self._paging(cpl), self._read_pte, self._private_bit)
        if isinstance(res, PageFault):
            raise GuestException(VEC_PF, res.error_code, va)
        if isinstance(res, NonCanonical):
            raise GuestException(VEC_GP, 0)
        if not isinstance(res, Translation):
            raise self._outcome_signal(res, va & PAGE_MASK)
        page = self._resolve_page(res.gpa & PAGE_MASK, acc == ACCESS_WRITE, acc == ACCESS_FETCH, res.private)
        if isinstance(page, Mmio):  # the exact gpa matters to event delivery (cpu_exc.ExceptionDelivery)
            raise MmioDuringAccess(_emulation_failure(res.gpa & PAGE_MASK).exit, res.gpa, acc == ACCESS_WRITE)
        if not isinstance(page, tuple):
            raise self._outcome_signal(page, res.gpa & PAGE_MASK)
        return page[0] + (res.gpa & 0xFFF)

    def _outcome_signal(self, outcome: object, gpa_page: int) -> Exception:
        if isinstance(outcome, Retry):
            return NeedRetry()
        if isinstance(outcome, MemoryFault):
            return VmExitSignal(MemoryFaultExit(outcome.flags, outcome.gpa, outcome.size, outcome.errno))
        return _emulation_failure(gpa_page)

    def read_virt(self, va: int, n: int, access: int = ACCESS_READ, cpl: int | None = None) -> bytes:
        out = b""
        while n > 0:
            chunk = min(n, PAGE_SIZE - (va & 0xFFF))
            data = self._deref(self._host_for(va, access, cpl), chunk)
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
            if self._deref(self._host_for(va, ACCESS_WRITE, cpl), chunk, data[:chunk]) is None:
                raise NeedRetry()
            va = (va + chunk) & MASK64
            data = data[chunk:]

    def _fetch_insn(self, rip: int) -> bytes:
        room = PAGE_SIZE - (rip & 0xFFF)
        code = self.read_virt(rip, min(15, room), ACCESS_FETCH)
        if room < 15:
            try:
                code += self.read_virt(rip + room, 15 - room, ACCESS_FETCH)
            except GuestException:
                pass  # the instruction may well end on this page
        return code

    # --- exits --------------------------------------------------------------------------------------------

    def _io_exit(self, io: _IoEvent) -> Exit:
        uc = self._uc
        next_rip = uc.reg_read(UC_X86_REG_RIP)
        if next_rip != io.rip and not self._sites.is_after_io(next_rip):
            # the stop did not land on a hooked address, so code after the IN/OUT ran (only possible for
            # code unicorn translated before it was scanned, e.g. code the guest rewrote): refuse loudly
            return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (io.rip, next_rip))
        if io.direction == uapi.KVM_EXIT_IO_IN:
            if self._sites.is_ins(io.rip):  # INS: the dummy value already went to memory; not emulated
                return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (io.rip,))
            uc.reg_write(UC_X86_REG_RAX, io.rax)
            self._completion = _Completion(Pending.IO_IN, next_rip, size=io.size)
        else:
            self._completion = _Completion(None, next_rip)
        uc.reg_write(UC_X86_REG_RIP, io.rip)  # as KVM: RIP stays on the instruction until the next run
        return IoExit(io.direction, io.port, io.size, 1, io.data)

    def _tlb_exit(self, vaddr: int, acc: int, outcome: object) -> Exit | None:
        if isinstance(outcome, PageFault):
            self._pending_event = Event(VEC_PF, outcome.error_code, self._fault_address(vaddr, acc))
            return None
        if isinstance(outcome, NonCanonical):
            self._pending_event = Event(VEC_GP, 0)
            return None
        if isinstance(outcome, VmExitSignal):
            return outcome.exit
        if isinstance(outcome, _DataOutcome):
            gpa_page, res = outcome.gpa_page, outcome.result
            if isinstance(res, Mmio):
                return self._mmio_exit(vaddr, gpa_page, acc)
            if isinstance(res, Retry):
                time.sleep(0)
                return None
            if isinstance(res, MemoryFault):
                return MemoryFaultExit(res.flags, res.gpa, res.size, res.errno)
            return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (gpa_page,))
        if isinstance(outcome, Retry):
            time.sleep(0)
            return None
        if isinstance(outcome, MemoryFault):  # taken while walking the guest's page tables
            return MemoryFaultExit(outcome.flags, outcome.gpa, outcome.size, outcome.errno)
        return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (vaddr,))  # e.g. a page table in MMIO space

    def _fault_address(self, page: int, acc: int) -> int:
        """CR2: the exact linear address, from the decoded instruction (unicorn only tells us the page)."""
        rip = self._uc.reg_read(UC_X86_REG_RIP)
        if acc == ACCESS_FETCH:
            return rip if rip & PAGE_MASK == page else page
        try:
            insn = decode(self._fetch_insn(rip), rip)
        except (GuestException, NeedRetry, VmExitSignal):
            return page
        if insn is None:
            return page
        for addr, size, write in memory_operands(insn, self._uc.reg_read):
            if acc == ACCESS_WRITE and not write:
                continue
            if addr & PAGE_MASK == page:
                return addr
            if addr < page < addr + size:
                return page
        return page

    def _mmio_exit(self, page: int, gpa_page: int, acc: int) -> Exit:
        rip = self._uc.reg_read(UC_X86_REG_RIP)
        if acc == ACCESS_FETCH:
            return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (rip,))
        insn = decode(self._fetch_insn(rip), rip)
        access = decode_mmio(insn, self._uc.reg_read) if insn is not None else None
        if access is None or access.va & PAGE_MASK != page or (access.va & 0xFFF) + access.length > PAGE_SIZE:
            return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (rip,))
        gpa = gpa_page | (access.va & 0xFFF)
        if access.is_write:
            self._completion = _Completion(None, access.next_rip)
            return MmioExit(gpa, access.data, access.length, True)
        self._completion = _Completion(Pending.MMIO_READ, access.next_rip, mmio=access)
        return MmioExit(gpa, bytes(access.length), access.length, False)

    def _invalid_opcode(self) -> Exit | None:
        uc = self._uc
        rip = uc.reg_read(UC_X86_REG_RIP)
        code = self._fetch_insn(rip)
        if code[:3] not in HYPERCALL_INSNS:
            self._pending_event = Event(VEC_UD)
            return None
        return self._hypercall(rip)

    def _hypercall(self, rip: int) -> Exit | None:
        """KVM's ``kvm_emulate_hypercall``, 64-bit mode."""
        uc = self._uc
        nr, a0, a1, a2 = uc.reg_read_batch([UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX])
        if self._state.load().cpl != 0:
            ret = -uapi.KVM_EPERM
        elif nr == uapi.KVM_HC_MAP_GPA_RANGE:
            if not (self.cpuset.exit_hypercall_mask >> uapi.KVM_HC_MAP_GPA_RANGE) & 1:
                ret = -uapi.KVM_ENOSYS
            elif a0 & 0xFFF or a1 == 0 or ((a0 >> 12) + a1) & MASK64 <= a0 >> 12:
                ret = -uapi.KVM_EINVAL
            else:
                self._completion = _Completion(Pending.HYPERCALL, rip + 3)
                return HypercallExit(nr, (a0, a1, a2, 0, 0, 0), True)
        elif nr == KVM_HC_VAPIC_POLL_IRQ:
            ret = 0
        else:
            ret = -uapi.KVM_ENOSYS
        uc.reg_write(UC_X86_REG_RAX, ret & MASK64)
        uc.reg_write(UC_X86_REG_RIP, rip + 3)
        return None

    # --- lifetime -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the engine (waits for a running ``run()`` to end; kick it first to make that quick)."""
        self.kick()
        with self._mutex:
            with self._cond:
                if self._closed:
                    return
                self._closed = True
                self._kick = False
            self.cpuset._forget(self)
            self._changing_map = True
            for window, store in list(self._mapped.items()):
                self._uc.mem_unmap(window, store.size)
            self._mapped.clear()

    @property
    def closed(self) -> bool:
        return self._closed
