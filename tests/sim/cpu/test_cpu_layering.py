"""What the sim CPU (``backends/sim/cpu/``) may import, as README's Architecture table says.

The CPU sits below the API: it imports the base layer (``uapi``, ``errors``, ``exits`` — ``Pending`` included, the
reply an exit waits for), the fault results it shares with the core (``fault.py``), the sim's leaf helpers
(``guest_cpuid``, ``exit_info``, the ``_walk`` C extension, which themselves import only the base layer), unicorn and
iced-x86. Not ``kvmgmem.api``: a CPU that imported the API would load the layer that builds on it (and it once did,
for ``Pending``). ``tests/sim/core/test_layering.py`` checks the other direction (never the core or the adapters).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.test_layering import SIM, SIM_NAME, _imports

CPU_NAME = f"{SIM_NAME}.cpu"
BASE = {"kvmgmem.uapi", "kvmgmem.errors", "kvmgmem.exits"}
#: Modules beside the adapters that only the CPU's side uses and that import only the base layer.
LEAF_HELPERS = {f"{SIM_NAME}.{m}" for m in ("guest_cpuid", "exit_info", "_walk")}
ALLOWED = BASE | LEAF_HELPERS | {f"{SIM_NAME}.fault"}
THIRD_PARTY = {"unicorn", "iced_x86"}


def _outside(module: str, allowed: set[str]) -> bool:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == "__future__" or top in THIRD_PARTY:
        return False
    return not (module in allowed or module == CPU_NAME or module.startswith(CPU_NAME + "."))


def test_cpu_imports_only_the_base_layer_the_fault_results_and_its_helpers() -> None:
    files = sorted((SIM / "cpu").glob("*.py"))
    assert len(files) >= 8, files
    bad = [f"{p.name}:{line} {m}" for p in files for line, m in _imports(p, CPU_NAME) if _outside(m, ALLOWED)]
    assert not bad, "the sim CPU imports from outside its layer:\n" + "\n".join(bad)


def test_leaf_helpers_import_only_the_base_layer() -> None:
    for name in ("guest_cpuid", "exit_info"):
        path = SIM / f"{name}.py"
        bad = [f"{path.name}:{line} {m}" for line, m in _imports(path, SIM_NAME) if _outside(m, BASE)]
        assert not bad, f"{name}.py imports above the base layer:\n" + "\n".join(bad)


def test_the_check_sees_an_api_import(tmp_path: Path) -> None:
    """The checker itself: the import this layer once had is reported, the base layer's are not."""
    src = tmp_path / "bad.py"
    src.write_text("from kvmgmem.api import Pending\nfrom kvmgmem.exits import Pending\nfrom .. import guest_cpuid\n")
    assert [m for _, m in _imports(src, CPU_NAME) if _outside(m, ALLOWED)] == ["kvmgmem.api"]
