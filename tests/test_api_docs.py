"""The public API documents itself: every public method has a docstring, and the examples in them run.

The examples are doctests on the sim (``kvmgmem.open("sim")``), so they run on every host and cannot drift
from the code: a changed errno or return value fails here. Every member the method reference
(``tools/api_docs.py``, docs/api.md) documents, and ``kvmgmem.open``, must carry a ``>>>`` example that this
file executes and must say which errors it raises ("Errors: ..." or the errno names), so a new method cannot
land undocumented.
"""

from __future__ import annotations

import doctest
import errno
import functools
import importlib.util
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import kvmgmem
import kvmgmem.backends
from kvmgmem import api, api_x86, errors, exits, gmem_mapping, hostmem

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [api.System, api.Vm, api.Vcpu, api.GuestMemfd, api.VmSimOptions, api_x86.VmX86Setup, api_x86.VcpuX86State]
#: Every module whose docstrings hold examples of the public API: all of them run here.
DOC_MODULES: list[ModuleType] = [api, api_x86, gmem_mapping, hostmem, kvmgmem.backends, errors, exits]

#: Members documented without a runnable example, each with the reason one is impossible. Empty: every member,
#: including ``Vcpu.run``/``complete_*`` (a two-instruction guest from ``kvmgmem.guest``), has one.
NO_EXAMPLE: dict[str, str] = {}

_ERRNO_NAMES = frozenset(errno.errorcode.values()) | {"EHWPOISON"}
_ERRORS_SENTENCE = re.compile(r"\bErrors?\b")


def _public_methods() -> list[tuple[str, object]]:
    out = []
    for cls in CLASSES:
        for name, member in vars(cls).items():
            if name.startswith("_"):
                continue
            if callable(member) or isinstance(member, property):
                out.append((f"{cls.__name__}.{name}", member))
    return out


def _reference_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("api_docs", ROOT / "tools" / "api_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documented() -> list[tuple[str, object]]:
    """(name, function) of every member docs/api.md has a section for, plus ``kvmgmem.open``."""
    tool = _reference_tool()
    out: list[tuple[str, object]] = [("kvmgmem.open", kvmgmem.open)]
    for cls, _ in tool.OBJECTS:
        for name, member in tool._members(cls):
            target = member.fget if isinstance(member, property) else member
            out.append((f"{cls.__name__}.{name}", target))
    return out


@functools.cache
def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    return [t for module in DOC_MODULES for t in finder.find(module) if t.examples]


@pytest.mark.parametrize(("name", "member"), _public_methods(), ids=[n for n, _ in _public_methods()])
def test_public_method_has_docstring(name: str, member: object) -> None:
    target = member.fget if isinstance(member, property) else member
    doc = inspect.getdoc(target)
    assert doc and len(doc.split()) >= 5, f"{name} has no docstring worth the name"


@pytest.mark.parametrize(("name", "target"), _documented(), ids=[n for n, _ in _documented()])
def test_documented_member_has_an_example_and_its_errors(name: str, target: object) -> None:
    """An example (run by ``test_api_examples_run``) and the errors: "Errors: ..." or at least an errno name."""
    doc = inspect.getdoc(target) or ""
    if name not in NO_EXAMPLE:
        assert ">>>" in doc, f"{name}: no runnable example (add a doctest on the sim)"
        qualified = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
        assert qualified in {t.name for t in _doctests()}, f"{name}: its example is not collected ({qualified})"
    names = set(re.findall(r"\bE[A-Z0-9]+\b", doc)) & _ERRNO_NAMES
    assert _ERRORS_SENTENCE.search(doc) or names, f"{name}: says nothing about the errors it raises"


def test_no_example_allowlist_is_current() -> None:
    """Each allowlisted member exists, still lacks an example, and says why."""
    documented = dict(_documented())
    for name, why in NO_EXAMPLE.items():
        assert name in documented, f"{name} is not documented any more: drop it from NO_EXAMPLE"
        assert ">>>" not in (inspect.getdoc(documented[name]) or ""), f"{name} has an example now: drop it"
        assert len(why.split()) >= 4, f"{name}: say why no example is possible"


def test_api_examples_run() -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = _doctests()
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} API doc examples failed (see the output above)"
    assert len(tests) >= 50 and results.attempted >= 130, (len(tests), results.attempted)


#: ``kvmgmem.open`` arguments an example may pass besides ``"sim"``: refused (ValueError) before anything opens.
_REFUSED_BEFORE_OPEN = frozenset({'"kvm", profile="6.8"'})


def test_examples_use_only_the_sim() -> None:
    """The examples must run on every host: none opens real KVM (``open()``, ``"kvm"`` or ``"auto"``)."""
    calls = 0
    for test in _doctests():
        source = "".join(example.source for example in test.examples)
        for call in re.findall(r"kvmgmem\.open\(([^)]*)\)", source):
            calls += 1
            assert call.startswith('"sim"') or call in _REFUSED_BEFORE_OPEN, f"{test.name} opens {call or 'auto'}"
    assert calls >= 50, calls
