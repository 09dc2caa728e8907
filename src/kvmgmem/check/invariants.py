"""The invariants checked after every step, at quiescence, and the state fingerprint of the oracle.

Names (what a test asserts a bug violates):

- ``stale-mapping``: an SPTE (or an MMIO translation) outside every open invalidation disagrees with the
  memslots (kvm_unmap_gfn_range must have zapped it before the change became visible).
- ``mutate-while-mapped``: a writer changed what a gfn translates to (attributes, truncation, unbind, memslot
  removal) while an SPTE still covered it, or, for attributes and truncation, outside an open invalidation.
- ``private-as-shared`` / ``shared-as-private``: an SPTE's access type differs from the gfn's attribute.
- ``use-after-free``: a step wrote to a freed memslot (KASAN), or an SPTE maps a freed slot or page.
- ``unbalanced``: mmu_invalidate_in_progress negative, open with no range added while mmu_lock is free, or
  not zero once every thread finished.
- ``huge-over-changing``: a huge SPTE installed over gfns of an open invalidation or of mixed attributes.
- ``punched-not-zero``: a punched page still holds what the guest wrote.
- ``unbounded-retries``, ``deadlock``, ``lock-order``: liveness and Documentation/virt/kvm/locking.rst order.
- ``not-linearisable``: the final state and results equal no serial order's (checked by the explorer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmgmem import uapi
from kvmgmem.backends.sim.core.gmem import PAGE_ABSENT, PAGE_STATE_NAMES
from kvmgmem.backends.sim.core.spte_map import Spte
from kvmgmem.backends.sim.core.steps import KLock, Step
from kvmgmem.backends.sim.core.vm import VmCore
from kvmgmem.backends.sim.fault import Mapped, MemoryFault, Mmio

from .world import Punched, World

INVARIANTS = (
    "stale-mapping",
    "mutate-while-mapped",
    "private-as-shared",
    "shared-as-private",
    "use-after-free",
    "unbalanced",
    "huge-over-changing",
    "punched-not-zero",
    "unbounded-retries",
    "deadlock",
    "lock-order",
    "not-linearisable",
)


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


class Checker:
    """Watches one world: hooks the VMs' mutation points, and inspects the state after each step."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.pending: list[Violation] = []
        self.kasan_seen = [0] * len(world.vms)
        self.edges: dict[str, set[str]] = {}
        self.thread = ""
        self.slots_seen: dict[str, set[int]] = {}
        self._before: list[dict[int, Spte]] = []
        for vm in world.vms:
            vm.mutation_hook = self._hook(vm)

    # --- per step ----------------------------------------------------------------------------------------

    def _hook(self, vm: VmCore) -> Callable[[str, int, int], None]:
        def on_mutation(kind: str, lo: int, hi: int) -> None:
            mmu = vm.mmu
            for s in vm.mmu.sptes():
                if kind == "hva" and s.gmem is not None:
                    continue  # the host side changes only what is mapped through the hva
                if s.gfn < hi and lo < s.end_gfn:
                    self.pending.append(
                        Violation(
                            "mutate-while-mapped",
                            f"{self.thread}: {kind} of {vm.name} gfns [{lo:#x}, {hi:#x}) while an SPTE maps {s.gfn:#x}"
                            f"+{s.npages}",
                        )
                    )
                    break
            bound = bool(vm.memslots[0].overlapping(lo, hi))
            if kind in ("attributes", "truncate", "hva") and bound and not _covers(mmu.ranges, lo, hi):
                self.pending.append(
                    Violation(
                        "mutate-while-mapped",
                        f"{self.thread}: {kind} of {vm.name} gfns [{lo:#x}, {hi:#x}) outside an open invalidation "
                        f"(in_progress {mmu.in_progress}, range {_hull(vm)})",
                    )
                )

        return on_mutation

    def begin_step(self, thread: str, step: Step) -> None:
        self.thread = thread
        if any(step is vm.mmu.step_entry for vm in self.world.vms):
            # the memslots this fault pass can see (kvm_vcpu_gfn_to_memslot runs in this step)
            self.slots_seen[thread] = {id(s) for vm in self.world.vms for s in vm.memslots[0]}
        self._before = [{id(s): s for s in vm.mmu.sptes()} for vm in self.world.vms]

    def after_step(
        self, thread: str, step: Step, done: bool, result: Any, locks_free: Callable[[KLock], bool]
    ) -> list[Violation]:
        found, self.pending = self.pending, []
        for i, vm in enumerate(self.world.vms):
            mmu = vm.mmu
            for report in vm.kasan[self.kasan_seen[i] :]:
                found.append(Violation("use-after-free", f"{thread}: {report}"))
            self.kasan_seen[i] = len(vm.kasan)
            if mmu.in_progress < 0:
                found.append(Violation("unbalanced", f"{vm.name}: mmu_invalidate_in_progress {mmu.in_progress}"))
            if mmu.in_progress > 0 and mmu.range_start is None and locks_free(mmu.klock):
                found.append(
                    Violation(
                        "unbalanced",
                        f"{vm.name}: invalidation in progress ({mmu.in_progress}) with no range added, mmu_lock free",
                    )
                )
            before = self._before[i] if i < len(self._before) else {}
            for s in mmu.sptes():
                if id(s) not in before or before[id(s)] is not s:
                    found.extend(self._installed(vm, s))
                found.extend(self._spte(vm, s))
        if done:
            found.extend(self._completed(thread, result))
        return found

    def _installed(self, vm: VmCore, s: Spte) -> list[Violation]:
        if s.level == 1:
            return []
        out = []
        if vm.mmu.overlaps_in_progress(s.gfn, s.end_gfn):
            out.append(
                Violation(
                    "huge-over-changing",
                    f"{self.thread} installed a {s.npages}-page SPTE at {s.gfn:#x} over the open range {_hull(vm)}",
                )
            )
        if not vm.attributes.is_uniform(s.gfn, s.end_gfn):
            out.append(
                Violation(
                    "huge-over-changing",
                    f"{self.thread} installed a {s.npages}-page SPTE at {s.gfn:#x} over mixed attributes",
                )
            )
        return out

    def _spte(self, vm: VmCore, s: Spte) -> list[Violation]:
        out = []
        where = f"{vm.name} SPTE {s.gfn:#x}+{s.npages} ({'private' if s.private else 'shared'}, {s.backing})"
        if s.slot.freed:
            out.append(Violation("use-after-free", f"{where} maps freed memslot {s.slot.id}"))
        if s.gmem is not None and (
            not s.gmem.alive
            or not s.gmem.pages.is_uniform(s.pgoff, s.pgoff + s.npages)
            or s.gmem.state(s.pgoff) == PAGE_ABSENT
        ):
            out.append(Violation("use-after-free", f"{where} maps a freed guest_memfd page"))
        for lo, _hi, attr in vm.attributes.pieces(s.gfn, s.end_gfn):
            private = bool(attr & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            if private and not s.private:
                out.append(Violation("private-as-shared", f"{where}: gfn {lo:#x} is private"))
                break
            if s.private and not private:
                out.append(Violation("shared-as-private", f"{where}: gfn {lo:#x} is shared"))
                break
        if not vm.mmu.overlaps_in_progress(s.gfn, s.end_gfn) and vm.memslots[0].lookup(s.gfn) is not s.slot:
            out.append(Violation("stale-mapping", f"{where}: memslot {s.slot.id} no longer maps it"))
        return out

    def _completed(self, thread: str, result: Any) -> list[Violation]:
        out = []
        if isinstance(result, Mmio):
            gfn = result.gpa >> 12
            for vm in self.world.vms:
                slot = vm.memslots[0].lookup(gfn)
                if slot is not None and id(slot) in self.slots_seen.get(thread, set()):
                    out.append(
                        Violation(
                            "stale-mapping",
                            f"{thread}: MMIO translation for gfn {gfn:#x} while memslot {slot.id}, which the fault saw,"
                            f"{' (INVALID)' if slot.invalid else ''} still maps it",
                        )
                    )
                    break
        if isinstance(result, Punched):
            dirty = sorted(i for i in result.backing.data if result.first <= i < result.last)
            if dirty:
                out.append(
                    Violation(
                        "punched-not-zero", f"{thread}: pages {dirty} still hold guest data after PUNCH_HOLE returned"
                    )
                )
        return out

    def at_quiescence(self) -> list[Violation]:
        out = []
        for vm in self.world.vms:
            if vm.mmu.in_progress != 0:
                out.append(
                    Violation(
                        "unbalanced",
                        f"{vm.name}: mmu_invalidate_in_progress {vm.mmu.in_progress} after every thread finished",
                    )
                )
        return out

    # --- lock order ------------------------------------------------------------------------------------------

    def lock_edge(self, held: list[KLock], taken: KLock) -> None:
        for h in held:
            if h is not taken:
                self.edges.setdefault(f"{h.name}", set()).add(taken.name)

    def lock_cycles(self) -> list[Violation]:
        state: dict[str, int] = {}

        def visit(n: str, path: list[str]) -> list[str] | None:
            state[n] = 1
            for m in self.edges.get(n, ()):
                if state.get(m) == 1:
                    return [*path, n, m]
                if m not in state:
                    cycle = visit(m, [*path, n])
                    if cycle:
                        return cycle
            state[n] = 2
            return None

        for n in list(self.edges):
            if n not in state:
                cycle = visit(n, [])
                if cycle:
                    return [Violation("lock-order", " -> ".join(cycle))]
        return []

    # --- oracle and reports ---------------------------------------------------------------------------------

    def fingerprint(self, results: list[Any]) -> Any:
        """The final state (without counters or seq numbers, which count retries) and the threads'
        results, for comparison with serial orders."""
        out: list[Any] = [tuple(_result(r) for r in results)]
        for vm in self.world.vms:
            out.append(
                (
                    tuple((s.gfn, s.level, s.private, s.backing, s.slot.id) for s in vm.mmu.sptes()),
                    tuple(vm.attributes.runs()),
                    tuple((s.id, s.base_gfn, s.npages, s.invalid, s.gmem is not None) for s in vm.memslots[0]),
                    tuple(
                        (f.released, tuple((a, b, s.id) for a, b, s in f.bound_pieces(0, 1 << 64)))
                        for f in vm.gmem_files
                    ),
                    vm.mmu.in_progress,
                )
            )
        inodes = {id(f.inode): f.inode for vm in self.world.vms for f in vm.gmem_files}
        for inode in inodes.values():
            backing = inode.backing
            data = tuple(sorted(backing.data.items())) if hasattr(backing, "data") else ()
            out.append((inode.alive, tuple(inode.pages.pieces(0, inode.npages)), data))
        return tuple(out)

    def summary(self) -> dict[str, str]:
        """A compact view of the state, diffed between steps for the counterexample table."""
        out: dict[str, str] = {}
        for vm in self.world.vms:
            m = vm.mmu
            p = vm.name
            out[f"{p}.seq"] = str(m.seq)
            out[f"{p}.in_progress"] = str(m.in_progress)
            out[f"{p}.range"] = _hull(vm)
            out[f"{p}.sptes"] = " ".join(f"{s.gfn:#x}+{s.npages}{'P' if s.private else 'S'}" for s in m.sptes()) or "-"
            out[f"{p}.private"] = " ".join(f"[{a:#x},{b:#x})" for a, b, v in vm.attributes.runs() if v and b) or "-"
            out[f"{p}.slots"] = (
                " ".join(
                    f"{s.id}{'!' if s.invalid else ''}{'(no file)' if s.gmem is None and s.can_be_private else ''}"
                    for s in vm.memslots[0]
                )
                or "-"
            )
            out[f"{p}.srcu_readers"] = str(vm.srcu_readers)
            for n, f in enumerate(vm.gmem_files):
                q = f"{p}.gmem{n}"
                out[f"{q}.refs"] = str(f.refs)
                out[f"{q}.bindings"] = (
                    " ".join(
                        f"[{a},{b})->{s.id}{' (freed)' if s.freed else ''}" for a, b, s in f.bound_pieces(0, 1 << 64)
                    )
                    or "-"
                )
                out[f"{q}.pages"] = (
                    " ".join(
                        f"[{a},{b}){PAGE_STATE_NAMES[v]}" for a, b, v in f.inode.pages.pieces(0, f.inode.npages) if v
                    )
                    or "-"
                )
                data = getattr(f.inode.backing, "data", {})
                out[f"{q}.data"] = " ".join(f"{i}:{v:#x}" for i, v in sorted(data.items())) or "-"
        return out

    @staticmethod
    def diff(before: dict[str, str] | None, after: dict[str, str]) -> str:
        if before is None:
            return ""
        parts = [f"{k} {before.get(k, '-')} -> {v}" for k, v in after.items() if before.get(k) != v]
        parts += [f"{k} gone" for k in before if k not in after]
        return "; ".join(parts)


def _covers(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in ranges)


def _hull(vm: VmCore) -> str:
    m = vm.mmu
    if m.range_start is None or m.range_end is None:
        return "INVALID"
    return f"[{m.range_start:#x},{m.range_end:#x})"


def _result(r: Any) -> Any:
    if isinstance(r, Mapped):
        return ("mapped", r.level, r.gmem)
    if isinstance(r, MemoryFault):
        return ("exit", r.errno, r.flags)
    if isinstance(r, Mmio):
        return ("mmio",)
    if isinstance(r, Punched):
        return ("punched", r.first, r.last)
    return r
