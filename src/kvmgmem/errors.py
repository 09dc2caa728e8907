"""The one exception type every backend raises for a failing KVM operation."""

from __future__ import annotations

import errno as _errno
import os

from kvmgmem import uapi

_EXTRA_NAMES = {uapi.EHWPOISON: "EHWPOISON"}


def errno_name(code: int) -> str:
    """Symbolic name of an errno value (``EINVAL``), falling back to the number."""
    return _errno.errorcode.get(code) or _EXTRA_NAMES.get(code) or str(code)


class KvmError(OSError):
    """A KVM ioctl or guest_memfd file operation failed.

    ``errno`` is the value the kernel returns (the sim returns the same one), ``op`` names the operation
    ("KVM_CREATE_GUEST_MEMFD", "fallocate", ...). Being an ``OSError`` lets callers that only care about the
    errno treat it like any failed syscall. ``detail`` (or None) says what was wrong when kvmgmem knows more
    than the errno; ``str()`` has all three. It pickles with its fields (for errors crossing processes).

    >>> import errno, pickle, kvmgmem
    >>> e = kvmgmem.KvmError(errno.EINVAL, "fallocate", "unaligned length")
    >>> (isinstance(e, OSError), e.errno == errno.EINVAL, e.op)
    (True, True, 'fallocate')
    >>> str(pickle.loads(pickle.dumps(e)))
    'fallocate failed: EINVAL (Invalid argument): unaligned length'
    """

    op: str

    def __init__(self, code: int, op: str, detail: str | None = None) -> None:
        text = f"{op} failed: {errno_name(code)} ({os.strerror(code)})"
        if detail:
            text += f": {detail}"
        super().__init__(code, text)
        self.op = op
        self.detail = detail

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type[KvmError], tuple[int, str, str | None]]:
        return (type(self), (self.errno or 0, self.op, self.detail))


def closed_error(op: str, what: str) -> KvmError:
    """Return the error for an operation on an object whose fd is already closed (the kernel's EBADF)."""
    return KvmError(_errno.EBADF, op, f"{what} is closed")
