"""The ``kvmgmem`` command as a new user meets it (issue 14): bad arguments, help, limits, Ctrl-C, selftest.

Argument checks run in-process (they end in argparse's SystemExit before anything starts); everything that
runs a VM or the conformance suite runs the *installed* command in a subprocess, because that is what a user
types and what broke (a checkout's pytest configuration, a live display written into a pipe).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvmgmem
from kvmgmem import cli, uapi
from kvmgmem.selftest import CaseResult, Collector, print_table, rewrite_pattern, spec_keywords
from kvmgmem.vmm.demo import Progress, parse_size

ROOT = Path(__file__).resolve().parents[1]


def _installed() -> str:
    """The console script of the interpreter running the tests (the venv's ``kvmgmem``)."""
    script = Path(sys.executable).parent / "kvmgmem"
    if not script.is_file():
        pytest.skip(f"no installed kvmgmem command next to {sys.executable}")
    return str(script)


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_installed(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _require_protected() -> None:
    try:
        with kvmgmem.open("auto", vm_type=uapi.KVM_X86_SW_PROTECTED_VM) as system:
            if uapi.KVM_X86_SW_PROTECTED_VM not in system.supported_vm_types:
                pytest.skip(f"KVM_X86_SW_PROTECTED_VM not available on backend {system.backend}")
    except OSError as e:
        pytest.skip(f"no backend: {e}")


# --- argument checking -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--vcpus", "0"], "1 to 64"),
        (["--vcpus", "300"], "1 to 64"),
        (["--vcpus", "two"], "not a whole number"),
        (["--memory", "4097"], "4 KiB pages"),
        (["--memory", "infM"], "not a size"),
        (["--memory", "nanG"], "not a size"),
        (["--memory", "1.5G"], "not a size"),
        (["--memory", "64T"], "half of this host's RAM"),
        (["--seconds", "inf"], "above 0"),
        (["--seconds", "nan"], "above 0"),
        (["--seconds", "0"], "above 0"),
        (["--seconds", "-1"], "above 0"),
        (["--plot", "/nonexistent-dir/map.png"], "cannot write"),
        (["--trace", "/"], "is a directory"),
        (["--memory", "4K", "--vcpus", "2"], "4 KiB page"),
    ],
)
def test_demo_bad_arguments_are_usage_errors(args: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["demo", *args])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: kvmgmem demo") and lines[-1].startswith("kvmgmem demo: error:"), err
    assert words in lines[-1] and "Traceback" not in err


def test_output_file_check_leaves_no_file(tmp_path: Path) -> None:
    """--plot/--trace are checked by creating the file; one that did not exist is not left behind."""
    target = tmp_path / "map.png"
    assert cli._output_file(str(target)) == str(target)
    assert not target.exists()
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write"):
        cli._output_file(str(tmp_path / "missing" / "map.png"))


def test_parse_size() -> None:
    assert parse_size("64M") == 64 << 20 and parse_size("1G") == 1 << 30 and parse_size("2MiB") == 2 << 20
    assert parse_size("4096") == 4096 and parse_size(" 8 kb ") == 8 << 10
    for bad in ("inf", "infM", "-1M", "1e3", "", "M"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def _all_options(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(f"{name} {a.dest}", a) for a in sub._actions if not isinstance(a, argparse._HelpAction)]
    return out


def test_help_describes_every_option_with_its_default() -> None:
    parser = cli.build_parser()
    assert "``" not in (parser.description or "") and ":mod:" not in (parser.description or "")
    options = _all_options(parser)
    assert {"demo seconds", "demo memory", "selftest k", "caps backend"} <= {name for name, _ in options}
    for name, action in options:
        assert action.help, f"{name} has no help text"
        assert "default" in action.help, f"{name}: the help does not say the default: {action.help!r}"
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    demo_help = subparsers.choices["demo"].format_help()
    assert "--memory 1G --seconds 20" in demo_help  # the example a user copies must be one that works


# --- selftest helpers ------------------------------------------------------------------------------------


def test_spec_ids_select_exactly() -> None:
    assert rewrite_pattern("GM-1") == "spec:GM-1:"
    assert rewrite_pattern("gm-9b or not SR-4") == "spec:GM-9b: or not spec:SR-4:"
    assert rewrite_pattern("test_gm1_flags") == "test_gm1_flags"  # pytest names pass through
    assert spec_keywords("test_gm13_guest_round_trip") == {"spec:GM-13:"}
    assert spec_keywords("test_gm9b_mbind") == {"spec:GM-9b:", "spec:GM-9:"}
    assert spec_keywords("test_2_5_modify_rules") == set()
    assert not any("spec:GM-1:" in k for k in spec_keywords("test_gm13_guest_round_trip"))


def test_collector_is_a_hashable_plugin() -> None:
    """pluggy 1.7 keys plugins by hash; a plain dataclass is unhashable (INTERNALERROR in a checkout)."""
    a, b = Collector(), Collector()
    assert len({a, b}) == 2


def test_table_keeps_parameters_in_case_names(capsys: pytest.CaptureFixture[str]) -> None:
    """'[cpl0]' is a parameter, not rich markup: the two rows must not print under one name."""
    print_table([CaseResult("test_gm13_guest_round_trip[cpl0]", "sim", "passed"),
                 CaseResult("test_gm13_guest_round_trip[cpl3]", "sim", "skipped", "needs [x]")])  # fmt: skip
    out = capsys.readouterr().out
    assert "test_gm13_guest_round_trip[cpl0]" in out and "test_gm13_guest_round_trip[cpl3]" in out
    assert "needs [x]" in out


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_installed_selftest_runs_from_any_directory(where: str, tmp_path: Path) -> None:
    """The installed command, from a checkout (its pyproject and conftests must not apply) and from a
    directory that is not one."""
    cwd = ROOT if where == "checkout" else tmp_path
    result = _run(["selftest", "--backend", "sim", "-k", "GM-1", "--json"], cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "INTERNALERROR" not in result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == 0 and report["interrupted"] is False
    cases = report["cases"]
    assert cases and {c["spec_id"] for c in cases} == {"GM-1"}
    assert {c["backend"] for c in cases} == {"sim"} and all(c["outcome"] == "passed" for c in cases)
    assert len({c["case"] for c in cases}) == len(cases)  # one row per case
    table = _run(["selftest", "--backend", "sim", "-k", "GM-1"], cwd, timeout=300)
    assert table.returncode == 0 and "test_gm1_flags_sweep[DEFAULT]" in table.stdout
    assert f"sim: {len(cases)} passed, 0 failed" in table.stdout


def test_selftest_says_when_nothing_matches_or_the_pattern_is_invalid(tmp_path: Path) -> None:
    none = _run(["selftest", "--backend", "sim", "-k", "no_such_case"], tmp_path, timeout=300)
    assert none.returncode == 1 and "no case matches -k 'no_such_case'" in none.stderr
    assert "┏" not in none.stdout  # no empty table
    bad = _run(["selftest", "--backend", "sim", "-k", "gm1 and ("], tmp_path, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "not a valid expression" in bad.stderr


#: A fresh interpreter in which pytest is not installed: a meta-path finder refuses it (and its ``_pytest``).
_WITHOUT_PYTEST = """
import sys

class NoPytest:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("pytest", "_pytest"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoPytest())
"""


def test_selftest_without_pytest_names_the_extra(tmp_path: Path) -> None:
    """pytest is an optional extra (``kvmgmem[selftest]``): without it ``kvmgmem selftest`` is one line on
    stderr naming the install and exit 1, not a traceback; ``import kvmgmem`` and the other commands need no
    pytest."""
    script = _WITHOUT_PYTEST + "\n".join(
        (
            "import kvmgmem, kvmgmem.cli",
            "assert 'pytest' not in sys.modules, 'import kvmgmem imported pytest'",
            "sys.exit(kvmgmem.cli.main(['selftest', '--backend', 'sim', '-k', 'GM-1']))",
        )
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stdout == "" and result.stderr.splitlines() == [cli.SELFTEST_NEEDS_PYTEST]
    assert "pip install 'kvmgmem[selftest]'" in result.stderr
    caps = _WITHOUT_PYTEST + "import kvmgmem.cli\nsys.exit(kvmgmem.cli.main(['caps', '--backend', 'sim', '--json']))"
    result = subprocess.run([sys.executable, "-c", caps], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and json.loads(result.stdout), result.stderr[-2000:]


def _interrupt(args: list[str], cwd: Path, after: float) -> tuple[int, str, str, int]:
    """Run the installed command, send it SIGINT (Ctrl-C) after ``after`` seconds; rc, stdout, stderr, pid."""
    with subprocess.Popen(
        [_installed(), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # the test runner may ignore it
    ) as proc:  # fmt: skip
        try:
            time.sleep(after)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:  # it did not stop: fail, but leave nothing behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    return proc.returncode, out, err, proc.pid


def test_selftest_ctrl_c_says_interrupted(tmp_path: Path) -> None:
    rc, out, err, _ = _interrupt(["selftest", "--backend", "sim", "--json"], tmp_path, after=6)
    assert rc == 130, err[-2000:]
    assert "interrupted after" in err and "Traceback" not in err
    assert json.loads(out)["interrupted"] is True


# --- the demo running ------------------------------------------------------------------------------------


def test_progress_line_says_what_is_happening() -> None:
    p = Progress(elapsed=1.5, seconds=5, slices_per_round=16, rounds=[0, 2], slices=[3, 40],
                 phases=["filling shared", "converting to private"], conversions=12, stopping=False)  # fmt: skip
    line = p.line()
    assert "vCPU0 round 1 slice 4/16 populating" in line
    assert "vCPU1 round 3 slice 9/16 converting to private" in line and "12 conversions" in line


def test_demo_seconds_is_a_limit_and_no_live_display_off_a_terminal(tmp_path: Path) -> None:
    """256 MiB took 51 s for --seconds 5 before: now the run stops after the slice in flight and the report
    says how far it got. stderr is a pipe here, so no progress refresh may be written into it."""
    _require_protected()
    result = _run(["demo", "--memory", "256M", "--seconds", "1"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr and "rounds per vCPU" not in result.stderr
    text = " ".join(result.stdout.replace("│", " ").split())  # the table's cells, unwrapped
    assert "result: VERIFIED" in text and "0 rounds + implicit part" in text and "of round 1" in text
    assert "64 slice(s) of up to 2 MiB" in text  # 128 MiB per vCPU; the run ended in round 1
    assert "Traceback" not in result.stderr


def test_demo_json_reports_partial_rounds(tmp_path: Path) -> None:
    _require_protected()
    result = _run(["demo", "--memory", "64M", "--seconds", "1", "--json"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["verified"] is True and report["kicked"] == [] and report["exits"]["done"] == 2
    assert report["slices_per_round"] == 16  # 32 MiB per vCPU less the implicit range, in 2 MiB slices
    for rounds, slices, implicit in zip(report["rounds"], report["slices"], report["implicit_rounds"], strict=True):
        assert rounds * 16 <= slices < (rounds + 1) * 16 and implicit in (rounds, rounds + 1) and implicit >= 1
    assert report["conversions_by_source"].get("hypercall", 0) == 4 * sum(report["slices"])
    assert report["conversions_by_source"]["memory-fault"] >= 4 * 64  # a 256 KiB implicit round: 4 per page


def test_demo_kvm_without_sw_protected_says_what_is_missing(tmp_path: Path) -> None:
    try:
        with kvmgmem.open("kvm") as system:
            if uapi.KVM_X86_SW_PROTECTED_VM in system.supported_vm_types:
                pytest.skip("this host's KVM has KVM_X86_SW_PROTECTED_VM")
    except OSError as e:
        pytest.skip(f"no /dev/kvm: {e}")
    result = _run(["demo", "--backend", "kvm", "--seconds", "1"], tmp_path, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "KVM_X86_SW_PROTECTED_VM is missing" in result.stderr and "EINVAL" not in result.stderr


def test_demo_ctrl_c_is_one_line_and_leaves_nothing_running(tmp_path: Path) -> None:
    _require_protected()
    rc, out, err, pid = _interrupt(["demo", "--seconds", "120"], tmp_path, after=4)  # past startup
    assert rc == 130, err[-2000:]
    assert err.strip() == "kvmgmem demo: interrupted" and out == ""
    with pytest.raises(ProcessLookupError):  # nothing of its session survives it
        os.killpg(pid, 0)


def test_map_bands_cover_ram_and_give_each_implicit_range_its_own_strip() -> None:
    """The PNG's rows: every byte of RAM in exactly one row, and each vCPU's 256 KiB implicit range drawn as
    its own band with a fixed share of the height (it was a fraction of a pixel in a 64 MiB map)."""
    from kvmgmem.vmm.plot import demo_bands

    memory, vcpus, implicit = 64 << 20, 2, 256 << 10
    bands = demo_bands(vcpus, memory // vcpus, implicit, memory)
    rows = [r for band in bands for r in band.row_ranges()]
    assert rows[0][0] == 0 and sum(size for _, size in rows) == memory
    assert all(a + sa == b for (a, sa), (b, _) in itertools.pairwise(rows))
    implicit_bands = [b for b in bands if "implicit" in b.label]
    assert [b.offset for b in implicit_bands] == [(32 << 20) - implicit, (64 << 20) - implicit]
    total = sum(b.weight for b in bands)
    assert all(b.weight / total >= 0.1 for b in implicit_bands)
    assert [b.label.split(":")[0] for b in bands] == ["vCPU 0", "vCPU 0", "vCPU 1", "vCPU 1"]


def test_demo_guest_check_failure_is_a_one_line_failed(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A check that fails inside the guest (here: the guest expects the wrong discard policy) is the run's
    result, FAILED with the guest's own words, exit 1 — not a traceback."""
    _require_protected()
    from kvmgmem.vmm import demo
    from kvmgmem.vmm.workload import SHARED_BYTE, Expectations

    wrong = Expectations(shared_after_round_trip=SHARED_BYTE, private_after_round_trip=0)
    monkeypatch.setattr(demo.Expectations, "for_policy", classmethod(lambda cls, policy: wrong))
    assert cli.main(["demo", "--memory", "1M", "--vcpus", "1", "--seconds", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvmgmem demo: FAILED:") and "shared copy after round trip" in err
    assert len(err.splitlines()) <= 3 and "Traceback" not in err
