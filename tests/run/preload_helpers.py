"""What the preload and launcher tests share: building C programs with gcc, running ``kvmgmem run``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from kvmgmem.run import launcher

HERE = Path(__file__).resolve().parent
C_DIR = HERE / "c"
#: the module the fake-server tests load instead of kvmgmem.run.server (found through PYTHONPATH)
FAKE_SERVER = "preload_fake_server"


def require_preload_library() -> Path:
    """The built library; a failed build is a test failure (setup.py marks the extension optional)."""
    try:
        return launcher.preload_library()
    except launcher.RunError as e:
        pytest.fail(str(e))


def build_c(source: Path | str, out_dir: Path, name: str, *flags: str) -> Path:
    """Compile a C program (a file, or source text) with gcc into ``out_dir``; skip if there is no gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the C test programs cannot be built")
    if isinstance(source, str):
        path = out_dir / f"{name}.c"
        path.write_text(source)
        source = path
    exe = out_dir / name
    result = subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(source), "-lpthread",
                             *flags], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, f"gcc failed:\n{result.stderr}"
    return exe


def kvmgmem_run(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``kvmgmem run ARGS`` in a child process of this interpreter, output captured. On a timeout (a hang is a
    failure) the launcher and the program are both killed: they run in a session of their own."""
    code = "import sys; from kvmgmem.cli import main; sys.exit(main(sys.argv[1:]))"
    full_env = dict(os.environ if env is None else env)
    with subprocess.Popen([sys.executable, "-c", code, "run", *args], env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as launcher_process:  # fmt: skip
        try:
            out, err = launcher_process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launcher_process.pid, signal.SIGKILL)
            out, err = launcher_process.communicate()
            pytest.fail(f"kvmgmem run {' '.join(args)} hung for {timeout} s:\n{out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(launcher_process.args, launcher_process.returncode, out, err)


def fake_server_env(log: Path, **extra: str) -> dict[str, str]:
    """The environment that makes the library load the fake server, which logs to ``log``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env[launcher.ENV_SERVER] = FAKE_SERVER
    env["KVMGMEM_FAKE_LOG"] = str(log)
    env.update(extra)
    return env
