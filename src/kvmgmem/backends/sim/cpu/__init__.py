"""The sim's vCPUs: unicorn as a KVM vCPU, with our TLB-fill hook as the EPT.

Modules: ``cpuset`` (CpuSet), ``simcpu`` (SimCpu: run loop, registers), ``requests`` (requests, mode, kicks),
``tlbcache`` (translation caches, store windows), ``fill`` (the TLB-fill hook), ``resolve`` (the vCPU side of
a TDP fault), ``memory`` (software walk, guest virtual access), ``exits`` (exits, hypercalls, completions),
``outcome`` (what a fill that installed nothing hands the exit handling), ``ticker`` (signals on the main
thread); below them ``pagewalk``, ``fastwalk`` (with the C ``backends/sim/_walk.c``), ``exc``, ``emul``,
``sites``, ``regs``, ``uc``, ``stores`` and ``types`` (the resolver contract).

Interface for the sim VM
========================

``CpuSet(resolver)`` — one per VM (KVM's ``struct kvm`` as far as vCPUs are concerned):

* ``resolver``: a ``GpaResolver`` (``handle_fault(gpa, write, fetch) -> Mapped | MemoryFault | Mmio | Retry``,
  see ``types``) — the VM's TDP fault handler — and ``emulate_hypercall(cpl, nr, a0, a1, a2, a3) -> int |
  HypercallExit``, KVM's ``kvm_emulate_hypercall`` (the CPU finds the VMCALL and applies the answer; the CPL it
  passes is SS.DPL, as KVM's ``get_cpl``).
* ``private_access_bit`` (sim-only, default None): bit N of a leaf guest PTE marks the access private, like
  SEV's C-bit (``pagewalk``). The bit is stripped from the frame address and every data access resolves
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
  vCPU that cached a translation in the range drops it (and the pages its unicorn TLB holds for it,
  ``tlbpages``); those executing guest code are stopped and the call returns only after each acknowledged. vCPUs
  that cached nothing there are left running: none of their TLB entries can point into the range, and a
  translation one of them resolves across the flush is refused (``CpuSet.stale_since``). Callable from any
  thread, including a vCPU's own thread inside ``handle_fault`` (the flush then takes effect before that
  vCPU executes another instruction).
* ``create_cpu(vcpu_id) -> SimCpu``, ``close()``.

``SimCpu`` — one unicorn engine (``UC_MODE_64``, virtual-TLB mode) per vCPU, driven by one thread at a time:

* ``get_regs/set_regs/get_sregs/set_sregs`` with ``uapi.kvm_regs``/``uapi.kvm_sregs`` and KVM semantics
  (hidden segment state loaded as given, CPL = SS.DPL, EFER verbatim; see ``regs``).
* ``run() -> exits.Exit``: IoExit, MmioExit, HltExit, HypercallExit, MemoryFaultExit, ShutdownExit,
  InternalErrorExit, or ``types.UnreportedFault`` for a ``MemoryFault`` the model does not report (KVM_RUN's
  error is the caller's to raise). Raises ``types.Interrupted`` when kicked (KVM_RUN's EINTR is the caller's to
  report).
* ``complete_io(data)``, ``complete_mmio(data)``, ``complete_hypercall(ret)``: answers applied on the next run.
* ``kick()``: KVM's ``immediate_exit`` + signal: the running (or next) ``run()`` raises ``Interrupted`` once.
* ``flush(...)``: this vCPU only; ``invalidate_code()``: drop translated code after the host rewrote guest
  code that already ran (real KVM needs nothing; unicorn caches translations). ``set_regs``/``set_sregs``
  do it implicitly.

Mechanism
=========

* **EPT = TLB-fill hook.** In ``UC_TLB_VIRTUAL`` mode unicorn asks ``fill.TlbFill.fill(vaddr, access)`` for every TLB
  miss (per 4 KiB page). A data access whose table pages are cached takes the fast path (``fill``,
  ``fastwalk``: the plain-case walk in C or Python, then the data cache or the fault path); everything else
  the full walk below. We walk the guest's page tables in software (``pagewalk``; each entry read is
  a guest-physical access through the resolver), resolve the data gpa through ``handle_fault``, and point
  the entry at ``window + offset`` with permissions = guest PTE ∧ ``Mapped.writable``. Page-table pages and
  data pages resolved once are cached per vCPU until the next flush, like a paging-structure cache.
* **Exits from the hook.** Returning False from the hook stops the engine at the faulting instruction with
  ``UC_ERR_EXCEPTION``; the run loop then returns ``MemoryFaultExit`` (re-running re-executes the
  instruction), decodes the instruction for ``MmioExit``, delivers #PF (with CR2 from the decoded operand
  and the architectural error code) through the guest IDT (``exc``; unicorn never delivers exceptions),
  or retries.
* **IN/OUT** hooks record the access and stop the engine. Unicorn honours a stop only at a block boundary or
  before an instruction a code hook covers, so every fetch TLB fill scans the code page (``TlbFill.scan_code``,
  ``sites``): each byte that could start an IN/OUT/INS/OUTS (with its prefix run) gets a native hook
  (``uc``) that stops *before* it; the first time one really runs as an instruction, the vCPU decodes
  it (``SimCpu._decide_io_site``), moves the hook to the instruction after it and drops translated code, so the
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
* **Requests and acks** (KVM's ``kvm_make_all_cpus_request``). A vCPU is *in guest mode* while unicorn
  executes guest code, and leaves it whenever it is in Python (fault hook, exit handling); ``requests.Mode``
  names the states as KVM's ``vcpu->mode`` does (a stopped vCPU is EXITING_GUEST_MODE until it is back in
  Python). Requests (flush, store changes) bump ``req`` (``requests``); the requester stops a vCPU in guest
  mode with ``emu_stop`` (repeated until it took, since a stop racing with ``emu_start``'s setup is lost) and
  waits for ``ack`` from every vCPU that is inside ``run()`` on another thread — except one inside
  ``handle_fault``, which may be blocked on a lock the requester holds (KVM likewise only waits for vCPUs in
  guest mode). Such a vCPU cannot use a stale translation: every TLB install and every Python-side
  dereference of guest memory happens under the request lock and only while ``req == ack``; otherwise the
  access is retried from the vCPU's safe point, where requests are serviced.
* **Flush scaling.** Cached translations are indexed by 2 MiB region of gfns, so a ranged flush costs
  O(pages cached in the range), and ``CpuSet.flush`` can ask each vCPU (under its request lock) whether it
  cached anything in the range at all. Pending ranges of a vCPU that is not running merge, and past
  ``MAX_PENDING_RANGES`` become one full flush. Every flush is numbered and logged; a resolver result is
  cached only if no flush since the resolution began covered it, which is what lets a flush skip vCPUs.
* **Signals.** CPython runs signal handlers only on the main thread between bytecodes; while a vCPU runs
  guest code on the main thread, ``ticker.SignalTicker`` stops its engine every 20 ms so Ctrl-C raises
  ``KeyboardInterrupt`` out of ``run()`` (KVM_RUN returns EINTR on a signal).
* **Stores.** Unicorn sends every store through a TLB entry that is writable *and* executable down its
  self-modifying-code slow path (``notdirty_write``: a TB lookup per store), and never clears it. A fill
  grants EXEC only for an instruction fetch, so data pages keep the inline fast path (bench 5 store rows).
Measured costs (this 2-vCPU VM, Python 3.11, unicorn 2.1.4; noisy — real numbers belong to bench/)
-----------------------------------------------------------------------------------------------------

* guest ``dec rcx; jnz``: 80-95% of a bare unicorn engine by CPU time (bench 5; it was ~22% with the former
  per-instruction native hook, ~450 → ~100 M instructions/s). Steady-state guest code runs with no Python
  callback and no native call at all.
* TLB fill (bench 8, thread CPU time per 4 KiB page): a warm refill ~2 µs with the C walk (~4-5 µs with
  the Python one), of which ~0.75 µs is the ctypes callback and unicorn's own fill; a refault after a zap
  ~5.5-6 µs and a first touch ~7.5-8 µs (~1.4 µs of it the host populating the page, ``storage.py``), the
  VM's fault path (``core/fault_path.py``) ~2 µs of it. Before issue 15's fault work: ~12 / 27 / 32 µs.
* exit round trip (guest OUT → ``run()`` returns → ``run()`` again): ~21 µs; a hypercall answered in the
  "kernel" (ENOSYS): ~65 µs (invalid-opcode stop + instruction fetch through the software walk).
* ``emu_start`` without exit work: ~3-4 µs; unicorn TLB flush ~1.4 µs; TB-cache flush ~10 µs; context
  save+restore ~3 µs; one ``reg_read`` ~2 µs.
* remote flush of a vCPU spinning in guest code (stop, flush, ack, resume): ~14 µs; of a vCPU with nothing
  cached in the range: none. Servicing a 4 KiB ranged flush: ~17 µs with 1k to 262k cached pages (bench 7).
"""

from kvmgmem.backends.sim.cpu.cpuset import CpuSet
from kvmgmem.backends.sim.cpu.requests import MAX_PENDING_RANGES
from kvmgmem.backends.sim.cpu.simcpu import SimCpu
from kvmgmem.backends.sim.cpu.types import GpaResolver, Interrupted, Mapped, MemoryFault, Mmio, Retry

__all__ = [
    "MAX_PENDING_RANGES",
    "CpuSet",
    "GpaResolver",
    "Interrupted",
    "Mapped",
    "MemoryFault",
    "Mmio",
    "Retry",
    "SimCpu",
]
