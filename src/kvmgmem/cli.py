"""The ``kvmgmem`` command line: ``caps``, ``demo``, ``selftest``, ``bench``, ``check`` and ``run``.

One ``_cmd_<name>(args) -> exit code`` per subcommand and one ``_add_<name>(sub)`` that declares its options;
``build_parser`` lists them. Arguments are checked by argparse types, so a bad value is a one-line usage error
(exit 2) before anything runs; failures the host causes are one line on stderr (exit 1); Ctrl-C is exit 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import kvmgmem
from kvmgmem import uapi
from kvmgmem.caps import collect

DESCRIPTION = """\
fd-based private guest memory for KVM (guest_memfd), on the real /dev/kvm or on a
software KVM (the sim). Run `kvmgmem COMMAND --help` for a command's options."""

DEMO_DESCRIPTION = """\
Boot a KVM_X86_SW_PROTECTED_VM (real KVM where the host has it, else the sim) whose
vCPUs convert their share of RAM between shared and private, filling and verifying
it, while the host checks that it can never read private memory. Ends with a report;
exit status 0 when everything that ran verified."""

DEMO_EPILOG = """\
examples:
  kvmgmem demo                                   2 vCPUs, 64 MiB, 5 s
  kvmgmem demo --memory 1G --seconds 20          bigger memory: the run still ends about 20 s after setup
  kvmgmem demo --plot map.png --trace trace.json the guest-physical map as a PNG, a Perfetto trace"""

BACKEND_CHOICES = ["auto", *kvmgmem.BACKENDS]
MAX_SECONDS = 24 * 3600.0


# --- argument types: each raises ArgumentTypeError with a sentence argparse prints as a usage error -------


def _vcpus(text: str) -> int:
    from kvmgmem.vmm.demo import MAX_VCPUS

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"{n} vCPUs: the demo runs 1 to {MAX_VCPUS}")
    return n


def _host_ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 40


def _memory(text: str) -> int:
    from kvmgmem.vmm.demo import human_size, parse_size

    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < uapi.PAGE_SIZE or size % uapi.PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 4 KiB pages (e.g. 64M)")
    limit = _host_ram() // 2 // uapi.PAGE_SIZE * uapi.PAGE_SIZE
    if size > limit:  # with --policy none both stores hold a full copy
        raise argparse.ArgumentTypeError(f"{text!r} is more than half of this host's RAM ({human_size(limit)} "
                                         "at most: guest_memfd and shared memory may each hold a copy)")  # fmt: skip
    return size


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0, at most {MAX_SECONDS:g}")
    return value


def _output_file(text: str) -> str:
    """A file the command will write at the end: prove now that it can be created, so a long run does not
    fail at its last step. A file that did not exist is removed again."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {e.strerror}") from None
    if not existed:
        path.unlink()
    return text


# --- caps ------------------------------------------------------------------------------------------------


def _add_caps(sub: Any) -> None:
    caps = sub.add_parser("caps", help="capabilities, VM types, guest_memfd flags and a verdict",
                          description="Query every guest_memfd-related KVM_CHECK_EXTENSION on the system and "
                          "on a VM of each supported type, and say in words what this KVM can run.")  # fmt: skip
    caps.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                      help="kvm (/dev/kvm), sim, or auto: kvm when it can, else the sim "
                      "(default: %(default)s)")  # fmt: skip
    caps.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")
    caps.set_defaults(func=_cmd_caps)


def _cmd_caps(args: argparse.Namespace) -> int:
    try:
        system = kvmgmem.open(args.backend)
    except (OSError, ImportError) as e:
        print(f"kvmgmem caps: cannot open backend {args.backend!r}: {e}", file=sys.stderr)
        return 1
    with system:
        report = collect(system)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]backend:[/bold] {report.backend} ({report.selection_reason})")
    table = Table(title="KVM_CHECK_EXTENSION")
    table.add_column("cap")
    table.add_column("#", justify="right")
    table.add_column("system", justify="right")
    for name in report.vm_caps:
        table.add_column(f"VM {name}", justify="right")
    for cap, number in uapi.CAPS.items():
        row = [cap, str(number), str(report.system_caps[cap])]
        row += [str(report.vm_caps[name][cap]) for name in report.vm_caps]
        table.add_row(*row)
    console.print(table)
    for name, err in report.vm_errors.items():
        console.print(f"[red]VM {name}: {err}[/red]")
    for line in report.verdict:
        console.print(f"• {line}")
    return 0


# --- demo ------------------------------------------------------------------------------------------------


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="a confidential VM converting memory, with a verified report",
        description=DEMO_DESCRIPTION,
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                      help="kvm needs KVM_X86_SW_PROTECTED_VM; auto picks the sim without it "
                      "(default: %(default)s)")  # fmt: skip
    demo.add_argument("--vcpus", type=_vcpus, default=2, metavar="N",
                      help="vCPUs, each converting its own share of RAM, 1-64 (default: %(default)s)")  # fmt: skip
    demo.add_argument("--memory", type=_memory, default="64M", metavar="SIZE",
                      help="guest RAM: a number of bytes with an optional K/M/G unit, e.g. 64M, 1G "
                      "(default: 64M)")  # fmt: skip
    demo.add_argument("--policy", default="both", choices=["both", "punch-only", "none"],
                      help="what a conversion discards: both = the copy no longer used, either side (QEMU); "
                      "punch-only = only guest_memfd (cloud-hypervisor); none (default: %(default)s)")  # fmt: skip
    demo.add_argument("--seconds", type=_seconds, default=5.0, metavar="S",
                      help="run the workload this long after setup, then let each vCPU finish its slice "
                      "(default: %(default)s)")  # fmt: skip
    demo.add_argument(
        "--plot",
        metavar="FILE.png",
        type=_output_file,
        help="also draw the guest-physical map over time into this PNG (default: no plot)",
    )
    demo.add_argument("--trace", metavar="FILE.json", type=_output_file,
                      help="also write a Chrome/Perfetto trace of conversions, punches and discards "
                      "(default: none)")  # fmt: skip
    demo.add_argument("--json", action="store_true", help="print the report as JSON (default: a table)")
    demo.set_defaults(func=_cmd_demo)


def _live_line() -> Callable[[Any], None] | None:
    """A progress line that rewrites itself on a terminal; nothing at all when stderr is not one (a log
    would otherwise collect every refresh)."""
    if not sys.stderr.isatty():
        return None

    def show(progress: Any) -> None:
        width = shutil.get_terminal_size().columns - 1
        print(f"\r{progress.line()[:width]}\x1b[K", end="", file=sys.stderr, flush=True)

    return show


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvmgmem.vmm import demo

    if args.memory // args.vcpus < uapi.PAGE_SIZE:
        args.parser.error(f"--memory {args.memory} bytes cannot give each of {args.vcpus} vCPUs a 4 KiB page")
    from kvmgmem.guest.events import GuestError
    from kvmgmem.vmm.machine import MachineError

    progress = None if args.json else _live_line()
    report, error = None, ""
    try:
        report = demo.run_demo(backend=args.backend, vcpus=args.vcpus, memory=args.memory, policy=args.policy,
                               seconds=args.seconds, plot=args.plot, trace=args.trace, progress=progress)  # fmt: skip
    except (demo.DemoError, ValueError, OSError) as e:  # the host cannot run it as asked
        error = str(e)
    except (GuestError, MachineError) as e:  # a check inside the guest or the VMM failed: the result is FAILED
        error = f"FAILED: {e}"
    finally:
        _end_live_line(progress)  # also on Ctrl-C, before main() says "interrupted"
    if report is None:
        print(f"kvmgmem demo: {error}", file=sys.stderr)
        return 1
    demo.print_report(report, args.json)
    if args.plot:
        print(f"map: {args.plot}", file=sys.stderr)
    if args.trace:
        print(f"trace: {args.trace} (open in https://ui.perfetto.dev)", file=sys.stderr)
    return 0 if report.verified else 1


def _end_live_line(progress: object) -> None:
    if progress is not None:
        print("\r\x1b[K", end="", file=sys.stderr, flush=True)


# --- selftest --------------------------------------------------------------------------------------------


def _add_selftest(sub: Any) -> None:
    st = sub.add_parser("selftest", help="run the conformance suite; case x backend table",
                        description="Run the conformance suite installed with kvmgmem (pytest) on each backend "
                        "and print one row per case: pass, FAIL, or skip with the capability that is missing. "
                        "Works from any directory.")  # fmt: skip
    st.add_argument("--backend", default="all", choices=["all", *kvmgmem.BACKENDS],
                    help="run on this backend only (default: %(default)s)")  # fmt: skip
    st.add_argument("-k", metavar="PATTERN",
                    help="only cases matching this pytest -k expression; spec ids as the table shows them "
                    "(GM-1, 'SR-4 or PK-1') select exactly those cases (default: every case)")  # fmt: skip
    st.add_argument("--json", action="store_true", help="print the results as JSON (default: a table)")
    st.add_argument("-v", "--verbose", action="store_true", help="also show pytest's own output (default: off)")
    st.set_defaults(func=_cmd_selftest)


#: What ``kvmgmem selftest`` says when pytest, which runs the suite, is not installed (it is an optional extra).
SELFTEST_NEEDS_PYTEST = "kvmgmem selftest: needs pytest, which is not installed: pip install 'kvmgmem[selftest]'"


def _cmd_selftest(args: argparse.Namespace) -> int:
    try:
        from kvmgmem import selftest  # the suite's driver imports pytest
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in ("pytest", "_pytest"):
            raise
        print(SELFTEST_NEEDS_PYTEST, file=sys.stderr)
        return 1
    backends = None if args.backend in (None, "all") else [args.backend]
    code = selftest.main(backends, args.k, args.json, args.verbose)
    if code == 130:
        # The interrupted case may have left threads running a guest that only the case itself would have
        # stopped; the interpreter would wait for them at exit. The results are printed: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return code


# --- bench -----------------------------------------------------------------------------------------------


def _bench_dir() -> Path | None:
    """The repository's bench/ (benchmarks are not installed: they compile a C baseline and write results)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "bench" / "run.py").is_file():
            return root / "bench"
    return None


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser("bench", help="run the benchmarks of a checkout (bench/run.py): JSON + markdown table",
                           description="Run a kvmgmem checkout's benchmarks (they are not installed) and write "
                           "bench/results/all.{json,md}.")  # fmt: skip
    bench.add_argument("names", nargs="*",
                       help="exits populate convert faults execspeed workload (default: all of them)")  # fmt: skip
    bench.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    bench = _bench_dir()
    if bench is None:
        print("kvmgmem bench: no bench/run.py here; run it from a kvmgmem checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(bench / "run.py"), *args.names], cwd=bench.parent)


# --- check -----------------------------------------------------------------------------------------------


def _add_check(sub: Any) -> None:
    chk = sub.add_parser("check", help="interleaving checker: every schedule of the fault/invalidation races",
                         description="Explore every schedule of small scenarios over the sim core's kernel steps "
                         "(faults vs attribute changes, punch hole, release, memslot updates, mm-notifier "
                         "invalidations) up to a preemption bound; print the schedules explored and the "
                         "verdict, and a counterexample as a step table (and a Perfetto trace). "
                         "See docs/interleavings.md.")  # fmt: skip
    chk.add_argument("scenario", nargs="?", help="one scenario (default: every scenario, or those exposing --bug)")
    chk.add_argument("--preemptions", type=int, default=2, help="preemption bound (default: %(default)s)")
    chk.add_argument("--bug", action="append", metavar="NAME",
                     help="put a historic kernel bug back into the model; repeatable "
                     "(default: none, the fixed kernel)")  # fmt: skip
    chk.add_argument("--trace", metavar="FILE.json", type=_output_file,
                     help="write the counterexample as a Chrome/Perfetto trace (default: no trace)")  # fmt: skip
    chk.add_argument("--replay", metavar="SCHEDULE",
                     help="re-run one schedule, thread indices comma-separated "
                     "(default: explore them all)")  # fmt: skip
    chk.add_argument("--shortest", action="store_true",
                     help="report the counterexample with the fewest preemptions, then steps "
                     "(default: the first found)")  # fmt: skip
    chk.add_argument("--list", action="store_true", help="list scenarios and bug switches (default: off)")
    chk.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    """Explore every schedule of the interleaving checker's scenarios; print a counterexample if found."""
    from kvmgmem import check
    from kvmgmem.check import report

    bugs = frozenset(args.bug or ())
    unknown = sorted(bugs - set(check.BUGS))
    if args.list or unknown:
        if unknown:
            print(f"unknown --bug {', '.join(unknown)}", file=sys.stderr)
        print("scenarios:")
        for sc in check.SCENARIOS.values():
            print(f"  {sc.name:20} {' '.join(sc.summary.split())}")
        print("bugs: " + " ".join(check.BUGS))
        return 2 if unknown else 0
    if args.scenario and args.scenario not in check.SCENARIOS:
        print(f"unknown scenario {args.scenario!r} (see --list)", file=sys.stderr)
        return 2
    if args.replay is not None:
        if not args.scenario:
            print("--replay needs a SCENARIO", file=sys.stderr)
            return 2
        run = check.replay(args.scenario, [int(i) for i in args.replay.split(",") if i], bugs)
        print(report.table(run))
        if args.trace:
            with open(args.trace, "w") as out:
                report.write_trace(run, args.scenario, out)
        return 1 if run.violations else 0
    names = [args.scenario] if args.scenario else [
        sc.name for sc in check.SCENARIOS.values() if not bugs or bugs & set(sc.exposes)
    ]  # fmt: skip
    failed = 0
    for name in names:
        result = check.check(name, args.preemptions, bugs, shortest=args.shortest)
        verdict = "no violation" if result.ok else f"VIOLATION {result.violations[0]}"
        print(f"{name}: {result.schedules} schedules explored (<= {args.preemptions} preemptions): {verdict}")
        cex = result.counterexample
        if cex is None:
            continue
        failed += 1
        print()
        print(report.table(cex))
        flags = "".join(f" --bug {b}" for b in sorted(bugs))
        print(f"replay: kvmgmem check {name}{flags} --replay {report.schedule_text(cex)}")
        if args.trace:
            with open(args.trace, "w") as out:
                report.write_trace(cex, name, out)
            print(f"trace: {args.trace} (open in https://ui.perfetto.dev)")
        print()
    return 1 if failed else 0


# --- run ---------------------------------------------------------------------------------------------------


def _profile(text: str) -> str:
    from kvmgmem.backends.sim import PROFILES

    if text not in PROFILES:
        raise argparse.ArgumentTypeError(f"unknown profile {text!r} (choose {', '.join(PROFILES)})")
    return text


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run an unmodified C program with the sim serving its /dev/kvm",
                         usage="kvmgmem run [-h] [--profile VERSION] [--trace FILE] [--] PROGRAM [ARGS...]",
                         description="Run PROGRAM (a KVM selftest, your own VMM) with the sim serving /dev/kvm "
                         "inside the program's own process, through a preloaded library; exit with the "
                         "program's status (128+N when signal N ended it). See docs/run.md.")  # fmt: skip
    run.add_argument("--profile", type=_profile, default="6.18", metavar="VERSION",
                     help="the kernel the sim models: 6.8, 6.18, 7.2 or host (default: %(default)s)")  # fmt: skip
    run.add_argument("--trace", metavar="FILE.json", type=_output_file,
                     help="write the program's KVM calls and exits as a Perfetto trace (default: none)")  # fmt: skip
    run.add_argument("program", nargs=argparse.REMAINDER, metavar="PROGRAM [ARGS...]",
                     help="the program and its arguments, after -- or after the options "
                     "(default: none, required)")  # fmt: skip
    run.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    """Run the program under the sim and return its exit status."""
    from kvmgmem.run import launcher

    argv = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not argv:
        args.parser.error("the program to run is missing: kvmgmem run [OPTIONS] [--] PROGRAM [ARGS...]")
    try:
        return launcher.run(argv, profile=args.profile, trace=args.trace)
    except launcher.RunError as e:
        print(f"kvmgmem run: {e}", file=sys.stderr)
        return e.status


# --- the parser and main ---------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Any], None]] = [_add_demo, _add_caps, _add_selftest, _add_bench, _add_check, _add_run]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmgmem", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"kvmgmem {kvmgmem.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for add in SUBCOMMANDS:
        add(sub)
    for name, subparser in sub.choices.items():  # lets a command report a usage error across options
        subparser.set_defaults(parser=subparser, command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    command = "kvmgmem"
    try:
        # Parsing imports the chosen command's modules (iced-x86, unicorn: a few hundred ms on a loaded host),
        # so a Ctrl-C there must end the same way as one during the command: a line and 130, no traceback.
        args = build_parser().parse_args(argv)
        command = f"kvmgmem {args.command}"
        result: int = args.func(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kvmgmem caps --json | head`
        sys.stderr.close()
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
