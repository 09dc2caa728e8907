"""``RangeMap.set`` of one index (the fault path allocating pages one by one takes a shortcut there): the map
still reads like a list and its runs stay coalesced."""

from __future__ import annotations

import itertools
import random

from kvmgmem.backends.sim.core.rangemap import RangeMap


def test_single_index_sets_match_a_list_and_stay_coalesced() -> None:
    rnd = random.Random(15)
    for _ in range(20):
        rm: RangeMap[int] = RangeMap(0)
        ref = [0] * 64
        for _ in range(400):
            i = rnd.randrange(64)
            if rnd.random() < 0.2:  # sometimes a neighbour of a run boundary, as sequential allocation does
                bounds = [k for k, _, _ in rm.runs() if k < 64]
                i = min(63, rnd.choice(bounds))
            v = rnd.randrange(3)
            rm.set(i, i + 1, v)
            ref[i] = v
            assert [rm.get(j) for j in range(64)] == ref
            runs = rm.runs()
            assert all(a[2] != b[2] for a, b in itertools.pairwise(runs))
            assert runs[0][0] == 0


def test_sequential_allocation_is_one_run() -> None:
    """Pages allocated in order grow the run before them: one run of present pages, however many."""
    rm: RangeMap[int] = RangeMap(0)
    for i in range(100, 1100):
        rm.set(i, i + 1, 1)
    assert rm.runs() == [(0, 100, 0), (100, 1100, 1), (1100, None, 0)]
    rm.set(1100, 1101, 2)  # a different value starts a run of its own
    rm.set(99, 100, 1)  # the index before a run does not take the shortcut, and merges
    assert rm.runs() == [(0, 99, 0), (99, 1100, 1), (1100, 1101, 2), (1101, None, 0)]
