"""The sim adapters decide no errno: every kernel rule lives in ``backends/sim/core/``.

The adapters (system, vm, vcpu, gmem, mapping, storage, fdtable) turn API calls into core calls and may only
translate a *host* failure (an ``OSError`` from ``os.memfd_create`` or ``mmap``) into the errno it carries. So
every ``KvmError(...)`` they build and every ``errno.E*`` they name is found with ``ast`` and must be one of the
short, commented list below; a new rule written in an adapter fails here and belongs in the core instead. Entries
name the module and the expression, not the function (a rename or a split of an adapter function must not fail the
check), and each may occur once: a second ``KvmError(errno.ENOMEM, ...)`` in ``mapping.py`` is a new decision. The
list must not keep entries the code no longer has, so it cannot grow stale.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvmgmem.backends.sim as sim_package

SIM = Path(sim_package.__file__).parent
ADAPTERS = ("system", "vm", "vcpu", "gmem", "mapping", "storage", "fdtable")

#: (module, what, expression) -> why it is a translation of a host failure and not a kernel rule (once each).
ALLOWED: dict[tuple[str, str, str], str] = {
    # SimVm._create_guest_memfd
    ("vm", "KvmError", "e.errno or errno.EMFILE"): (
        "the host refused the fd standing for the guest_memfd (memfd_create's EMFILE/ENFILE/ENOMEM, the errnos "
        "get_unused_fd_flags and the anon inode give in kvm_gmem_create)"
    ),
    # map_gmem
    ("mapping", "KvmError", "errno.ENOMEM"): (
        "the host could not create the storage memfd behind the file (GmemStorage keeps fd -1): out of memory"
    ),
    # GmemStorage's scan of the data ranges (SEEK_DATA / SEEK_HOLE)
    ("storage", "errno", "errno.ENXIO"): (
        "the host's lseek(SEEK_DATA) past the last data: the end of the scan, not an errno anyone sees"
    ),
}


class _Sites(ast.NodeVisitor):
    """Collects ``(function, what, expression)`` for every ``KvmError(...)`` call and ``errno.E*`` reference."""

    def __init__(self) -> None:
        self.scope: list[str] = []
        self.sites: list[tuple[str, str, str]] = []
        self._inside_call: set[int] = set()

    def _qualname(self) -> str:
        return ".".join(self.scope) or "<module>"

    def _scoped(self, node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _scoped

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "KvmError" and alias.asname not in (None, "KvmError"):
                self.sites.append((self._qualname(), "alias", f"KvmError as {alias.asname}"))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name == "KvmError":
            first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "errno"), None)
            self.sites.append((self._qualname(), "KvmError", ast.unparse(first) if first is not None else ""))
            self._inside_call.update(id(n) for arg in node.args[:1] for n in ast.walk(arg))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        is_errno = isinstance(node.value, ast.Name) and node.value.id == "errno" and node.attr.startswith("E")
        if is_errno and id(node) not in self._inside_call:
            self.sites.append((self._qualname(), "errno", ast.unparse(node)))
        self.generic_visit(node)


def sites(source: str, module: str) -> list[tuple[str, str, str, str]]:
    """Every errno decision in adapter source ``source``: ``(module, function, what, expression)``."""
    visitor = _Sites()
    visitor.visit(ast.parse(source))
    return [(module, *site) for site in visitor.sites]


def _adapter_sites() -> list[tuple[str, str, str, str]]:
    out = []
    for module in ADAPTERS:
        path = SIM / f"{module}.py"
        out += sites(path.read_text(), module)
    return out


def violations(
    found: list[tuple[str, str, str, str]], allowed: dict[tuple[str, str, str], str] | None = None
) -> list[str]:
    """The sites of ``found`` not in ``allowed`` (default: this file's ``ALLOWED``), and every repeat of an allowed
    one: ``module.py function: ...``. Shared with the CPU layer's scan (``tests/sim/cpu/test_no_errno.py``)."""
    allowed = ALLOWED if allowed is None else allowed
    seen: set[tuple[str, str, str]] = set()
    out = []
    for module, function, what, expr in found:
        key = (module, what, expr)
        if key not in allowed or key in seen:
            out.append(f"{module}.py {function}: {what} {expr}")
        seen.add(key)
    return out


def test_adapters_only_translate_host_failures() -> None:
    rules = violations(_adapter_sites())
    assert not rules, (
        "an adapter decides an errno: move the rule into backends/sim/core/ (or, for a pure translation of a "
        "host OSError, add it to ALLOWED with the reason):\n" + "\n".join(rules)
    )


def test_the_allowlist_has_no_stale_entries() -> None:
    found = {(module, what, expr) for module, _function, what, expr in _adapter_sites()}
    assert set(ALLOWED) <= found, set(ALLOWED) - found


def test_the_scan_sees_every_kind_of_decision() -> None:
    """The checker itself: a rule raised in a method, with a keyword, under an alias, or returned as a number is
    found; an allowed translation passes only in its module and only once."""
    source = (
        "import errno\nfrom kvmgmem.errors import KvmError\nfrom kvmgmem.errors import KvmError as Fail\n"
        "from kvmgmem import errors\n"
        "class SimVm:\n"
        "    def _set_thing(self, n):\n"
        "        if n < 64:\n"
        "            raise KvmError(errno.EINVAL, 'KVM_SET_THING', 'too small')\n"
        "        raise errors.KvmError(errno=22, op='KVM_SET_THING')\n"
        "def rule(n):\n"
        "    return errno.EEXIST if n else 0\n"
        "def translate(e):\n"
        "    raise KvmError(e.errno or errno.ENOMEM, 'mmap') from e\n"
    )
    assert sites(source, "x") == [
        ("x", "<module>", "alias", "KvmError as Fail"),
        ("x", "SimVm._set_thing", "KvmError", "errno.EINVAL"),
        ("x", "SimVm._set_thing", "KvmError", "22"),
        ("x", "rule", "errno", "errno.EEXIST"),
        ("x", "translate", "KvmError", "e.errno or errno.ENOMEM"),
    ]
    translation = ("mapping", "map_gmem", "KvmError", "errno.ENOMEM")
    assert violations([translation]) == []
    assert violations([translation, ("mapping", "SimMapper.madvise", "KvmError", "errno.ENOMEM")]) == [
        "mapping.py SimMapper.madvise: KvmError errno.ENOMEM"  # the same expression twice: a new decision
    ]
    assert violations([("vm", "SimVm._set_thing", "KvmError", "errno.ENOMEM")]) == [
        "vm.py SimVm._set_thing: KvmError errno.ENOMEM"  # allowed in mapping.py only
    ]
