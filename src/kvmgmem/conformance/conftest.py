"""Fixtures of the installed conformance suite (re-exported from :mod:`kvmgmem.conformance.fixtures`, which
the repository's ``tests/conftest.py`` shares), plus the guest fixture and the not-yet-implemented rule for
guest-running cases (:mod:`kvmgmem.conformance.guests`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmgmem.conformance.fixtures import *  # noqa: F403
from kvmgmem.errors import KvmError


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Guest-running cases (``test_guests``) on a backend other than kvm: an operation the backend does not
    implement yet (ENOSYS/ENOTTY/EOPNOTSUPP, NotImplementedError) skips the case naming the error."""
    try:
        return (yield)
    except (KvmError, NotImplementedError) as e:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        module = getattr(getattr(item, "module", None), "__name__", "")
        if backend not in (None, "kvm") and module.endswith("test_guests"):
            from kvmgmem.conformance.test_guests import skip_if_unready

            skip_if_unready(str(backend), "run this guest", e)
        raise
