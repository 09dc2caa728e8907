"""Fixtures of the installed conformance suite (re-exported from :mod:`kvmgmem.conformance.fixtures`, which
the repository's ``tests/conftest.py`` shares), plus the guest fixture and the not-yet-implemented rule for
guest-running cases (:mod:`kvmgmem.conformance.guests`)."""

from __future__ import annotations

from kvmgmem.conformance.fixtures import *  # noqa: F403
