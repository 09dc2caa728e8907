"""Backend selection: ``kvmgmem.open(backend="auto"|"kvm"|"sim")``.

``auto`` picks real KVM when the host can do what is asked (``/dev/kvm`` opens and, if a VM type is named,
the host supports it), otherwise the sim; the chosen System says why in ``selection_reason``.

Options are checked before anything is opened, the same way on every backend, because an option that is
silently dropped makes a test or a VMM run against a configuration it did not ask for:

- a name no backend knows → ``TypeError`` (as for any unexpected keyword argument), naming the known ones;
- a sim-only option (``profile`` and the profile fields in ``backends/sim/core/profile.py``) with
  ``backend="kvm"`` → ``ValueError``: the real ``/dev/kvm`` cannot be configured that way;
- ``path`` (the device node, kvm-only) with ``backend="sim"`` or ``"auto"`` → ``ValueError``;
- with ``backend="auto"``, sim-only options *select the sim* (only the sim can honour them), and
  ``selection_reason`` says so;
- a bad value (``address_spaces=0``, ``profile="9.9"``, ``hugepage="yes"``) → ``ValueError`` at open.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvmgmem.api import System

BACKENDS = ("kvm", "sim")

#: Options only the kvm backend takes: the device node to open.
KVM_OPTIONS = frozenset({"path"})


def sim_options() -> frozenset[str]:
    """Options only the sim takes: ``profile`` and every profile field.

    Imported lazily: the sim needs unicorn, which a kvm-only user may not have.
    """
    import dataclasses

    from kvmgmem.backends.sim.core.profile import Profile

    return frozenset({"profile", *(f.name for f in dataclasses.fields(Profile))})


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kvm options, sim options); a name neither backend knows → TypeError."""
    kvm = {k: v for k, v in options.items() if k in KVM_OPTIONS}
    rest = {k: v for k, v in options.items() if k not in KVM_OPTIONS}
    if not rest:
        return kvm, {}
    known_sim = sim_options()
    unknown = sorted(set(rest) - known_sim)
    if unknown:
        known = ", ".join(sorted(KVM_OPTIONS | known_sim))
        raise TypeError(f"kvmgmem.open: unknown option(s) {', '.join(unknown)} (known: vm_type, {known})")
    return kvm, rest


def _open_backend(name: str, **options: Any) -> System:
    module = importlib.import_module(f"kvmgmem.backends.{name}")
    system: System = module.open_system(**options)
    return system


def open(backend: str = "auto", *, vm_type: int | None = None, **options: Any) -> System:
    """Open a KVM.

    ``vm_type`` (for ``auto``) is the VM type the caller needs: auto uses real KVM only if it lists that
    type; an explicit backend opens regardless (``create_vm`` then gives the kernel's EINVAL).
    ``options`` configure a backend: the sim takes ``profile=`` ("6.8", "6.18", "host", "7.2") and the
    profile fields (``sw_protected``, ``address_spaces``, ``hugepage``, ``private_access_bit``, ...), the kvm
    backend takes ``path=``. The rules for options given to the wrong backend are in the module docstring.
    The returned ``System``'s ``backend`` says which one was opened and ``selection_reason`` why.

    Errors, before anything is opened: ValueError for an unknown backend, a ``vm_type`` that is not a
    non-negative int, a sim-only option with ``backend="kvm"`` or ``path`` without it, or a bad option value;
    TypeError for an option no backend knows. Opening ``/dev/kvm`` (``backend="kvm"``): ``KvmError`` with
    ``open(2)``'s errno (ENOENT without the device, EACCES without permission; op "open <path>"), or
    ``KVM_GET_API_VERSION``'s. ``backend="auto"`` falls back to the sim instead of raising, and raises
    OSError only when the sim cannot be imported either.

    >>> import kvmgmem
    >>> with kvmgmem.open("sim", profile="6.8") as kvm:
    ...     (kvm.backend, kvm.selection_reason)
    ('sim', "backend 'sim' requested")
    >>> try:
    ...     kvmgmem.open("kvm", profile="6.8")
    ... except ValueError as e:
    ...     print(str(e)[:48])
    kvmgmem.open: profile configure(s) the sim; back
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"kvmgmem.open: unknown backend {backend!r} (choose auto, {', '.join(BACKENDS)})")
    if vm_type is not None and (isinstance(vm_type, bool) or not isinstance(vm_type, int) or vm_type < 0):
        raise ValueError(f"kvmgmem.open: vm_type must be None or a KVM_X86_*_VM number, not {vm_type!r}")
    kvm_opts, sim_opts = _split_options(options)
    if backend == "kvm" and sim_opts:
        raise ValueError(
            f"kvmgmem.open: {', '.join(sorted(sim_opts))} configure(s) the sim; backend 'kvm' is the real "
            "/dev/kvm, whose configuration is the host's (use backend='sim' or 'auto')"
        )
    if backend != "kvm" and kvm_opts:
        raise ValueError(f"kvmgmem.open: {', '.join(sorted(kvm_opts))} is a kvm backend option (use backend='kvm')")
    if backend in BACKENDS:
        system = _open_backend(backend, **(kvm_opts if backend == "kvm" else sim_opts))
        system.selection_reason = f"backend {backend!r} requested"
        return system
    if sim_opts:
        system = _open_backend("sim", **sim_opts)
        system.selection_reason = f"auto: sim-only option(s) {', '.join(sorted(sim_opts))} given, using the sim"
        return system
    why = ""
    try:
        system = _open_backend("kvm")
    except OSError as e:
        why = f"/dev/kvm unusable ({e})"
    else:
        if vm_type is None or vm_type in system.supported_vm_types:
            system.selection_reason = "auto: /dev/kvm can run the requested VM type"
            return system
        why = f"/dev/kvm lacks VM type {vm_type}"
        system.close()
    try:
        system = _open_backend("sim")
    except ImportError as e:
        raise OSError(f"kvmgmem.open: {why}, and the sim backend is unavailable ({e})") from e
    system.selection_reason = f"auto: {why}, using the sim"
    return system
