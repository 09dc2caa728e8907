"""The sysfs files a KVM program reads about "its" KVM, answered for the sim.

Why: the KVM selftests' library reads module parameters to decide what to test — ``force_emulation_prefix``
(``kvm_is_forced_emulation_enabled``), ``ept``/``npt`` (``kvm_is_tdp_enabled``), ``enable_pmu``,
``tdp_mmu`` ... — and this host's answers describe its own KVM (or are missing: this host loads no
``kvm_amd``). The sim's values are given where the host lacks the file or would contradict the sim; every
other path is the host's. An emulated file is a memfd holding the text, opened at offset 0, so reads,
``lseek`` and ``close`` are plain file operations the preload library need not route.
"""

from __future__ import annotations

import os

#: What the sim models, as sysfs prints it (bools as Y/N, ints in decimal).
SIM_VALUES: dict[str, bytes] = {
    "/sys/module/kvm/parameters/force_emulation_prefix": b"0\n",  # no forced emulation
    "/sys/module/kvm/parameters/tdp_mmu": b"Y\n",  # the sim's MMU is the TDP MMU's model
    "/sys/module/kvm/parameters/enable_pmu": b"N\n",  # no PMU
    "/sys/module/kvm/parameters/ignore_msrs": b"N\n",
    "/sys/module/kvm/parameters/enable_vmware_backdoor": b"N\n",
    "/sys/module/kvm/parameters/nx_huge_pages": b"N\n",  # no NX huge page mitigation
    "/sys/module/kvm/parameters/eager_page_split": b"Y\n",
    "/sys/module/kvm_intel/parameters/ept": b"Y\n",
    "/sys/module/kvm_intel/parameters/unrestricted_guest": b"Y\n",
    "/sys/module/kvm_intel/parameters/enable_shadow_vmcs": b"N\n",
    "/sys/module/kvm_intel/parameters/nested": b"N\n",
    "/sys/module/kvm_intel/parameters/enable_apicv": b"N\n",
    "/sys/module/kvm_intel/parameters/tdx": b"N\n",
    "/sys/module/kvm_amd/parameters/npt": b"Y\n",
    "/sys/module/kvm_amd/parameters/nested": b"0\n",
    "/sys/module/kvm_amd/parameters/sev": b"N\n",
    "/sys/module/kvm_amd/parameters/sev_es": b"N\n",
    "/sys/module/kvm_amd/parameters/sev_snp": b"N\n",
    "/sys/module/kvm_amd/parameters/avic": b"N\n",
}

#: Files the sim agrees with the host on, answered only where the host lacks them.
HOST_DEFAULTS: dict[str, bytes] = {
    "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size": b"2097152\n",
}


def content(path: str) -> bytes | None:
    """The emulated content of ``path``, or None when the host's file is the answer."""
    value = SIM_VALUES.get(path)
    if value is not None:
        return value
    value = HOST_DEFAULTS.get(path)
    if value is not None and not os.path.exists(path):
        return value
    return None


def open_emulated(path: str, flags: int) -> int:
    """An fd reading ``path``'s emulated content, or -1 ("not mine"). Opens for writing are the host's
    (EACCES/ENOENT there): the sim's parameters are read-only."""
    if flags & (os.O_WRONLY | os.O_RDWR) or flags & os.O_DIRECTORY:
        return -1
    data = content(os.path.normpath(path))
    if data is None:
        return -1
    fd = os.memfd_create(os.path.basename(path), os.MFD_CLOEXEC if flags & os.O_CLOEXEC else 0)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd
