"""The ``kvmgmem`` command line: ``caps``, ``demo``, ``selftest`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import kvmgmem
from kvmgmem import uapi
from kvmgmem.caps import collect


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


def _cmd_selftest(args: argparse.Namespace) -> int:
    from kvmgmem import selftest

    backends = None if args.backend in (None, "all") else [args.backend]
    return selftest.main(backends, args.k, args.json, args.verbose)


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvmgmem.vmm import demo

    try:
        memory = demo.parse_size(args.memory)
    except ValueError as e:
        print(f"kvmgmem demo: {e}", file=sys.stderr)
        return 2
    progress = None
    if not args.json:
        def progress(rounds: list[int], conversions: int) -> None:
            print(f"\r  rounds per vCPU {rounds}  conversions {conversions}", end="", file=sys.stderr, flush=True)

    try:
        report = demo.run_demo(backend=args.backend, vcpus=args.vcpus, memory=memory, policy=args.policy,
                               seconds=args.seconds, plot=args.plot, trace=args.trace, progress=progress)  # fmt: skip
    except KeyboardInterrupt:
        print("\nkvmgmem demo: interrupted", file=sys.stderr)
        return 130
    if progress is not None:
        print(file=sys.stderr)
    demo.print_report(report, args.json)
    if args.plot:
        print(f"map: {args.plot}", file=sys.stderr)
    if args.trace:
        print(f"trace: {args.trace} (open in https://ui.perfetto.dev)", file=sys.stderr)
    return 0 if report.verified else 1


def _bench_dir() -> Path | None:
    """The repository's bench/ (benchmarks are not installed: they compile a C baseline and write results)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "bench" / "run.py").is_file():
            return root / "bench"
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    bench = _bench_dir()
    if bench is None:
        print("kvmgmem bench: no bench/run.py here; run it from a kvmgmem checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(bench / "run.py"), *args.names], cwd=bench.parent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmgmem", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvmgmem {kvmgmem.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    caps = sub.add_parser("caps", help="capabilities, VM types, guest_memfd flags and a verdict")
    caps.add_argument("--backend", default="auto", choices=["auto", *kvmgmem.BACKENDS])
    caps.add_argument("--json", action="store_true", help="machine-readable output")
    caps.set_defaults(func=_cmd_caps)
    demo = sub.add_parser("demo", help="a confidential VM converting memory, with a verified report")
    demo.add_argument("--backend", default="auto", choices=["auto", *kvmgmem.BACKENDS])
    demo.add_argument("--vcpus", type=int, default=2)
    demo.add_argument("--memory", default="64M", help="guest RAM (e.g. 64M, 1G)")
    demo.add_argument("--policy", default="both", choices=["both", "punch-only", "none"])
    demo.add_argument("--seconds", type=float, default=5.0)
    demo.add_argument("--plot", metavar="FILE.png", help="draw the guest-physical map over time")
    demo.add_argument("--trace", metavar="FILE.json", help="write a Chrome/Perfetto trace")
    demo.add_argument("--json", action="store_true", help="machine-readable report")
    demo.set_defaults(func=_cmd_demo)
    bench = sub.add_parser("bench", help="run the benchmarks of a checkout (bench/run.py): JSON + markdown table")
    bench.add_argument("names", nargs="*", help="exits populate convert faults execspeed workload (default: all)")
    bench.set_defaults(func=_cmd_bench)
    st = sub.add_parser("selftest", help="run the conformance suite; case x backend table")
    st.add_argument("--backend", default="all", choices=["all", *kvmgmem.BACKENDS])
    st.add_argument("-k", metavar="PATTERN", help="only cases matching this pytest -k expression")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("-v", "--verbose", action="store_true", help="show pytest's own output")
    st.set_defaults(func=_cmd_selftest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except BrokenPipeError:  # e.g. `kvmgmem caps --json | head`
        sys.stderr.close()
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
