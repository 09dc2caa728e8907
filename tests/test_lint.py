"""ruff and mypy are part of the test suite, so CI keeps the tree clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_ruff_clean() -> None:
    result = subprocess.run(
        [_tool("ruff"), "check", "src", "tests", "bench", "tools"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


#: The public modules: every public class, method and function there says what it does (ruff's D1 rules).
PUBLIC_MODULES = [
    "src/kvmgmem/__init__.py",
    "src/kvmgmem/api.py",
    "src/kvmgmem/api_args.py",
    "src/kvmgmem/api_x86.py",
    "src/kvmgmem/backends/__init__.py",
    "src/kvmgmem/caps.py",
    "src/kvmgmem/errors.py",
    "src/kvmgmem/exits.py",
    "src/kvmgmem/gmem_mapping.py",
    "src/kvmgmem/hostmem.py",
    "src/kvmgmem/libc.py",
    "src/kvmgmem/uapi.py",
]


def test_public_modules_document_everything() -> None:
    rules = "D100,D101,D102,D103,D104,D106"  # magic methods (D105) and __init__ (D107) say nothing new
    result = subprocess.run(
        [_tool("ruff"), "check", "--select", rules, *PUBLIC_MODULES], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_modules_follow_the_docstring_rules() -> None:
    """ruff's whole D set with pyproject's convention (pep257): a one-line summary, imperative for functions,
    then a blank line and the why; closing quotes on their own line."""
    result = subprocess.run(
        [_tool("ruff"), "check", "--select", "D", "--ignore", "D105,D107", *PUBLIC_MODULES],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    result = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- citations stay inside the project ---------------------------------------------------------------------------
# Comments, docstrings and docs cite the kernel (function, file, selftest, Documentation/ section) or a document in
# this repository; never a design document or spec that lives outside it ("spec §2.10", "host-probes §1", ...).
_EXTERNAL_CITATIONS = ("spec §", "host-probes", "ecosystem.md", "../shared", "design.md §")
# A bare section sign with a number is the same kind of citation; Intel SDM sections ("SDM vol. 3 §4.5") are fine.
_BARE_SECTION = re.compile(r"§\s*\d")
# This file names the patterns it looks for.
_SELF = "tests/test_lint.py"
#: Files that still carry such citations. Reason for every entry: being edited concurrently; fixed at merge.
#: The lead empties this list when those branches land (the test fails for an entry that has become clean).
_CITATION_ALLOWLIST: frozenset[str] = frozenset()  # files still citing outside documents: none


def _external_citations(text: str) -> list[str]:
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        hits = [p for p in _EXTERNAL_CITATIONS if p in line]
        if _BARE_SECTION.search(line) and "SDM" not in line:
            hits.append("§N")
        if hits:
            found.append(f"{n}: {', '.join(hits)}: {line.strip()[:100]}")
    return found


def test_no_citations_outside_the_repository() -> None:
    git = shutil.which("git")
    if not git or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the check runs over tracked files)")
    listed = subprocess.run([git, "ls-files", "-z", "src", "tests", "bench", "tools", "docs", "README.md"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")  # fmt: skip
    bad, clean_allowed = [], []
    for rel in filter(None, listed):
        path = ROOT / rel
        if rel == _SELF or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found = _external_citations(text)
        if rel in _CITATION_ALLOWLIST:
            if not found:
                clean_allowed.append(rel)
        elif found:
            bad.append(f"{rel}:\n  " + "\n  ".join(found))
    hint = "cite the kernel (function, file, selftest) or a document in this repository instead:\n"
    assert not bad, hint + "\n".join(bad)
    assert not clean_allowed, f"no external citations left; remove from _CITATION_ALLOWLIST: {clean_allowed}"
