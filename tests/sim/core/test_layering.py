"""The sim's kernel model (``backends/sim/core/``) is a layer of its own.

It imports only from itself, ``kvmgmem.uapi`` and ``kvmgmem.errors`` (and the standard library): no adapter,
no CPU, no ``kvmgmem.api``. That is what lets it be tested with plain objects, and what keeps "every kernel
rule and errno" in one place — a core that reached up into the API or the CPU layer would start sharing their
rules. Checked two ways: statically, over every import statement (``TYPE_CHECKING`` ones included), and by
importing and using the core in a fresh interpreter where unicorn cannot be imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import kvmgmem.backends.sim.core as core_package

CORE = Path(core_package.__file__).parent
ALLOWED = {"kvmgmem.uapi", "kvmgmem.errors"}
CORE_NAME = "kvmgmem.backends.sim.core"


def _violations(path: Path) -> list[str]:
    """Imports in ``path`` that leave the layer: ``file:line module``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                continue  # a sibling inside core/
            if node.level > 1:
                modules = ["." * node.level + (node.module or "")]
            elif node.module == "kvmgmem":
                modules = [f"kvmgmem.{alias.name}" for alias in node.names]  # from kvmgmem import uapi
            else:
                modules = [node.module or ""]
        for module in modules:
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if module in ALLOWED or module == CORE_NAME or module.startswith(CORE_NAME + "."):
                continue
            out.append(f"{path.name}:{node.lineno} {module}")
    return out


def test_core_imports_only_itself_uapi_and_errors() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 8, files
    bad = [v for path in files for v in _violations(path)]
    assert not bad, "core/ imports from outside its layer:\n" + "\n".join(bad)


def test_the_check_sees_violations(tmp_path: Path) -> None:
    """The checker itself: each kind of escape is reported."""
    src = tmp_path / "bad.py"
    src.write_text(
        "import unicorn\nfrom kvmgmem.api import signed64\nfrom kvmgmem import exits\nfrom ..cpu import CpuSet\n"
        "from kvmgmem import uapi, errors\nfrom .vm import VmCore\nimport errno\n"
    )
    assert [v.split(" ")[1] for v in _violations(src)] == ["unicorn", "kvmgmem.api", "kvmgmem.exits", "..cpu"]


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
        from kvmgmem.backends.sim.core import FaultMemoryExit, NullBacking, create_vm, get_profile

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
        assert isinstance(result, FaultMemoryExit) and result.errno == errno.EFAULT, result
        gmem.put()
        leaked = sorted(m for m in sys.modules if m.startswith(("unicorn", "kvmgmem.backends.sim.cpu")))
        assert not leaked, leaked
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
