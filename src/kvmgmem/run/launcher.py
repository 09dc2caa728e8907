"""Start a program with the sim serving its ``/dev/kvm``: the preload library, its environment, the exit status.

The program runs as a child process with ``LD_PRELOAD`` naming the library built from ``_preload.c``, and the
``KVMGMEM_RUN_*`` variables telling the library which Python to embed (this one, with this ``sys.path``) and
the server which kernel to model. The launcher waits for it and returns its exit status the way a shell
reports it: the program's own code, or 128 + N when signal N ended it.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import FrameType

#: Environment variables read by the preload library and the server.
ENV_PYTHON = "KVMGMEM_RUN_PYTHON"  # the interpreter the library embeds (executable, program name)
ENV_PATH = "KVMGMEM_RUN_PATH"  # its module search path, os.pathsep-separated
ENV_PROFILE = "KVMGMEM_RUN_PROFILE"  # the sim profile the server opens
ENV_TRACE = "KVMGMEM_RUN_TRACE"  # where the server writes a Perfetto trace (unset: none)
ENV_SERVER = "KVMGMEM_RUN_SERVER"  # the server module (default kvmgmem.run.server; tests substitute a fake)

#: The sim's default profile (``core/profile.py``'s ``DEFAULT_PROFILE``), named here because the launcher imports
#: nothing of the sim; tests/run/test_launcher.py checks the two agree.
DEFAULT_PROFILE = "6.18"

#: Exit statuses of a shell that cannot start a command.
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

_PT_INTERP = 3


class RunError(Exception):
    """The program cannot be started under the sim (the message says why); ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def preload_library() -> Path:
    """The built preload library, next to this package; RunError when the install could not build it."""
    here = Path(__file__).resolve().parent
    for suffix in EXTENSION_SUFFIXES:
        candidate = here / f"_preload{suffix}"
        if candidate.is_file():
            return candidate
    raise RunError(
        f"the preload library was not built (no _preload*.so in {here}): it needs gcc, the Python headers "
        "and a shared libpython (this interpreter's LDLIBRARY is "
        f"{_config_var('LDLIBRARY')!r}); reinstall with `pip install -e .` and read its build output"
    )


def _config_var(name: str) -> object:
    import sysconfig

    return sysconfig.get_config_var(name)


def find_program(program: str, env: Mapping[str, str]) -> str:
    """The program's path, looked up in PATH as a shell does; RunError 127 when missing, 126 when not runnable."""
    found = program if os.sep in program else shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None or not os.path.exists(found):
        raise RunError(f"{program}: command not found", EXIT_NOT_FOUND)
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise RunError(f"{program}: not an executable file", EXIT_NOT_EXECUTABLE)
    return found


def is_static_elf(path: str) -> bool:
    """True for an x86-64 ELF executable without a program interpreter: LD_PRELOAD never reaches it (it would
    open the host's /dev/kvm). Anything else (another format, an unreadable file) is not one."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return False
            (phoff,) = struct.unpack_from("<Q", header, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    types = (struct.unpack_from("<I", table, i * phentsize)[0] for i in range(len(table) // max(phentsize, 1)))
    return _PT_INTERP not in types


def is_script(path: str) -> bool:
    """True for a ``#!`` script: the library would load into its interpreter, which removes it from LD_PRELOAD
    before the script starts anything, so the programs the script runs would use the host's /dev/kvm."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def run_environment(
    base: Mapping[str, str], library: Path, profile: str = DEFAULT_PROFILE, trace: str | None = None
) -> dict[str, str]:
    """The program's environment: ``base`` plus LD_PRELOAD (the library first, the caller's entries kept) and
    the KVMGMEM_RUN_* variables. The library removes itself from LD_PRELOAD when it loads."""
    env = dict(base)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else str(library)
    env[ENV_PYTHON] = sys.executable
    env[ENV_PATH] = os.pathsep.join(p for p in sys.path if p)
    env[ENV_PROFILE] = profile
    if trace is None:
        env.pop(ENV_TRACE, None)
    else:
        env[ENV_TRACE] = os.path.abspath(trace)
    return env


def exit_status(returncode: int) -> int:
    """A child's returncode as a shell reports it: 128 + N for a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run(
    argv: Sequence[str],
    profile: str = DEFAULT_PROFILE,
    trace: str | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run ``argv`` with the sim serving its /dev/kvm; return its exit status. RunError if it cannot start.

    While the program runs, Ctrl-C and Ctrl-\\ reach it directly (same process group) and are ignored here, as
    a shell does; SIGTERM and SIGHUP sent to the launcher are passed on to the program.
    """
    if not argv:
        raise RunError("no program given", 2)
    base = os.environ if env is None else env
    program = find_program(argv[0], base)
    if is_static_elf(program):
        raise RunError(f"{argv[0]} is statically linked: a preloaded library cannot reach it (it would use the "
                       "host's /dev/kvm); link it dynamically")  # fmt: skip
    if is_script(program):
        raise RunError(f"{argv[0]} is a script: the programs it starts would not load the sim (the library leaves "
                       "LD_PRELOAD at load time) and would use the host's /dev/kvm; run the VMM itself")  # fmt: skip
    child_env = run_environment(base, preload_library(), profile, trace)
    try:
        child = subprocess.Popen([program, *argv[1:]], env=child_env, executable=program)
    except OSError as e:
        raise RunError(f"{argv[0]}: {e.strerror}", EXIT_NOT_EXECUTABLE) from None

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    handlers: dict[int, Callable[[int, FrameType | None], None] | signal.Handlers] = {
        signal.SIGINT: signal.SIG_IGN,
        signal.SIGQUIT: signal.SIG_IGN,
        signal.SIGTERM: forward,
        signal.SIGHUP: forward,
    }
    in_main = threading.current_thread() is threading.main_thread()  # only there can handlers change
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()} if in_main else {}
    try:
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return exit_status(returncode)
