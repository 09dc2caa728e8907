"""The sim's CPU layer (``backends/sim/cpu/``) decides no errno: it reports, the kernel model decides.

The same ``ast`` scan as ``test_adapters_translate.py``, over the CPU package, with two more kinds of decision: a
hypercall return value (``uapi.KVM_EPERM``, ``KVM_ENOSYS``, ``KVM_EINVAL``: ``kvm_emulate_hypercall``'s rules, now
``core/hypercall.py`` behind ``GpaResolver.emulate_hypercall``) and ``closed_error`` (the errors module's EBADF for a
closed object). A kick ends a run with ``types.Interrupted`` and KVM_RUN's EINTR is ``VcpuCore.interrupted``. The
only errno left is the short, commented list below; each entry may occur once and must still be in the code.
"""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import kvmgmem.backends.sim.cpu as cpu_package

from ..test_adapters_translate import _Sites
from ..test_adapters_translate import violations as adapter_violations

CPU = Path(cpu_package.__file__).parent
#: uapi's hypercall return values (-KVM_E*): the names whose suffix is an errno name.
HYPERCALL_ERRNOS = {f"KVM_{name}" for name in errno.errorcode.values()}

#: (module, what, expression) -> why the CPU may name it (once each).
ALLOWED: dict[tuple[str, str, str], str] = {
    # SimCpu.loaded, SimCpu.run, VcpuRequests.block: the engine of a closed vCPU is released, as the file of a
    # closed fd is gone; the failure is the fd layer's (fdget's EBADF, ``closed_error`` as for every closed API
    # object), not a KVM rule, and only the CPU knows its engine went away under a waiting caller.
    ("simcpu", "closed_error", "op"): "a vCPU ioctl (vcpu_load) on a closed vCPU: EBADF",
    ("simcpu", "closed_error", "'KVM_RUN'"): "KVM_RUN on a closed vCPU: EBADF",
    ("requests", "closed_error", "op"): "a block entered after close: EBADF",
}


class _CpuSites(_Sites):
    """``_Sites`` plus ``closed_error(op, ...)`` calls and ``uapi.KVM_E*`` hypercall return values."""

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name == "closed_error":
            self.sites.append((self._qualname(), "closed_error", ast.unparse(node.args[0]) if node.args else ""))
        super().visit_Call(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id == "uapi" and node.attr in HYPERCALL_ERRNOS:
            self.sites.append((self._qualname(), "uapi", ast.unparse(node)))
        super().visit_Attribute(node)


def cpu_sites(source: str, module: str) -> list[tuple[str, str, str, str]]:
    """Every errno decision in CPU-layer source ``source``: ``(module, function, what, expression)``."""
    visitor = _CpuSites()
    visitor.visit(ast.parse(source))
    return [(module, *site) for site in visitor.sites]


def _all_sites() -> list[tuple[str, str, str, str]]:
    out = []
    for path in sorted(CPU.glob("*.py")):
        out += cpu_sites(path.read_text(), path.stem)
    return out


def violations(found: list[tuple[str, str, str, str]]) -> list[str]:
    """The sites of ``found`` not in ``ALLOWED``, and every repeat of an allowed one."""
    return adapter_violations(found, ALLOWED)


def test_the_cpu_decides_no_errno() -> None:
    assert len(list(CPU.glob("*.py"))) >= 10
    rules = violations(_all_sites())
    assert not rules, (
        "the CPU layer decides an errno or a hypercall result: report what happened and let the core decide "
        "(backends/sim/core/, reached through the resolver or the adapter):\n" + "\n".join(rules)
    )


def test_the_allowlist_has_no_stale_entries() -> None:
    found = {(module, what, expr) for module, _function, what, expr in _all_sites()}
    assert set(ALLOWED) <= found, set(ALLOWED) - found


def test_the_scan_sees_every_kind_of_decision() -> None:
    """The checker itself: KVM_RUN's EINTR, a hypercall's -KVM_EPERM and a closed_error are found; an exit reason
    that merely starts with KVM_E is not; an allowed closed_error passes once."""
    source = (
        "import errno\nfrom kvmgmem import uapi\nfrom kvmgmem.errors import KvmError, closed_error\n"
        "class SimCpu:\n"
        "    def run(self, op):\n"
        "        if self.kicked:\n"
        "            raise KvmError(errno.EINTR, 'KVM_RUN')\n"
        "        if self.closed:\n"
        "            raise closed_error(op, 'vCPU')\n"
        "        return uapi.KVM_EXIT_IO_IN\n"
        "def hypercall(cpl):\n"
        "    return -uapi.KVM_EPERM if cpl else 0\n"
    )
    found = cpu_sites(source, "simcpu")
    assert found == [
        ("simcpu", "SimCpu.run", "KvmError", "errno.EINTR"),
        ("simcpu", "SimCpu.run", "closed_error", "op"),
        ("simcpu", "hypercall", "uapi", "uapi.KVM_EPERM"),
    ]
    assert violations(found) == [
        "simcpu.py SimCpu.run: KvmError errno.EINTR",
        "simcpu.py hypercall: uapi uapi.KVM_EPERM",
    ]
    twice = [("simcpu", "SimCpu.run", "closed_error", "op")] * 2
    assert violations(twice) == ["simcpu.py SimCpu.run: closed_error op"]
