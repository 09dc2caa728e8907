"""The demo's guest workload: shared → private → shared round trips with fill/verify, per vCPU.

Each vCPU owns a chunk of RAM and walks it in *slices* (``SLICE`` bytes, written by the host; the whole chunk
when it writes none). For each slice, until the host sets its stop flag:

1. fill the chunk with ``SHARED_BYTE`` and verify; SYNC(CHECK_SHARED) — the host checks its view shows it;
2. ``KVM_HC_MAP_GPA_RANGE(ENCRYPTED)``; fill with ``PRIVATE_BYTE`` and verify; SYNC(CHECK_HIDDEN) — the
   host checks its view does **not** show the private bytes and that every host API refuses private memory;
3. map shared again and verify what the discard policy left in the shared copy (``expect_shared``: the old
   shared bytes, or zero where the policy discarded the shared copy on to-private);
4. map private again *without writing* and verify what survived in guest_memfd (``expect_private``: the
   private bytes, or zero where the policy punched the hole on to-shared); map shared; count the round.

The guest polls the stop flag after every slice, so a VMM can end a run within one slice however big the
memory is (a 512 MiB chunk took minutes per round on the sim): a stop seen after the last slice of a round
finishes that round, a stop seen earlier ends the round part-way, and ``SLICES`` says how far it got. Every
slice that ran was fully checked, so a partial round is still a verified one, only shorter. The guest also
writes the step it is in (``PHASE``, one of ``PHASES``) so the host can show what is happening.

Steps 3 and 4 make the discard policy visible to the guest itself, so a wrong policy implementation fails
inside the guest with the address of the first wrong byte.

The same round with *implicit* conversions (``implicit_conversion_workload``; needs a backend with a private
access bit, i.e. the sim's ``private_access_bit``, and an image with the matching private alias): the guest
never issues a hypercall, it just accesses memory privately through the alias (``image.private_va``) or
shared through the identity map, and every access against the page's current attribute is a
KVM_EXIT_MEMORY_FAULT that the VMM answers by converting that page, after which the instruction re-executes.
Per round: fill through the private alias (to-private faults, by write) → SYNC(CHECK_HIDDEN) → verify through
the shared map (to-shared faults, by read: ``expect_shared``) → verify through the alias (to-private, by read:
``expect_private``) → fill through the shared map (to-shared, by write) → SYNC(CHECK_SHARED).
``mixed_conversion_workload`` does an implicit round on one range and an explicit round on another, so one
run exercises both conversion sources.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmgmem import uapi
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.guest.asm import Asm
from kvmgmem.guest.operands import Label, Reg, qword, r8, r9, r10, r11, r12, r13, r14, r15, rax, rcx, rdx, rsi

from .convert import DiscardPolicy

SHARED_BYTE = 0x11
PRIVATE_BYTE = 0x22

SYNC_CHECK_SHARED = 1  # args: code, gpa, size, byte
SYNC_CHECK_HIDDEN = 2  # args: code, gpa, size, private byte that must not be visible

# Offsets in each vCPU's data area (the image passes its address in rsi).
ROUNDS = 0  # u64 written by the guest: completed rounds
STOP = 8  # u64 written by the host: non-zero = stop after the slice in flight (finishing a round's last one)
SLICE = 16  # u64 written by the host before the run: slice size in bytes (page multiple); 0 = the whole chunk
SLICES = 24  # u64 written by the guest: explicit slices completed, over all rounds
PHASE = 32  # u64 written by the guest: the step it is in (PHASES)
CHUNK_GPA = 40  # u64s the guest keeps for itself: its explicit range
CHUNK_END = 48
IMPLICIT_ROUNDS = 56  # u64 written by the mixed workload: implicit parts completed (the stop flag is polled
#                       after each from round 2 on: with many vCPUs on few cores one round can take seconds)

# What the guest is doing, by PHASE value (the host's progress display).
PHASES = {
    0: "starting",
    1: "filling shared",
    2: "converting to private",
    3: "filling private",
    4: "converting back, verifying",
    5: "implicit conversions",
    6: "done",
}
_FILL_SHARED, _TO_PRIVATE, _FILL_PRIVATE, _ROUND_TRIP, _IMPLICIT, _DONE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Expectations:
    shared_after_round_trip: int
    private_after_round_trip: int

    @classmethod
    def for_policy(cls, policy: DiscardPolicy) -> Expectations:
        return cls(
            shared_after_round_trip=0 if policy.discards_shared else SHARED_BYTE,
            private_after_round_trip=0 if policy.punches_private else PRIVATE_BYTE,
        )


def conversion_workload(expect: Expectations) -> Asm:
    """The payload. Entry ABI (kvmgmem.guest.image): rsi = data area, rdx = chunk gpa, rcx = chunk size."""
    a = Asm()
    top, stopped = Label("round"), Label("stopped")
    # The routines clobber rax/rbx/rcx/rdx/rsi/rdi: keep the arguments in r10-r13.
    a.mov(r10, rsi)
    _chunk_setup(a)
    a.label(top)
    _explicit_slices(a, expect, stopped)
    a.inc(qword[r10 + ROUNDS])
    a.cmp(qword[r10 + STOP], 0).je(top)
    a.label(stopped)
    _phase(a, _DONE)
    U.done(a)
    return a


def implicit_conversion_workload(expect: Expectations, alias_offset: int) -> Asm:
    """The implicit-conversion payload (module docstring). ``alias_offset`` = private VA - gpa (the image's
    ``private_alias_base``). Entry ABI: rsi = data area, rdx = range gpa, rcx = range size."""
    a = Asm()
    top = Label("implicit_round")
    a.mov(r10, rsi).mov(r8, rdx).mov(r9, rcx)
    _implicit_setup(a, alias_offset)
    a.label(top)
    _implicit_round(a, expect)
    a.inc(qword[r10 + ROUNDS])
    a.cmp(qword[r10 + STOP], 0).je(top)
    _phase(a, _DONE)
    U.done(a)
    return a


def mixed_conversion_workload(expect: Expectations, alias_offset: int) -> Asm:
    """Both sources in every round: the implicit round on [r8, +r9), then the explicit one on [rdx, +rcx)
    slice by slice. With a private access bit every private access must use the alias, so the explicit round
    does too."""
    a = Asm()
    top, stopped, explicit = Label("mixed_round"), Label("stopped"), Label("explicit")
    a.mov(r10, rsi)
    _chunk_setup(a)
    _implicit_setup(a, alias_offset)
    a.label(top)
    _phase(a, _IMPLICIT)
    _implicit_round(a, expect)
    a.inc(qword[r10 + IMPLICIT_ROUNDS])
    # A stop here ends the round before its slices, except in the first round: every run does one explicit
    # slice, so every run used both sources.
    a.cmp(qword[r10 + SLICES], 0).je(explicit)
    a.cmp(qword[r10 + STOP], 0).jne(stopped)
    a.label(explicit)
    _explicit_slices(a, expect, stopped, alias_offset)
    a.inc(qword[r10 + ROUNDS])
    a.cmp(qword[r10 + STOP], 0).je(top)
    a.label(stopped)
    _phase(a, _DONE)
    U.done(a)
    return a


def _phase(a: Asm, phase: int) -> None:
    a.mov(qword[r10 + PHASE], phase)


def _chunk_setup(a: Asm) -> None:
    """Keep the explicit range (rdx, rcx) in the data area; a slice size of 0 means the whole chunk."""
    done = Label("slice_set")
    a.mov(qword[r10 + CHUNK_GPA], rdx)
    a.add(rdx, rcx).mov(qword[r10 + CHUNK_END], rdx)
    a.cmp(qword[r10 + SLICE], 0).jne(done)
    a.mov(qword[r10 + SLICE], rcx)
    a.label(done)


def _explicit_slices(a: Asm, expect: Expectations, stopped: Label, alias_offset: int | None = None) -> None:
    """One explicit round over the chunk, one slice at a time: r12 = slice gpa, r13 = its size, r11 = its
    pages (r15 = its private VA with an alias). After each slice but the last, a set stop flag jumps to
    ``stopped``; after the last one the round is complete and the caller decides."""
    top, sized, end = Label("slice"), Label("slice_sized"), Label("slices_end")
    a.mov(r12, qword[r10 + CHUNK_GPA])
    a.label(top)
    a.mov(rax, qword[r10 + CHUNK_END]).sub(rax, r12)  # bytes left in the chunk
    a.mov(r13, qword[r10 + SLICE])
    a.cmp(r13, rax).jbe(sized)
    a.mov(r13, rax)
    a.label(sized)
    a.mov(r11, r13).shr(r11, uapi.PAGE_SHIFT)
    if alias_offset is not None:
        a.mov(r15, alias_offset & (1 << 64) - 1).add(r15, r12)
    _explicit_round(a, expect, private_va=r15 if alias_offset is not None else r12)
    a.inc(qword[r10 + SLICES])
    a.add(r12, r13)
    a.cmp(r12, qword[r10 + CHUNK_END]).jae(end)
    a.cmp(qword[r10 + STOP], 0).jne(stopped)
    a.jmp(top)
    a.label(end)


# Register use: r10 = data area; explicit range r12 (gpa), r13 (size), r11 (pages), r15 (its private VA in
# the mixed workload); implicit range r8 (gpa == its shared VA), r9 (size), r14 (private VA). The routines
# clobber only rax/rbx/rcx/rdx/rsi/rdi.
_SHARED_VA: Reg = r8
_SIZE: Reg = r9
_PRIVATE_VA: Reg = r14


def _implicit_setup(a: Asm, alias_offset: int) -> None:
    """Private VA of the implicit range; then make it hold shared data the host can see (starts shared)."""
    a.mov(_PRIVATE_VA, alias_offset & (1 << 64) - 1).add(_PRIVATE_VA, _SHARED_VA)
    R.fill(a, _SHARED_VA, _SIZE, SHARED_BYTE)
    R.verify(a, _SHARED_VA, _SIZE, SHARED_BYTE, "implicit: shared fill")
    U.sync(a, SYNC_CHECK_SHARED, _SHARED_VA, _SIZE, SHARED_BYTE)


def _implicit_round(a: Asm, expect: Expectations) -> None:
    """Starts and ends with the range shared; every conversion is a memory fault the VMM answers."""
    R.fill(a, _PRIVATE_VA, _SIZE, PRIVATE_BYTE)  # private writes to shared pages: to private, page by page
    R.verify(a, _PRIVATE_VA, _SIZE, PRIVATE_BYTE, "implicit: private fill")
    U.sync(a, SYNC_CHECK_HIDDEN, _SHARED_VA, _SIZE, PRIVATE_BYTE)
    R.verify(a, _SHARED_VA, _SIZE, expect.shared_after_round_trip, "implicit: shared copy after round trip")
    R.verify(a, _PRIVATE_VA, _SIZE, expect.private_after_round_trip, "implicit: private copy after round trip")
    R.fill(a, _SHARED_VA, _SIZE, SHARED_BYTE)  # shared writes to private pages: back to shared
    R.verify(a, _SHARED_VA, _SIZE, SHARED_BYTE, "implicit: shared fill")
    U.sync(a, SYNC_CHECK_SHARED, _SHARED_VA, _SIZE, SHARED_BYTE)


def _explicit_round(a: Asm, expect: Expectations, private_va: Reg = r12) -> None:
    """One explicit round on r12/r13/r11 (module docstring, steps 1-4). ``private_va`` is where the guest
    touches the range while it is private: its identity address, or (with a private access bit, where an
    identity access is a *shared* access and would convert the page back) its private alias."""
    private = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED
    shared = uapi.KVM_MAP_GPA_RANGE_DECRYPTED
    _phase(a, _FILL_SHARED)
    R.fill(a, r12, r13, SHARED_BYTE)
    R.verify(a, r12, r13, SHARED_BYTE, "shared fill")
    U.sync(a, SYNC_CHECK_SHARED, r12, r13, SHARED_BYTE)
    _phase(a, _TO_PRIVATE)
    R.map_gpa_range(a, r12, r11, private, check="to private")
    _phase(a, _FILL_PRIVATE)
    R.fill(a, private_va, r13, PRIVATE_BYTE)
    R.verify(a, private_va, r13, PRIVATE_BYTE, "private fill")
    U.sync(a, SYNC_CHECK_HIDDEN, r12, r13, PRIVATE_BYTE)
    _phase(a, _ROUND_TRIP)
    R.map_gpa_range(a, r12, r11, shared, check="to shared")
    R.verify(a, r12, r13, expect.shared_after_round_trip, "shared copy after round trip")
    R.map_gpa_range(a, r12, r11, private, check="to private again")
    R.verify(a, private_va, r13, expect.private_after_round_trip, "private copy after round trip")
    R.map_gpa_range(a, r12, r11, shared, check="to shared again")


__all__ = [
    "IMPLICIT_ROUNDS",
    "PHASE",
    "PHASES",
    "PRIVATE_BYTE",
    "ROUNDS",
    "SHARED_BYTE",
    "SLICE",
    "SLICES",
    "STOP",
    "SYNC_CHECK_HIDDEN",
    "SYNC_CHECK_SHARED",
    "Expectations",
    "conversion_workload",
    "implicit_conversion_workload",
    "mixed_conversion_workload",
]
