"""``kvmgmem check``: schedules counted, verdicts, the counterexample table, its replay and its trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmgmem.cli import main


def test_clean_scenario_prints_schedules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "fault_convert", "--preemptions", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fault_convert: ")
    count = int(out.split(": ")[1].split()[0])
    assert count > 1
    assert "no violation" in out


def test_bug_prints_table_trace_and_replays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "cex.json"
    assert main(["check", "--bug", "invalid_slot_as_no_slot", "--shortest", "--trace", str(trace)]) == 1
    out = capsys.readouterr().out
    assert "fault_delete:" in out and "VIOLATION stale-mapping" in out
    assert "kvm_invalidate_memslot" in out  # the table names the kernel step
    replay_line = next(line for line in out.splitlines() if line.startswith("replay: "))
    schedule = replay_line.split("--replay ")[1]
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "violation" and e["name"] == "stale-mapping" for e in events)
    assert main(["check", "fault_delete", "--bug", "invalid_slot_as_no_slot", "--replay", schedule]) == 1
    assert "VIOLATION stale-mapping" in capsys.readouterr().out
    assert main(["check", "fault_delete", "--replay", schedule]) == 0  # the same schedule, bug off
    out = capsys.readouterr().out
    assert "VIOLATION" not in out and "no longer applied" in out  # the fixed fault retries instead


def test_list_and_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--list"]) == 0
    assert "attr_huge" in capsys.readouterr().out
    assert main(["check", "--bug", "nope"]) == 2
    assert main(["check", "nope"]) == 2
