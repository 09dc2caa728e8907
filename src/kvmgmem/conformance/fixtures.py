"""Shared pytest fixtures: backend parametrization, System/Vm fixtures, and a resource-leak check per test.

Used by the installed suite (``kvmgmem/conformance/conftest.py``) and by the repository's ``tests/conftest.py``;
both re-export these names, so the fixture code exists once.

- ``backend`` is parametrized (by :func:`pytest_generate_tests`) over ``kvmgmem.BACKENDS`` ("kvm", "sim"),
  or over the comma-separated names in the environment variable ``KVMGMEM_BACKENDS`` (read at collection
  time, so ``kvmgmem selftest --backend sim`` can restrict it). Only a missing or inaccessible ``/dev/kvm``
  skips (``no usable /dev/kvm: ...``); every other error opening a backend fails the test.
- ``system`` opens it, ``vm`` is a DEFAULT VM, ``vm_of(type)`` creates a VM of another type and skips naming
  the missing capability when the backend lacks that type; ``protected_vm`` is ``vm_of(SW_PROTECTED)``.
- ``_no_resource_leaks`` (autouse): the process's open fds and shared mappings must be the same after the
  test (and its fixtures' teardown) as before it. Lazily created long-lived state of a backend (imported
  shared libraries, signal handlers, caches) is created by a one-time warm-up before the first snapshot.
  Tests that knowingly keep resources across tests can opt out with ``@pytest.mark.no_leak_check``.
"""

from __future__ import annotations

import errno
import gc
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

import kvmgmem
from kvmgmem import uapi

if TYPE_CHECKING:
    from kvmgmem.guest import GuestVm

ENV_BACKENDS = "KVMGMEM_BACKENDS"
#: Every backend (ignores ``KVMGMEM_BACKENDS``; :func:`backend_names` honours it).
BACKEND_NAMES = tuple(kvmgmem.BACKENDS)


def backend_names() -> tuple[str, ...]:
    """The backends to run on: ``KVMGMEM_BACKENDS`` (comma-separated) if set, else every backend."""
    raw = os.environ.get(ENV_BACKENDS, "").strip()
    if not raw:
        return tuple(kvmgmem.BACKENDS)
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = [n for n in names if n not in kvmgmem.BACKENDS]
    if unknown:
        choices = ", ".join(kvmgmem.BACKENDS)
        raise pytest.UsageError(f"{ENV_BACKENDS}={raw!r}: unknown backend(s) {', '.join(unknown)} (choose {choices})")
    return names


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_leak_check: skip the per-test fd/mapping leak check")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test that uses ``backend`` (directly or through a fixture) over the backends."""
    if "backend" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if "backend" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)):
            return  # the test parametrizes ``backend`` itself
    metafunc.parametrize("backend", backend_names(), indirect=True)


# --- opening backends --------------------------------------------------------------------------------------


#: Errnos of opening ``/dev/kvm`` that mean this host has no KVM for us: no device node (ENOENT), no driver
#: behind it (ENODEV, ENXIO), or no permission to use it (EACCES, EPERM). Any other failure is a failure.
MISSING_DEVICE_ERRNOS = frozenset({errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EACCES, errno.EPERM})


def open_backend(name: str, **options: Any) -> kvmgmem.System:
    """Open backend ``name``; skip the calling test, with the reason, only when the kvm backend's device is
    missing or not ours to use. The sim's dependencies are the package's own, so a sim that does not open is
    a failure, as is any other error from ``/dev/kvm`` (a skip would hide a broken host or library)."""
    if name == "kvm":
        try:
            return kvmgmem.open("kvm", **options)
        except OSError as e:
            if e.errno in MISSING_DEVICE_ERRNOS:
                pytest.skip(f"no usable /dev/kvm: {e}")
            raise
    if name == "sim":
        return kvmgmem.open("sim", **options)
    raise ValueError(f"unknown backend {name!r}")


def vm_type_name(vm_type: int) -> str:
    """``KVM_X86_SW_PROTECTED_VM`` for 1, etc."""
    return f"KVM_X86_{uapi.VM_TYPE_NAMES.get(vm_type, str(vm_type))}_VM"


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name under test ("kvm" or "sim"), set by :func:`pytest_generate_tests`."""
    return str(request.param)


@pytest.fixture
def system(backend: str) -> Iterator[kvmgmem.System]:
    """An open System of ``backend`` (skips if the backend is unusable)."""
    sys_ = open_backend(backend)
    try:
        yield sys_
    finally:
        sys_.close()


@pytest.fixture
def vm(system: kvmgmem.System) -> Iterator[kvmgmem.Vm]:
    """A KVM_X86_DEFAULT_VM on ``system``."""
    v = system.create_vm(uapi.KVM_X86_DEFAULT_VM)
    try:
        yield v
    finally:
        v.close()


def require_vm_type(system: kvmgmem.System, backend: str, vm_type: int) -> None:
    """Skip naming the VM type (and KVM_CAP_VM_TYPES) unless ``system`` supports ``vm_type``."""
    if vm_type not in system.supported_vm_types:
        mask = system.check_extension(uapi.KVM_CAP_VM_TYPES)
        pytest.skip(
            f"{vm_type_name(vm_type)} not in KVM_CAP_VM_TYPES on backend {backend} (KVM_CAP_VM_TYPES = {mask:#x})"
        )


@pytest.fixture
def vm_of(system: kvmgmem.System, backend: str) -> Iterator[Callable[[int], kvmgmem.Vm]]:
    """Factory: ``vm_of(vm_type)`` creates a VM of that type (closed at teardown), or skips naming the
    missing capability when the backend does not list the type in KVM_CAP_VM_TYPES."""
    made: list[kvmgmem.Vm] = []

    def make(vm_type: int) -> kvmgmem.Vm:
        require_vm_type(system, backend, vm_type)
        v = system.create_vm(vm_type)
        made.append(v)
        return v

    try:
        yield make
    finally:
        for v in reversed(made):
            v.close()


#: ``make_guest(image, vcpus=N, vm_type=T, **GuestVm kwargs)`` → a GuestVm with N vCPUs in the image's boot state.
MakeGuest = Callable[..., "GuestVm"]


@pytest.fixture
def make_guest(system: kvmgmem.System, backend: str) -> Iterator[MakeGuest]:
    """Guests on the parametrized backend, closed at teardown; skips naming the VM type when the backend
    lacks it. Any other failure (also a backend refusing to run vCPUs) is a test failure."""
    from kvmgmem.guest import GuestImage, GuestVm

    made: list[GuestVm] = []

    def make(image: GuestImage, *, vcpus: int = 1, vm_type: int = uapi.KVM_X86_DEFAULT_VM, **kw: Any) -> GuestVm:
        require_vm_type(system, backend, vm_type)
        g = GuestVm.create(system, image, vm_type=vm_type, **kw)
        made.append(g)
        for _ in range(vcpus):
            g.create_vcpu()
        return g

    try:
        yield make
    finally:
        for g in reversed(made):
            g.close()


@pytest.fixture
def protected_vm(vm_of: Callable[[int], kvmgmem.Vm]) -> kvmgmem.Vm:
    """A KVM_X86_SW_PROTECTED_VM (skips when the backend lacks it, e.g. this host's real KVM)."""
    return vm_of(uapi.KVM_X86_SW_PROTECTED_VM)


# --- leak check --------------------------------------------------------------------------------------------


def _open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd of the listdir itself, gone by now
            continue
    return fds


def _maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return f.read().splitlines()


def _shared_mappings(lines: list[str]) -> Counter[str]:
    """Shared mappings (perms has 's'), by length and path: every resource this library maps is MAP_SHARED
    (HostMemory = "/dev/zero (deleted)", guest_memfd mmaps, vCPU kvm_run), while the interpreter's own heap,
    arenas, thread stacks and shared libraries are private mappings whose number legitimately varies."""
    out: Counter[str] = Counter()
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 2 or "s" not in parts[1]:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        path = parts[5].strip() if len(parts) > 5 else "[anon]"
        out[f"{hi - lo:#x} {parts[1]} {path}"] += 1
    return out


_warmed: set[str] = set()


def _warm_up(name: str) -> None:
    """Create the lazily created, process-lifetime state of a backend once (shared libraries, the kick
    signal handler, caches), so the first test using it is not blamed for that state."""
    if name in _warmed:
        return
    _warmed.add(name)
    try:
        sys_ = kvmgmem.open(name)
    except Exception:
        return
    try:
        with sys_.create_vm() as v:
            flags = sys_.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
            with v.create_guest_memfd(uapi.PAGE_SIZE, flags) as g:
                if flags & uapi.GUEST_MEMFD_FLAG_MMAP:
                    g.mmap().close()
            with kvmgmem.HostMemory(uapi.PAGE_SIZE) as mem:
                v.set_user_memory_region(0, 0, uapi.PAGE_SIZE, mem)
                v.set_user_memory_region(0, 0, 0, mem)
            v.create_vcpu(0)
    except Exception:
        pass
    finally:
        sys_.close()
    gc.collect()


@pytest.fixture(autouse=True)
def _no_resource_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it (with its fixtures) leaves an fd or a shared mapping behind."""
    if request.node.get_closest_marker("no_leak_check"):
        yield
        return
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec is not None else None
    if isinstance(name, str):
        _warm_up(name)
    gc.collect()
    fds_before = _open_fds()
    maps_before = _shared_mappings(_maps())
    yield
    gc.collect()
    fds_after = _open_fds()
    maps_after = _shared_mappings(_maps())
    problems = []
    leaked = {fd: t for fd, t in fds_after.items() if fds_before.get(fd) != t}
    closed = {fd: t for fd, t in fds_before.items() if fd not in fds_after}
    if leaked:
        problems.append(f"fds left open: {leaked}")
    if closed:
        problems.append(f"fds closed that the test did not open: {closed}")
    extra = maps_after - maps_before
    missing = maps_before - maps_after
    if extra:
        problems.append(f"shared mappings left behind: {dict(extra)}")
    if missing:
        problems.append(f"shared mappings unmapped that the test did not map: {dict(missing)}")
    if problems:
        pytest.fail("resource leak: " + "; ".join(problems), pytrace=False)


#: What a conftest re-exports (``from kvmgmem.conformance.fixtures import *``): hooks and fixtures.
__all__ = [
    "MakeGuest",
    "_no_resource_leaks",
    "backend",
    "make_guest",
    "protected_vm",
    "pytest_configure",
    "pytest_generate_tests",
    "system",
    "vm",
    "vm_of",
]
