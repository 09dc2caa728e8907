"""Issue 15: the kvm backend's two KVM_RUN paths — the C extension ``kvmgmem.backends.kvm._run`` and the
pure-Python fallback (``KVMGMEM_NO_CEXT=1``) — give the same exits, errors and completions.

Every test that runs a vCPU is parametrized over both paths (the env var is read when a vCPU is created).
``test_extension_is_in_use`` makes a failed or skipped build of the extension a failure, since ``setup.py``
marks it optional (an install without a C compiler still works, on the pure-Python path).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.backends.kvm import vcpu as kvm_vcpu
from kvmgmem.backends.kvm.vcpu import NO_CEXT_ENV, KvmVcpu
from kvmgmem.conformance.fixtures import open_backend
from kvmgmem.exits import Exit, HltExit, IoExit, MemoryFaultExit, MmioExit
from kvmgmem.guest import Asm, GuestImage, GuestVm
from kvmgmem.guest.operands import al, ax, eax, qword, rax, rsi

MMIO_GPA = 0xF000_0000  # mapped by the image's page tables, covered by no memslot
OUT, IN = uapi.KVM_EXIT_IO_OUT, uapi.KVM_EXIT_IO_IN


@pytest.fixture(params=["cext", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which KVM_RUN path vCPUs created in the test use; the C one skips if the extension is not built
    (``test_extension_is_in_use`` fails in that case)."""
    if request.param == "cext":
        if not kvm_vcpu.cext_available():
            pytest.skip("the C extension kvmgmem.backends.kvm._run is not built")
        monkeypatch.setenv(NO_CEXT_ENV, "0")
    else:
        monkeypatch.setenv(NO_CEXT_ENV, "1")
    return str(request.param)


@pytest.fixture
def kvm() -> Iterator[kvmgmem.System]:
    system = open_backend("kvm")
    try:
        yield system
    finally:
        system.close()


def _vcpu(guest: GuestVm, path: str) -> KvmVcpu:
    vcpu = guest.create_vcpu().vcpu
    assert isinstance(vcpu, KvmVcpu)
    assert vcpu.uses_cext == (path == "cext")
    return vcpu


def _answer(vcpu: KvmVcpu, exit: Exit) -> None:
    """Complete IN and MMIO-read exits with recognisable bytes."""
    if isinstance(exit, IoExit) and exit.direction == IN:
        vcpu.complete_io(bytes(range(0xA0, 0xA0 + exit.size * exit.count)))
    elif isinstance(exit, MmioExit) and not exit.is_write:
        vcpu.complete_mmio(bytes(range(0xB0, 0xB0 + exit.length)))


def test_extension_is_in_use() -> None:
    """A normal install builds the extension and new vCPUs use it (catches a silently failed build)."""
    if os.environ.get(NO_CEXT_ENV, "") not in ("", "0"):
        pytest.skip(f"{NO_CEXT_ENV} is set: the pure-Python path was asked for")
    assert kvm_vcpu.cext_available(), "kvmgmem.backends.kvm._run did not import: was the C extension built?"
    assert kvm_vcpu.cext_enabled()
    from kvmgmem.backends.kvm import _run

    assert Path(_run.__file__).suffix == ".so", _run.__file__
    system = open_backend("kvm")
    with system, system.create_vm() as vm, vm.create_vcpu() as vcpu:
        assert isinstance(vcpu, KvmVcpu) and vcpu.uses_cext


@pytest.mark.parametrize("user", [False, True], ids=["cpl0", "cpl3"])
def test_exits_and_completions(kvm: kvmgmem.System, path: str, user: bool) -> None:
    """OUT of each width, IN answered by complete_io, MMIO write and read answered by complete_mmio, HLT:
    the exact exits, and the completions reach the guest (it echoes them back with OUT)."""
    a = Asm()
    a.mov(eax, 0x11223344).out(0x10, al).out(0x12, ax).out(0x14, eax)
    a.in_(al, 0x20).out(0x21, al)
    a.in_(eax, 0x22).out(0x23, eax)
    a.mov(rsi, MMIO_GPA).mov(qword[rsi], rax).mov(rax, qword[rsi]).out(0x24, eax)
    if not user:
        a.hlt()  # at CPL3 HLT is a #GP, not an exit
    with GuestVm.create(kvm, GuestImage(a, user=user)) as guest:
        vcpu = _vcpu(guest, path)
        got: list[Exit] = []
        for _ in range(11 if user else 12):
            exit = vcpu.run()
            got.append(exit)
            _answer(vcpu, exit)
    echo = bytes(range(0xA0, 0xA4))
    mmio = echo + bytes(4)  # rax after `in eax` is the zero-extended echo
    want: list[Exit] = [
        IoExit(OUT, 0x10, 1, 1, b"\x44"),
        IoExit(OUT, 0x12, 2, 1, b"\x44\x33"),
        IoExit(OUT, 0x14, 4, 1, b"\x44\x33\x22\x11"),
        IoExit(IN, 0x20, 1, 1, b"\x00"),
        IoExit(OUT, 0x21, 1, 1, b"\xa0"),
        IoExit(IN, 0x22, 4, 1, b"\x00" * 4),
        IoExit(OUT, 0x23, 4, 1, echo),
        MmioExit(MMIO_GPA, mmio, 8, True),
        MmioExit(MMIO_GPA, mmio, 8, False),  # a read exit's data is whatever kvm_run held (the last write)
        IoExit(OUT, 0x24, 4, 1, bytes(range(0xB0, 0xB4))),
    ]
    if not user:
        want.append(HltExit())
    assert got[: len(want)] == want
    assert all(type(g) is type(w) for g, w in zip(got, want, strict=False))


def test_equal_exits_are_interchangeable(kvm: kvmgmem.System, path: str) -> None:
    """Whether or not an IoExit is reused for equal values, callers see equal, frozen, hashable exits."""
    a = Asm()
    top = a.new_label("top")
    a.mov(eax, 7).label(top).out(0x10, al).jmp(top)
    with GuestVm.create(kvm, GuestImage(a, user=True)) as guest:
        vcpu = _vcpu(guest, path)
        exits = [vcpu.run() for _ in range(3)]
    assert exits[0] == exits[1] == exits[2] == IoExit(OUT, 0x10, 1, 1, b"\x07")
    assert len({hash(e) for e in exits}) == 1
    with pytest.raises(AttributeError):
        exits[0].port = 1  # type: ignore[misc]


def test_reused_exits_never_change_under_a_holder(kvm: kvmgmem.System, path: str) -> None:
    """An OUT loop over 256 payload values (more than the exit caches hold): exits a caller keeps, strongly or
    only weakly, keep their values; exits dropped at once (which the C path may rewrite in place for the
    next exit) are right when returned."""
    a = Asm()
    top = a.new_label("top")
    a.label(top).out(0x10, al).inc(eax).jmp(top)
    with GuestVm.create(kvm, GuestImage(a, user=True)) as guest:
        vcpu = _vcpu(guest, path)
        for i in range(600):  # dropped at once
            exit = vcpu.run()
            assert isinstance(exit, IoExit) and exit.data == bytes([i & 0xFF]) and exit.port == 0x10
            del exit
        kept = [vcpu.run() for _ in range(300)]
        assert [e.data for e in kept] == [bytes([(600 + i) & 0xFF]) for i in range(300)]  # type: ignore[attr-defined]
        refs = [weakref.ref(vcpu.run()) for _ in range(300)]
        alive = [(i, r()) for i, r in enumerate(refs) if r() is not None]
        for i, e in alive:
            assert e == IoExit(OUT, 0x10, 1, 1, bytes([(900 + i) & 0xFF]))


def test_pending_completion_is_cleared_by_the_next_run(kvm: kvmgmem.System, path: str) -> None:
    """complete_io is only accepted right after an IN exit, with exactly size*count bytes."""
    a = Asm()
    a.out(0x10, al).in_(al, 0x20).out(0x21, al).out(0x22, al)
    with GuestVm.create(kvm, GuestImage(a)) as guest:
        vcpu = _vcpu(guest, path)
        assert isinstance(vcpu.run(), IoExit)
        with pytest.raises(kvmgmem.KvmError) as info:
            vcpu.complete_io(b"\x01")  # after an OUT: nothing to complete
        assert info.value.errno == errno.EINVAL
        assert vcpu.run() == IoExit(IN, 0x20, 1, 1, b"\x00")
        with pytest.raises(ValueError, match="expected 1 bytes"):
            vcpu.complete_io(b"\x01\x02")
        vcpu.complete_io(b"\x5a")
        assert vcpu.run() == IoExit(OUT, 0x21, 1, 1, b"\x5a")
        with pytest.raises(kvmgmem.KvmError):
            vcpu.complete_io(b"\x01")
        with pytest.raises(kvmgmem.KvmError):
            vcpu.complete_mmio(b"\x01")


def test_kick_before_run_returns_eintr_once(kvm: kvmgmem.System, path: str) -> None:
    """A kick with no vCPU running sets immediate_exit: the next run() fails with EINTR and clears it, the
    one after that enters the guest."""
    a = Asm()
    a.out(0x10, al)
    with GuestVm.create(kvm, GuestImage(a)) as guest:
        vcpu = _vcpu(guest, path)
        vcpu.kick()
        with pytest.raises(kvmgmem.KvmError) as info:
            vcpu.run()
        assert (info.value.errno, info.value.op) == (errno.EINTR, "KVM_RUN")
        assert vcpu.kvm_run().immediate_exit == 0
        assert vcpu.run() == IoExit(OUT, 0x10, 1, 1, b"\x00")


def _spinner(kvm: kvmgmem.System) -> GuestVm:
    a = Asm()
    spin = a.new_label("spin")
    a.label(spin).jmp(spin)
    return GuestVm.create(kvm, GuestImage(a, user=True))  # CPL3: native on this host


def _run_into(vcpu: KvmVcpu, errors: list[BaseException]) -> None:
    """Thread body: one run(), its exception (the test expects one) appended to ``errors``."""
    try:
        vcpu.run()
    except BaseException as e:
        errors.append(e)


def test_kick_interrupts_a_running_vcpu_and_releases_the_gil(kvm: kvmgmem.System, path: str) -> None:
    """While one thread is inside KVM_RUN, this thread keeps running Python (the GIL is released), a second
    run() is refused with EBUSY, and a kick makes the first return EINTR; then it runs again."""
    with _spinner(kvm) as guest:
        vcpu = _vcpu(guest, path)
        for _ in range(2):
            errors: list[BaseException] = []
            thread = threading.Thread(target=_run_into, args=(vcpu, errors))
            thread.start()
            count, deadline = 0, time.monotonic() + 0.2
            while time.monotonic() < deadline:
                count += 1
            assert count > 1000  # we ran Python meanwhile
            with pytest.raises(kvmgmem.KvmError) as busy:
                vcpu.run()
            assert busy.value.errno == errno.EBUSY
            vcpu.kick()
            thread.join(10)
            assert not thread.is_alive()
            assert len(errors) == 1 and isinstance(errors[0], kvmgmem.KvmError), errors
            assert (errors[0].errno, errors[0].op) == (errno.EINTR, "KVM_RUN")


def test_close_while_running(kvm: kvmgmem.System, path: str) -> None:
    """close() from another thread kicks the running vCPU out and waits for it; run() afterwards says closed."""
    with _spinner(kvm) as guest:
        vcpu = _vcpu(guest, path)
        errors: list[BaseException] = []
        thread = threading.Thread(target=_run_into, args=(vcpu, errors))
        thread.start()
        time.sleep(0.1)
        vcpu.close()
        thread.join(10)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], kvmgmem.KvmError) and errors[0].errno == errno.EINTR
        with pytest.raises(kvmgmem.KvmError, match="closed"):
            vcpu.run()
        vcpu.close()  # idempotent


def _loop_until_closed(vcpu: KvmVcpu, errors: list[BaseException]) -> None:
    """Thread body: run() in a loop, recording each KvmError, until the closed error (EBADF) or 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            vcpu.run()
        except kvmgmem.KvmError as e:
            errors.append(e)
            if e.errno == errno.EBADF:
                return


def test_close_while_another_thread_loops_on_run(kvm: kvmgmem.System, path: str) -> None:
    """A thread calling run() in a loop (catching each error) cannot win the vCPU back after close() kicked
    it: close() returns, and the loop ends on the closed error (EBADF). Repeated because the race (the loop
    re-entering KVM_RUN before close() gets the run lock) does not happen every time."""
    for _ in range(10):
        with _spinner(kvm) as guest:
            vcpu = _vcpu(guest, path)
            errors: list[BaseException] = []
            thread = threading.Thread(target=_loop_until_closed, args=(vcpu, errors), daemon=True)
            thread.start()
            time.sleep(0.05)
            started = time.monotonic()
            vcpu.close()
            thread.join(10)
            assert not thread.is_alive()
            assert time.monotonic() - started < 5
            assert isinstance(errors[-1], kvmgmem.KvmError) and errors[-1].errno == errno.EBADF, errors[-3:]


def test_efault_without_memory_fault_info_raises(kvm: kvmgmem.System, path: str) -> None:
    """A memslot whose file was truncated under it: the CPL3 access fails KVM_RUN with EFAULT while
    exit_reason is not KVM_EXIT_MEMORY_FAULT here, so it is a KvmError(EFAULT, "KVM_RUN"), not an exit."""
    a = Asm()
    a.mov(rsi, 1 << 30).mov(rax, qword[rsi]).out(0x10, eax)
    with GuestVm.create(kvm, GuestImage(a, user=True)) as guest, tempfile.TemporaryFile() as f:
        os.ftruncate(f.fileno(), 2 << 20)
        backing = mmap.mmap(f.fileno(), 2 << 20)
        try:
            guest.vm.set_user_memory_region(1, 1 << 30, 2 << 20, backing)
            os.ftruncate(f.fileno(), 0)
            vcpu = _vcpu(guest, path)
            for _ in range(2):
                with pytest.raises(kvmgmem.KvmError) as info:
                    vcpu.run()
                assert (info.value.errno, info.value.op) == (errno.EFAULT, "KVM_RUN")
                assert vcpu.kvm_run().exit_reason != uapi.KVM_EXIT_MEMORY_FAULT
        finally:
            guest.vm.set_user_memory_region(1, 1 << 30, 0)
            backing.close()


@pytest.mark.parametrize("err", [errno.EFAULT, uapi.EHWPOISON, errno.EINVAL])
def test_failed_run_decodes_memory_fault(kvm: kvmgmem.System, path: str, err: int) -> None:
    """The failure decoder both paths share: EFAULT/EHWPOISON with exit_reason KVM_EXIT_MEMORY_FAULT is a
    MemoryFaultExit built from kvm_run.memory_fault; any other errno is KvmError. (This host's KVM cannot
    produce a memory-fault exit, so kvm_run is written the way the kernel would fill it.)"""
    with kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        assert isinstance(vcpu, KvmVcpu) and vcpu.uses_cext == (path == "cext")
        run = vcpu._map
        struct.pack_into("<I", run, uapi.kvm_run.exit_reason.offset, uapi.KVM_EXIT_MEMORY_FAULT)
        fault = uapi.kvm_run.exit.offset
        struct.pack_into("<QQQ", run, fault, uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x1234_5000, 4096)
        if err == errno.EINVAL:
            with pytest.raises(kvmgmem.KvmError) as info:
                vcpu._failed(err)
            assert (info.value.errno, info.value.op) == (errno.EINVAL, "KVM_RUN")
        else:
            got = vcpu._failed(err)
            assert got == MemoryFaultExit(uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x1234_5000, 4096, err)
            assert got.private and got.hwpoison == (err == uapi.EHWPOISON)


# --- the C Runner on its own: misuse is an exception, never a crash or a hang ---------------------------------


@pytest.fixture
def _run_module() -> object:
    if not kvm_vcpu.cext_available():
        pytest.skip("the C extension kvmgmem.backends.kvm._run is not built")
    from kvmgmem.backends.kvm import _run

    return _run


def test_runner_misuse_raises(_run_module: object, kvm: kvmgmem.System) -> None:
    from kvmgmem.backends.kvm._run import Runner

    class Owner:
        pass

    def slow(owner: object, kind: int, value: int) -> Exit:
        raise AssertionError("not reached")

    with pytest.raises(OSError):
        Runner(-1, 4096, IoExit, Owner(), slow)  # mmap of a bad fd
    with pytest.raises(ValueError, match="smaller than struct kvm_run"):
        Runner(0, 16, IoExit, Owner(), slow)
    with pytest.raises(TypeError):
        Runner(0, 4096, IoExit, Owner(), 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uninitialised"):
        Runner.__new__(Runner).run()
    with kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        assert isinstance(vcpu, KvmVcpu)
        size = len(vcpu._map)
        owner = Owner()
        runner = Runner(vcpu.fd, size, IoExit, owner, slow)
        with pytest.raises(RuntimeError, match="already initialised"):
            runner.__init__(vcpu.fd, size, IoExit, owner, slow)  # type: ignore[misc]
        del owner  # held weakly: the slow path reports it gone
        runner.kick(0)  # immediate_exit: KVM_RUN fails with EINTR, which goes to the (dead) owner
        with pytest.raises(ReferenceError):
            runner.run()
        runner.close()
        runner.close()
        assert runner.closed
        runner.kick(0)  # no-op once closed


def test_runner_close_from_its_own_slow_path_is_refused(_run_module: object, kvm: kvmgmem.System) -> None:
    """close() inside run() on the same thread would wait for itself forever: it raises instead."""
    from kvmgmem.backends.kvm._run import Runner

    class Owner:
        runner: Runner

    def slow(owner: Owner, kind: int, value: int) -> Exit:
        owner.runner.close()
        raise AssertionError("not reached")

    with kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        assert isinstance(vcpu, KvmVcpu)
        owner = Owner()
        owner.runner = Runner(vcpu.fd, len(vcpu._map), IoExit, owner, slow)
        owner.runner.kick(0)
        with pytest.raises(RuntimeError, match="from inside its own run"):
            owner.runner.run()
        owner.runner.close()
        assert owner.runner.closed
