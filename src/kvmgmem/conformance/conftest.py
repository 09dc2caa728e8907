"""Fixtures of the installed conformance suite, from :mod:`kvmgmem.conformance.fixtures` (which the
repository's ``tests/conftest.py`` shares)."""

from __future__ import annotations

from kvmgmem.conformance.fixtures import *  # noqa: F403
