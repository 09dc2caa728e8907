"""The kernel's own KVM selftests (7.2, unmodified) run on the sim through ``kvmgmem run``.

``tools/upstream_selftests.py`` builds guest_memfd_test, set_memory_region_test, private_mem_conversions_test,
private_mem_kvm_exits_test and pre_fault_memory_test from Debian's linux-source-7.2 with the tree's own
Makefile (about 1 minute the first time, then cached under ``~/.cache/kvmgmem/upstream-7.2``). Each one must
pass under ``kvmgmem run --profile 7.2``: exit 0, nothing skipped (a kselftest ``# SKIP`` or a ``Skipping …``
note is a failure here: the 7.2 profile offers everything these tests ask for), every progress line printed.

With the default profile (6.18) the 7.2 guest_memfd_test must stop exactly where a real 6.18 kernel stops it:
6.18's ``kvm_gmem_bind()`` accepts a binding whose offset + size wraps past the end of the file, which 7.2
rejects (``test_invalid_binding``). The expected place is taken live from this host's kernel when it is a
6.18 with /dev/kvm, else from the recording below (made on 6.18.44).

Skips name their reason: ``kvmgmem run`` not in this install, or the selftests cannot be fetched or built here
(no network, no apt-get, no gcc/make, ...).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _load_tools_module(name: str) -> ModuleType:
    """``tools/NAME.py`` of this checkout (tools/ is scripts, not a package; sys.path stays as it is)."""
    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered before it runs: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


up = _load_tools_module("upstream_selftests")

#: guest_memfd_test 7.2 on a real 6.18 kernel (6.18.44, recorded with the binary built by tools/upstream_selftests).
RECORDED_618 = up.AssertionSite(
    location="guest_memfd_test.c:354",
    expression="r && errno == EINVAL",
    message="Memslot with out-of-range offset+size should fail",
    function="test_invalid_binding",
)
RECORDED_618_EXIT = 254  # lib/assert.c test_assert(): exit(254) (KSFT_SKIP when the errno says unsupported)

#: Per selftest: arguments, time limit (s) and the progress lines (prefixes) it must print, in order. The limits
#: leave room for a loaded 2-core host: at load 8–15 here private_mem_conversions_test took 2–4 s (1 vCPU) and
#: 6 s (-n 4 -m 4), set_memory_region_test 17–25 s (32764 memslot ioctls through the server).
CASES: dict[str, tuple[str, list[str], float, list[str]]] = {
    "guest_memfd_test": ("guest_memfd_test", [], 180, []),
    "set_memory_region_test": (
        "set_memory_region_test",
        [],
        600,
        [
            "Testing KVM_RUN with zero added memory regions",
            "Testing MMIO during vectoring error handling",
            "Allowed number of memory slots: ",
            "Adding slots 0..",
            "Testing ADD of KVM_MEM_GUEST_MEMFD memory regions",
            "Testing ADD of overlapping KVM_MEM_GUEST_MEMFD memory regions",
            "Testing MOVE of in-use region, 10 loops, slot zap quirk enabled",
            "Testing DELETE of in-use region, 10 loops, slot zap quirk enabled",
            "Testing MOVE of in-use region, 10 loops, slot zap quirk disabled",
            "Testing DELETE of in-use region, 10 loops, slot zap quirk disabled",
        ],
    ),
    "private_mem_conversions_test": ("private_mem_conversions_test", [], 120, []),
    "private_mem_conversions_test -n 4 -m 4": ("private_mem_conversions_test", ["-n", "4", "-m", "4"], 240, []),
    "private_mem_kvm_exits_test": ("private_mem_kvm_exits_test", [], 180, []),
    "pre_fault_memory_test": ("pre_fault_memory_test", [], 180, []),
}


@pytest.fixture(scope="module")
def selftests() -> dict[str, Path]:
    """The five binaries, built if needed; skips (with the reason) where ``kvmgmem run`` or the build is missing."""
    missing = up.kvmgmem_run_missing()
    if missing:
        pytest.skip(missing)
    try:
        return up.ensure()
    except up.Unavailable as e:
        pytest.skip(f"upstream selftests unavailable: {e}")
    except up.BuildFailed as e:
        pytest.fail(f"building the upstream selftests failed: {e}")


def _in_order(lines: list[str], prefixes: list[str]) -> list[str]:
    """The prefixes that do not appear, in this order, at the start of some line."""
    missing, i = [], 0
    for p in prefixes:
        j = next((k for k in range(i, len(lines)) if lines[k].startswith(p)), None)
        if j is None:
            missing.append(p)
        else:
            i = j + 1
    return missing


#: Calls that prove a silent selftest ran every part (counted in its ``--trace``). guest_memfd_test prints nothing:
#: one VM per bit of KVM_CAP_VM_TYPES (the 7.2 profile: DEFAULT and SW_PROTECTED) plus test_guest_memfd_guest's
#: VM, which runs its vCPU — that test returns early, silently, without KVM_CAP_GUEST_MEMFD_FLAGS.
TRACED: dict[str, dict[str, int]] = {"guest_memfd_test": {"KVM_CREATE_VM": 3, "KVM_RUN": 1}}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", list(CASES))
def test_passes_on_the_72_profile(selftests: dict[str, Path], case: str, tmp_path: Path) -> None:
    name, args, limit, progress = CASES[case]
    trace = tmp_path / "trace.json" if case in TRACED else None
    out = up.run_selftest(selftests[name], args, profile="7.2", timeout=limit, cwd=tmp_path, trace=trace)
    assert out.returncode == 0, out.describe()
    lines = [ln.strip() for ln in out.output.splitlines()]
    assert any(ln.startswith("Random seed: ") for ln in lines), out.describe()  # kvm_selftest_init() ran
    assert not up.skipped(out.output), out.describe()
    assert not up.tap_failures(out.output), out.describe()
    assert up.assertion_failure(out.output) is None, out.describe()
    assert not _in_order(lines, progress), f"progress lines missing: {_in_order(lines, progress)}\n{out.describe()}"
    if trace is not None:
        calls = up.traced_calls(trace)
        for call, at_least in TRACED[case].items():
            assert calls.get(call, 0) >= at_least, f"{call}: {calls.get(call, 0)} in the trace, want ≥ {at_least}"


def _host_618_expectation(binary: Path, tmp_path: Path) -> tuple[int, up.AssertionSite] | None:
    """guest_memfd_test's exit status and failure site on this host's own KVM, if the host runs 6.18."""
    if not platform.release().startswith("6.18.") or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return None
    real = up.run_selftest(binary, sim=False, timeout=120, cwd=tmp_path)
    site = up.assertion_failure(real.output)
    assert site is not None, f"the host's 6.18 KVM no longer fails guest_memfd_test 7.2:\n{real.describe()}"
    return real.returncode, site


@pytest.mark.timeout(400)
def test_guest_memfd_test_stops_where_a_618_kernel_does(selftests: dict[str, Path], tmp_path: Path) -> None:
    binary = selftests["guest_memfd_test"]
    live = _host_618_expectation(binary, tmp_path)
    want_exit, want = live if live is not None else (RECORDED_618_EXIT, RECORDED_618)
    source = "this host's 6.18 kernel" if live is not None else "the recorded 6.18.44 run"
    out = up.run_selftest(binary, timeout=180, cwd=tmp_path)  # default profile: 6.18
    got = up.assertion_failure(out.output)
    assert got is not None, f"expected the failure {want.place()} of {source}; got none:\n{out.describe()}"
    assert got.place() == want.place(), f"{source} fails at {want.place()}, the sim at {got.place()}\n{out.describe()}"
    if want.function and got.function:  # both backtraces resolved (addr2line present)
        assert got.function == want.function, out.describe()
    assert out.returncode == want_exit, out.describe()
