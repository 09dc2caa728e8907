"""What a TLB fill or a software walk made of an access that did not end in a TLB entry: one typed union.

Why one module: the fill path (``fill``), the software walk (``memory``) and the exit handling (``exits``) all
pass these outcomes along. The union names every case the exit handling has to decide — a #PF or #GP to
inject, a resolver answer for a page-table page or a data page, an exit already decided — where a bare
``object`` let a new case slip through to the catch-all emulation failure unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from kvmgmem.backends.sim.cpu.exc import VmExitSignal
from kvmgmem.backends.sim.cpu.pagewalk import NonCanonical, PageFault
from kvmgmem.backends.sim.cpu.types import FaultResult, Mapped, MemoryFault, Mmio, Retry
from kvmgmem.exits import InternalErrorExit
from kvmgmem.uapi import KVM_INTERNAL_ERROR_EMULATION


def emulation_failure(*data: int) -> VmExitSignal:
    """KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION with ``data``, raised or returned as a signal."""
    return VmExitSignal(InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, tuple(data)))


@dataclass(frozen=True)
class DataOutcome:
    """The data page (not a page-table page) could not be mapped: what the resolver said instead."""

    gpa_page: int
    result: FaultResult


#: Why a fill installed no TLB entry: the walk's #PF or #GP, the resolver's answer for a page-table page
#: (``Mapped`` only in type: ``read_pte`` turns a mapping into the entry's value), a data page's
#: ``DataOutcome``, or an exit already decided (``VmExitSignal``).
FillOutcome: TypeAlias = PageFault | NonCanonical | Mapped | MemoryFault | Mmio | Retry | DataOutcome | VmExitSignal

#: A fill that did not install: (vaddr page, ACCESS_*, outcome), for the run loop after ``emu_start`` stopped.
TlbEvent: TypeAlias = tuple[int, int, FillOutcome]
