"""Signals and kicks reach a running vCPU on every backend (issue 14 items 2 and 9b).

On kvm, a signal makes KVM_RUN return EINTR and Python then runs its handler; the sim runs guest code inside
one long unicorn call, so it must stop the engine itself for the handler to run (``cpu.ticker.SignalTicker``).
"""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import kvmgmem
from kvmgmem import uapi

# A child that enters an endless guest loop on its main thread, announcing it just before.
CHILD = textwrap.dedent(
    """
    import sys
    import kvmgmem
    from kvmgmem.exits import IoExit
    from kvmgmem.guest import Asm, GuestImage, GuestVm
    from kvmgmem.guest.operands import al

    a = Asm()
    top = a.new_label("top")
    a.out(0x10, al).label(top).jmp(top)
    with kvmgmem.open(sys.argv[1]) as kvm, GuestVm.create(kvm, GuestImage(a)) as g:
        vcpu = g.create_vcpu().vcpu
        first = vcpu.run()
        assert isinstance(first, IoExit) and first.port == 0x10, first
        print("looping", flush=True)
        try:
            vcpu.run()
        except KeyboardInterrupt:
            rip = vcpu.get_regs().rip
            print(f"interrupted rip={rip:#x}", flush=True)
            sys.exit(0)
        print("run() returned", flush=True)
        sys.exit(3)
    """
)


def test_sigint_stops_an_endless_guest_on_the_main_thread(backend: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, backend], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "looping", (line, proc.stderr.read() if proc.stderr else "")
        time.sleep(0.5)  # let it get into the guest loop: without signal delivery it would never return
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # a hang guard, not a speed assertion (speed: bench/)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert out.startswith("interrupted rip="), out


def test_kick_then_run_on_a_fresh_vcpu_is_eintr(system: kvmgmem.System) -> None:
    with system.create_vm(uapi.KVM_X86_DEFAULT_VM) as vm, vm.create_vcpu(0) as vcpu:
        vcpu.kick()
        with pytest.raises(kvmgmem.KvmError) as info:
            vcpu.run()
        assert info.value.errno == errno.EINTR
