"""Helpers shared by the guest tests (not collected: no ``test_`` prefix)."""

from __future__ import annotations

import pytest

import kvmgmem
from kvmgmem.conformance.fixtures import MakeGuest  # noqa: F401 (re-export for the tests)


def require_cap(system: kvmgmem.System, backend: str, cap_name: str, cap: int, mask: int = 0) -> int:
    """The value of ``cap``; skip naming it when it is 0 (or lacks the bits in ``mask``)."""
    value = system.check_extension(cap)
    if not value or (mask and value & mask != mask):
        pytest.skip(f"backend {backend}: KVM_CAP_{cap_name} = {value:#x} lacks {mask:#x}")
    return value
