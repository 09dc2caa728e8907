"""Type stub for the C extension ``_run.c``: a vCPU's KVM_RUN with the GIL released, KVM_EXIT_IO decoded in C."""

from collections.abc import Callable
from typing import Any

from kvmgmem.exits import Exit, IoExit

EXIT: int
ERRNO: int
CLOSED: int
BUSY: int

class Runner:
    """KVM_RUN on vCPU ``fd`` with its own mapping of ``size`` bytes of kvm_run; every outcome but KVM_EXIT_IO
    goes to ``slow(owner, kind, value)`` (``owner`` is held weakly)."""

    pending: str | None
    def __init__(
        self, fd: int, size: int, io_exit: type[IoExit], owner: Any, slow: Callable[[Any, int, int], Exit]
    ) -> None: ...
    def run(self) -> Exit: ...
    def kick(self, signum: int) -> None: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
