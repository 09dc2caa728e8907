"""Bench 1: exit round trips — a guest looping on OUT, exits/s through kvmgmem vs a plain C KVM_RUN loop.

Variants: kvmgmem on kvm with the payload at CPL0 (run by KVM's instruction emulator here) and at CPL3
(native), the sim, and the C program ``bench/c/exitloop.c`` running the same image at CPL3 and CPL0 (the
floor for Python overhead). Target: kvmgmem's loop (typed exits) ≥ 90% of the C loop's exits/s.
"""

from __future__ import annotations

import json
import subprocess
import time

from common import Report, Row, best_of, c_baseline, image_file, open_or_none, out_loop

from kvmgmem.exits import IoExit
from kvmgmem.guest import GuestImage, GuestVm

N_KVM = 20_000
N_SIM = 100_000


def python_rate(backend: str, user: bool, n: int) -> float | None:
    system = open_or_none(backend)
    if system is None:
        return None
    with system, GuestVm.create(system, GuestImage(out_loop(), user=user)) as g:
        vcpu = g.create_vcpu().vcpu
        first = vcpu.run()
        assert isinstance(first, IoExit) and first.port == 0x10, first

        def once() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                exit = vcpu.run()
                if not isinstance(exit, IoExit):
                    raise RuntimeError(f"unexpected exit {exit}")
            return n / (time.perf_counter() - t0)

        return best_of(3, once)


def c_rate(user: bool, n: int) -> float | None:
    binary = c_baseline("exitloop.c")
    if binary is None:
        return None
    image = GuestImage(out_loop(), user=user)
    mem = (image.end + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    img, state, _ = image_file(image, mem)

    def once() -> float:
        out = subprocess.run([str(binary), str(img), str(mem), str(state), str(n)], check=True,
                             capture_output=True, text=True)  # fmt: skip
        return float(json.loads(out.stdout)["exits_per_second"])

    return best_of(3, once)


def run(report: Report) -> None:
    bench = "exit round trip"
    for user, cpl in ((True, "CPL3"), (False, "CPL0")):
        base = f"C KVM_RUN loop, {cpl}"
        report.add(Row(bench, base, c_rate(user, N_KVM), "exits/s", note="floor for Python overhead"))
        report.add(Row(bench, f"kvmgmem kvm, {cpl}", python_rate("kvm", user, N_KVM), "exits/s",
                       target="≥ 90% of the C loop"))  # fmt: skip
    report.add(Row(bench, "kvmgmem sim, CPL0", python_rate("sim", False, N_SIM), "exits/s"))
    _ratios_per_cpl(report, bench)


def _ratios_per_cpl(report: Report, bench: str) -> None:
    """Each kvm variant's ratio is against the C loop at the same CPL (the kernel path differs by CPL)."""
    rows = [r for r in report.rows if r.bench == bench]
    for cpl in ("CPL3", "CPL0"):
        base = next((r for r in rows if r.variant == f"C KVM_RUN loop, {cpl}"), None)
        for r in rows:
            if base and base.value and r.value is not None and r.variant.endswith(cpl):
                r.ratio = r.value / base.value


if __name__ == "__main__":
    rep = Report()
    run(rep)
    print(rep.markdown("python bench/exits.py"))
