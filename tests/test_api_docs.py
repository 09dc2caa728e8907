"""The public API documents itself: every public method has a docstring, and the examples in them run.

The examples are doctests on the sim (``kvmgmem.open("sim")``), so they run on every host and cannot drift
from the code: a changed errno or return value fails here.
"""

from __future__ import annotations

import doctest
import inspect

import pytest

from kvmgmem import api, api_x86

CLASSES = [api.System, api.Vm, api.Vcpu, api.GuestMemfd, api.VmSimOptions, api_x86.VmX86Setup, api_x86.VcpuX86State]


def _public_methods() -> list[tuple[str, object]]:
    out = []
    for cls in CLASSES:
        for name, member in vars(cls).items():
            if name.startswith("_"):
                continue
            if callable(member) or isinstance(member, property):
                out.append((f"{cls.__name__}.{name}", member))
    return out


@pytest.mark.parametrize(("name", "member"), _public_methods(), ids=[n for n, _ in _public_methods()])
def test_public_method_has_docstring(name: str, member: object) -> None:
    target = member.fget if isinstance(member, property) else member
    doc = inspect.getdoc(target)
    assert doc and len(doc.split()) >= 5, f"{name} has no docstring worth the name"


def test_api_examples_run() -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for module in (api, api_x86) for t in finder.find(module) if t.examples]
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} API doc examples failed (see the output above)"
    assert len(tests) >= 20 and results.attempted >= 40, (len(tests), results.attempted)
