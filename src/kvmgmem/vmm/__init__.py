"""The VMM layer: a confidential-VM runner that converts memory the way QEMU does."""

from kvmgmem.vmm.convert import ConversionError, ConversionService, DiscardPolicy, Region
from kvmgmem.vmm.machine import Machine, MachineError, StoreUsage
from kvmgmem.vmm.trace import TraceEvent, Tracer

__all__ = [
    "ConversionError",
    "ConversionService",
    "DiscardPolicy",
    "Machine",
    "MachineError",
    "Region",
    "StoreUsage",
    "TraceEvent",
    "Tracer",
]
