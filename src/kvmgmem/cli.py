"""The ``kvmgmem`` command line: ``caps`` (and, as they land, ``demo``, ``selftest``, ``bench``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmgmem", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvmgmem {kvmgmem.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    caps = sub.add_parser("caps", help="capabilities, VM types, guest_memfd flags and a verdict")
    caps.add_argument("--backend", default="auto", choices=["auto", *kvmgmem.BACKENDS])
    caps.add_argument("--json", action="store_true", help="machine-readable output")
    caps.set_defaults(func=_cmd_caps)
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
