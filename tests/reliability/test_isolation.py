"""Isolation on the sim (hypothesis): bytes the guest writes to private memory never reach the host, and a
punched page reads zero afterwards.

Each example is a random sequence of guest and host operations on a SW_PROTECTED VM with one memslot bound
to a guest_memfd. Private bytes are written the way the sim CPU writes them: a private fault through
``core.handle_fault`` gives the guest_memfd page's address and the secret is stored there. After every step
every host API is tried — ``read``/``pread``/``write``/``pwrite`` on the guest_memfd, every page of an
``mmap`` of it, the memslot's HostMemory, the guest's *shared* (host-memory) view, ``introspect()`` of the VM
and the file, and a fresh guest_memfd mapping in another VM (memory reuse) — and none may contain a secret.
"""

from __future__ import annotations

import ctypes
import errno
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmgmem import HostMemory, KvmError, uapi
from kvmgmem.backends import sim
from kvmgmem.backends.sim.fault import Mapped

from ._support import PRIVATE, P

NPAGES = 16
GMEM = uapi.KVM_MEM_GUEST_MEMFD
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
SHARED_FLAGS = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
EXAMPLES, MAX_STEPS = 150, 30
COUNT = {"examples": 0, "steps": 0, "secrets": 0, "probes": 0, "punch_checks": 0}

OPS = st.sampled_from(["write_private", "write_private", "convert", "punch", "reslot", "probe", "probe"])


class World:
    def __init__(self, gmem_flags: int) -> None:
        self.system = sim.open_system()
        self.vm = self.system.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        self.core = self.vm.sim
        self.mem = HostMemory(NPAGES * P)
        self.gmem = self.vm.create_guest_memfd(NPAGES * P, gmem_flags)
        self.secrets: list[bytes] = []
        self.offset = 0
        self.vm.set_user_memory_region2(0, 0, NPAGES * P, self.mem, GMEM, self.gmem, 0)

    def close(self) -> None:
        self.gmem.close()
        self.vm.close()
        self.mem.close()
        self.system.close()

    # --- guest side ------------------------------------------------------------------------------------------

    def guest_map(self, page: int, write: bool) -> Mapped | None:
        r = self.core.handle_fault(page * P, write)
        return r if isinstance(r, Mapped) else None

    def write_private(self, page: int, token: bytes) -> None:
        self.vm.set_memory_attributes(page * P, P, PRIVATE)
        r = self.guest_map(page, True)
        if r is not None and r.gmem:
            ctypes.memmove(r.host_address_of(page * P + 128), token, len(token))
            self.secrets.append(token)
            COUNT["secrets"] += 1

    def punch(self, page: int, n: int) -> None:
        self.gmem.punch_hole((self.offset // P + page) * P, n * P)
        for p in range(page, min(page + n, NPAGES)):
            if not self.core.attributes.is_private(p):
                continue
            r = self.guest_map(p, False)
            if r is not None and r.gmem:
                data = ctypes.string_at(r.host_address_of(p * P), P)
                assert data == bytes(P), f"punched private page {p} does not read zero"
                COUNT["punch_checks"] += 1

    # --- host side ------------------------------------------------------------------------------------------

    def assert_clean(self, where: str, data: bytes | str) -> None:
        raw = data.encode("latin-1", "replace") if isinstance(data, str) else bytes(data)
        for token in self.secrets:
            assert token not in raw and token.hex() not in raw.decode("latin-1"), f"private bytes visible via {where}"

    def probe(self, reuse: bool) -> None:
        COUNT["probes"] += 1
        g = self.gmem
        for name, call in [
            ("read", lambda: g.read(P)),
            ("pread", lambda: g.pread(P, 0)),
            ("write", lambda: g.write(b"x")),
            ("pwrite", lambda: g.pwrite(b"x", 0)),
        ]:
            try:
                out = call()
            except KvmError as e:
                self.assert_clean(f"{name} error", str(e))
            else:
                raise AssertionError(f"guest_memfd {name} succeeded: {out!r}")
        if g.flags & MMAP:
            with g.mmap() as m:
                # Read each page the way a debugger would (/proc/self/mem): a page the kernel answers with
                # SIGBUS fails with EIO there instead of killing the process. Private memory must never read.
                fd = os.open("/proc/self/mem", os.O_RDONLY)
                try:
                    for page in range(NPAGES):
                        try:
                            data = os.pread(fd, P, m.address + page * P)
                        except OSError as e:
                            assert e.errno == errno.EIO, e
                        else:
                            assert g.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED, f"private page {page} readable"
                            self.assert_clean(f"mmap page {page}", data)
                finally:
                    os.close(fd)
        self.assert_clean("HostMemory", self.mem[:])
        for page in range(NPAGES):  # the guest's shared view is host memory
            if self.core.attributes.is_private(page):
                continue
            r = self.guest_map(page, False)
            if r is not None and not r.gmem:
                self.assert_clean(f"shared gpa page {page}", ctypes.string_at(r.host_address_of(page * P), P))
        self.assert_clean("VM introspect()", repr(self.vm.introspect()))
        self.assert_clean("guest_memfd introspect()", repr(g.introspect()))
        self.assert_clean("guest_memfd stat()", repr(g.stat()))
        if reuse:
            with self.system.create_vm() as other, other.create_guest_memfd(NPAGES * P, SHARED_FLAGS) as g2:
                with g2.mmap() as m2:
                    self.assert_clean("a new guest_memfd's mapping", m2[:])


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
@given(gmem_flags=st.sampled_from([0, MMAP]), data=st.data())
def test_private_bytes_never_reach_the_host(gmem_flags: int, data: st.DataObject) -> None:
    COUNT["examples"] += 1
    w = World(gmem_flags)
    try:
        for _ in range(data.draw(st.integers(1, MAX_STEPS), label="steps")):
            COUNT["steps"] += 1
            op = data.draw(OPS, label="op")
            page = data.draw(st.integers(0, NPAGES - 1), label="page")
            if op == "write_private":
                token = b"\xa5SECRET" + data.draw(st.binary(min_size=8, max_size=8), label="token")
                w.write_private(page, token)
            elif op == "convert":
                n = data.draw(st.integers(1, NPAGES), label="n")
                w.vm.set_memory_attributes(page * P, n * P, PRIVATE if data.draw(st.booleans()) else 0)
            elif op == "punch":
                w.punch(page, data.draw(st.integers(1, 4), label="n"))
            elif op == "reslot":
                w.vm.set_user_memory_region2(0, 0, 0)
                w.offset = data.draw(st.sampled_from([0, 0, 4 * P]), label="offset")
                size = NPAGES * P - w.offset
                w.vm.set_user_memory_region2(0, 0, size, w.mem, GMEM, w.gmem, w.offset)
            else:
                w.probe(reuse=data.draw(st.integers(0, 9), label="reuse") == 0)
        w.probe(reuse=True)
    finally:
        w.close()


def test_isolation_ran_enough() -> None:
    """The property must have written secrets and then hunted for them. Runs after it (file order); when
    run alone (the property deselected), it runs the property itself first, so it never passes vacuously."""
    if COUNT["examples"] == 0:
        test_private_bytes_never_reach_the_host()
    assert COUNT["secrets"] >= 50 and COUNT["probes"] >= EXAMPLES and COUNT["punch_checks"] >= 10, COUNT
