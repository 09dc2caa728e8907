"""Fixtures of the core's tests: a kernel-model VM on plain objects (no fds, no threads, no unicorn)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmgmem import uapi
from kvmgmem.backends.sim.core import create_vm, get_profile
from kvmgmem.backends.sim.core.vm import VmCore


@pytest.fixture
def vm() -> Iterator[VmCore]:
    """A DEFAULT VM of the 6.18 profile, its reference dropped after the test."""
    v = create_vm(get_profile("6.18"), uapi.KVM_X86_DEFAULT_VM)
    yield v
    v.put()
