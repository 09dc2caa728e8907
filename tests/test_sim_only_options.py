"""The sim-only options are declared on the API and answer on every backend: None where the backend has none.

``System.private_access_bit``, ``Vm.private_access_bit`` and ``Vm.introspect()`` exist on real KVM too (None: no
C-bit model, no view of the kernel's SPTEs), so a VMM or tool asks the object rather than probing it with
``getattr`` — a probe would silently take the "not supported" branch after a rename. The last test keeps it so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvmgmem
from kvmgmem import uapi
from kvmgmem.conformance.fixtures import open_backend

ROOT = Path(__file__).resolve().parents[1]
SIM_ONLY = {"private_access_bit", "introspect"}


def test_every_backend_answers_the_sim_only_options(system: kvmgmem.System, backend: str) -> None:
    """Opened without options, no backend has a private access bit; only the sim has a snapshot to show."""
    assert system.private_access_bit is None
    with system.create_vm() as vm:
        assert vm.private_access_bit is None
        snapshot = vm.introspect()
        if backend == "kvm":
            assert snapshot is None
        else:
            assert snapshot is not None and snapshot["memslots"] == [] and "counters" in snapshot


def test_the_sim_bit_applies_to_sw_protected_vms_only() -> None:
    with open_backend("sim", private_access_bit=51) as system:
        assert system.private_access_bit == 51
        with system.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as pvm, system.create_vm() as dvm:
            assert (pvm.private_access_bit, dvm.private_access_bit) == (51, None)


def _probes(path: Path, root: Path = ROOT) -> list[str]:
    """``getattr``/``hasattr`` calls in ``path`` whose attribute is a literal sim-only option name."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id in ("getattr", "hasattr") and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and name.value in SIM_ONLY:
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.func.id}(..., {name.value!r})")
    return out


def test_nothing_probes_for_the_sim_only_options() -> None:
    files = [p for d in ("src", "tests", "tools", "bench") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 100, len(files)
    bad = [probe for path in files for probe in _probes(path)]
    assert not bad, "call the declared API member instead:\n" + "\n".join(bad)


def test_the_check_sees_probes(tmp_path: Path) -> None:
    """The checker itself: both forms it forbids are reported, other names and computed names are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        'getattr(vm, "introspect", None)\nhasattr(s, "private_access_bit")\ngetattr(vm, "fd")\ngetattr(vm, n)\n'
    )
    assert _probes(sample, tmp_path) == [
        "sample.py:1 getattr(..., 'introspect')",
        "sample.py:2 hasattr(..., 'private_access_bit')",
    ]
