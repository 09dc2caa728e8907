"""``VmCore.introspect``: a snapshot of one VM's model state for tests and tools (no kernel counterpart).

Why apart: it reads every structure of the model (SPTEs, attributes, memslots, guest_memfd pages, counters) and
belongs to none of them; as plain data it is what tests compare and ``kvmgmem`` tools print.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .gmem import PAGE_STATE_NAMES
from .memslots import HUGE_LEVELS

if TYPE_CHECKING:
    from .vm import VmCore


def introspect(vm: VmCore) -> dict[str, Any]:
    """A snapshot of ``vm``: SPTEs, attributes, memslots, guest_memfd pages, counters."""
    with vm.slots_lock, vm.mmu.lock:
        return {
            "sptes": [
                {
                    "gfn": s.gfn,
                    "level": s.level,
                    "npages": s.npages,
                    "backing": s.backing,
                    "host_address": s.host_address,
                    "writable": s.writable,
                    "private": s.private,
                    "slot": s.slot.slot,
                    "gmem_ino": s.gmem.ino if s.gmem else None,
                    "pgoff": s.pgoff if s.gmem else None,
                }
                for s in vm.mmu.sptes()
            ],
            "attributes": [(a, b, v) for a, b, v in vm.attributes.runs() if v],
            "attribute_runs": len(vm.attributes),
            "memslots": [
                {
                    "slot": s.slot,
                    "base_gfn": s.base_gfn,
                    "npages": s.npages,
                    "flags": s.flags,
                    "userspace_addr": s.userspace_addr,
                    "gmem_ino": s.gmem.inode.ino if s.gmem else None,
                    "pgoff": s.pgoff,
                    "gmem_only": s.gmem_only,
                    "mixed": {lv: [(a, b) for a, b, v in s.mixed[lv].runs() if v] for lv in HUGE_LEVELS},
                }
                for space in vm.memslots
                for s in space
            ],
            "gmem": [
                {
                    "ino": f.inode.ino,
                    "size": f.inode.size,
                    "flags": f.inode.flags,
                    "refs": f.refs,
                    "pages": [(a, b, PAGE_STATE_NAMES[v]) for a, b, v in f.inode.pages.pieces(0, f.inode.npages) if v],
                    "pages_present": f.inode.nr_present,
                    "pages_allocated": f.inode.pages_allocated,
                    "pages_freed": f.inode.pages_freed,
                    "bindings": [(a, b, s.slot) for a, b, s in f.bound_pieces(0, 1 << 64)],
                }
                for f in vm.gmem_files
            ],
            "counters": dict(vars(vm.mmu.counters)),
            "mmu_seq": vm.mmu.seq,
            "refs": vm.refs,
            "hypercall_exit_mask": vm.hypercall_exit_mask,
            "disabled_quirks": vm.disabled_quirks,
        }
