"""Fixtures for the sim's own tests: systems per profile, VMs, host memory, closed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvmgmem import HostMemory, uapi
from kvmgmem.backends import sim
from kvmgmem.backends.sim import SimSystem, SimVm

P = uapi.PAGE_SIZE
M2 = 2 << 20
GMEM = uapi.KVM_MEM_GUEST_MEMFD
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED


@pytest.fixture
def open_sim() -> Iterator[Callable[..., SimSystem]]:
    """Factory: ``open_sim(profile="6.18", **options)``; systems closed at teardown."""
    made: list[SimSystem] = []

    def make(profile: str = "6.18", **options: Any) -> SimSystem:
        s = sim.open_system(profile, **options)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def simsys(open_sim: Callable[..., SimSystem]) -> SimSystem:
    return open_sim()


@pytest.fixture
def make_vm(simsys: SimSystem, hostmem: Callable[[int], HostMemory]) -> Iterator[Callable[..., SimVm]]:
    """Factory: ``make_vm(vm_type=0, system=None)``; VMs closed at teardown."""
    made: list[SimVm] = []

    def make(vm_type: int = uapi.KVM_X86_DEFAULT_VM, system: SimSystem | None = None) -> SimVm:
        v = (system or simsys).create_vm(vm_type)
        made.append(v)
        return v

    yield make
    for v in reversed(made):
        v.close()


@pytest.fixture
def dvm(make_vm: Callable[..., SimVm]) -> SimVm:
    """A DEFAULT VM on the 6.18 profile."""
    return make_vm(uapi.KVM_X86_DEFAULT_VM)


@pytest.fixture
def pvm(make_vm: Callable[..., SimVm]) -> SimVm:
    """A SW_PROTECTED VM on the 6.18 profile."""
    return make_vm(uapi.KVM_X86_SW_PROTECTED_VM)


@pytest.fixture
def hostmem() -> Iterator[Callable[[int], HostMemory]]:
    """Factory for HostMemory; unmapped at teardown (after the VMs, which unpin it on close)."""
    made: list[HostMemory] = []

    def make(size: int) -> HostMemory:
        m = HostMemory(size)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()
