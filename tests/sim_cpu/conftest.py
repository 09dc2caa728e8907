"""Fixtures for the sim CPU-layer tests: a fresh 4 MiB long-mode guest per test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from simcpu_guest import Guest


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    try:
        yield g
    finally:
        g.close()
