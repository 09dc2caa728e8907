"""Fetch Debian's ``linux-source-7.2`` and build five upstream KVM selftests from it, unmodified.

The tests (``tests/run/test_upstream_selftests.py``) and the benchmark (``bench/upstream.py``) run the
kernel's own selftests under ``kvmgmem run``; this module gets the binaries (:func:`ensure`) and runs and
reads them (:func:`run_selftest`, :func:`assertion_failure`, :func:`skipped`). A build from nothing:

1. ``apt-get download linux-source-7.2`` from Debian unstable (``KVMGMEM_DEBIAN_MIRROR`` overrides the mirror)
   through a private apt configuration (its own sources.list, lists and cache directories under the cache, so
   the system's apt state is never touched). apt checks
   the .deb's SHA256 against the Release file signed by the Debian archive key; :func:`_verify` checks it once
   more against the index and reads the package's own control fields.
2. ``dpkg-deb -x`` and untar the source (minus the trees the build never reads: drivers, Documentation, ...).
3. ``make headers`` at the top of the tree, then the selftests with the tree's own
   ``tools/testing/selftests/kvm/Makefile``, naming each binary by its full path (the Makefile's rules are
   written for full output paths; plain names fall through to make's built-in rule and fail to link).

Everything lives in ``${XDG_CACHE_HOME:-~/.cache}/kvmgmem/upstream-7.2/``: ``src/`` (the tree), ``bin/`` (the
five binaries) and ``bin/BUILD.json`` (package version, .deb SHA256, build time). A build that completed
is reused without any network access; a crashed or killed build leaves no ``BUILD.json`` and is redone. A
lock file serialises concurrent runs (two pytest sessions, or pytest and the bench): the second waits for
the first and then finds its result.

What the host lacks (network, apt-get, dpkg-deb, gcc, make, the Debian archive keyring, time) raises
:class:`Unavailable` with the reason, which callers turn into a skip. A build that starts and then fails
raises :class:`BuildFailed` with the tail of the log: that is a defect to look at, not a skip.

Command line: ``python tools/upstream_selftests.py [--budget SECONDS] [--refresh]`` prints the binaries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "linux-source-7.2"
#: The Debian mirror (``KVMGMEM_DEBIAN_MIRROR`` overrides it, e.g. a CI runner's local mirror).
MIRROR = os.environ.get("KVMGMEM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "unstable"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

#: The selftests, as paths under ``tools/testing/selftests/kvm`` (the binary's name is the last part).
TESTS = (
    "guest_memfd_test",
    "set_memory_region_test",
    "x86/private_mem_conversions_test",
    "x86/private_mem_kvm_exits_test",
    "pre_fault_memory_test",
)
#: Top-level directories of the tree that neither ``make headers`` nor the kvm selftests read; not extracting
#: them saves most of the disk writes (decompressing the whole .tar.xz is the bulk of the time either way).
SKIPPED_TOP_DIRS = ("drivers", "Documentation", "sound", "net", "fs", "rust", "samples", "crypto", "security")
#: Default time budget for a build from nothing: about 1 minute here (5 s download, 30 s extract, 10 s
#: headers, 10 s selftests); the budget leaves room for a slower CI runner without letting a hung download
#: hold the suite.
DEFAULT_BUDGET = 600.0

_TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "tar", "xz", "make", "gcc")


class Unavailable(Exception):
    """The host cannot fetch or build the selftests (the message says what is missing); callers skip."""


class BuildFailed(Exception):
    """The build started and failed (the message carries the command and the tail of its output)."""


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/kvmgmem/upstream-7.2``: where the tree, the binaries and the lock live."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvmgmem" / "upstream-7.2"


def binary_name(test: str) -> str:
    """The file name of a selftest binary (``x86/private_mem_conversions_test`` → ``private_mem_conversions_test``)."""
    return test.rsplit("/", 1)[-1]


def cached(root: Path | None = None) -> dict[str, Path] | None:
    """The five binaries of a completed build (name → path), or None if there is none: no network, no lock."""
    bindir = (root or cache_root()) / "bin"
    stamp = bindir / "BUILD.json"
    if not stamp.is_file():
        return None
    paths = {binary_name(t): bindir / binary_name(t) for t in TESTS}
    if not all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()):
        return None
    return paths


def build_info(root: Path | None = None) -> dict[str, str]:
    """What ``BUILD.json`` of the completed build records (package, version, sha256, built)."""
    return dict(json.loads(((root or cache_root()) / "bin" / "BUILD.json").read_text()))


def ensure(budget: float = DEFAULT_BUDGET, refresh: bool = False, log: Path | None = None) -> dict[str, Path]:
    """The five binaries (name → path), fetching and building them first if needed, within ``budget`` seconds.

    ``refresh`` rebuilds from the newest package even when a build is cached. Raises :class:`Unavailable`
    (skip) or :class:`BuildFailed` (defect)."""
    root = cache_root()
    if not refresh and (found := cached(root)):
        return found
    deadline = time.monotonic() + budget
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock", deadline):
        if not refresh and (found := cached(root)):  # another run built it while this one waited
            return found
        _Builder(root, deadline, log or root / "build.log").run()
    found = cached(root)
    if found is None:
        raise BuildFailed(f"the build finished but {root / 'bin'} is incomplete")
    return found


@contextlib.contextmanager
def _locked(path: Path, deadline: float) -> Iterator[None]:
    with path.open("a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Unavailable(f"another build holds {path} past the time budget") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Builder:
    """One build from nothing (download → verify → extract → headers → selftests) into ``root``."""

    def __init__(self, root: Path, deadline: float, log: Path) -> None:
        self.root, self.deadline, self.log = root, deadline, log
        self.apt = root / "apt"

    def run(self) -> None:
        missing = [t for t in _TOOLS if shutil.which(t) is None]
        if missing:
            raise Unavailable(f"needs {', '.join(missing)} on PATH to fetch and build the selftests")
        if not KEYRING.is_file():
            raise Unavailable(f"needs the Debian archive keyring {KEYRING} (package debian-archive-keyring)")
        self.log.write_text("")
        deb, version = self._download()
        sha256 = self._verify(deb, version)
        tree = self._extract(deb)
        shutil.rmtree(deb.parent)
        self._make(["make", "headers", f"-j{_jobs()}"], tree, "make headers")
        kvm = tree / "tools/testing/selftests/kvm"
        targets = [str(kvm / t) for t in TESTS]
        self._make(["make", f"-j{_jobs()}", *targets], kvm, "make (selftests)")
        bindir = self.root / "bin"
        shutil.rmtree(bindir, ignore_errors=True)
        bindir.mkdir()
        for t in TESTS:
            shutil.copy2(kvm / t, bindir / binary_name(t))
        built = time.strftime("%FT%TZ", time.gmtime())
        info = {"package": PACKAGE, "version": version, "sha256": sha256, "built": built}
        (bindir / "BUILD.json").write_text(json.dumps(info, indent=2) + "\n")

    # --- steps -------------------------------------------------------------------------------------------------

    def _apt_options(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::sourcelist={self.apt / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={self.apt / 'lists'}",
            "-o", f"Dir::Cache={self.apt / 'cache'}",
            "-o", "APT::Sandbox::User=root",
            "-o", "Acquire::Retries=2",
            "-o", "Acquire::http::Timeout=20",
        ]  # fmt: skip

    def _download(self) -> tuple[Path, str]:
        (self.apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (self.apt / "sources.list").write_text(f"deb [signed-by={KEYRING}] {MIRROR} {SUITE} main\n")
        update = self._run(["apt-get", *self._apt_options(), "update"], self.apt, check=False)
        # apt-get update exits 0 even when every fetch failed; the index is what matters
        if update.returncode != 0 or not any((self.apt / "lists").glob("*_Packages*")):
            raise Unavailable(f"cannot fetch the Debian {SUITE} index from {MIRROR}: {_last_line(update)}")
        policy = self._run(["apt-cache", *self._apt_options(), "policy", PACKAGE], self.apt, check=False)
        version = next((ln.split(":", 1)[1].strip() for ln in policy.stdout.splitlines()
                        if ln.strip().startswith("Candidate:")), "")  # fmt: skip
        if not version or version == "(none)":
            raise Unavailable(f"Debian {SUITE} has no {PACKAGE} any more (apt-cache policy: {_last_line(policy)})")
        dl = self.root / "dl"
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir()
        got = self._run(["apt-get", *self._apt_options(), "download", f"{PACKAGE}={version}"], dl, check=False)
        debs = list(dl.glob(f"{PACKAGE}_*.deb"))
        if got.returncode != 0 or len(debs) != 1:
            raise Unavailable(f"downloading {PACKAGE} {version} failed: {_last_line(got)}")
        return debs[0], version

    def _verify(self, deb: Path, version: str) -> str:
        """The .deb is the package apt indexed: same SHA256 as the signed index, same name and version inside."""
        show = self._run(["apt-cache", *self._apt_options(), "show", f"{PACKAGE}={version}"], self.apt)
        want = next((ln.split(":", 1)[1].strip() for ln in show.stdout.splitlines() if ln.startswith("SHA256:")), "")
        digest = hashlib.sha256()
        with deb.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        got = digest.hexdigest()
        if not want or got != want:
            raise BuildFailed(f"{deb.name}: SHA256 {got} does not match the signed index ({want or 'missing'})")
        fields = self._run(["dpkg-deb", "-f", str(deb), "Package", "Version"], self.root).stdout
        if f"Package: {PACKAGE}" not in fields or f"Version: {version}" not in fields:
            raise BuildFailed(f"{deb.name}: control fields do not name {PACKAGE} {version}: {fields!r}")
        return got

    def _extract(self, deb: Path) -> Path:
        unpacked = self.root / "deb"
        src = self.root / "src"
        for d in (unpacked, src):
            shutil.rmtree(d, ignore_errors=True)
        self._run(["dpkg-deb", "-x", str(deb), str(unpacked)], self.root)
        tarballs = list((unpacked / "usr/src").glob(f"{PACKAGE}.tar.*"))
        if len(tarballs) != 1:
            raise BuildFailed(f"{deb.name} holds no single {PACKAGE}.tar.* under /usr/src: {tarballs}")
        src.mkdir()
        top = PACKAGE
        excludes = [f"--exclude={top}/{d}" for d in SKIPPED_TOP_DIRS]
        self._run(["tar", "-xf", str(tarballs[0]), "-C", str(src), "--anchored", *excludes], self.root)
        shutil.rmtree(unpacked)
        tree = src / top
        if not (tree / "tools/testing/selftests/kvm/Makefile").is_file():
            raise BuildFailed(f"{tarballs[0].name} has no tools/testing/selftests/kvm/Makefile")
        return tree

    def _make(self, argv: list[str], cwd: Path, what: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "ARCH", "CROSS_COMPILE", "O")}
        self._run(argv, cwd, env=env, what=what)

    # --- plumbing ----------------------------------------------------------------------------------------------

    def _run(self, argv: list[str], cwd: Path, *, check: bool = True, env: dict[str, str] | None = None,
             what: str = "") -> subprocess.CompletedProcess[str]:  # fmt: skip
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Unavailable(f"the time budget ran out before `{' '.join(argv[:2])}`")
        with self.log.open("a") as logf:
            logf.write(f"$ (cd {cwd} && {' '.join(argv)})\n")
        try:
            done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"the time budget ran out during `{' '.join(argv[:2])}`") from None
        with self.log.open("a") as logf:
            logf.write(done.stdout + done.stderr + f"[exit {done.returncode}]\n")
        if check and done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise BuildFailed(f"{what or argv[0]} failed (exit {done.returncode}; full log {self.log}):\n{tail}")
        return done


# --- running them ---------------------------------------------------------------------------------------------


def kvmgmem_run_missing() -> str | None:
    """Why ``kvmgmem run`` cannot be used from this interpreter (None when it can)."""
    if importlib.util.find_spec("kvmgmem") is None:
        return "kvmgmem is not installed in this interpreter"
    if importlib.util.find_spec("kvmgmem.run") is None or importlib.util.find_spec("kvmgmem.run.launcher") is None:
        return "kvmgmem run not built (no kvmgmem.run.launcher in this install)"
    return None


def kvmgmem_command() -> list[str]:
    """How to call the CLI of this interpreter's kvmgmem: its console script, else ``python -m kvmgmem.cli``."""
    script = Path(sys.executable).parent / "kvmgmem"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "kvmgmem.cli"]


@dataclass
class Outcome:
    """One run of a selftest: its command, exit status, output (stdout and stderr interleaved) and wall time."""

    argv: list[str]
    returncode: int
    output: str
    seconds: float

    def describe(self) -> str:
        """Exit status, time and the output, for an assertion message."""
        return f"$ {' '.join(self.argv)}\n[exit {self.returncode} after {self.seconds:.1f} s]\n{self.output}"


def run_selftest(binary: Path, args: Sequence[str] = (), *, profile: str | None = None, sim: bool = True,
                 timeout: float = 300.0, cwd: Path | None = None, trace: Path | None = None) -> Outcome:  # fmt: skip
    """Run ``binary args`` under ``kvmgmem run [--profile P] [--trace FILE]`` (``sim=False``: directly, on the
    host's /dev/kvm).

    A run that outlives ``timeout`` is killed and reported as exit -9 with what it printed so far."""
    argv = [str(binary), *args]
    if sim:
        options = [*(["--profile", profile] if profile else []), *(["--trace", str(trace)] if trace else [])]
        argv = [*kvmgmem_command(), "run", *options, "--", *argv]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        code, out = done.returncode, done.stdout
    except subprocess.TimeoutExpired as e:
        code, out = -9, (e.stdout or b"") + f"\n[killed after {timeout:.0f} s]".encode()
    return Outcome(argv, code, out.decode(errors="replace"), time.perf_counter() - t0)


@dataclass(frozen=True)
class AssertionSite:
    """Where a selftest's TEST_ASSERT fired: ``file:line``, the expression, the message, the innermost function."""

    location: str
    expression: str
    message: str
    function: str = ""
    errno: int = 0

    def place(self) -> tuple[str, str, str]:
        """What identifies the place (errno and the backtrace's function are left out: libc may leave any
        errno behind a successful call, and addr2line may be missing)."""
        return (self.location, self.expression, self.message)


_FRAME = re.compile(r"^\s+\d+\t0x[0-9a-f]+: (?:(\S+) at )?")


def assertion_failure(output: str) -> AssertionSite | None:
    """The first ``==== Test Assertion Failure ====`` report in a selftest's output (kvm_util's
    ``test_assert()``: location and expression, ``pid=… errno=…``, the addr2line backtrace, the message)."""
    lines = output.splitlines()
    try:
        i = lines.index("==== Test Assertion Failure ====")
    except ValueError:
        return None
    head = lines[i + 1].strip() if i + 1 < len(lines) else ""
    location, _, expression = head.partition(": ")
    m = re.search(r"errno=(\d+)", lines[i + 2]) if i + 2 < len(lines) else None
    function, message = "", []
    for line in lines[i + 3 :]:
        frame = _FRAME.match(line)
        if frame:
            function = function or frame.group(1) or ""
        elif "(inlined by)" in line or line.startswith("==== "):
            continue
        elif line.strip():
            message.append(line.strip())
    return AssertionSite(location, expression, "\n".join(message), function, int(m.group(1)) if m else 0)


def skipped(output: str) -> list[str]:
    """The lines by which a selftest says it skipped something: kselftest ``# SKIP`` (a whole-test ``1..0``
    or one case) and the kvm selftests' own ``Skipping …`` notes."""
    return [ln for ln in output.splitlines() if "# SKIP" in ln or re.search(r"\bSkipping\b", ln)]


def traced_calls(trace: Path) -> dict[str, int]:
    """How many times each KVM call appears in a ``kvmgmem run --trace`` file (Perfetto JSON: one complete
    event per ioctl, named after it)."""
    data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    counts: dict[str, int] = {}
    for event in events:
        if event.get("ph") == "X":
            counts[event["name"]] = counts.get(event["name"], 0) + 1
    return counts


def tap_failures(output: str) -> list[str]:
    """The kselftest/TAP result lines that report a failed case (``not ok N …``)."""
    return [ln for ln in output.splitlines() if re.match(r"\s*not ok \d+", ln)]


def _jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    """apt's own diagnosis (its first ``E:`` line, else its first ``W:``), else the last line, else the exit status."""
    lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    for kind in ("E:", "W:"):
        found = [ln for ln in lines if ln.startswith(kind)]
        if found:
            return found[0]
    return lines[-1] if lines else f"exit {done.returncode}"


def main(argv: list[str]) -> int:
    """``python tools/upstream_selftests.py [--budget SECONDS] [--refresh]``: build if needed, print the paths."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds (default %(default)s)")
    parser.add_argument("--refresh", action="store_true", help="rebuild from the newest package")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        paths = ensure(args.budget, refresh=args.refresh)
    except Unavailable as e:
        print(f"unavailable: {e}", file=sys.stderr)
        return 3
    except BuildFailed as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    info = build_info()
    print(f"{info['package']} {info['version']} (sha256 {info['sha256'][:16]}…, built {info['built']}; "
          f"{time.monotonic() - t0:.0f} s now)")  # fmt: skip
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
