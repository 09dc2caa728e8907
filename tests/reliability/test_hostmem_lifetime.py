"""HostMemory's lifetime against memslots, on both backends (issues 14 and 15).

- ``resize()`` (and every other inherited ``mmap`` method) cannot move or unmap memory a memslot uses: the
  guest keeps reading its bytes. A regression crashed the interpreter on the sim, so the scenario that
  crashed runs in a fresh interpreter.
- A VM dropped without ``close()`` lets go of its memslots' memory when it is garbage-collected.
- Leaving a ``with`` block never replaces the exception leaving it, and ``with vm, HostMemory(n) as mem``
  works: the unmap waits for the last memslot.
- HostMemory of 2 MiB or more is 2 MiB-aligned, and placing it leaves no mapping behind.

The autouse leak check (tests/conftest.py) also runs after every test here.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import sys
import threading
from collections import Counter

import pytest

import kvmgmem
from kvmgmem import HostMemory, KvmError, hostmem
from kvmgmem.conformance.fixtures import open_backend
from kvmgmem.gmem_mapping import GmemMapping
from kvmgmem.hostmem import buffer_address

from ._support import P, run_python

MiB = 1 << 20
HUGE = 2 * MiB

#: Real-mode guest at 0x1000: ``mov al, [0x2000]; out 0x10, al; hlt`` — reports the byte at gpa 0x2000.
GUEST = bytes.fromhex("a00020e610f4")


def _start_guest(vm: kvmgmem.Vm, mem: HostMemory) -> kvmgmem.Vcpu:
    """Memslot 0 over ``mem`` at gpa 0 and a vCPU about to run GUEST."""
    mem[0x1000 : 0x1000 + len(GUEST)] = GUEST
    vm.set_user_memory_region(0, 0, len(mem), mem)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base = 0
    sregs.cs.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = 0x1000
    regs.rflags = 2
    vcpu.set_regs(regs)
    return vcpu


def _guest_reads(vcpu: kvmgmem.Vcpu) -> int:
    """Run GUEST from its start to its HLT; the byte it read at gpa 0x2000."""
    regs = vcpu.get_regs()
    regs.rip = 0x1000
    vcpu.set_regs(regs)
    exit_ = vcpu.run()
    assert isinstance(exit_, kvmgmem.IoExit) and exit_.port == 0x10, exit_
    halt = vcpu.run()
    assert isinstance(halt, kvmgmem.HltExit), halt
    return exit_.data[0]


# --- issue 14.1: resize() and the other inherited mmap methods ---------------------------------------------

RESIZE_UNDER_A_SLOT = r"""
import errno, mmap, sys
import kvmgmem
from kvmgmem import HostMemory, KvmError
from tests.reliability.test_hostmem_lifetime import _guest_reads, _start_guest

with kvmgmem.open(sys.argv[1]) as s, s.create_vm() as vm:
    mem = HostMemory(4 << 20)
    vcpu = _start_guest(vm, mem)
    mem[0x2000] = 0x5A
    address = mem.address
    for newsize in (8 << 20, 1 << 20, 4 << 20):
        try:
            mem.resize(newsize)
            raise SystemExit("resize under a memslot was not refused")
        except KvmError as e:
            assert e.errno == errno.EBUSY and e.op == "HostMemory.resize" and "memslot 0" in str(e), e
    # the C methods, called around the overrides, cannot unmap or move it either: the pin holds an export
    for bypass in (lambda: mmap.mmap.resize(mem, 8 << 20), lambda: mmap.mmap.close(mem)):
        try:
            bypass()
            raise SystemExit("mmap.mmap's own resize/close under a memslot was not refused")
        except BufferError:
            pass
    assert mem.address == address and len(mem) == 4 << 20 and not mem.closed
    mem[0x2000] = 0xA5
    assert _guest_reads(vcpu) == 0xA5  # the guest still sees this very memory (the sim crashed here)
    vcpu.close()
    vm.set_user_memory_region(0, 0, 0)  # delete the slot: now it may move
    mem.resize(8 << 20)
    assert len(mem) == 8 << 20 and mem[0x2000] == 0xA5
    import ctypes
    assert mem.address == ctypes.addressof(ctypes.c_char.from_buffer(mem))  # .address followed the move
    mem.close()
print("resize refused", flush=True)
"""


def test_resize_refused_while_a_memslot_uses_the_memory(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14.1: ``resize()`` under a memslot fails with EBUSY naming the slot, as ``close()`` does; the
    memory stays where the slot points and the guest keeps reading it. Unpinned, resize works and
    ``address`` follows the mapping."""
    open_backend(backend).close()  # skip with the reason if unusable
    # The child imports this module's guest helpers as ``tests.reliability...``: the checkout's root goes on its
    # PYTHONPATH (the package itself is installed in the interpreter), nobody edits sys.path.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("PYTHONPATH", root, prepend=os.pathsep)
    proc = run_python(RESIZE_UNDER_A_SLOT, args=[backend], timeout=60)
    assert "resize refused" in proc.stdout, proc.stdout


#: Every public ``mmap.mmap`` attribute, and what it may do to the mapping itself (not its bytes).
MMAP_AUDIT = {
    "close": "unmaps: refused (EBUSY) while pinned",
    "resize": "moves/unmaps: refused (EBUSY) while pinned",
    "size": "shadowed by the .size property",
    "closed": "reads state",
    "read": "bytes",
    "read_byte": "bytes",
    "readline": "bytes",
    "write": "bytes",
    "write_byte": "bytes",
    "move": "bytes",
    "find": "bytes",
    "rfind": "bytes",
    "seek": "file position",
    "tell": "file position",
    "flush": "msync: bytes",
    "madvise": "page state (e.g. MADV_REMOVE discards), never the mapping",
}


def test_every_inherited_mmap_method_is_audited() -> None:
    """A Python release that adds an ``mmap`` method must be audited here before HostMemory inherits it."""
    public = {name for name in dir(mmap.mmap) if not name.startswith("_")}
    assert public == set(MMAP_AUDIT), sorted(public ^ set(MMAP_AUDIT))
    assert "resize" in vars(HostMemory) and "close" in vars(hostmem.PinnedMapping)


def test_inherited_byte_methods_leave_a_pinned_mapping_in_place(system: kvmgmem.System) -> None:
    """Every audited byte/position method runs on pinned memory without moving it; the guest sees the result."""
    with system.create_vm() as vm, HostMemory(4 * MiB) as mem:
        vcpu = _start_guest(vm, mem)
        address = mem.address
        mem.seek(0x2000)
        mem.write(b"\x11")
        assert mem.tell() == 0x2001
        assert _guest_reads(vcpu) == 0x11
        mem.seek(0x2000)
        mem.write_byte(0x22)
        mem.seek(0x2000)
        assert mem.read_byte() == 0x22 and mem.find(b"\x22", 0x1000) == 0x2000 and mem.rfind(b"\x22", 0) == 0x2000
        mem.seek(0)
        mem.readline()
        mem.read(16)
        mem[0x3000] = 0x33
        mem.move(0x2000, 0x3000, 1)
        mem.flush()
        assert _guest_reads(vcpu) == 0x33
        mem.madvise(mmap.MADV_REMOVE, 0x2000, P)  # discards the page: reads zero from here and from the guest
        assert mem[0x2000] == 0 and _guest_reads(vcpu) == 0
        assert mem.address == address and mem.size == 4 * MiB and mem.pinned_by
    assert mem.closed


# --- issue 14.4: a VM dropped without close() ------------------------------------------------------------


def test_dropped_vm_releases_its_memslot_pins(system: kvmgmem.System) -> None:
    """Issue 14.4: dropping a VM with memslots (no close()) unpins its host memory once it is collected; on
    kvm the pins used to stay forever and ``close()`` failed with EBUSY naming the dead VM."""
    mem = HostMemory(4 * MiB)
    vm = system.create_vm()
    vm.set_user_memory_region(0, 0, 2 * MiB, mem)
    vm.set_user_memory_region(1, 2 * MiB, 2 * MiB, memoryview(mem)[2 * MiB :])  # a plain buffer too
    assert len(mem.pinned_by) == 1
    del vm
    gc.collect()
    assert mem.pinned_by == []
    mem.close()  # a buffer export of the memoryview slot would make this fail with BufferError
    assert mem.closed


def test_dropped_vm_with_a_live_guest_memfd(system: kvmgmem.System) -> None:
    """A guest_memfd object keeps its VM object (as the kernel's file pins the VM): the pins go with the last
    of them, on both backends, and the guest_memfd keeps working meanwhile."""
    mem = HostMemory(2 * MiB)
    vm = system.create_vm()
    gmem = vm.create_guest_memfd(2 * MiB)
    vm.set_user_memory_region(0, 0, 2 * MiB, mem)
    del vm
    gc.collect()
    gmem.punch_hole(0, P)  # still works: the VM lives on
    assert len(mem.pinned_by) == 1
    del gmem
    gc.collect()
    assert mem.pinned_by == []
    mem.close()


# --- issue 14.5: with blocks -----------------------------------------------------------------------------


def test_body_error_is_not_masked(system: kvmgmem.System) -> None:
    """Issue 14.5: the body's exception leaves the block as it is — no EBUSY replacing it or chained to it —
    and the unmap waits for the memslot: the memory is closed to new users but stays mapped for the slot."""
    with system.create_vm() as vm:
        with pytest.raises(ZeroDivisionError) as info:
            with HostMemory(4 * MiB) as mem:
                vcpu = _start_guest(vm, mem)
                mem[0x2000] = 0x77
                1 / 0  # noqa: B018
        assert info.value.__context__ is None and info.value.__cause__ is None
        assert mem.closed and mem.pinned_by and "unmapped once memslot 0" in repr(mem)
        assert _guest_reads(vcpu) == 0x77  # the guest still has its memory
        with pytest.raises(KvmError) as refused:
            vm.set_user_memory_region(1, 8 * MiB, 2 * MiB, mem)
        assert refused.value.errno == errno.EFAULT and refused.value.op == "KVM_SET_USER_MEMORY_REGION"
        with pytest.raises(ValueError, match=r"^HostMemory\.resize: memory is closed"):
            mem.resize(8 * MiB)
        mem.close()  # already closed: a no-op, not an error
        assert mem[0x2000] == 0x77  # still mapped
        vcpu.close()
        vm.set_user_memory_region(0, 0, 0)  # the last memslot lets go: unmapped now
        assert mem.pinned_by == []
        with pytest.raises(ValueError):
            mem[0x2000]


def test_gmem_mapping_follows_the_same_with_rule(system: kvmgmem.System) -> None:
    """A guest_memfd mapping backing a memslot obeys HostMemory's rule: leaving its ``with`` block with an
    error raises that error unchanged (no EBUSY), the unmap waits for the memslot, and then happens."""
    flags = kvmgmem.GUEST_MEMFD_FLAG_MMAP | kvmgmem.GUEST_MEMFD_FLAG_INIT_SHARED
    with system.create_vm() as vm, vm.create_guest_memfd(2 * MiB, flags) as gmem:
        with pytest.raises(ZeroDivisionError) as info:
            with gmem.mmap() as view:
                vm.set_user_memory_region(0, 0, 2 * MiB, view)
                view[0x2000] = 0x5C
                with pytest.raises(KvmError) as busy:  # an explicit close means "unmap now": refused
                    view.close()
                assert busy.value.errno == errno.EBUSY and busy.value.op == "GmemMapping.close"
                1 / 0  # noqa: B018
        assert info.value.__context__ is None and info.value.__cause__ is None
        assert view.closed and not view.unmapped and view.pinned_by
        assert view[0x2000] == 0x5C  # still mapped for the memslot
        view.close()  # already closed (deferred): a no-op
        vm.set_user_memory_region(0, 0, 0)  # the last memslot lets go: unmapped now
        assert view.unmapped and view.pinned_by == []


@pytest.mark.parametrize("body_raises", [False, True])
def test_natural_nesting(system: kvmgmem.System, body_raises: bool) -> None:
    """Issue 14.5: ``with create_vm() as vm, HostMemory(n) as mem`` exits the memory first: it is unmapped
    when the VM closes right after. A body error comes out unchanged."""

    def body() -> HostMemory:
        with system.create_vm() as vm, HostMemory(2 * MiB) as mem:
            vm.set_user_memory_region(0, 0, 2 * MiB, mem)
            if body_raises:
                raise RuntimeError("the user's error")
        return mem

    if body_raises:
        with pytest.raises(RuntimeError, match="the user's error") as info:
            body()
        assert info.value.__context__ is None
    else:
        mem = body()
        assert mem.closed and mem.pinned_by == []


def test_deferred_unmap_on_a_dropped_vm(system: kvmgmem.System) -> None:
    """The deferred unmap also runs when the last memslot goes because its VM is garbage-collected."""
    vm = system.create_vm()
    with HostMemory(2 * MiB) as mem:
        vm.set_user_memory_region(0, 0, 2 * MiB, mem)
    assert mem.closed and mem.pinned_by
    del vm
    gc.collect()
    assert mem.pinned_by == []
    with pytest.raises(ValueError):
        mem[0]


def test_deferred_unmap_with_a_live_view(system: kvmgmem.System) -> None:
    """A view the user still holds keeps the mapping (mmap cannot unmap exported memory): the VM's close does
    not fail because of it; ``close()`` retries the unmap once the view is released."""
    with system.create_vm() as vm:
        with HostMemory(2 * MiB) as mem:
            vm.set_user_memory_region(0, 0, 2 * MiB, mem)
            view = memoryview(mem)
    assert mem.closed and mem.pinned_by == [] and view[0] == 0  # the unmap could not happen yet
    with pytest.raises(BufferError):
        mem.close()
    view.release()
    mem.close()
    with pytest.raises(ValueError):
        mem[0]


def test_with_block_error_survives_a_view_held_past_the_block() -> None:
    """With no memslot, an unmap that fails (BufferError: a live view) is raised only if the body did not
    raise: the body's error is never replaced."""
    with pytest.raises(KeyError) as info:
        with HostMemory(P) as mem:
            view = memoryview(mem)
            raise KeyError("body")
    assert info.value.__context__ is None
    with pytest.raises(BufferError):
        with HostMemory(P) as other:
            view2 = memoryview(other)
    view.release()
    view2.release()
    mem.close()
    other.close()


def test_with_exit_racing_a_memslot_update(system: kvmgmem.System) -> None:
    """Leaving the block in one thread while another creates a memslot over the memory: either the create is
    turned away (EFAULT) or it wins and the unmap waits for its slot — never a slot over unmapped memory."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    outcomes: Counter[str] = Counter()
    try:
        with system.create_vm() as vm:
            for _ in range(200):
                mem = HostMemory(4 * P)
                barrier = threading.Barrier(2)

                def leave(mem: HostMemory = mem, barrier: threading.Barrier = barrier) -> None:
                    barrier.wait()
                    mem.__exit__(None, None, None)

                t = threading.Thread(target=leave)
                t.start()
                barrier.wait()
                try:
                    vm.set_user_memory_region(0, 0, 4 * P, mem)
                    created = True
                except KvmError as e:
                    # the op is "... in progress" if the close came between resolving and pinning (api.py)
                    assert e.errno == errno.EFAULT and e.op.startswith("KVM_SET_USER_MEMORY_REGION"), e
                    created = False
                t.join()
                assert mem.closed
                if created:
                    mem[0] = 1  # the slot's memory is still mapped
                    assert mem.pinned_by
                    vm.set_user_memory_region(0, 0, 0)
                outcomes["created" if created else "refused"] += 1
                with pytest.raises(ValueError):
                    mem[0]  # unmapped once nothing uses it
    finally:
        sys.setswitchinterval(interval)
    assert sum(outcomes.values()) == 200


# --- issue 15: 2 MiB alignment, no leaked mappings -------------------------------------------------------


def _maps_of_kind() -> Counter[str]:
    """What placement may create: PROT_NONE fences and shared mappings, counted by line and by size (a fence
    leaked next to another would merge into one line, so bytes are counted too)."""
    out: Counter[str] = Counter()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            perms = parts[1]
            if perms == "---p" or perms.endswith("s"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                kind = "fence" if perms == "---p" else "shared"
                out[f"{kind} lines"] += 1
                out[f"{kind} bytes"] += hi - lo
    return out


SIZES = [2 * MiB, 2 * MiB + P, 3 * MiB, 5 * MiB - P, 64 * MiB]


def test_hostmemory_is_2mib_aligned_and_placement_leaks_nothing() -> None:
    """Issue 15: every HostMemory of 2 MiB or more starts on a 2 MiB boundary (the sim and KVM map it huge only
    then); smaller ones need not. Fences and misplaced attempts are all unmapped."""
    HostMemory(HUGE).close()  # warm-up: anything placement loads lazily
    before = _maps_of_kind()
    for _ in range(10):
        mems = [HostMemory(size) for size in SIZES]
        for mem in mems:
            assert mem.address % HUGE == 0, f"{mem!r} is {mem.address % HUGE:#x} off a 2 MiB boundary"
            assert mem.address == buffer_address(mem) and len(mem) == mem.size
            mem[-1] = 1  # all of it is mapped
        small = HostMemory(P)
        small.close()
        for mem in mems:
            mem.close()
    assert _maps_of_kind() == before


def test_alignment_when_the_kernel_prefers_a_misaligned_hole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gap that fits the memory but not the placement's reservation, its top 1 MiB off a boundary: a plain
    mmap lands there misaligned (checked first); HostMemory still lands aligned, on a later attempt, and the
    attempt that went there is unmapped again."""
    size = 4 * MiB
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    span = size + 12 * MiB
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000  # MAP_NORESERVE
    base = libc.mmap(None, span, 0, flags, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    hole = (base // HUGE + 1) * HUGE + MiB
    hole_end = hole + size + 2 * MiB  # fits 4 MiB, not the 6 MiB reservation; its top is 1 MiB off
    holes_opened = []

    class Counting(hostmem._AlignedHole):
        def __init__(self, size: int) -> None:
            holes_opened.append(size)
            super().__init__(size)

    monkeypatch.setattr(hostmem, "_AlignedHole", Counting)
    try:
        assert libc.munmap(hole, hole_end - hole) == 0
        before = _maps_of_kind()
        with mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS) as probe:
            landed = buffer_address(probe)
        mem = HostMemory(size)
        try:
            assert mem.address % HUGE == 0, f"{mem!r}: {mem.address % HUGE:#x} off"
        finally:
            mem.close()
        after = _maps_of_kind()
        assert after == before, f"placement left mappings behind: {after - before} / {before - after}"
        if hole <= landed < hole_end:  # the set-up did what it says (top-down layout): a misaligned offer
            assert landed % HUGE == MiB and len(holes_opened) >= 2, (hex(landed), holes_opened)
    finally:
        libc.munmap(base, span)


def test_guest_memfd_style_file_mapping_is_aligned() -> None:
    """``GmemMapping`` (what ``GuestMemfd.mmap()`` returns on both backends) lands aligned too."""
    fd = os.memfd_create("hostmem-test")
    try:
        os.ftruncate(fd, 4 * MiB)
        before = _maps_of_kind()
        with GmemMapping.of_fd(fd, 4 * MiB) as m:
            assert m.address % HUGE == 0
            m[0] = 7
            assert os.pread(fd, 1, 0) == b"\x07"
        assert _maps_of_kind() == before
    finally:
        os.close(fd)


def test_placement_gives_up_usably(monkeypatch: pytest.MonkeyPatch) -> None:
    """If no attempt lands aligned (a pathologically fragmented address space), the memory is still made —
    merely unaligned — and the misplaced attempts are unmapped."""
    monkeypatch.setattr(hostmem, "_PLACEMENT_TRIES", 3)

    class NoHole:  # opens no hole: the kernel places as it likes
        def __init__(self, size: int) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(hostmem, "_AlignedHole", NoHole)
    before = _maps_of_kind()
    placed = []

    def place() -> mmap.mmap:
        m = mmap.mmap(-1, 2 * MiB + P, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        placed.append(m)
        return m

    result = hostmem._place_aligned(2 * MiB + P, place, lambda m: HUGE // 2, mmap.mmap.close)  # never aligned
    assert len(placed) == 3 and result is placed[-1] and not result.closed
    assert all(m.closed for m in placed[:-1])
    result.close()
    assert _maps_of_kind() == before
