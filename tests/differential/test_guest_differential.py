"""Differential guest runs: the same generated guest program on real KVM and on the sim.

Hypothesis generates a short list of guest operations over a guest_memfd-backed region (write a byte, read a
byte and report it, fill a page, verify a page, punch a page from the host between two syncs, poke from the
host through the guest_memfd mapping). The program runs on ``kvmgmem.open("kvm")`` and on the sim configured
like this host (DEFAULT VM, ``profile="host"``); the sequence of exits (ucall values), and the region's final
contents read through the mapping, must be identical. This host's kvm_pvm serves a gmem-only slot from the
slot's userspace address for emulated CPL0 accesses where upstream 6.18 and the sim use the guest_memfd (a
host deviation, ``HOST_DEVIATIONS`` in the sim's profile module), so the slot here takes the mapping of the
guest_memfd itself as its userspace address: then both are the same pages and both backends must agree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmgmem
from kvmgmem import uapi
from kvmgmem.conformance.fixtures import open_backend
from kvmgmem.guest import Asm, Done, GuestImage, GuestVm, Sync, byte
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.guest.operands import rax, rbx

P = uapi.PAGE_SIZE
GPA = 4 << 30
PAGES = 8
SIZE = PAGES * P
FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
SIM_OPTIONS = {"profile": "host"}
EXAMPLES = int(os.environ.get("KVMGMEM_GUEST_DIFF_EXAMPLES", "150"))

# An operation: (kind, page, offset in page, value)
OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "read", "fill", "verify_or_report", "punch", "poke"]),
        st.integers(0, PAGES - 1),
        st.integers(0, P - 1),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=8,
)


@pytest.fixture(scope="module")
def systems() -> Iterator[tuple[kvmgmem.System, kvmgmem.System]]:
    kvm = open_backend("kvm")  # skips only without a usable /dev/kvm
    sim = kvmgmem.open("sim", **SIM_OPTIONS)
    try:
        yield kvm, sim
    finally:
        sim.close()
        kvm.close()


def program(ops: list[tuple[str, int, int, int]]) -> Asm:
    """The guest side: every op that needs the host (punch, poke) or reports a value is a SYNC."""
    a = Asm()
    for i, (kind, page, off, value) in enumerate(ops):
        addr = GPA + page * P + off
        if kind == "write":
            a.mov(rbx, addr).mov(byte[rbx], value)
        elif kind == "read":
            a.mov(rbx, addr).movzx(rax, byte[rbx])
            U.sync(a, i, rax)
        elif kind == "fill":
            R.fill(a, GPA + page * P, P, value)
        elif kind == "verify_or_report":
            a.mov(rbx, GPA + page * P).movzx(rax, byte[rbx])  # report the first byte; the host compares
            U.sync(a, i, rax)
        else:  # punch / poke: the host acts at this sync
            U.sync(a, i, 0)
    U.done(a)
    return a


def run_on(system: kvmgmem.System, ops: list[tuple[str, int, int, int]]) -> tuple[list[object], bytes]:
    """Run the program; returns the events the host saw and the region's final bytes."""
    events: list[object] = []
    with system.create_vm() as vm, vm.create_guest_memfd(SIZE, FLAGS) as gmem:
        with gmem.mmap() as view, GuestVm(vm, GuestImage(program(ops)), own_vm=False) as guest:
            guest.add_memory(1, GPA, view, flags=uapi.KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
            vcpu = guest.create_vcpu()
            while True:
                got = vcpu.run(timeout=20)
                if isinstance(got, Done):
                    break
                assert isinstance(got, Sync), got
                index, value = got.args[0], got.args[1]
                kind, page, off, arg = ops[index]
                if kind == "punch":
                    gmem.punch_hole(page * P, P)
                elif kind == "poke":
                    view[page * P + off] = arg
                events.append((index, value))
            guest.close()  # deletes the memslots (unpins the mapping) before the mapping goes
            final = bytes(view[:SIZE])
    return events, final


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(ops=OPS)
def test_same_guest_same_results(systems: tuple[kvmgmem.System, kvmgmem.System], ops: list) -> None:
    kvm, sim = systems
    on_kvm = run_on(kvm, ops)
    on_sim = run_on(sim, ops)
    assert on_kvm[0] == on_sim[0], f"exits differ for {ops}: kvm {on_kvm[0]} sim {on_sim[0]}"
    assert on_kvm[1] == on_sim[1], f"guest_memfd contents differ for {ops}"
