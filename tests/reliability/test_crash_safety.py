"""The nastiest lifetime cases, each in a fresh interpreter that must exit normally (no segfault, no abort).

Scenarios (per backend): HostMemory closed under a memslot; a vCPU closed while another thread is inside
``run()``; the VM closed under a running vCPU; mmap views used after close; buffers pinned by a memslot
resized/closed; the System closed under live VMs; everything dropped without ``close()`` in random order;
and a race of ``HostMemory.close()`` against ``set_user_memory_region`` using that memory.
"""

from __future__ import annotations

from kvmgmem.conformance.fixtures import open_backend

from ._support import run_python

SCENARIOS = r'''
import errno, gc, mmap, random, sys, threading, time
import kvmgmem
from kvmgmem import HostMemory, KvmError, uapi

BACKEND = sys.argv[1]
P = uapi.PAGE_SIZE
done = []

failed = []
thread_failures = []  # exceptions in helper threads: a plain thread would only print them and let the scenario pass

def in_thread(target):
    """A daemon thread running ``target`` whose exception is recorded for the current scenario."""
    import traceback
    def run():
        try:
            target()
        except BaseException:
            thread_failures.append(traceback.format_exc())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t

def scenario(fn):
    import traceback
    try:
        fn()
        gc.collect()
        if thread_failures:
            raise AssertionError("a helper thread failed:\n" + "\n".join(thread_failures))
    except BaseException:
        failed.append(fn.__name__)
        print("FAIL", fn.__name__, traceback.format_exc(), flush=True)
    else:
        done.append(fn.__name__)
        print("ok", fn.__name__, flush=True)
    thread_failures.clear()
    return fn

def spin_vm(s):
    """A VM whose vCPU 0 spins forever (real-mode `jmp $` at 0x1000)."""
    vm = s.create_vm()
    mem = HostMemory(16 * P)
    mem[0x1000:0x1002] = b"\xeb\xfe"
    vm.set_user_memory_region(0, 0, 16 * P, mem)
    c = vm.create_vcpu(0)
    sr = c.get_sregs(); sr.cs.base = 0; sr.cs.selector = 0; c.set_sregs(sr)
    r = c.get_regs(); r.rip = 0x1000; r.rflags = 2; c.set_regs(r)
    return vm, mem, c

def runner(c, results):
    def loop():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                results.append(c.run())
            except KvmError as e:
                results.append(e)
                if e.errno == errno.EBADF:
                    return
    return in_thread(loop)

@scenario
def hostmemory_closed_under_a_slot():
    with kvmgmem.open(BACKEND) as s, s.create_vm() as vm:
        mem = HostMemory(4 * P)
        vm.set_user_memory_region(0, 0, 4 * P, mem)
        for _ in range(3):
            try:
                mem.close()
                raise SystemExit("HostMemory.close() under a memslot was not refused")
            except KvmError as e:
                assert e.errno == errno.EBUSY and e.op == "HostMemory.close", e
        mem[0] = 1  # still mapped
        assert mem.pinned_by
    mem.close()  # the VM is gone: unpinned

@scenario
def vcpu_closed_while_another_thread_runs():
    with kvmgmem.open(BACKEND) as s:
        vm, mem, c = spin_vm(s)
        results = []
        t = runner(c, results)
        time.sleep(0.2)
        c.close()
        t.join(10)
        assert not t.is_alive(), "run() did not return after close()"
        assert isinstance(results[-1], KvmError) and results[-1].errno == errno.EBADF, results[-3:]
        vm.close()
        mem.close()

@scenario
def vm_closed_while_its_vcpu_runs():
    with kvmgmem.open(BACKEND) as s:
        vm, mem, c = spin_vm(s)
        results = []
        t = runner(c, results)
        time.sleep(0.2)
        vm.close()  # closes its vCPUs
        t.join(10)
        assert not t.is_alive() and c.closed
        mem.close()

@scenario
def kick_storm_then_close():
    with kvmgmem.open(BACKEND) as s:
        vm, mem, c = spin_vm(s)
        results = []
        t = runner(c, results)
        for _ in range(200):
            c.kick()
        c.close()
        for _ in range(10):
            c.kick()  # no-op on a closed vCPU
        t.join(10)
        assert not t.is_alive()
        vm.close()
        mem.close()

@scenario
def gmem_mapping_views_after_close():
    with kvmgmem.open(BACKEND) as s, s.create_vm() as vm:
        flags = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & 3
        if flags != 3:
            return
        g = vm.create_guest_memfd(4 * P, flags)
        m = g.mmap()
        m[0:4] = b"live"
        g.close()  # the mapping keeps the file
        assert m[0:4] == b"live"
        m.close()
        m.close()
        for op in (lambda: m[0], lambda: m[0:4], lambda: m.__setitem__(0, 1)):
            try:
                op()
                raise SystemExit("access to a closed mapping succeeded")
            except ValueError:
                pass
        for op in (lambda: g.mmap(), lambda: g.allocate(0, P)):
            try:
                op()
                raise SystemExit("operation on a closed guest_memfd succeeded")
            except KvmError as e:
                assert e.errno == errno.EBADF

@scenario
def hostmemory_views_after_close():
    mem = HostMemory(4 * P)
    view = memoryview(mem)
    try:
        mem.close()
        raise SystemExit("close() with an exported view succeeded")
    except BufferError:
        pass
    view[0] = 7
    view.release()
    mem.close()
    for op in (lambda: mem[0], lambda: memoryview(mem), lambda: mem.size):
        try:
            op()
            raise SystemExit("access to closed HostMemory succeeded")
        except ValueError:
            pass

@scenario
def pinned_plain_buffers_cannot_be_freed():
    with kvmgmem.open(BACKEND) as s, s.create_vm() as vm:
        raw = mmap.mmap(-1, 8 * P)
        vm.set_user_memory_region(1, 0, 4 * P, raw)
        try:
            raw.close()
            raise SystemExit("mmap.close() under a memslot succeeded")
        except BufferError:
            pass
        raw[0] = 1
        vm.set_user_memory_region(1, 0, 0, raw)
    raw.close()

@scenario
def system_closed_under_live_vms():
    s = kvmgmem.open(BACKEND)
    vm = s.create_vm()
    g = vm.create_guest_memfd(4 * P)
    s.close()
    g.allocate(0, P)  # the VM and its guest_memfd do not depend on the /dev/kvm fd
    c = vm.create_vcpu(0)
    c.get_regs()
    for obj in (g, vm):
        obj.close()

@scenario
def everything_dropped_without_close_in_random_order():
    rng = random.Random(1)
    for _ in range(5):
        s = kvmgmem.open(BACKEND)
        vm = s.create_vm()
        mem = HostMemory(4 * P)
        flags = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & 3
        g = vm.create_guest_memfd(4 * P, flags)
        c = vm.create_vcpu(0)
        m = g.mmap() if flags & 1 else None
        objs = [s, vm, mem, g, c, m]
        rng.shuffle(objs)
        while objs:
            objs.pop()
            gc.collect()
        del s, vm, mem, g, c, m
        gc.collect()

@scenario
def close_races_set_user_memory_region():
    """HostMemory.close() in one thread against a memslot create using it in another: either the close is
    refused (EBUSY) or the create fails; never a memslot over unmapped memory."""
    with kvmgmem.open(BACKEND) as s, s.create_vm() as vm:
        bad = []
        sim_dangling = []
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        for i in range(300):
            mem = HostMemory(4 * P)
            barrier = threading.Barrier(2)
            def closer():
                barrier.wait()
                try:
                    mem.close()
                except KvmError as e:
                    assert e.errno == errno.EBUSY
            t = in_thread(closer)
            barrier.wait()
            try:
                vm.set_user_memory_region(0, 0, 4 * P, mem)
            except KvmError:
                pass
            t.join()
            if BACKEND == "sim" and mem.closed:
                # what a vCPU touching gpa 0 would be handed now
                r = vm.handle_fault(0, True)
                ptr = getattr(r, "host_ptr", None)
                if ptr is not None and mem.address <= ptr < mem.address + 4 * P:
                    sim_dangling.append(f"{r}")
            try:
                vm.set_user_memory_region(0, 0, 0)
                slot_existed = True
            except KvmError as e:
                assert e.errno == errno.EINVAL
                slot_existed = False
            if slot_existed and mem.closed:
                bad.append(i)
            mem.close()
        sys.setswitchinterval(interval)
        assert not bad, (
            f"memslot left over closed (unmapped) HostMemory in {len(bad)} of 300 races"
            + (f"; the sim fault path then maps gpa 0 to the unmapped memory ({len(sim_dangling)} times, "
               f"e.g. {sim_dangling[0]})" if sim_dangling else "")
        )

print("passed", len(done), "failed", len(failed), flush=True)
sys.exit(1 if failed else 0)
'''

N_SCENARIOS = SCENARIOS.count("@scenario")


def test_lifetime_scenarios_do_not_crash(backend: str) -> None:
    open_backend(backend).close()  # skip with the reason if unusable
    proc = run_python(SCENARIOS, args=[backend], timeout=60)
    assert f"passed {N_SCENARIOS} failed 0" in proc.stdout, proc.stdout
