"""Write docs/api.md, the method reference, from the public API's docstrings.

Why generated: the docstrings are the one source (their examples are doctests the suite runs on the sim,
``tests/test_api_docs.py``), and a hand-kept copy would drift. ``tests/test_api_reference.py`` regenerates the
page and fails when the committed one differs, so README can link to it as the reference a VMM author reads.

Usage: ``python tools/api_docs.py`` (rewrites docs/api.md) or ``python tools/api_docs.py --check``.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from kvmgmem import api, exits, gmem_mapping, hostmem
from kvmgmem.errors import KvmError

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"

#: (class, what makes it), in the order a VMM meets them.
OBJECTS: list[tuple[type, str]] = [
    (api.System, "`kvmgmem.open(backend=...)`"),
    (api.Vm, "`System.create_vm`"),
    (api.GuestMemfd, "`Vm.create_guest_memfd`"),
    (gmem_mapping.GmemMapping, "`GuestMemfd.mmap`"),
    (api.Vcpu, "`Vm.create_vcpu`"),
    (hostmem.HostMemory, "`HostMemory(size)`"),
    (KvmError, "every failing ioctl or file operation"),
]

HEADER = """# API reference

Generated from the docstrings by `python tools/api_docs.py`; `tests/test_api_reference.py` fails when this page
and the code disagree. Every example runs on the sim (`kvmgmem.open("sim")`) and is executed by the test suite
(`tests/test_api_docs.py`), so the errnos shown are the ones the code raises. Methods inherited from
`Resource` (`close()`, `closed`, the context manager) work the same on every object.
"""


def _members(cls: type) -> Iterator[tuple[str, object]]:
    """Public methods and properties ``cls`` defines itself or takes from the project's own mixins (not from
    ``Resource``, ``object`` or the standard library's bases), in definition order."""
    seen: set[str] = set()
    for klass in cls.__mro__:
        if klass in (api.Resource, object) or not klass.__module__.startswith("kvmgmem"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            if callable(member) or isinstance(member, property):
                seen.add(name)
                yield name, member


def _signature(name: str, member: object) -> str:
    if isinstance(member, property):
        return name
    target = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
    try:
        sig = inspect.signature(target)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"{name}(...)"
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    text = str(sig.replace(parameters=params))
    return f"{name}{text}".replace("'", "")  # annotations are strings (from __future__ import annotations)


def _markdown(doc: str) -> str:
    """A docstring as markdown: doctest runs become fenced ``pycon`` blocks, RST ``code`` becomes `code`."""
    out: list[str] = []
    in_code = False
    for line in doc.splitlines():
        starts = line.startswith(">>>")
        if starts and not in_code:
            out.append("```pycon")
            in_code = True
        elif in_code and not line.strip():
            out.append("```")
            in_code = False
        out.append(line if in_code else re.sub(r":(?:meth|class|func|attr):`", "`", line.replace("``", "`")))
    if in_code:
        out.append("```")
    return "\n".join(out)


def render() -> str:
    """The whole page."""
    parts = [HEADER, "## Contents\n"]
    parts += [f"- [`{cls.__name__}`](#{cls.__name__.lower()}) — made by {made}" for cls, made in OBJECTS]
    parts.append("- [Exits](#exits)\n")
    for cls, made in OBJECTS:
        parts.append(f"## {cls.__name__}\n\nMade by {made}.\n\n{_markdown(inspect.getdoc(cls) or '')}\n")
        for name, member in _members(cls):
            target = member.fget if isinstance(member, property) else member
            doc = inspect.getdoc(target) or ""
            kind = " *(property)*" if isinstance(member, property) else ""
            parts.append(f"### `{cls.__name__}.{_signature(name, member)}`{kind}\n\n{_markdown(doc)}\n")
    parts.append(f"## Exits\n\n{_markdown(inspect.getdoc(exits) or '')}\n")
    for name, cls in vars(exits).items():
        if isinstance(cls, type) and issubclass(cls, exits.Exit) and cls.__module__ == exits.__name__:
            parts.append(f"### `{name}`\n\n{_markdown(inspect.getdoc(cls) or '')}\n")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the page, or with ``--check`` report whether it is current (exit 1 if not)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run python tools/api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
