"""Fixtures for the sim CPU-layer tests: a fresh 4 MiB long-mode guest per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .simcpu_guest import Guest


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    try:
        yield g
    finally:
        g.close()
