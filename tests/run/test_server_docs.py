"""docs/run.md stays accurate about what the server serves: every ioctl in its tables is documented, and
every documented sysfs answer is the one the server gives."""

from __future__ import annotations

import re
from pathlib import Path

from kvmgmem.run import abi, ioctls, sysfs

DOC = Path(__file__).resolve().parents[2] / "docs" / "run.md"


def test_every_served_ioctl_is_documented() -> None:
    """Each request number of each fd kind's table appears by name in docs/run.md."""
    text = DOC.read_text()
    names = {abi.ioctl_name(request) for table in ioctls.TABLES.values() for request in table}
    assert not any(name.startswith("ioctl ") for name in names), names
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"served but not in docs/run.md: {missing}"


def test_documented_sysfs_values_match() -> None:
    """`force_emulation_prefix` 0, `tdp_mmu` Y, `enable_pmu` N, `ept`/`npt` Y as the doc says."""
    text = DOC.read_text()
    for name, value in re.findall(r"`(force_emulation_prefix|tdp_mmu|enable_pmu)` (\w)", text):
        assert sysfs.SIM_VALUES[f"/sys/module/kvm/parameters/{name}"].strip() == value.encode()
    assert sysfs.SIM_VALUES["/sys/module/kvm_intel/parameters/ept"] == b"Y\n"
    assert sysfs.SIM_VALUES["/sys/module/kvm_amd/parameters/npt"] == b"Y\n"
