"""Fuzzing the ioctl-level argument structs on the sim: random bytes → ``kvmgmem.uapi`` ctypes struct →
the matching API call. Nothing but ``KvmError`` may escape, and the model's invariants (no forbidden SPTE,
no invalidation left open) hold after every call.

Byte strings are drawn half uniformly at random, half from a field-aware generator that mixes interesting
values (0, -1, page multiples, real fd numbers, bits of the valid flag masks) so calls get past the first
check often enough to reach the deeper ones.
"""

from __future__ import annotations

import ctypes
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmgmem import HostMemory, KvmError, uapi
from kvmgmem.backends import sim

from ._support import P, spte_violations

EXAMPLES = 300
COUNT: dict[str, int] = {}

U64_INTERESTING = [0, 1, P, 2 * P, 16 * P, 1 << 20, 1 << 52, (1 << 63) - P, 1 << 63, (1 << 64) - P, (1 << 64) - 1]
U32_INTERESTING = [0, 1, 2, 3, 4, 5, 0x10, 0x1000, 1 << 16, (1 << 16) | 1, 32763, 32764, (1 << 31), (1 << 32) - 1]


def u64s(extra: list[int] | None = None) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(U64_INTERESTING + (extra or [])), st.integers(0, (1 << 64) - 1))


def u32s(extra: list[int] | None = None) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(U32_INTERESTING + (extra or [])), st.integers(0, (1 << 32) - 1))


class Target:
    """A sim VM with a HostMemory, two guest_memfds and a slot, plus the fds a fuzzed struct may name."""

    def __init__(self, vm_type: int) -> None:
        self.system = sim.open_system()
        self.vm = self.system.create_vm(vm_type)
        self.mem = HostMemory(16 * P)
        flags = self.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        self.gmems = [self.vm.create_guest_memfd(16 * P, flags), self.vm.create_guest_memfd(16 * P)]
        self.vm.set_user_memory_region(1, 1 << 30, 16 * P, self.mem)
        self.fds = [g.fd for g in self.gmems] + [self.vm.fd, self.system.fd, 0]
        self.made: list[object] = []

    def close(self) -> None:
        for obj in self.made:
            obj.close()  # type: ignore[attr-defined]
        for g in self.gmems:
            g.close()
        self.vm.close()
        self.mem.close()
        self.system.close()

    def check(self) -> None:
        for gpa in (0, 1 << 30, (1 << 30) + 5 * P):
            self.vm.handle_fault(gpa, True)
        assert spte_violations(self.vm.introspect()) == []
        mmu = self.vm.sim.mmu
        assert mmu.in_progress == 0 and not mmu.ranges


def mostly(valid: st.SearchStrategy[int], wild: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """A field that is valid 7 times in 8 (so whole structs are often valid), else wild."""
    return st.integers(0, 7).flatmap(lambda k: wild if k == 0 else valid)


def pages(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi).map(lambda n: n * P)


def region2_bytes(fds: list[int], mem: int) -> st.SearchStrategy[bytes]:
    def build(slot: int, flags: int, gpa: int, size: int, hva: int, off: int, fd: int, tail: bytes) -> bytes:
        return struct.pack("<IIQQQQI", slot, flags, gpa, size, hva, off, fd) + tail

    return st.builds(
        build,
        mostly(st.integers(0, 3), u32s()),
        mostly(st.sampled_from([uapi.KVM_MEM_GUEST_MEMFD, 0, 2]), u32s([uapi.KVM_MEM_GUEST_MEMFD | 1])),
        mostly(pages(0, 64), u64s([1 << 30])),
        mostly(pages(0, 16), u64s()),
        mostly(st.sampled_from([mem, mem + P, 0]), u64s([0x7FFFFFFFF000])),
        mostly(pages(0, 8), u64s()),
        mostly(st.sampled_from(fds[:2]), u32s(fds)),
        st.binary(min_size=4 + 14 * 8, max_size=4 + 14 * 8),
    )


def fuzzed(size: int, aware: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(min_size=size, max_size=size), aware)


VM_TYPES = st.sampled_from([uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM])
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _call(name: str, target: Target, fn: object) -> None:
    COUNT[name] = COUNT.get(name, 0) + 1
    try:
        result = fn()  # type: ignore[operator]
    except KvmError:
        COUNT[name + ":errno"] = COUNT.get(name + ":errno", 0) + 1
    else:
        COUNT[name + ":ok"] = COUNT.get(name + ":ok", 0) + 1
        if hasattr(result, "close"):
            target.made.append(result)
    target.check()


@SETTINGS
@given(vm_type=VM_TYPES, data=st.data())
def test_fuzz_kvm_userspace_memory_region2(vm_type: int, data: st.DataObject) -> None:
    t = Target(vm_type)
    try:
        for _ in range(3):
            size = ctypes.sizeof(uapi.kvm_userspace_memory_region2)
            raw = data.draw(fuzzed(size, region2_bytes(t.fds, t.mem.address)))
            r = uapi.kvm_userspace_memory_region2.from_buffer_copy(raw)
            _call(
                "region2",
                t,
                lambda r=r: t.vm.set_user_memory_region2(
                    r.slot, r.guest_phys_addr, r.memory_size, r.userspace_addr, r.flags, r.guest_memfd,
                    r.guest_memfd_offset,
                ),
            )  # fmt: skip
            v1 = uapi.kvm_userspace_memory_region.from_buffer_copy(
                raw[: ctypes.sizeof(uapi.kvm_userspace_memory_region)]
            )
            _call(
                "region",
                t,
                lambda v1=v1: t.vm.set_user_memory_region(
                    v1.slot, v1.guest_phys_addr, v1.memory_size, v1.userspace_addr, v1.flags
                ),
            )
    finally:
        t.close()


@SETTINGS
@given(vm_type=VM_TYPES, data=st.data())
def test_fuzz_kvm_memory_attributes(vm_type: int, data: st.DataObject) -> None:
    t = Target(vm_type)
    aware = st.builds(
        lambda a, s, at, f: struct.pack("<QQQQ", a, s, at, f),
        mostly(pages(0, 64), u64s([1 << 30])),
        mostly(pages(1, 64), u64s()),
        mostly(st.sampled_from([0, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE]), u64s()),
        mostly(st.just(0), u64s([1, 1 << 63])),
    )
    try:
        for _ in range(3):
            raw = data.draw(fuzzed(ctypes.sizeof(uapi.kvm_memory_attributes), aware))
            a = uapi.kvm_memory_attributes.from_buffer_copy(raw)
            _call("attributes", t, lambda a=a: t.vm.set_memory_attributes(a.address, a.size, a.attributes, a.flags))
    finally:
        t.close()


@SETTINGS
@given(vm_type=VM_TYPES, data=st.data())
def test_fuzz_kvm_create_guest_memfd(vm_type: int, data: st.DataObject) -> None:
    t = Target(vm_type)
    aware = st.builds(
        lambda s, f, tail: struct.pack("<QQ", s, f) + tail,
        mostly(pages(1, 64), u64s()),
        mostly(st.sampled_from([0, 1, 2, 3]), u64s([1 << 63])),
        st.binary(min_size=48, max_size=48),
    )
    try:
        raw = data.draw(fuzzed(ctypes.sizeof(uapi.kvm_create_guest_memfd), aware))
        c = uapi.kvm_create_guest_memfd.from_buffer_copy(raw)
        _call("create_guest_memfd", t, lambda: t.vm.create_guest_memfd(c.size, c.flags))
    finally:
        t.close()


@SETTINGS
@given(vm_type=VM_TYPES, data=st.data())
def test_fuzz_kvm_enable_cap(vm_type: int, data: st.DataObject) -> None:
    t = Target(vm_type)
    aware = st.builds(
        lambda cap, flags, args, pad: struct.pack("<II4Q", cap, flags, *args) + pad,
        mostly(st.just(uapi.KVM_CAP_EXIT_HYPERCALL), u32s()),
        mostly(st.just(0), u32s()),
        st.lists(mostly(st.sampled_from([0, 1 << uapi.KVM_HC_MAP_GPA_RANGE]), u64s()), min_size=4, max_size=4),
        st.binary(min_size=64, max_size=64),
    )
    try:
        raw = data.draw(fuzzed(ctypes.sizeof(uapi.kvm_enable_cap), aware))
        e = uapi.kvm_enable_cap.from_buffer_copy(raw)
        _call("enable_cap", t, lambda: t.vm.enable_cap(e.cap, *e.args, flags=e.flags))
    finally:
        t.close()


def test_fuzzing_reached_success_paths() -> None:
    """After the fuzz tests (file order): enough calls got past validation to mean something. A fuzz test
    that did not run in this session (run alone, or deselected) is run here first, so the counts are never
    vacuously absent."""
    fuzzers = {
        "region2": test_fuzz_kvm_userspace_memory_region2,
        "attributes": test_fuzz_kvm_memory_attributes,
        "create_guest_memfd": test_fuzz_kvm_create_guest_memfd,
        "enable_cap": test_fuzz_kvm_enable_cap,
    }
    for name, fuzz in fuzzers.items():
        if not COUNT.get(name):
            fuzz()
    assert COUNT.get("region2:ok", 0) >= 20 and COUNT.get("attributes:ok", 0) >= 20, COUNT
    assert COUNT.get("create_guest_memfd:ok", 0) >= 5 and COUNT.get("enable_cap:ok", 0) >= 5, COUNT
