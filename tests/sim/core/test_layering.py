"""The sim's kernel model (``backends/sim/core/``) is a layer of its own.

It imports only from itself, ``kvmgmem.uapi``, ``kvmgmem.errors`` and the fault results it shares with the CPU
(``backends/sim/fault.py``, which imports only ``kvmgmem.uapi``), and the standard library: no adapter, no CPU, no
``kvmgmem.api``; the CPU in turn never imports the core or the adapters. That is what lets it be tested with plain
objects, and what keeps "every kernel rule and errno" in one place — a core that reached up into the API or the CPU
layer would start sharing their rules. Checked two ways: statically, over every import statement (``TYPE_CHECKING``
ones included), and by importing and using the core in a fresh interpreter where unicorn cannot be imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import kvmgmem.backends.sim.core as core_package

CORE = Path(core_package.__file__).parent
SIM = CORE.parent
CORE_NAME = "kvmgmem.backends.sim.core"
SIM_NAME = "kvmgmem.backends.sim"
#: The fault results (``fault.py``): the one module above the core that both the core and the CPU import.
FAULT_NAME = "kvmgmem.backends.sim.fault"
ALLOWED = {"kvmgmem.uapi", "kvmgmem.errors", FAULT_NAME}
#: The sim adapters: the layer above both the core and the CPU.
ADAPTERS = {f"{SIM_NAME}.{m}" for m in ("system", "vm", "vcpu", "gmem", "mapping", "storage", "fdtable")}


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports (``TYPE_CHECKING`` ones included), as absolute names: relative imports
    are resolved against ``package``; ``from pkg import name`` counts as ``pkg.name``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            if base in ("kvmgmem", SIM_NAME) or (node.level and not node.module):
                out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # from kvmgmem import uapi
            else:
                out.append((node.lineno, base))
    return out


def _violations(path: Path, package: str = CORE_NAME) -> list[str]:
    """Imports in core file ``path`` that leave the layer: ``file:line module``."""
    out = []
    for lineno, module in _imports(path, package):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top == "__future__":
            continue
        if module in ALLOWED or module == CORE_NAME or module.startswith(CORE_NAME + "."):
            continue
        out.append(f"{path.name}:{lineno} {module}")
    return out


def test_core_imports_only_itself_uapi_errors_and_the_fault_results() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 8, files
    bad = [v for path in files for v in _violations(path)]
    assert not bad, "core/ imports from outside its layer:\n" + "\n".join(bad)


def test_the_check_sees_violations(tmp_path: Path) -> None:
    """The checker itself: each kind of escape is reported, the fault results are not."""
    src = tmp_path / "bad.py"
    src.write_text(
        "import unicorn\nfrom kvmgmem.api import signed64\nfrom kvmgmem import exits\nfrom ..cpu import CpuSet\n"
        "from kvmgmem import uapi, errors\nfrom .vm import VmCore\nimport errno\nfrom ..fault import Mapped\n"
        "from .. import vm\n"
    )
    assert [v.split(" ")[1] for v in _violations(src)] == [
        "unicorn",
        "kvmgmem.api",
        "kvmgmem.exits",
        "kvmgmem.backends.sim.cpu",
        "kvmgmem.backends.sim.vm",
    ]


def _cpu_files() -> list[Path]:
    """The CPU layer: ``cpu*.py`` beside the adapters, or a ``cpu/`` package once it is one."""
    return sorted(SIM.glob("cpu*.py")) + (sorted((SIM / "cpu").glob("*.py")) if (SIM / "cpu").is_dir() else [])


def test_cpu_never_imports_the_core_or_the_adapters() -> None:
    """The CPU reaches the VM only through ``cpu.types.GpaResolver`` and gets its answers as ``fault.py``
    results: it imports neither the kernel model nor the adapters (nor anything that pulls them in)."""
    files = _cpu_files()
    assert len(files) >= 8, files
    bad = []
    for path in files:
        package = SIM_NAME if path.parent == SIM else f"{SIM_NAME}.cpu"
        for lineno, module in _imports(path, package):
            if module == CORE_NAME or module.startswith(CORE_NAME + ".") or module in ADAPTERS:
                bad.append(f"{path.name}:{lineno} {module}")
    assert not bad, "the CPU layer imports the core or the adapters:\n" + "\n".join(bad)


def test_fault_results_import_only_uapi_of_the_project() -> None:
    """``fault.py`` sits below both layers that share it, so it may import only the standard library and
    ``kvmgmem.uapi`` (which both layers import too)."""
    mods = [m for _, m in _imports(SIM / "fault.py", SIM_NAME)]
    assert mods and all(
        m.split(".")[0] in sys.stdlib_module_names or m in ("__future__", "kvmgmem.uapi") for m in mods
    ), mods


def test_core_works_without_unicorn() -> None:
    """In a fresh interpreter that cannot import unicorn: import the core and run a VM's memory through it."""
    script = textwrap.dedent(
        """
        import errno, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "unicorn" or name.startswith("unicorn."):
                    raise ImportError("unicorn is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        from kvmgmem import uapi
        from kvmgmem.errors import KvmError
        from kvmgmem.backends.sim.core import NullBacking, create_vm, get_profile
        from kvmgmem.backends.sim.fault import MemoryFault

        vm = create_vm(get_profile("6.18"), uapi.KVM_X86_SW_PROTECTED_VM)
        assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD) == 1
        gmem = vm.create_guest_memfd(1 << 20, 0, lambda size: NullBacking())
        try:
            vm.create_guest_memfd(4097, 0, lambda size: NullBacking())
        except KvmError as e:
            assert e.errno == errno.EINVAL
        else:
            raise AssertionError("unaligned size accepted")
        vm.set_memory_attributes(1 << 32, 4096, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)
        result = vm.handle_fault(1 << 32)
        assert isinstance(result, MemoryFault) and result.errno == errno.EFAULT, result
        gmem.put()
        leaked = sorted(m for m in sys.modules if m.startswith(("unicorn", "kvmgmem.backends.sim.cpu")))
        assert not leaked, leaked
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
