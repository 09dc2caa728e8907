"""The ucall protocol without a VM: host-side decoding of structs the guest would write, guest-side checks."""

from __future__ import annotations

import struct

import pytest

from kvmgmem import uapi
from kvmgmem.exits import IoExit
from kvmgmem.guest import (
    Asm,
    AssertFail,
    Done,
    GuestAssertionError,
    GuestException,
    GuestFaultError,
    GuestMemory,
    Print,
    Sync,
)
from kvmgmem.guest import events as E
from kvmgmem.guest import ucall as U
from kvmgmem.guest.operands import qword, rax, rbx, rsp


def _exit(gpa: int, port: int = U.UCALL_PORT) -> IoExit:
    return IoExit(direction=uapi.KVM_EXIT_IO_OUT, port=port, size=4, count=1, data=gpa.to_bytes(4, "little"))


def _memory(*records: tuple[int, bytes]) -> GuestMemory:
    buf = bytearray(0x4000)
    for where, blob in records:
        buf[where - 0x1000 : where - 0x1000 + len(blob)] = blob
    return GuestMemory().add(0x1000, buf)


def _struct(cmd: int, *args: int) -> bytes:
    return struct.pack("<8Q", cmd, len(args), *(list(args) + [0] * (6 - len(args))))


def test_decode_each_command() -> None:
    mem = _memory(
        (0x1100, _struct(U.SYNC, 1, 2, 3, 4, 5, 6)),
        (0x1200, _struct(U.DONE)),
        (0x1300, _struct(U.PRINT, 0x2000)),
        (0x2000, b"hi there\0junk"),
        (0x1400, _struct(U.ASSERT_FAIL, 0x2100, 0xAA, 0x11, 0x1234)),
        (0x2100, b"bytes match\0"),
        (0x1500, _struct(U.EXCEPTION, 14, 4, 0x401000, 0x33, 0xDEAD000, 0x7000)),
    )
    assert E.decode(_exit(0x1100), mem) == Sync((1, 2, 3, 4, 5, 6))
    assert E.decode(_exit(0x1200), mem) == Done()
    assert E.decode(_exit(0x1300), mem) == Print("hi there")
    fail = E.decode(_exit(0x1400), mem)
    assert fail == AssertFail("bytes match", 0xAA, 0x11, (0x1234,))
    assert isinstance(fail, AssertFail)
    assert str(GuestAssertionError(fail, 2)) == (
        "vCPU 2: guest check 'bytes match' failed: expected 0xaa, got 0x11 (extra: 0x1234)"
    )
    exc = E.decode(_exit(0x1500), mem)
    assert isinstance(exc, GuestException) and (exc.name, exc.cpl) == ("#PF", 3)
    assert "cr2=0xdead000" in str(GuestFaultError(exc)) and "rip=0x401000" in str(GuestFaultError(exc))


def test_only_4_byte_outs_to_the_ucall_port_are_ucalls() -> None:
    assert E.is_ucall(_exit(0x1000))
    assert not E.is_ucall(_exit(0x1000, port=0x10))
    assert not E.is_ucall(IoExit(direction=uapi.KVM_EXIT_IO_IN, port=U.UCALL_PORT, size=4, count=1, data=bytes(4)))


def test_unknown_command_is_an_error() -> None:
    with pytest.raises(E.GuestError, match="unknown ucall command 99"):
        E.decode(_exit(0x1000), _memory((0x1000, _struct(99))))


def test_guest_side_argument_rules() -> None:
    with pytest.raises(ValueError, match="at most 6"):
        U.sync(Asm(), *range(7))
    with pytest.raises(ValueError, match="rsp"):
        U.sync(Asm(), rsp)
    with pytest.raises(ValueError, match="rsp-relative"):
        U.sync(Asm(), qword[rsp + 8])
    listing = U.sync(Asm(), rax, rbx, 1 << 40, qword[rbx]).assemble(0).disassemble()
    assert "out dx,eax" in listing and listing.count("push") == 2 and listing.count("pop") == 2


def test_guest_memory_regions() -> None:
    mem = GuestMemory().add(0x1000, bytearray(0x1000)).add(0x4000, bytearray(0x100))
    mem.write(0x1FF8, (7).to_bytes(8, "little"))
    assert mem.read_u64(0x1FF8) == 7
    with pytest.raises(ValueError, match="not in one known"):
        mem.read(0x1FFC, 8)  # crosses the region end
    with pytest.raises(ValueError, match="overlaps"):
        mem.add(0x1800, bytearray(16))
    mem.release()
