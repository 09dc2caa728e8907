"""Remote TLB flush with acknowledgement, stores added while running, kick → Interrupted, vCPUs on threads.

Guest speed is measured by ``bench/execspeed.py`` (bench 5), not asserted here: a test suite sharing its
machine has no business failing on a slow moment."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from kvmgmem.backends.sim.cpu import Interrupted, SimCpu
from kvmgmem.backends.sim.cpu.requests import OUTSIDE_GUEST_MODE
from kvmgmem.exits import Exit, HltExit, IoExit
from kvmgmem.hostmem import HostMemory

from .simcpu_guest import CODE, DATA, Asm, C, Guest, I, R, mem_op


class Runner(threading.Thread):
    """Runs ``cpu.run()`` once on its own thread and keeps the result."""

    def __init__(self, cpu: SimCpu) -> None:
        super().__init__(daemon=True)
        self.cpu = cpu
        self.result: Exit | BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.cpu.run()
        except BaseException as e:
            self.result = e


def wait_in_guest(cpu: SimCpu, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while cpu.requests.mode == OUTSIDE_GUEST_MODE:
        assert time.monotonic() < deadline, "vCPU never entered the guest"
        time.sleep(0.001)
    time.sleep(0.02)


def _poll_loop() -> Asm:
    """Spin until the qword at DATA is non-zero, then OUT it."""
    a = Asm().label("top")(I.create_reg_mem(C.MOV_R64_RM64, R.RAX, mem_op(DATA)))
    a(I.create_reg_i32(C.CMP_RM64_IMM8, R.RAX, 0)).branch(C.JE_REL8_64, "top")
    return a.out(0x10).hlt()


def test_flush_from_another_thread_while_running(guest: Guest) -> None:
    guest.load(_poll_loop())
    cpu = guest.cpu()
    runner = Runner(cpu)
    runner.start()
    wait_in_guest(cpu)
    assert runner.result is None  # still polling the zero page

    other = HostMemory(4096)
    struct.pack_into("<Q", other, 0, 7)
    try:
        guest.cpuset.add_store(other.address, 4096)  # mapped into the running engine: stop, map, resume
        assert runner.result is None
        guest.resolver.map[DATA >> 12] = other.address  # the "zap": new backing for the gfn ...
        guest.cpuset.flush(DATA >> 12, (DATA >> 12) + 1)  # ... and the remote TLB flush
        assert cpu.requests.ack == cpu.requests.req  # returned only after the vCPU acknowledged
        runner.join(5)
        assert isinstance(runner.result, IoExit) and runner.result.value == 7
        assert guest.u64(DATA) == 0  # the old page was never written
    finally:
        runner.join(5)
        guest.cpuset.remove_store(other.address)
        other.close()


def test_stale_translation_survives_without_flush(guest: Guest) -> None:
    """The TLB persists across flush-less remaps (what makes flush necessary), until the flush comes."""
    guest.load(_poll_loop())
    cpu = guest.cpu()
    runner = Runner(cpu)
    runner.start()
    wait_in_guest(cpu)
    other = HostMemory(4096)
    struct.pack_into("<Q", other, 0, 9)
    try:
        guest.cpuset.add_store(other.address, 4096)
        guest.resolver.map[DATA >> 12] = other.address
        time.sleep(0.1)
        assert runner.result is None  # still reading the old page through the cached translation
        guest.cpuset.flush()
        runner.join(5)
        assert isinstance(runner.result, IoExit) and runner.result.value == 9
    finally:
        runner.join(5)
        guest.cpuset.remove_store(other.address)
        other.close()


def test_flush_from_inside_the_fault_handler_does_not_deadlock(guest: Guest) -> None:
    guest.set_u64(DATA, 3)
    guest.load(_poll_loop())
    cpu = guest.cpu()
    flushed = []

    def zap_on_data_fault(gpa: int, write: bool, fetch: bool) -> None:
        if gpa >> 12 == DATA >> 12 and not flushed:
            flushed.append(gpa)
            guest.cpuset.flush()  # from the vCPU's own thread, inside its TLB-fill hook

    guest.resolver.on_fault = zap_on_data_fault
    runner = Runner(cpu)
    runner.start()
    runner.join(10)
    assert flushed and isinstance(runner.result, IoExit) and runner.result.value == 3


def test_kick_makes_run_report_interrupted(guest: Guest) -> None:
    guest.load(Asm().label("spin").branch(C.JMP_REL8_64, "spin"))
    cpu = guest.cpu()
    for _ in range(2):
        runner = Runner(cpu)
        runner.start()
        wait_in_guest(cpu)
        cpu.kick()
        runner.join(5)
        assert isinstance(runner.result, Interrupted) and not runner.result.blocked  # the adapter's EINTR
    assert cpu.get_regs().rip == CODE


def test_kick_before_run_is_consumed_once(guest: Guest) -> None:
    guest.load(Asm().out_rax(0x10, 1).hlt())
    cpu = guest.cpu()
    cpu.kick()
    with pytest.raises(Interrupted):
        cpu.run()
    assert isinstance(cpu.run(), IoExit)
    assert isinstance(cpu.run(), HltExit)


def _handshake(mine: int, theirs: int) -> Asm:
    """Set my flag, then spin until the other vCPU's flag is set: finishes only if the other vCPU runs while
    this one is still running."""
    a = Asm()(I.create_mem_i32(C.MOV_RM64_IMM32, mem_op(mine), 1))
    a.label("wait")(I.create_reg_mem(C.MOV_R64_RM64, R.RAX, mem_op(theirs)))
    a(I.create_reg_i32(C.CMP_RM64_IMM8, R.RAX, 0)).branch(C.JE_REL8_64, "wait")
    return a.hlt()


def test_two_vcpus_run_concurrently(guest: Guest) -> None:
    """Two vCPU threads in run() at once: each guest waits for the other's flag, so both halt only if their
    runs overlap (decided by the guests, not by clocks; serialized vCPUs would never halt)."""
    flags = (DATA, DATA + 8)
    guest.load(_handshake(flags[0], flags[1]), at=CODE)
    guest.load(_handshake(flags[1], flags[0]), at=CODE + 0x1000)
    cpus = [guest.cpu(rip=CODE + i * 0x1000, vcpu_id=i) for i in range(2)]
    runners = [Runner(c) for c in cpus]
    for r in runners:
        r.start()
    for r in runners:
        r.join(60)
    if any(r.is_alive() for r in runners):
        for c in cpus:
            c.kick()
        for r in runners:
            r.join(10)
    assert all(isinstance(r.result, HltExit) for r in runners), [r.result for r in runners]
    assert (guest.u64(flags[0]), guest.u64(flags[1])) == (1, 1)
