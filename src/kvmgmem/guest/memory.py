"""Host view of guest-physical memory: which buffer backs which gpa range.

The ucall decoder reads argument structs and strings at gpas; tests read back what the guest wrote. Both need
the same "gpa → bytes" lookup over whatever the memslots use — a ``HostMemory``, a guest_memfd mapping, any
writable buffer — without caring which backend runs the guest. Objects without the buffer protocol but with
slicing (the sim's guest_memfd mapping, which must be able to refuse private pages) work too, by copying.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Region:
    gpa: int
    size: int
    view: memoryview | None  # zero-copy access when the object has the buffer protocol
    obj: Any  # otherwise: something supporting len() and slice get/set

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def read(self, off: int, n: int) -> bytes:
        if self.view is not None:
            return bytes(self.view[off : off + n])
        return bytes(self.obj[off : off + n])

    def write(self, off: int, data: bytes) -> None:
        if self.view is not None:
            self.view[off : off + len(data)] = data
        else:
            self.obj[off : off + len(data)] = data


class GuestMemory:
    """A set of non-overlapping (gpa, buffer) regions with reads/writes that may not cross a region end."""

    def __init__(self) -> None:
        self._regions: list[Region] = []

    def add(self, gpa: int, buffer: Any) -> GuestMemory:
        view: memoryview | None
        try:
            view = memoryview(buffer).cast("B")
            size = view.nbytes
        except TypeError:
            view, size = None, len(buffer)
        new = Region(gpa, size, view, None if view is not None else buffer)
        for r in self._regions:
            if gpa < r.end and r.gpa < new.end:
                raise ValueError(f"guest memory at {gpa:#x} overlaps the region at {r.gpa:#x}")
        self._regions.append(new)
        self._regions.sort(key=lambda r: r.gpa)
        return self

    def _find(self, gpa: int, size: int) -> tuple[Region, int]:
        for r in self._regions:
            if r.gpa <= gpa and gpa + size <= r.end:
                return r, gpa - r.gpa
        raise ValueError(f"gpa range [{gpa:#x}, {gpa + size:#x}) is not in one known guest memory region")

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy view of [gpa, gpa+size) (buffer-protocol regions only)."""
        r, off = self._find(gpa, size)
        if r.view is None:
            raise TypeError(f"the region at {r.gpa:#x} has no buffer protocol; use read()/write()")
        return r.view[off : off + size]

    def read(self, gpa: int, size: int) -> bytes:
        r, off = self._find(gpa, size)
        return r.read(off, size)

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._find(gpa, len(data))
        r.write(off, data)

    def read_u64(self, gpa: int) -> int:
        value: int = struct.unpack("<Q", self.read(gpa, 8))[0]
        return value

    def read_cstring(self, gpa: int, limit: int = 4096) -> str:
        """A NUL-terminated string (cut at ``limit`` bytes or the region end), decoded leniently."""
        for r in self._regions:
            if r.gpa <= gpa < r.end:
                off = gpa - r.gpa
                raw = r.read(off, min(limit, r.size - off))
                return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        raise ValueError(f"gpa {gpa:#x} is not in a known guest memory region")

    def release(self) -> None:
        """Drop the views so the underlying buffers can be closed."""
        for r in self._regions:
            if r.view is not None:
                r.view.release()
        self._regions.clear()
