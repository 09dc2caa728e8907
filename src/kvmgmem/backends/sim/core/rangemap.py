"""A map from integer indices (gfns, page offsets, region numbers) to values, stored as runs.

Why: every per-page table in the model (memory attributes, guest_memfd page states, bindings, "mixed"
huge-page flags) is usually uniform over long ranges. Storing runs instead of pages keeps a 1 TiB update as
cheap as a 4 KiB one (``kvm_vm_ioctl_set_mem_attributes`` accepts any range) and keeps memory constant for uniform
ranges.

Representation: two parallel sorted lists. ``_keys[i]`` is where run ``i`` starts and ``_vals[i]`` its value;
run ``i`` ends where run ``i + 1`` starts (the last run is unbounded). ``_keys[0]`` is always 0, and adjacent
runs never hold equal values (runs are coalesced on every update), so a uniform map is a single run.
Updates and queries cost O(log n + pieces touched) plus a list splice.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class RangeMap(Generic[V]):
    """Index → value, every index starting at ``default``."""

    __slots__ = ("_keys", "_vals", "default")

    def __init__(self, default: V) -> None:
        self.default = default
        self._keys: list[int] = [0]
        self._vals: list[V] = [default]

    def __len__(self) -> int:
        """Number of runs (a uniform map has 1): the memory the map uses is proportional to this."""
        return len(self._keys)

    def get(self, index: int) -> V:
        return self._vals[bisect_right(self._keys, index) - 1]

    def set(self, lo: int, hi: int, value: V) -> None:
        """Assign ``value`` to every index in ``[lo, hi)`` (overwrite, not merge)."""
        if hi <= lo:
            return
        keys, vals = self._keys, self._vals
        left = bisect_left(keys, lo)
        if (  # one index at the start of a run that goes on, right after a run of ``value``: that run grows
            hi == lo + 1  # (the fault path's allocation of the next page: a list splice saved per page)
            and left < len(keys)
            and keys[left] == lo
            and left
            and vals[left - 1] == value
            and (left + 1 == len(keys) or keys[left + 1] > hi)
        ):
            keys[left] = hi
            return
        right = bisect_right(keys, hi)
        after = vals[right - 1]  # the value at ``hi`` before this update
        new_keys: list[int] = []
        new_vals: list[V] = []
        if left == 0 or vals[left - 1] != value:
            new_keys.append(lo)
            new_vals.append(value)
        if after != value:
            new_keys.append(hi)
            new_vals.append(after)
        keys[left:right] = new_keys
        vals[left:right] = new_vals

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, int, V]]:
        """The runs overlapping ``[lo, hi)``, clipped to it, in order: ``(start, end, value)``."""
        if hi <= lo:
            return
        keys, vals = self._keys, self._vals
        i = bisect_right(keys, lo) - 1
        n = len(keys)
        while i < n and keys[i] < hi:
            start = max(keys[i], lo)
            end = min(keys[i + 1], hi) if i + 1 < n else hi
            yield start, end, vals[i]
            i += 1

    def is_uniform(self, lo: int, hi: int, value: V | None = None) -> bool:
        """Whether ``[lo, hi)`` is one run (holding ``value`` when given)."""
        keys = self._keys
        i = bisect_right(keys, lo) - 1
        if i + 1 < len(keys) and keys[i + 1] < hi:
            return False
        return value is None or self._vals[i] == value

    def first_value(self, lo: int) -> V:
        return self.get(lo)

    def runs(self) -> list[tuple[int, int | None, V]]:
        """Every run as ``(start, end or None for unbounded, value)`` (introspection)."""
        keys, vals = self._keys, self._vals
        return [(keys[i], keys[i + 1] if i + 1 < len(keys) else None, vals[i]) for i in range(len(keys))]

    def boundaries(self, lo: int, hi: int) -> list[int]:
        """Indices strictly inside ``(lo, hi)`` where the value changes."""
        keys = self._keys
        return keys[bisect_right(keys, lo) : bisect_left(keys, hi)]

    def count(self, lo: int, hi: int, value: V) -> int:
        """How many indices in ``[lo, hi)`` hold ``value``."""
        return sum(e - s for s, e, v in self.pieces(lo, hi) if v == value)
