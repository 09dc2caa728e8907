"""Fixtures for guest tests: build a ``GuestVm`` on the parametrized backend, or skip saying why.

The ``backend``/``system`` fixtures come from tests/conftest.py (one run per backend, unusable backends are
skipped with their reason). Here a backend that opens but cannot yet run guests (the sim while its vCPU is
being written) is skipped at VM/vCPU creation, again naming the error, never passed silently.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.errors import KvmError
from kvmgmem.guest import GuestImage, GuestVm

from ._util import MakeGuest

_NOT_READY = (errno.ENOSYS, errno.ENOTTY, errno.EOPNOTSUPP)


def _skip_if_unready(backend: str, what: str, e: BaseException) -> None:
    if isinstance(e, NotImplementedError) or (isinstance(e, KvmError) and e.errno in _NOT_READY):
        pytest.skip(f"backend {backend} cannot {what} yet: {type(e).__name__}: {e}")


@pytest.fixture
def make_guest(system: kvmgmem.System, backend: str) -> Iterator[MakeGuest]:
    """``make_guest(image, vm_type=..., vcpus=N, **GuestVm kwargs)`` -> a GuestVm with N booted vCPUs."""
    made: list[GuestVm] = []

    def make(image: GuestImage, *, vcpus: int = 1, vm_type: int = uapi.KVM_X86_DEFAULT_VM, **kw: Any) -> GuestVm:
        try:
            g = GuestVm.create(system, image, vm_type=vm_type, **kw)
        except Exception as e:
            _skip_if_unready(backend, "create a VM with an image memslot", e)
            raise
        made.append(g)
        for _ in range(vcpus):
            try:
                g.create_vcpu()
            except Exception as e:
                _skip_if_unready(backend, "create and boot a vCPU", e)
                raise
        return g

    try:
        yield make
    finally:
        for g in reversed(made):
            g.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """On a backend other than kvm, an operation the backend does not implement yet (ENOSYS/ENOTTY/
    EOPNOTSUPP or NotImplementedError, e.g. the sim's KVM_RUN while its vCPU is being written) skips the
    test with that error as the reason; on kvm it stays a failure."""
    try:
        return (yield)
    except (KvmError, NotImplementedError) as e:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        if backend not in (None, "kvm"):
            _skip_if_unready(str(backend), "run this guest", e)
        raise
