"""docs/api.md, the method reference README links to, is the docstrings as they are now.

The page is generated (``tools/api_docs.py``) so it cannot say something the code does not; this test regenerates
it and fails on any difference, naming the command that brings it up to date.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("api_docs", ROOT / "tools" / "api_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_api_md_is_current() -> None:
    tool = _tool()
    committed = (ROOT / "docs" / "api.md").read_text()
    assert committed == tool.render(), "docs/api.md is stale: run python tools/api_docs.py"


def test_every_public_method_has_a_section() -> None:
    """Each public method of the objects a VMM uses has its own heading (nothing is silently left out)."""
    tool = _tool()
    text = tool.render()
    for cls, _ in tool.OBJECTS:
        for name, _member in tool._members(cls):
            assert f"### `{cls.__name__}.{name}" in text, f"{cls.__name__}.{name} has no section"
    assert "### `Vm.set_memory_attributes(address: int, size: int, attributes: int, flags: int = 0) -> None`" in text
