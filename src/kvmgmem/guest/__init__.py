"""Guest toolkit: x86-64 long-mode guests written in Python that run unchanged on real KVM and on the sim.

- :mod:`~kvmgmem.guest.asm` / :mod:`~kvmgmem.guest.operands`: the assembler DSL (iced-x86 underneath).
- :mod:`~kvmgmem.guest.image`: page tables, GDT/TSS/IDT, stacks, and the one-call vCPU boot state.
- :mod:`~kvmgmem.guest.ucall` (guest side) and :mod:`~kvmgmem.guest.events` (host side): the ucall protocol.
- :mod:`~kvmgmem.guest.routines`: fill, verify, read-loop, touch pages, KVM_HC_MAP_GPA_RANGE.
- :mod:`~kvmgmem.guest.machine` / :mod:`~kvmgmem.guest.runner`: a VM with an image, vCPU threads.
"""

from __future__ import annotations

from kvmgmem.guest.asm import Asm, AsmError, Program
from kvmgmem.guest.events import (
    AssertFail,
    Done,
    Event,
    GuestAssertionError,
    GuestError,
    GuestException,
    GuestFaultError,
    GuestTimeoutError,
    Print,
    Sync,
    UnexpectedExitError,
)
from kvmgmem.guest.image import GuestImage, VcpuArea
from kvmgmem.guest.machine import GuestVcpu, GuestVm
from kvmgmem.guest.memory import GuestMemory
from kvmgmem.guest.operands import Label, byte, dword, mem, qword, word
from kvmgmem.guest.paging import PAGE_1G, PAGE_2M, PAGE_4K, max_page_size
from kvmgmem.guest.runner import VcpuThreads, run_until_event, run_vcpus

__all__ = [
    "PAGE_1G",
    "PAGE_2M",
    "PAGE_4K",
    "Asm",
    "AsmError",
    "AssertFail",
    "Done",
    "Event",
    "GuestAssertionError",
    "GuestError",
    "GuestException",
    "GuestFaultError",
    "GuestImage",
    "GuestMemory",
    "GuestTimeoutError",
    "GuestVcpu",
    "GuestVm",
    "Label",
    "Print",
    "Program",
    "Sync",
    "UnexpectedExitError",
    "VcpuArea",
    "VcpuThreads",
    "byte",
    "dword",
    "max_page_size",
    "mem",
    "qword",
    "run_until_event",
    "run_vcpus",
    "word",
]
