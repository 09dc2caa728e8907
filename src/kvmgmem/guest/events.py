"""Ucalls, host side: decode an ``IoExit`` on the ucall port into a typed event, or raise for failures.

A guest assertion or an unexpected exception is a test failure, so it surfaces as a Python exception that
names the check and the values (or the vector, error code and RIP); SYNC/DONE/PRINT are plain values the
caller acts on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmgmem.exits import Exit, IoExit
from kvmgmem.guest import ucall as U
from kvmgmem.guest.memory import GuestMemory

EXCEPTION_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF", 10: "#TS",
    11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE",
    21: "#CP", 29: "#VC", 30: "#SX",
}  # fmt: skip


@dataclass(frozen=True)
class Event:
    """A decoded ucall."""


@dataclass(frozen=True)
class Sync(Event):
    args: tuple[int, ...]


@dataclass(frozen=True)
class Done(Event):
    pass


@dataclass(frozen=True)
class Print(Event):
    text: str


@dataclass(frozen=True)
class AssertFail(Event):
    check: str
    expected: int
    actual: int
    extra: tuple[int, ...]


@dataclass(frozen=True)
class GuestException(Event):
    """An exception caught by the image's IDT: vector, error code, and the CPU-pushed frame."""

    vector: int
    error_code: int
    rip: int
    cs: int
    cr2: int
    rsp: int

    @property
    def name(self) -> str:
        return EXCEPTION_NAMES.get(self.vector, f"vector {self.vector}")

    @property
    def cpl(self) -> int:
        return self.cs & 3


class GuestError(Exception):
    """Base of the failures a guest reports or causes."""


class GuestAssertionError(GuestError, AssertionError):
    """The guest's check ``check`` failed: it expected ``expected`` and saw ``actual``."""

    def __init__(self, event: AssertFail, vcpu: int | None = None) -> None:
        self.event = event
        self.check, self.expected, self.actual, self.extra = event.check, event.expected, event.actual, event.extra
        where = f"vCPU {vcpu}: " if vcpu is not None else ""
        more = f" (extra: {', '.join(hex(x) for x in event.extra)})" if event.extra else ""
        super().__init__(f"{where}guest check {event.check!r} failed: expected {event.expected:#x}, "
                         f"got {event.actual:#x}{more}")  # fmt: skip


class GuestFaultError(GuestError):
    """The guest took an exception it did not expect."""

    def __init__(self, event: GuestException, vcpu: int | None = None) -> None:
        self.event = event
        where = f"vCPU {vcpu}: " if vcpu is not None else ""
        cr2 = f" cr2={event.cr2:#x}" if event.vector == 14 else ""
        super().__init__(f"{where}guest exception {event.name} (vector {event.vector}) error code "
                         f"{event.error_code:#x} at rip={event.rip:#x} cs={event.cs:#x}{cr2}")  # fmt: skip


class UnexpectedExitError(GuestError):
    """The vCPU exited (or made a ucall) in a way the caller did not expect at this point."""

    def __init__(self, got: Exit | Event, vcpu: int | None = None) -> None:
        self.got = got
        where = f"vCPU {vcpu}: " if vcpu is not None else ""
        super().__init__(f"{where}unexpected {'ucall' if isinstance(got, Event) else 'exit'} {got}")


class GuestTimeoutError(GuestError, TimeoutError):
    """The guest did not reach the awaited point in time (the vCPU was kicked out)."""


def is_ucall(exit: Exit, port: int = U.UCALL_PORT) -> bool:
    return isinstance(exit, IoExit) and exit.is_out and exit.port == port and exit.size == 4


def decode(exit: IoExit, memory: GuestMemory) -> Event:
    """Read the ucall struct whose gpa the guest OUT'ed, and type it."""
    gpa = exit.value
    cmd, nargs, *args = struct.unpack("<8Q", memory.read(gpa, U.UCALL_SIZE))
    values = tuple(args[: min(nargs, U.MAX_ARGS)])
    if cmd == U.SYNC:
        return Sync(values)
    if cmd == U.DONE:
        return Done()
    if cmd == U.PRINT:
        text = (
            memory.read_cstring(values[0])
            if len(values) == 1
            else memory.read(values[0], values[1]).decode("utf-8", "replace")
        )
        return Print(text)
    if cmd == U.ASSERT_FAIL:
        padded = values + (0,) * 3
        return AssertFail(memory.read_cstring(padded[0]), padded[1], padded[2], values[3:])
    if cmd == U.EXCEPTION:
        return GuestException(*(values + (0,) * 6)[:6])
    raise GuestError(f"unknown ucall command {cmd} at gpa {gpa:#x}")
