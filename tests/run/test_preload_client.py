"""``c/client.c`` — a C VMM of the project's own — end to end under ``kvmgmem run``, and on the host's KVM.

The client checks every answer itself (OUT/IN/MMIO/HLT exits and their completions, guest_memfd file
operations and a slot bound through a dup of the guest_memfd fd, private memory, KVM_EXIT_MEMORY_FAULT as
-1/EFAULT, misuse errnos) and prints ``ok``/``skip``/``FAIL`` lines. Running the same binary on the real
/dev/kvm shows the checks are the kernel's behaviour, not the sim's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kvmgmem.backends.sim.core.profile import PROFILES

from .preload_helpers import C_DIR, build_c, kvmgmem_run, require_preload_library

PRIVATE_CHECKS = [
    "ok OUT on a protected VM",
    "ok host's shared view does not see private data",
    "ok private access without guest_memfd: -1/EFAULT",
    "ok KVM_EXIT_MEMORY_FAULT filled",
    "ok access retried after the conversion",
]
DEFAULT_VM_CHECKS = [
    "ok MMIO write",
    "ok MMIO read completed",
    "ok KVM_EXIT_HLT",
    "ok vCPU fd still works after its VM fd closed",
    "ok successful open leaves errno alone",
    "ok successful close leaves errno alone",
    "ok SIGINT disposition unchanged",
]
GMEM_MMAP_CHECKS = ["ok punched page reads zero", "ok guest reads guest_memfd through a dup-bound slot"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """client.c built once for the module."""
    require_preload_library()
    return build_c(C_DIR / "client.c", tmp_path_factory.mktemp("client"), "client")


def _lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "all ok"
    assert not [line for line in lines if line.startswith("FAIL")]
    return lines


@pytest.mark.parametrize("profile", ["6.8", "6.18", "7.2", "host"])
def test_client_on_the_sim(client: Path, profile: str) -> None:
    lines = _lines(kvmgmem_run(["--profile", profile, str(client)]))
    assert set(DEFAULT_VM_CHECKS) <= set(lines)
    if PROFILES[profile].sw_protected:
        assert set(PRIVATE_CHECKS) <= set(lines)
    else:
        assert any(line.startswith("skip private memory") for line in lines)
    if PROFILES[profile].gmem_flags:  # GUEST_MEMFD_FLAG_MMAP and INIT_SHARED exist from 6.18 on
        assert set(GMEM_MMAP_CHECKS) <= set(lines)
    else:
        assert "skip guest_memfd on a default VM: KVM_CAP_GUEST_MEMFD_FLAGS is 0" in lines


@pytest.mark.kvm
def test_client_on_the_hosts_kvm(client: Path) -> None:
    """The same checks against the real kernel (the part its VM types allow)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this host")
    result = subprocess.run([str(client)], capture_output=True, text=True, timeout=120)
    lines = _lines(result)
    assert set(DEFAULT_VM_CHECKS) <= set(lines)
