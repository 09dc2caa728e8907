"""``kvmgmem selftest``: run the installed conformance suite and print a case × backend table.

The suite ships inside the package (:mod:`kvmgmem.conformance`), so a user can check a kernel — or the sim —
without a checkout. It is ordinary pytest; this module only drives it and tabulates what each case did on
each backend (pass / FAIL / skip with the reason, which names the missing capability).

It must behave the same from any directory, a checkout of kvmgmem included: pytest would otherwise adopt the
current directory's configuration (a checkout's ``pyproject.toml``) and conftest files, so :func:`run` gives it
an empty configuration and roots it at the suite's own directory. ``-k`` accepts the spec ids the table shows
(``GM-1``, ``SR-4e``; ``GM-9`` also selects GM-9a/b/c) besides pytest's own names.

pytest is a test dependency, not a run-time one (the ``selftest`` extra, ``pip install 'kvmgmem[selftest]'``):
this module imports it, so nothing in the package imports this module but the command (``kvmgmem.cli``), which says in
one line what to install when pytest is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SUITE = "kvmgmem.conformance"
EXIT_INTERRUPTED, EXIT_USAGE = 2, 4  # pytest.ExitCode values, named here to keep pytest's import lazy


_SPEC_ID = re.compile(r"^test_(gm|sr|pk|pc)(\d+[a-z]?)(?:_|$)")
# A spec id as a user types it in -k: "GM-1", "sr-4e" — standing alone, not inside a longer name.
_SPEC_ID_IN_PATTERN = re.compile(r"(?<![\w:.\[-])(gm|sr|pk|pc)-(\d+)([a-z]?)(?![\w.\]-])", re.IGNORECASE)


def spec_id(case: str) -> str:
    """The selftest case id a test is named for ("GM-13", "SR-4e", ...), or "" for the edge cases (see
    kvmgmem.conformance)."""
    m = _SPEC_ID.match(case)
    return f"{m.group(1).upper()}-{m.group(2)}" if m else ""


def spec_keywords(case: str) -> set[str]:
    """The -k keywords a case carries: ``spec:GM-9b:`` and its family ``spec:GM-9:``. The colons make a
    -k substring match exact: ``spec:GM-1:`` is not inside ``spec:GM-13:``."""
    m = _SPEC_ID.match(case)
    if not m:
        return set()
    family, number = m.group(1).upper(), m.group(2)
    return {f"spec:{family}-{number}:", f"spec:{family}-{number.rstrip('abcdefghijklmnopqrstuvwxyz')}:"}


def rewrite_pattern(pattern: str) -> str:
    """A -k expression with each spec id (``GM-1``) replaced by the keyword :func:`spec_keywords` adds."""
    return _SPEC_ID_IN_PATTERN.sub(lambda m: f"spec:{m.group(1).upper()}-{m.group(2)}{m.group(3).lower()}:", pattern)


def check_pattern(pattern: str) -> str | None:
    """Why pytest would refuse this -k expression, or None. Asked before the run so a typo is one line, not
    an empty table followed by pytest's error (the parser is pytest's own; without it pytest says it later)."""
    try:
        from _pytest.mark.expression import Expression
    except ImportError:
        return None
    try:
        Expression.compile(pattern)
    except SyntaxError as e:  # pytest's ParseError
        return str(e)
    except Exception as e:  # another pytest version's error type: still a refusal
        return str(e)
    return None


@dataclass
class CaseResult:
    case: str
    backend: str
    outcome: str  # "passed", "failed", "skipped", "xfailed" (a known, documented bug of the backend)
    detail: str = ""
    seconds: float = 0.0

    @property
    def spec_id(self) -> str:
        return spec_id(self.case)


@dataclass(eq=False)  # pluggy keys plugins by hash: identity, not the (mutable) fields
class Collector:
    """A pytest plugin that records one CaseResult per test (setup skips and call outcomes)."""

    results: dict[str, CaseResult] = field(default_factory=dict)
    names: dict[str, tuple[str, str]] = field(default_factory=dict)

    interrupted: bool = False
    #: Set by ``run``'s SIGINT handler. Its KeyboardInterrupt can land in a weakref callback or a finalizer,
    #: where Python only prints it ("Exception ignored in ...") and the run would go on; the flag makes the
    #: next test's start raise it again, from a place pytest sees.
    sigint: bool = False

    def pytest_keyboard_interrupt(self) -> None:
        self.interrupted = True

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: Any, nextitem: Any) -> None:
        if self.sigint:
            raise KeyboardInterrupt

    @pytest.hookimpl(tryfirst=True)  # before pytest's -k deselection, which reads the spec keywords
    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        for item in items:
            item.extra_keyword_matches.update(spec_keywords(item.originalname))
            params = dict(getattr(getattr(item, "callspec", None), "params", {}) or {})
            backend = str(params.pop("backend", "-"))
            ids = item.name[len(item.originalname) :].removeprefix("[").removesuffix("]").split("-")
            if backend in ids:
                ids.remove(backend)
            rest = "-".join(i for i in ids if i)
            case = item.originalname + (f"[{rest}]" if rest else "")
            self.names[item.nodeid] = (case, backend)

    def pytest_runtest_logreport(self, report: Any) -> None:
        case, backend = self.names.get(report.nodeid, (report.nodeid, "-"))
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = report.outcome
            detail = ""
            if hasattr(report, "wasxfail"):
                outcome, detail = "xfailed", str(report.wasxfail).removeprefix("reason: ")
            elif report.skipped:
                detail = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
                detail = detail.removeprefix("Skipped: ")
            elif report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                detail = crash.message if crash is not None else str(report.longrepr)[-200:]
            self.results[report.nodeid] = CaseResult(case, backend, outcome, detail, report.duration)
        elif report.when == "teardown" and report.failed and report.nodeid in self.results:
            self.results[report.nodeid].outcome = "failed"
            self.results[report.nodeid].detail = "teardown: " + str(report.longrepr)[-200:]


#: Modules whose code runs as weakref callbacks and finalizers, where an exception cannot propagate.
_CALLBACK_MODULES = ("/weakref.py", "/_weakrefset.py")


def run(
    backends: Sequence[str] | None = None, pattern: str | None = None, verbose: bool = False
) -> tuple[int, list[CaseResult]]:
    """Run the suite; returns pytest's exit code and the per-case results."""
    import kvmgmem.conformance

    here = str(Path(kvmgmem.conformance.__file__).parent)
    collector = Collector()
    # No configuration file and no conftest above the suite: the same run from any directory.
    args = ["--pyargs", SUITE, "-c", os.devnull, "--rootdir", here, "--confcutdir", here]
    args += ["-p", "no:cacheprovider", "-q" if not verbose else "-v", "--no-header", "-rN"]
    if not verbose:
        args += ["--tb=no", "-o", "console_output_style=classic"]
    if pattern:
        args += ["-k", rewrite_pattern(pattern)]
    old = os.environ.get("KVMGMEM_BACKENDS")
    if backends:
        os.environ["KVMGMEM_BACKENDS"] = ",".join(backends)

    def on_sigint(signum: int, frame: Any) -> None:
        collector.sigint = True
        if frame is not None and frame.f_code.co_filename.endswith(_CALLBACK_MODULES):
            # Raised here, the interrupt would be printed as an ignored exception (with its traceback) and
            # dropped: deliver it again in 10 ms, when the callback is over.
            redeliver = threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT))
            redeliver.daemon = True
            redeliver.start()
            return
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        try:
            code = int(pytest.main(args, plugins=[collector]))
        except BaseException as e:
            # After a Ctrl-C pytest still tears the interrupted test's fixtures down, with its output capture
            # already stopped, so a fixture's own check (the suite's fd-leak check) can raise out of
            # pytest.main. That is part of the interruption, not a result.
            if not (collector.interrupted or isinstance(e, KeyboardInterrupt)):
                raise
            code = EXIT_INTERRUPTED
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old_handler)
        if old is None:
            os.environ.pop("KVMGMEM_BACKENDS", None)
        else:
            os.environ["KVMGMEM_BACKENDS"] = old
    return code, list(collector.results.values())


def summarize(results: Sequence[CaseResult]) -> dict[str, dict[str, int]]:
    summary: dict[str, dict[str, int]] = {}
    for r in results:
        per = summary.setdefault(r.backend, {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0})
        per[r.outcome] = per.get(r.outcome, 0) + 1
    return summary


def print_table(results: Sequence[CaseResult]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    backends = sorted({r.backend for r in results})
    cases: dict[str, dict[str, CaseResult]] = {}
    for r in results:
        cases.setdefault(r.case, {})[r.backend] = r
    table = Table(title="kvmgmem conformance")
    table.add_column("spec", no_wrap=True)
    table.add_column("case", no_wrap=True)
    for b in backends:
        table.add_column(b, overflow="fold")
    style = {
        "passed": "[green]pass[/green]",
        "failed": "[red]FAIL[/red]",
        "skipped": "[yellow]skip[/yellow]",
        "xfailed": "[magenta]xfail[/magenta]",
    }
    for case, per in cases.items():
        cells = []
        for b in backends:
            got = per.get(b)
            if got is None:
                cells.append("")
                continue
            cell = style.get(got.outcome, got.outcome)
            if got.outcome != "passed" and got.detail:
                cell += f" {escape(got.detail[:110])}"
            cells.append(cell)
        table.add_row(spec_id(case), escape(case), *cells)  # "[cpl0]" is a parameter, not rich markup
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
    for backend, counts in summarize(results).items():
        console.print(
            f"{backend}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
            f"{counts['xfailed']} xfailed (known host defects, named in the table)"
        )


def main(backends: Sequence[str] | None, pattern: str | None, as_json: bool, verbose: bool = False) -> int:
    """``kvmgmem selftest``: 0 when every selected case passed or skipped; 1 on a failure or when nothing
    matched ``pattern``; 2 for a -k pytest cannot parse; 130 when interrupted (the partial results are shown,
    marked as such)."""
    if pattern is not None:
        problem = check_pattern(rewrite_pattern(pattern))
        if problem is not None:
            print(f"kvmgmem selftest: -k {pattern!r} is not a valid expression: {problem}", file=sys.stderr)
            return 2
    if as_json:  # keep stdout pure JSON: pytest's own progress goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            code, results = run(backends, pattern, verbose)
    else:
        code, results = run(backends, pattern, verbose)
    interrupted = code == EXIT_INTERRUPTED
    if code == EXIT_USAGE:
        print("kvmgmem selftest: pytest refused the arguments (see its message above)", file=sys.stderr)
        return 2
    if as_json:
        json.dump(
            {
                "exit_code": code,
                "interrupted": interrupted,
                "summary": summarize(results),
                "cases": [{**r.__dict__, "spec_id": r.spec_id} for r in results],
            },
            sys.stdout,
            indent=2,
        )
        print()
    elif results:
        print_table(results)
    if interrupted:
        print(f"kvmgmem selftest: interrupted after {len(results)} cases; the results above are partial",
              file=sys.stderr)  # fmt: skip
        return 130
    if not results:
        what = "ran"
        if pattern:
            what = f"matches -k {pattern!r} (test names, or spec ids as the table shows them: GM-1, SR-4e)"
        print(f"kvmgmem selftest: no case {what}", file=sys.stderr)
        return 1
    failed = any(r.outcome == "failed" for r in results)
    return 1 if failed or code not in (0, 5) else 0
