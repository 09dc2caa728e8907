"""Type stub for the C extension ``_run.c`` (KVM_RUN with the GIL released, KVM_EXIT_IO decoded in C)."""

from kvmgmem.exits import IoExit

KVM_RUN: int
KVM_EXIT_IO: int

class Runner:
    """KVM_RUN on a vCPU fd, with the Runner's own mapping of ``size`` bytes of kvm_run."""

    def __init__(self, fd: int, size: int, io_exit: type[IoExit]) -> None: ...
    def run(self) -> IoExit | int:
        """An IoExit for KVM_EXIT_IO, the exit reason (>= 0) for other exits, -errno if KVM_RUN failed."""
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
