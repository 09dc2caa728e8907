"""One sim vCPU (``SimCpu``): the unicorn engine, its run loop (KVM_RUN) and its register and CPUID ioctls.

Why so little here: the vCPU is assembled from components with one job each, as KVM's ``kvm_vcpu`` is from the
request bits and the MMU — the request/kick handshake (``requests.VcpuRequests``), the translation caches
(``tlbcache.TranslationCache``), the fault path (``resolve.PageResolver``), guest memory access
(``memory.GuestMemoryAccess``), the TLB-fill hook (``fill.TlbFill``) and exit handling
(``exits.ExitHandler``). What stays is what ties them together: entering the guest, deciding what a stop
means, and the ioctls that hold ``vcpu->mutex``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

from unicorn import UcError
from unicorn.unicorn_const import UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR
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
from kvmgmem.backends.sim import guest_cpuid
from kvmgmem.backends.sim.cpu import regs
from kvmgmem.backends.sim.cpu.exc import Event, ExceptionDelivery, GuestException, NeedRetry, VmExitSignal
from kvmgmem.backends.sim.cpu.exits import ExitHandler
from kvmgmem.backends.sim.cpu.fill import TlbFill
from kvmgmem.backends.sim.cpu.memory import MASK64, GuestMemoryAccess
from kvmgmem.backends.sim.cpu.outcome import KVM_INTERNAL_ERROR_EMULATION
from kvmgmem.backends.sim.cpu.pagewalk import ACCESS_FETCH
from kvmgmem.backends.sim.cpu.requests import IN_GUEST_MODE, OUTSIDE_GUEST_MODE, VcpuRequests
from kvmgmem.backends.sim.cpu.resolve import PageResolver
from kvmgmem.backends.sim.cpu.sites import CodeSites, decode_io
from kvmgmem.backends.sim.cpu.ticker import MAIN_THREAD, ticker
from kvmgmem.backends.sim.cpu.tlbcache import TranslationCache
from kvmgmem.backends.sim.cpu.types import Interrupted
from kvmgmem.backends.sim.cpu.uc import (
    HF_CS32_MASK,
    HF_CS64_MASK,
    CpuState,
    Engine,
    add_tlb_fill_hook,
    new_engine,
)
from kvmgmem.errors import closed_error
from kvmgmem.exits import Exit, HltExit, InternalErrorExit, ShutdownExit

if TYPE_CHECKING:
    from kvmgmem.backends.sim.cpu.cpuset import CpuSet

UNTIL = 1 << 63  # non-canonical: the guest can never reach it, so emu_start never ends on "until"


class SimCpu:
    """One vCPU. See the package docstring for the interface and the mechanism."""

    def __init__(self, cpuset: CpuSet, vcpu_id: int) -> None:
        self.cpuset = cpuset
        self.vcpu_id = vcpu_id
        uc = self._uc = new_engine()
        self._state = CpuState(uc)
        self._sites = CodeSites(uc)  # where exits must be precise (sites); outlives the engine
        self.tlb = TranslationCache(uc, cpuset.stores)
        self.requests = VcpuRequests(uc, self.tlb)
        self.pages = PageResolver(cpuset, self.requests, self.tlb)
        self.memory = GuestMemoryAccess(self._state, self.requests, self.tlb, self.pages, cpuset.private_access_bit)
        self.filler = TlbFill(uc, cpuset, self.requests, self.tlb, self.pages, self.memory, self._sites)
        self.exits = ExitHandler(uc, self._state, self._sites, self.memory, cpuset)
        self._fill_cb = add_tlb_fill_hook(uc, self.filler.fill)  # kept alive with the engine
        uc.hook_add(UC_HOOK_INSN, self.exits.hook_out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self.exits.hook_in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INTR, self.exits.hook_intr)
        uc.hook_add(UC_HOOK_INSN_INVALID, self.exits.hook_insn_invalid)
        uc.hook_add(UC_HOOK_INSN, self._hook_cpuid, None, 1, 0, UC_X86_INS_CPUID)
        self._cpuid: list[uapi.kvm_cpuid_entry2] = []  # KVM_SET_CPUID2's table (empty: every leaf reads 0)
        self._delivery = ExceptionDelivery(uc, self._state, self.memory)
        # KVM's vcpu->mutex: held by run() and by register access, never by requesters
        self._mutex = threading.RLock()
        self.cr8 = 0
        self.apic_base = 0xFEE00000 | 0x800 | (0x100 if vcpu_id == 0 else 0)

    @contextlib.contextmanager
    def loaded(self, op: str) -> Iterator[None]:
        """``vcpu_load`` for a vCPU ioctl other than KVM_RUN: holds the vCPU mutex (a KVM_RUN on another
        thread finishes first, as ``kvm_vcpu_ioctl`` waits on ``vcpu->mutex``); once closed, the fd layer's
        EBADF (``closed_error``: the engine is gone, as a closed fd's file is; no KVM rule is involved)."""
        with self._mutex:
            if self.requests.closed:
                raise closed_error(op, "vCPU")
            yield

    # --- registers (KVM_GET/SET_REGS, KVM_GET/SET_SREGS) and CPUID -----------------------------------------

    def get_regs(self) -> uapi.kvm_regs:
        with self._mutex:
            return regs.get_regs(self._uc)

    def set_regs(self, kvm_regs: uapi.kvm_regs) -> None:
        with self._mutex:
            regs.set_regs(self._uc, kvm_regs)
            self.requests.code_stale = True

    def get_sregs(self) -> uapi.kvm_sregs:
        with self._mutex:
            return regs.get_sregs(self._uc, self._state, self.cr8, self.apic_base)

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        with self._mutex:
            regs.set_sregs(self._uc, self._state, sregs)
            self.cr8 = sregs.cr8
            self.apic_base = sregs.apic_base
            with self.requests.cond:
                self.tlb.clear()
            self.requests.code_stale = True

    def set_cpuid(self, entries: list[uapi.kvm_cpuid_entry2]) -> None:
        """Load the KVM_SET_CPUID2 table the guest's CPUID answers from."""
        with self._mutex:
            self._cpuid = list(entries)

    def cpuid_entries(self) -> list[uapi.kvm_cpuid_entry2]:
        """The table with KVM's runtime bits refreshed from the current CR4 and APIC base (KVM_GET_CPUID2)."""
        with self._mutex:
            return guest_cpuid.runtime_entries(self._cpuid, self._uc.reg_read(UC_X86_REG_CR4), self.apic_base)

    def _hook_cpuid(self, uc: Engine, _ud: object) -> int:
        """CPUID exits on KVM: ``kvm_emulate_cpuid`` answers from the KVM_SET_CPUID2 table (``guest_cpuid.py``) and
        writes the four results zero-extended. Returning 1 skips the emulator's own CPUID model."""
        rax, rcx, cr4 = uc.reg_read_batch([UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_CR4])
        table = guest_cpuid.runtime_entries(self._cpuid, cr4, self.apic_base)
        eax, ebx, ecx, edx = guest_cpuid.kvm_cpuid(table, rax & 0xFFFFFFFF, rcx & 0xFFFFFFFF)
        uc.reg_write_batch([(UC_X86_REG_RAX, eax), (UC_X86_REG_RBX, ebx), (UC_X86_REG_RCX, ecx), (UC_X86_REG_RDX, edx)])
        return 1

    # --- completions, requests, kicks (the public surface the adapters use) --------------------------------

    def complete_io(self, data: bytes) -> None:
        self.exits.complete_io(data)

    def complete_mmio(self, data: bytes) -> None:
        self.exits.complete_mmio(data)

    def complete_hypercall(self, ret: int) -> None:
        self.exits.complete_hypercall(ret)

    def flush(self, gfn_start: int | None = None, gfn_end: int | None = None) -> None:
        """Flush this vCPU's TLB (range in gfns, None = all) and wait for its acknowledgement."""
        self.requests.wait_ack(self.requests.post_request((gfn_start, gfn_end)))

    def invalidate_code(self) -> None:
        """Drop translated code before the next entry (after the host rewrote guest code that already ran)."""
        rq = self.requests
        with rq.cond:
            rq.code_stale = True
        rq.wait_ack(rq.post_request(None))

    def kick(self) -> None:
        """Make the running (or next) ``run()`` raise ``Interrupted``; waits until it left the guest."""
        self.requests.kick()

    def take_kick(self) -> bool:
        """Consume a pending kick (KVM's ``immediate_exit`` checked before anything else in KVM_RUN)."""
        return self.requests.take_kick()

    def block(self, op: str) -> NoReturn:
        """``kvm_vcpu_block`` with nothing to wake it but a kick: raises ``Interrupted(blocked=True)`` once kicked
        (the caller reports KVM_RUN's EINTR), the fd layer's EBADF for ``op`` once closed."""
        with self._mutex:
            self.requests.block(op)

    def take_signal(self) -> bool:
        """Consume the signal half of a kick (``signal_pending(current)`` for an ioctl other than KVM_RUN)."""
        return self.requests.take_signal()

    # --- run (KVM_RUN) -------------------------------------------------------------------------------------

    def run(self) -> Exit:
        """KVM_RUN's guest entry until the next exit. A kick ends it with ``Interrupted`` (what EINTR it means is
        the caller's rule), a closed vCPU with the fd layer's EBADF."""
        rq = self.requests
        with self._mutex:
            with rq.cond:
                if rq.closed:
                    raise closed_error("KVM_RUN", "vCPU")
                rq.owner = threading.get_ident()
                rq.service_locked()
                if rq.take_kick_locked():
                    rq.owner = None
                    raise Interrupted()
            on_main = rq.owner == MAIN_THREAD
            if on_main:
                ticker.arm(rq)
            try:
                self.exits.finish_completion()
                return self._run_loop()
            finally:
                if on_main:
                    ticker.disarm()
                with rq.cond:
                    rq.owner = None
                    rq.mode = OUTSIDE_GUEST_MODE
                    rq.cond.notify_all()

    def _run_loop(self) -> Exit:
        uc, rq, exits = self._uc, self.requests, self.exits
        while True:
            with rq.cond:
                rq.service_locked()
                if rq.take_kick_locked():
                    raise Interrupted()
            try:
                if exits.pending_event is not None:
                    if not self._delivery.deliver(exits.pending_event):
                        exits.pending_event = None
                        return ShutdownExit()
                    exits.pending_event = None
            except NeedRetry:
                time.sleep(0)
                continue
            except VmExitSignal as sig:
                return sig.exit

            if rq.code_stale:
                uc.ctl_flush_tb()
                self.tlb.installed.flush_all()  # rewritten code pages are re-scanned on their next fetch fill
                rq.code_stale = False
            exits.clear_events()
            self.filler.event = None
            self._sites.clear_last()
            rip = uc.reg_read(UC_X86_REG_RIP)
            with rq.cond:
                if rq.req != rq.ack:
                    continue
                rq.mode = IN_GUEST_MODE
            err: UcError | None = None
            try:
                uc.emu_start(rip, UNTIL)
            except UcError as e:
                err = e
            finally:
                with rq.cond:
                    rq.mode = OUTSIDE_GUEST_MODE
                    rq.service_locked()
            try:
                result = self._after_stop(err)
            except NeedRetry:
                time.sleep(0)
                continue
            except VmExitSignal as sig:
                return sig.exit
            except GuestException as exc:
                exits.pending_event = Event(exc.vector, exc.error_code, exc.cr2)
                continue
            if result is not None:
                return result

    def _after_stop(self, err: UcError | None) -> Exit | None:
        """What stopped ``emu_start``: an exit to return, or None to enter the guest again."""
        exits, sites = self.exits, self._sites
        if err is None:
            if exits.io is not None:
                return exits.io_exit(exits.io)
            if exits.intr is not None:
                vector, fault_rip = exits.intr
                # INT n/INT3/INTO/INT1 leave RIP after the instruction, and one of them ran last iff the
                # hook slot names its address (they are all hooked); a fault leaves RIP at the instruction
                last = sites.last
                length = sites.int_length(last)
                soft = length > 0 and (last + length) & MASK64 == fault_rip
                exits.pending_event = Event(vector, 0, None, soft)
                return None
            rip = self._uc.reg_read(UC_X86_REG_RIP)
            # A HLT ran iff the hooked instruction that ran last is the HLT byte right before RIP. Known from
            # the scan, not read from guest memory: a read may have to be retried, and retrying from here
            # would run on past the HLT.
            if sites.last == (rip - 1) & MASK64 and sites.is_hlt(sites.last):
                return HltExit()
            if sites.is_pending(rip):
                self._decide_io_site(rip)
            return None  # stopped for a request or a kick: serviced at the top of the loop
        if exits.invalid_insn:
            return exits.invalid_opcode()
        if self.filler.event is not None:
            return exits.tlb_exit(*self.filler.event)
        return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (err.errno,))

    def _decide_io_site(self, rip: int) -> None:
        """The engine stopped before a possible IN/OUT (a pending site, ``sites``): decode it once, hook
        the instruction after it if it is one, and drop the translations made with the old hooks."""
        hflags = self._state.load().hflags
        bitness = 64 if hflags & HF_CS64_MASK else 32 if hflags & HF_CS32_MASK else 16
        code = self.memory.fetch_insn(rip)
        io = decode_io(code, bitness, rip)
        if io is not None and io.length == 0:  # the instruction runs into a page the fetch cannot reach:
            self.memory.read_virt(rip + len(code), 1, ACCESS_FETCH)  # take the CPU's fault
            io = None  # pragma: no cover - the page became reachable meanwhile; a late stop stays loud
        self._sites.decide(rip, io)
        self._uc.ctl_flush_tb()

    # --- lifetime ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the engine (waits for a running ``run()`` to end; kick it first to make that quick)."""
        self.kick()
        with self._mutex:
            rq = self.requests
            with rq.cond:
                if rq.closed:
                    return
                rq.closed = True
                rq.kicked = False
            self.cpuset.forget(self)
            self.tlb.unmap_all()

    @property
    def closed(self) -> bool:
        return self.requests.closed
