"""Host view of guest-physical memory: which buffer backs which gpa range.

The ucall decoder reads argument structs and strings at gpas; tests read back what the guest wrote. Both need
the same "gpa → bytes" lookup over whatever buffers the memslots use (``HostMemory``, a guest_memfd mapping,
any writable buffer), without caring which backend runs the guest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Region:
    gpa: int
    view: memoryview

    @property
    def end(self) -> int:
        return self.gpa + len(self.view)


class GuestMemory:
    """A set of non-overlapping (gpa, buffer) regions with reads/writes that may not cross a region end."""

    def __init__(self) -> None:
        self._regions: list[Region] = []

    def add(self, gpa: int, buffer: Any) -> GuestMemory:
        view = memoryview(buffer).cast("B")
        new = Region(gpa, view)
        for r in self._regions:
            if gpa < r.end and r.gpa < new.end:
                raise ValueError(f"guest memory at {gpa:#x} overlaps the region at {r.gpa:#x}")
        self._regions.append(new)
        self._regions.sort(key=lambda r: r.gpa)
        return self

    def remove(self, gpa: int) -> None:
        self._regions = [r for r in self._regions if r.gpa != gpa]

    def _find(self, gpa: int, size: int) -> tuple[memoryview, int]:
        for r in self._regions:
            if r.gpa <= gpa and gpa + size <= r.end:
                return r.view, gpa - r.gpa
        raise ValueError(f"gpa range [{gpa:#x}, {gpa + size:#x}) is not in one known guest memory region")

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy view of [gpa, gpa+size)."""
        buf, off = self._find(gpa, size)
        return buf[off : off + size]

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u64(self, gpa: int) -> int:
        value: int = struct.unpack("<Q", self.view(gpa, 8))[0]
        return value

    def read_cstring(self, gpa: int, limit: int = 4096) -> str:
        """A NUL-terminated string (cut at ``limit`` bytes or the region end), decoded leniently."""
        for r in self._regions:
            if r.gpa <= gpa < r.end:
                off = gpa - r.gpa
                raw = bytes(r.view[off : min(off + limit, len(r.view))])
                return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        raise ValueError(f"gpa {gpa:#x} is not in a known guest memory region")

    def release(self) -> None:
        """Drop the views so the underlying buffers can be closed."""
        for r in self._regions:
            r.view.release()
        self._regions.clear()
