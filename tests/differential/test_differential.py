"""Differential tests: the same operation sequence on real KVM and on the sim must give identical results.

Design (README.md, Conformance; docs/conformance.md, Differential testing): hypothesis generates short sequences of
guest_memfd / memslot / fallocate / mmap operations for the DEFAULT VM type. Each operation is rendered as one line of
Python (against the names ``vm``, ``vm2``, ``g``, ``memfd``), evaluated on ``kvmgmem.open("kvm")`` and on
``kvmgmem.open("sim", profile="host")`` (the sim configured like this host: VM_TYPES 1, no memory
attributes, no SMM) step by step, and its outcome — return value, errno and failing op, or exception type — is
compared. Pages are read back through the mappings (``peek``) and, at the end of every sequence, every page
of every host-accessible guest_memfd is compared too. The first difference fails the test with a runnable
reproducer of the executed steps; hypothesis shrinks the sequence first.

Never-SIGBUS rule: real KVM kills the process on a host access the kernel answers with SIGBUS, so host
accesses (``poke``/``peek``) are only rendered for MMAP|INIT_SHARED files, inside the file; for MMAP-only
files the step maps and unmaps without touching. The decision uses only facts both backends have already
agreed on (a creation's flags and size, whether the file was closed).

Guest runs are differential-tested by ``test_guest_differential.py``: generated guest programs reading and
writing guest_memfd pages, with host punches and pokes between their syncs.

Host configuration: the sim runs ``profile="host"``: 6.18 without KVM_X86_SW_PROTECTED_VM (no memory
attributes) and without SMM (KVM_CAP_MULTI_ADDRESS_SPACE = 0, a memslot in address space 1 → EINVAL; the
differential found the latter on its first run). The host's remaining deviations from upstream 6.18
(``HOST_DEVIATIONS`` in the sim's profile module) concern guest execution, which these sequences do not do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import kvmgmem
from kvmgmem import KvmError, uapi
from kvmgmem.conformance.fixtures import open_backend
from kvmgmem.errors import errno_name

P = uapi.PAGE_SIZE
GIB = 1 << 30
KEEP, PUNCH = uapi.FALLOC_FL_KEEP_SIZE, uapi.FALLOC_FL_PUNCH_HOLE
GMEM, LOG_DIRTY, READONLY = uapi.KVM_MEM_GUEST_MEMFD, uapi.KVM_MEM_LOG_DIRTY_PAGES, uapi.KVM_MEM_READONLY
MMAP, INIT_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP, uapi.GUEST_MEMFD_FLAG_INIT_SHARED
SIM_OPTIONS: dict[str, Any] = {"profile": "host"}
MAX_EXAMPLES = int(os.environ.get("KVMGMEM_DIFF_EXAMPLES", "2000"))

# --- the helpers every rendered line may use (also emitted into the reproducer) ------------------------------

PRELUDE = '''\
import os
import kvmgmem

def poke(gm, off, data):
    """Write through a fresh MAP_SHARED mapping of the whole file."""
    mp = gm.mmap(gm.size)
    try:
        mp[off:off + len(data)] = data
    finally:
        mp.close()

def peek(gm, off, n):
    """Read through a fresh MAP_SHARED mapping of the whole file."""
    mp = gm.mmap(gm.size)
    try:
        return bytes(mp[off:off + n])
    finally:
        mp.close()

def map_only(gm, shared=True):
    """mmap and munmap without touching a byte (MMAP-only files SIGBUS on access)."""
    gm.mmap(gm.size, shared=shared).close()

def stat3(gm):
    st = gm.stat()
    return (st.st_size, st.st_blksize, oct(st.st_mode))
'''

_HELPERS: dict[str, Any] = {}
exec(compile(PRELUDE, "<differential prelude>", "exec"), _HELPERS)


@dataclass
class GmemFacts:
    """What both backends agreed on about ``g[i]`` (used to decide which host accesses are safe)."""

    size: int
    flags: int
    closed: bool = False

    @property
    def host_accessible(self) -> bool:
        return not self.closed and self.flags & (MMAP | INIT_SHARED) == MMAP | INIT_SHARED


@dataclass
class Env:
    """One backend's world for one sequence: two DEFAULT VMs, the guest_memfds made so far, a memfd."""

    system: kvmgmem.System
    vm: kvmgmem.Vm
    vm2: kvmgmem.Vm
    memfd: int
    g: list[kvmgmem.GuestMemfd] = field(default_factory=list)

    @classmethod
    def open(cls, system: kvmgmem.System) -> Env:
        vm = system.create_vm()
        vm2 = system.create_vm()
        memfd = os.memfd_create("diff", 0)
        os.ftruncate(memfd, 16 * P)
        return cls(system, vm, vm2, memfd)

    def namespace(self) -> dict[str, Any]:
        return {**_HELPERS, "vm": self.vm, "vm2": self.vm2, "g": self.g, "memfd": self.memfd}

    def close(self) -> None:
        for gm in self.g:
            gm.close()
        self.vm2.close()
        self.vm.close()
        os.close(self.memfd)


def outcome(line: str, ns: dict[str, Any]) -> tuple[Any, ...]:
    """Run one rendered line; the comparable result."""
    try:
        value = eval(_compiled(line), ns)
    except KvmError as e:
        return ("errno", errno_name(e.errno or 0), e.op)
    except Exception as e:  # TypeError/ValueError from argument marshalling, OverflowError from os.*
        return (type(e).__name__,)
    if isinstance(value, kvmgmem.GuestMemfd) or value is None:
        return ("ok",)
    return ("ok", value)


_CODE_CACHE: dict[str, Any] = {}


def _compiled(line: str) -> Any:
    code = _CODE_CACHE.get(line)
    if code is None:
        code = _CODE_CACHE[line] = compile(line, "<step>", "eval")
    return code


# --- operations ---------------------------------------------------------------------------------------------
# Each op is a tuple of small ints drawn by hypothesis; ``render`` turns it into a line of Python using the
# facts of the sequence so far (or None: not applicable now, e.g. no guest_memfd yet).

SIZES = [P, 2 * P, 4 * P, 8 * P, 4 * P, 2 * P, 0, P + 1, 1 << 63]
CREATE_FLAGS = [0, MMAP, MMAP | INIT_SHARED, MMAP | INIT_SHARED, MMAP | INIT_SHARED, INIT_SHARED, 4, 1 << 63]
SLOTS = [0, 1, 2, 3, 1 << 16, 32764]
GPAS = [4 * GIB, 4 * GIB + P, 4 * GIB + 2 * P, 4 * GIB + 4 * P, 8 * GIB, 0x800, (1 << 64) - P]
REGION_SIZES = [0, P, 2 * P, 4 * P, P + 1, 8 * P]
REGION_FLAGS = [GMEM, GMEM, GMEM, 0, GMEM | LOG_DIRTY, GMEM | READONLY, READONLY, LOG_DIRTY]
OFFSETS = [0, P, 2 * P, 3 * P, 4 * P, 1, 0x7FFFFFFFFFFFF000, (1 << 64) - P]
FD_KINDS = ["g", "g", "g", "g", "-1", "9999", "vm", "memfd", "g2"]
#: ftruncate lengths. Not 1<<63: the kvm backend passes it to os.ftruncate, which raises OverflowError, while
#: the sim answers the kernel's EINVAL (a C caller's (off_t)(1<<63) is negative) — reported, not hidden:
#: see test_truncate_huge_length_kvm_backend_overflow below.
TRUNCATE_SIZES = [0, P, 2 * P, 4 * P, 8 * P, (1 << 63) - P, 1 << 63]
FALLOC_MODES = [KEEP, KEEP | PUNCH, KEEP | PUNCH, 0, PUNCH, uapi.FALLOC_FL_ZERO_RANGE | KEEP]
FALLOC_OFFS = [0, P, 2 * P, 4 * P, 8 * P, 1, -P]
FALLOC_LENS = [P, 2 * P, 4 * P, 8 * P, 0, 1]


def _pick(seq: list[Any], i: int) -> Any:
    return seq[i % len(seq)]


@dataclass
class Sequence:
    """The agreed facts while a sequence runs (rendering input)."""

    facts: list[GmemFacts] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)  # "vm" or "vm2" per g[i]


def render(op: tuple[int, ...], seq: Sequence) -> tuple[str, Callable[[tuple[Any, ...]], None] | None] | None:
    """The line for ``op`` now, and an update of ``seq`` to apply once both backends agreed on the outcome."""
    kind, a, b, c, d, e, f = op
    n = len(seq.facts)
    if not n and kind not in (2, 3, 9):
        kind = 0  # nothing to operate on yet: create a file instead
    if kind == 9:  # close the VM fd (its guest_memfds hold a VM reference and keep working); later vm ops → EBADF
        return ("vm.close()", None) if a % 4 == 0 else None
    if kind == 0:  # create on vm (or vm2, 1 in 4)
        size, flags, owner = _pick(SIZES, a), _pick(CREATE_FLAGS, b), "vm2" if c % 4 == 0 else "vm"

        def created(result: tuple[Any, ...]) -> None:
            if result == ("ok",):
                seq.facts.append(GmemFacts(size, flags))
                seq.owners.append(owner)

        return f"g.append({owner}.create_guest_memfd({size:#x}, {flags:#x}))", created
    if kind == 1:  # close g[i]
        if not n:
            return None
        i = a % n

        def closed(result: tuple[Any, ...]) -> None:
            seq.facts[i].closed = True

        return f"g[{i}].close()", closed
    if kind in (2, 3):  # KVM_SET_USER_MEMORY_REGION2 (kind 3: the v1 ioctl, no gmem)
        slot, gpa, size = _pick(SLOTS, a), _pick(GPAS, b), _pick(REGION_SIZES, c)
        if kind == 3:
            flags = _pick([0, LOG_DIRTY, READONLY, GMEM], d)
            return f"vm.set_user_memory_region({slot:#x}, {gpa:#x}, {size:#x}, None, {flags:#x})", None
        flags, off = _pick(REGION_FLAGS, d), _pick(OFFSETS, f)
        fd_kind = _pick(FD_KINDS, e)
        mine = [i for i, o in enumerate(seq.owners) if o == "vm"]
        theirs = [i for i, o in enumerate(seq.owners) if o == "vm2"]
        if fd_kind == "g":
            fd = f"g[{mine[a % len(mine)]}]" if mine else "None"
        elif fd_kind == "g2":
            fd = f"g[{theirs[b % len(theirs)]}]" if theirs else "-1"
        elif fd_kind == "vm":
            fd = "vm.fd"
        else:
            fd = fd_kind
        return f"vm.set_user_memory_region2({slot:#x}, {gpa:#x}, {size:#x}, None, {flags:#x}, {fd}, {off:#x})", None
    if kind == 4:  # fallocate
        if not n:
            return None
        i = a % n
        mode, off, length = _pick(FALLOC_MODES, b), _pick(FALLOC_OFFS, c), _pick(FALLOC_LENS, d)
        return f"g[{i}].fallocate({mode:#x}, {off:#x}, {length:#x})", None
    if kind == 5:  # host write through a mapping (only where it cannot SIGBUS)
        if not n:
            return None
        i = a % n
        fx = seq.facts[i]
        if fx.flags & MMAP and not fx.closed and not fx.host_accessible:
            return f"map_only(g[{i}])", None  # MMAP-only: private, any access would SIGBUS
        if not fx.host_accessible:
            return f"poke(g[{i}], 0, b'x')", None  # ENODEV / EBADF before any access
        pages = fx.size // P
        off = (b % pages) * P + _pick([0, 1, P - 8], c)
        data = bytes([d % 256]) * _pick([1, 8, 64], e)
        data = data[: fx.size - off]
        return f"poke(g[{i}], {off:#x}, {data!r})", None
    if kind == 6:  # host read of one page
        if not n:
            return None
        i = a % n
        fx = seq.facts[i]
        if not fx.host_accessible:
            line = f"map_only(g[{i}], shared={bool(b % 2)})" if fx.flags & MMAP else f"peek(g[{i}], 0, 1)"
            return line, None
        off = (b % (fx.size // P)) * P
        return f"peek(g[{i}], {off:#x}, {P:#x})", None
    if kind == 7:  # fstat / file ops that always fail
        if not n:
            return None
        i = a % n
        what = _pick(["stat3(g[{i}])", "g[{i}].truncate({x:#x})", "g[{i}].read(8)", "g[{i}].pwrite(b'x', 0)"], b)
        return what.format(i=i, x=_pick(TRUNCATE_SIZES, c)), None
    if kind == 8:  # mmap MAP_PRIVATE (EINVAL / ENODEV; never touched)
        if not n:
            return None
        i = a % n
        return f"map_only(g[{i}], shared=False)", None
    raise AssertionError(kind)


OPS = st.tuples(
    st.integers(0, 9),
    *(st.integers(0, 255) for _ in range(6)),
)
SEQUENCES = st.lists(OPS, min_size=2, max_size=14)


def reproducer(lines: list[str]) -> str:
    """A standalone script that replays ``lines`` on both backends and prints each outcome."""
    body = "\n".join(f"        {line!r}," for line in lines)
    return (
        PRELUDE
        + f"""
STEPS = [
{body}
]

for backend, options in (("kvm", {{}}), ("sim", {SIM_OPTIONS!r})):
    with kvmgmem.open(backend, **options) as system:
        vm, vm2 = system.create_vm(), system.create_vm()
        memfd = os.memfd_create("diff", 0)
        os.ftruncate(memfd, {16 * P:#x})
        g = []
        for step in STEPS:
            try:
                print(backend, step, "->", eval(step))
            except OSError as e:
                print(backend, step, "->", type(e).__name__, e)
            except Exception as e:
                print(backend, step, "->", type(e).__name__, e)
        for gm in g:
            gm.close()
        vm2.close(); vm.close(); os.close(memfd)
"""
    )


def final_contents(seq: Sequence) -> list[str]:
    """Lines that read back every page of every host-accessible file (the end-of-sequence memory check)."""
    return [
        f"peek(g[{i}], 0, {fx.size:#x})" for i, fx in enumerate(seq.facts) if fx.host_accessible and fx.size <= 64 * P
    ]


# --- the test ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def systems() -> Iterator[tuple[kvmgmem.System, kvmgmem.System]]:
    kvm = open_backend("kvm")  # skips only without a usable /dev/kvm
    sim = kvmgmem.open("sim", **SIM_OPTIONS)
    try:
        yield kvm, sim
    finally:
        sim.close()
        kvm.close()


@dataclass
class Stats:
    sequences: int = 0
    steps: int = 0
    seconds: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)


STATS = Stats()


def run_sequence(kvm: kvmgmem.System, sim: kvmgmem.System, ops: list[tuple[int, ...]]) -> None:
    seq = Sequence()
    left, right = Env.open(kvm), Env.open(sim)
    lines: list[str] = []
    try:
        ns_l, ns_r = left.namespace(), right.namespace()
        for op in ops:
            rendered = render(op, seq)
            if rendered is None:
                continue
            line, update = rendered
            lines.append(line)
            got_l, got_r = outcome(line, ns_l), outcome(line, ns_r)
            if got_l != got_r:
                raise AssertionError(_report(lines, got_l, got_r))
            if update is not None:
                update(got_l)
        for line in final_contents(seq):
            lines.append(line)
            got_l, got_r = outcome(line, ns_l), outcome(line, ns_r)
            if got_l != got_r:
                raise AssertionError(_report(lines, got_l, got_r))
        STATS.steps += len(lines)
    finally:
        left.close()
        right.close()


def _short(result: tuple[Any, ...]) -> str:
    text = repr(result)
    return text if len(text) < 300 else text[:300] + "...)"


def _report(lines: list[str], kvm_result: tuple[Any, ...], sim_result: tuple[Any, ...]) -> str:
    return (
        f"kvm and sim disagree at step {len(lines)}: {lines[-1]}\n"
        f"  kvm: {_short(kvm_result)}\n  sim: {_short(sim_result)}\n"
        f"--- reproducer (python3 repro.py) ---\n{reproducer(lines)}"
    )


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no "explain": it replays thousands of variants
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(ops=SEQUENCES)
def test_kvm_and_sim_agree(systems: tuple[kvmgmem.System, kvmgmem.System], ops: list[tuple[int, ...]]) -> None:
    """`kvm_gmem_create`, `__kvm_set_memory_region`, `kvm_gmem_fallocate`, `kvm_gmem_fops`, `kvm_gmem_mmap` and
    `kvm_gmem_setattr` on the DEFAULT VM: every generated sequence gives identical outcomes (return values, errnos with
    the failing op, exception types, page contents) on kvm and on the sim configured like this host
    (``profile="host"``)."""
    kvm, sim = systems
    started = time.perf_counter()
    run_sequence(kvm, sim, ops)
    STATS.sequences += 1
    STATS.seconds += time.perf_counter() - started


def test_differential_budget(systems: tuple[kvmgmem.System, kvmgmem.System]) -> None:
    """The sequence test above ran at least 2,000 sequences (when not restricted by KVMGMEM_DIFF_EXAMPLES).
    Run alone, it runs the sequence test first: a budget check that skips or passes without sequences would
    say nothing."""
    if STATS.sequences == 0:
        test_kvm_and_sim_agree(systems)
    assert STATS.sequences > 0, STATS
    print(f"differential: {STATS.sequences} sequences, {STATS.steps} steps, {STATS.seconds:.1f} s in sequences")
    if MAX_EXAMPLES >= 2000:
        assert STATS.sequences >= 2000, STATS


def test_reproducer_is_runnable(tmp_path: Any, systems: tuple[kvmgmem.System, kvmgmem.System]) -> None:
    """The reproducer printed on a failure is a standalone script that runs (here: a short known sequence)."""
    import subprocess
    import sys

    lines = [
        "g.append(vm.create_guest_memfd(0x4000, 0x3))",
        "vm.set_user_memory_region2(0x1, 0x100000000, 0x1000, None, 0x4, g[0], 0x0)",
        "g[0].fallocate(0x1, 0x1, 0x1000)",
        "poke(g[0], 0x10, b'xx')",
        "peek(g[0], 0x10, 0x2)",
    ]
    script = tmp_path / "repro.py"
    script.write_text(reproducer(lines))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 2 * len(lines)
    assert out[2].endswith("-> KvmError KVM fallocate failed: EINVAL (Invalid argument)") or "EINVAL" in out[2]
    assert out[4].endswith("-> b'xx'") and out[9].endswith("-> b'xx'")


def test_render_never_touches_private_pages() -> None:
    """The never-SIGBUS rule: for an MMAP-only file, host-access ops render as map/unmap without access."""
    seq = Sequence([GmemFacts(4 * P, MMAP)], ["vm"])
    for kind in (5, 6):
        for b in range(4):
            rendered = render((kind, 0, b, 0, 0, 0, 0), seq)
            assert rendered is not None
            assert rendered[0].startswith("map_only("), rendered[0]


def test_truncate_huge_length(systems: tuple[kvmgmem.System, kvmgmem.System]) -> None:
    """Found by the differential test: ftruncate to 2^63 (a negative off_t for a C caller) fails the same way
    on both backends (the kernel's EINVAL)."""
    results = []
    for system in systems:
        with system.create_vm() as vm, vm.create_guest_memfd(P, 0) as gm:
            results.append(outcome("g.truncate(1 << 63)", {"g": gm}))
    assert results[0] == results[1] == ("errno", "EINVAL", "ftruncate"), results


def test_host_profile_caps_match_kvm(systems: tuple[kvmgmem.System, kvmgmem.System]) -> None:
    """``profile="host"`` mirrors this host: every capability the sim models (``uapi.CAPS``, include/uapi/linux/kvm.h,
    plus the vCPU limits) answers the same on the system fd and on a DEFAULT VM, and the VM types are the same. (It
    was not so for ``sw_protected=False`` alone: KVM_CAP_MULTI_ADDRESS_SPACE was 2 there, 0 here.)"""
    caps = {**uapi.CAPS, "NR_VCPUS": uapi.KVM_CAP_NR_VCPUS, "MAX_VCPUS": uapi.KVM_CAP_MAX_VCPUS, "MAX_VCPU_ID": 128}
    kvm, sim = systems
    with kvm.create_vm() as kvm_vm, sim.create_vm() as sim_vm:
        for name, cap in caps.items():
            on_kvm = (kvm.check_extension(cap), kvm_vm.check_extension(cap))
            on_sim = (sim.check_extension(cap), sim_vm.check_extension(cap))
            assert on_kvm == on_sim, f"KVM_CAP_{name}: kvm {on_kvm}, sim profile=host {on_sim}"
    assert kvm.supported_vm_types == sim.supported_vm_types
