"""The preload library (``kvmgmem/run/_preload.c``) against a fake server that records what reaches it.

``c/preload_probe.c`` calls every wrapped function on ``/dev/kvm``, on dups of it, on ordinary fds, from eight
threads at once and from a forked child, and checks the answers; the fake server's log then shows that only
the program's calls arrived (not the interpreter's own opens, not a Python thread's munmap) and on which
thread. Other tests: the start failing, a program that never opens ``/dev/kvm``, LD_PRELOAD's other entries.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from kvmgmem.run import launcher

from .preload_helpers import C_DIR, build_c, fake_server_env, kvmgmem_run, require_preload_library

NTHREADS, OPENS_PER_THREAD = 8, 6  # as in preload_probe.c
PROGRAM_OPENS = 5 + NTHREADS * OPENS_PER_THREAD + 1  # main thread (3 kvm, 2 sysfs), workers, forked child

#: The probe's builds: plain; fortified (__open_2, __read_chk, __pread_chk); large-file (open64, pread64, mmap64,
#: fstat64, fcntl64, ...): each reaches different symbols of the library.
BUILDS = {"plain": (), "fortify": ("-D_FORTIFY_SOURCE=2",), "lfs": ("-D_FILE_OFFSET_BITS=64",)}


@pytest.fixture(scope="module", params=list(BUILDS))
def probe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """preload_probe.c built once per variant."""
    require_preload_library()
    name = f"preload_probe_{request.param}"
    return build_c(C_DIR / "preload_probe.c", tmp_path_factory.mktemp("probe"), name, *BUILDS[request.param])


def _log_lines(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()]


def test_every_wrapper_routes_to_the_server(probe: Path, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    result = kvmgmem_run(["--profile", "7.2", str(probe)], env=fake_server_env(log))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.endswith("all ok\n")
    assert "FAIL" not in result.stdout
    assert "child-env-clean" in result.stdout  # system()'s shell saw no LD_PRELOAD
    # the one non-OSError exception: its traceback on stderr, EIO to the program
    assert "RuntimeError: the fake server's deliberate bug" in result.stderr

    lines = _log_lines(log)
    start = next(fields for fields in lines if fields[1] == "start")
    main_thread, profile, python_thread = start[0], start[2], start[3]
    assert profile == "7.2"
    # nothing from the server's own Python thread (its mmap.mmap/close churn stayed in the real libc)
    assert [fields for fields in lines if fields[0] == python_thread] == []
    # exactly the program's opens: the interpreter's own (it opened /sys/kernel/mm/transparent_hugepage/enabled
    # and /proc/self/status in start()) never came back
    opens = [fields for fields in lines if fields[1] == "open_path"]
    assert len(opens) == PROGRAM_OPENS
    assert all(fields[2] in ("/dev/kvm", "/sys/module/kvm/parameters/fake_param",
                             "/sys/module/kvm/parameters/denied") for fields in opens)  # fmt: skip
    # calls arrive on the thread that made them: eight workers besides main, and the forked child
    threads = {fields[0] for fields in lines} - {main_thread}
    assert len(threads) == NTHREADS + 1
    # at exit, on the main thread: server.stop(), then what the server registered with Python's atexit
    assert [fields[1:] for fields in lines[-2:]] == [["stop", "worker-done"], ["atexit"]]
    assert [fields[1] for fields in lines].count("stop") == 1  # not in the forked child that called exit()
    assert lines[-1][0] == lines[-2][0] == main_thread


def test_program_without_dev_kvm_never_starts_python(tmp_path: Path) -> None:
    require_preload_library()
    log = tmp_path / "calls.log"
    result = kvmgmem_run(["sh", "-c", "cat /proc/self/maps >/dev/null; exit 7"], env=fake_server_env(log))
    assert result.returncode == 7
    assert not log.exists()
    assert result.stderr == ""


_NO_SIM = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void)
{
    for (int i = 0; i < 3; i++) {
        errno = 0;
        int fd = open("/dev/kvm", O_RDWR);
        printf("open %d %s\n", fd, strerror(errno));
    }
    return 0;
}
"""


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        ("no_such_server_module", "ModuleNotFoundError: No module named 'no_such_server_module'"),
        ("preload_helpers", "preload_helpers has no open_path()"),
    ],
)
def test_failed_start_is_one_line_and_enoent(tmp_path: Path, server: str, reason: str) -> None:
    require_preload_library()
    exe = build_c(_NO_SIM, tmp_path, "no_sim")
    env = fake_server_env(tmp_path / "calls.log", **{launcher.ENV_SERVER: server})
    result = kvmgmem_run([str(exe)], env=env)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["open -1 No such file or directory"] * 3
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvmgmem run: the sim could not start (")
    assert reason in lines[0]
    assert "ENOENT" in lines[0]


def test_without_the_launcher_environment(tmp_path: Path) -> None:
    """LD_PRELOAD set by hand, without KVMGMEM_RUN_PYTHON: one line saying how to start it, ENOENT."""
    library = require_preload_library()
    exe = build_c(_NO_SIM, tmp_path, "no_sim")
    env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": str(library)}
    result = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["open -1 No such file or directory"] * 3
    assert re.fullmatch(r"kvmgmem run: the sim could not start \(KVMGMEM_RUN_PYTHON is not set.*\n", result.stderr)


def test_other_ld_preload_entries_are_kept(tmp_path: Path) -> None:
    require_preload_library()
    other = "/usr/lib/x86_64-linux-gnu/libdl.so.2"
    if not Path(other).exists():
        pytest.skip(f"{other} is not on this host")
    env = fake_server_env(tmp_path / "calls.log", LD_PRELOAD=other)
    result = kvmgmem_run(["sh", "-c", 'echo "[$LD_PRELOAD]"'], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"[{other}]\n"


_RACE = r"""
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>
#define N 8
static pthread_barrier_t barrier;
static int fds[N];
static void *first_open(void *arg)
{
    int i = (int)(long)arg;
    pthread_barrier_wait(&barrier);
    fds[i] = open("/dev/kvm", O_RDWR);
    return NULL;
}
int main(void)
{
    pthread_t t[N];
    pthread_barrier_init(&barrier, NULL, N);
    for (long i = 0; i < N; i++)
        pthread_create(&t[i], NULL, first_open, (void *)i);
    int ok = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        ok += fds[i] >= 0 && ioctl(fds[i], 0xAE00, 0) == 12 && close(fds[i]) == 0;
    }
    printf("%d of %d\n", ok, N);
    return ok == N ? 0 : 1;
}
"""


def test_concurrent_first_opens_start_python_once(tmp_path: Path) -> None:
    require_preload_library()
    exe = build_c(_RACE, tmp_path, "race")
    log = tmp_path / "calls.log"
    result = kvmgmem_run([str(exe)], env=fake_server_env(log))
    assert (result.returncode, result.stdout) == (0, "8 of 8\n"), result.stderr
    lines = _log_lines(log)
    assert [fields[1] for fields in lines].count("start") == 1
    assert [fields[1] for fields in lines].count("open_path") == 8
