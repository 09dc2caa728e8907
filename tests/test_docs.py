"""The examples in README.md and docs/*.md run as written (a README that lies is worse than none)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmgmem.conformance.fixtures import open_backend

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def _examples() -> list[tuple[str, str]]:
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            out.append((f"{path.name}#{i}", code))
    return out


@pytest.mark.parametrize(("where", "code"), _examples(), ids=[w for w, _ in _examples()])
def test_example_runs(where: str, code: str) -> None:
    if 'open("kvm")' in code or "open()" in code:
        open_backend("kvm").close()  # skips only without a usable /dev/kvm
    exec(compile(code, where, "exec"), {"__name__": "__example__"})
