"""The demo's guest workload: shared → private → shared round trips with fill/verify, per vCPU.

Each vCPU owns a chunk of RAM and repeats, until the host sets its stop flag:

1. fill the chunk with ``SHARED_BYTE`` and verify; SYNC(CHECK_SHARED) — the host checks its view shows it;
2. ``KVM_HC_MAP_GPA_RANGE(ENCRYPTED)``; fill with ``PRIVATE_BYTE`` and verify; SYNC(CHECK_HIDDEN) — the
   host checks its view does **not** show the private bytes and that every host API refuses private memory;
3. map shared again and verify what the discard policy left in the shared copy (``expect_shared``: the old
   shared bytes, or zero where the policy discarded the shared copy on to-private);
4. map private again *without writing* and verify what survived in guest_memfd (``expect_private``: the
   private bytes, or zero where the policy punched the hole on to-shared); map shared; count the round.

Steps 3 and 4 make the discard policy visible to the guest itself, so a wrong policy implementation fails
inside the guest with the address of the first wrong byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmgmem import uapi
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.guest.asm import Asm
from kvmgmem.guest.operands import Label, qword, r10, r11, r12, r13, rcx, rdx, rsi

from .convert import DiscardPolicy

SHARED_BYTE = 0x11
PRIVATE_BYTE = 0x22

SYNC_CHECK_SHARED = 1  # args: code, gpa, size, byte
SYNC_CHECK_HIDDEN = 2  # args: code, gpa, size, private byte that must not be visible

# Offsets in each vCPU's data area (the image passes its address in rsi).
ROUNDS = 0  # u64 written by the guest: completed rounds
STOP = 8  # u64 written by the host: non-zero = finish after this round


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
    top = Label("round")
    # The routines clobber rax/rbx/rcx/rdx/rsi/rdi: keep the arguments in r10-r13.
    a.mov(r10, rsi).mov(r12, rdx).mov(r13, rcx)
    a.mov(r11, r13).shr(r11, uapi.PAGE_SHIFT)  # pages in the chunk
    private = uapi.KVM_MAP_GPA_RANGE_ENCRYPTED
    shared = uapi.KVM_MAP_GPA_RANGE_DECRYPTED
    a.label(top)
    R.fill(a, r12, r13, SHARED_BYTE)
    R.verify(a, r12, r13, SHARED_BYTE, "shared fill")
    U.sync(a, SYNC_CHECK_SHARED, r12, r13, SHARED_BYTE)
    R.map_gpa_range(a, r12, r11, private, check="to private")
    R.fill(a, r12, r13, PRIVATE_BYTE)
    R.verify(a, r12, r13, PRIVATE_BYTE, "private fill")
    U.sync(a, SYNC_CHECK_HIDDEN, r12, r13, PRIVATE_BYTE)
    R.map_gpa_range(a, r12, r11, shared, check="to shared")
    R.verify(a, r12, r13, expect.shared_after_round_trip, "shared copy after round trip")
    R.map_gpa_range(a, r12, r11, private, check="to private again")
    R.verify(a, r12, r13, expect.private_after_round_trip, "private copy after round trip")
    R.map_gpa_range(a, r12, r11, shared, check="to shared again")
    a.inc(qword[r10 + ROUNDS])
    a.cmp(qword[r10 + STOP], 0).je(top)
    U.done(a)
    return a


__all__ = [
    "PRIVATE_BYTE",
    "ROUNDS",
    "SHARED_BYTE",
    "STOP",
    "SYNC_CHECK_HIDDEN",
    "SYNC_CHECK_SHARED",
    "Expectations",
    "conversion_workload",
]
