"""``kvmgmem run``'s launcher and command line: arguments, the environment, the program's exit status."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from kvmgmem import cli
from kvmgmem.backends.sim.core.profile import DEFAULT_PROFILE, PROFILES
from kvmgmem.run import launcher

from .preload_helpers import build_c, kvmgmem_run, require_preload_library


def test_default_profile_is_the_sims() -> None:
    """``kvmgmem run``'s default profile is the sim's own (the launcher names it without importing the sim)."""
    assert launcher.DEFAULT_PROFILE == DEFAULT_PROFILE


def test_no_program_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["run"], ["run", "--"], ["run", "--profile", "7.2", "--"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert "the program to run is missing" in capsys.readouterr().err


def test_unknown_profile_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--profile", "5.4", "true"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown profile '5.4'" in err
    assert all(name in err for name in PROFILES)


def test_every_profile_is_accepted() -> None:
    parser = cli.build_parser()
    for name in PROFILES:
        args = parser.parse_args(["run", "--profile", name, "--", "prog", "--profile", "x"])
        assert args.profile == name
        assert args.program == ["--", "prog", "--profile", "x"]  # options after PROGRAM are the program's


def test_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = tmp_path / "_preload.so"
    env = launcher.run_environment({"PATH": "/bin", "LD_PRELOAD": "/x.so", launcher.ENV_TRACE: "old"}, library)
    assert env["LD_PRELOAD"] == f"{library}:/x.so"
    assert env[launcher.ENV_PYTHON] == sys.executable
    assert env[launcher.ENV_PATH].split(os.pathsep) == [p for p in sys.path if p]
    assert env[launcher.ENV_PROFILE] == "6.18"
    assert launcher.ENV_TRACE not in env  # no --trace: a stale value is not inherited
    monkeypatch.chdir(tmp_path)
    env = launcher.run_environment({}, library, profile="7.2", trace="t.json")
    assert env["LD_PRELOAD"] == str(library)
    assert env[launcher.ENV_PROFILE] == "7.2"
    assert env[launcher.ENV_TRACE] == str(tmp_path / "t.json")  # absolute: the program may chdir


def test_exit_status_is_the_programs() -> None:
    require_preload_library()
    assert kvmgmem_run(["sh", "-c", "exit 3"]).returncode == 3
    assert kvmgmem_run(["--", "sh", "-c", "exit 0"]).returncode == 0
    result = kvmgmem_run(["sh", "-c", "kill -SEGV $$"])
    assert result.returncode == 128 + signal.SIGSEGV


def test_missing_and_unrunnable_programs(tmp_path: Path) -> None:
    require_preload_library()
    result = kvmgmem_run(["no-such-program-here"])
    assert (result.returncode, result.stderr) == (127, "kvmgmem run: no-such-program-here: command not found\n")
    plain = tmp_path / "plain"
    plain.write_text("not a program")
    result = kvmgmem_run([str(plain)])
    assert (result.returncode, result.stderr) == (126, f"kvmgmem run: {plain}: not an executable file\n")


def test_static_program_is_refused(tmp_path: Path) -> None:
    """LD_PRELOAD cannot reach a static program: it would use the host's /dev/kvm, so it does not start."""
    require_preload_library()
    if not Path("/usr/lib/x86_64-linux-gnu/libc.a").exists():
        pytest.skip("no static C library (libc.a) to link a static test program")
    exe = build_c("int main(void) { return 0; }\n", tmp_path, "static_prog", "-static")
    assert launcher.is_static_elf(str(exe))
    result = kvmgmem_run([str(exe)])
    assert result.returncode == 1
    assert "is statically linked" in result.stderr
    dynamic = build_c("int main(void) { return 0; }\n", tmp_path, "dynamic_prog")
    assert not launcher.is_static_elf(str(dynamic))
    assert not launcher.is_static_elf("/nonexistent")


def test_missing_library_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(launcher, "EXTENSION_SUFFIXES", [".not-built.so"])
    assert cli.main(["run", "true"]) == 1
    assert "the preload library was not built" in capsys.readouterr().err


def test_script_is_refused(tmp_path: Path) -> None:
    """A script's children would not load the sim (the library leaves LD_PRELOAD): run the VMM itself."""
    require_preload_library()
    script = tmp_path / "wrapper.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    assert launcher.is_script(str(script))
    result = kvmgmem_run([str(script)])
    assert result.returncode == 1
    assert "is a script" in result.stderr
