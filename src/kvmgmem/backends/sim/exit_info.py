"""The data words of the sim's KVM_EXIT_INTERNAL_ERROR exits, laid out as KVM lays them out on Intel VMX.

Why: ``kvm_run.internal.data`` is not free-form. KVM fills it from the vendor's exit information
(``kvm_x86_ops.get_exit_info``: exit reason, exit qualification, IDT-vectoring info, interruption info, error
code) in an order each suberror fixes, and selftests read single words of it (set_memory_region_test's MMIO
during vectoring checks ``data[3]``, the gpa). The sim has no VMCS, so it reports what VMX with EPT would have
recorded for the same guest event; one vendor's encoding throughout, documented here, rather than made-up
numbers per exit.
"""

from __future__ import annotations

from kvmgmem import uapi
from kvmgmem.exits import InternalErrorExit

#: VMX basic exit reasons (arch/x86/include/uapi/asm/vmx.h).
EXIT_REASON_EPT_VIOLATION = 48

#: EPT-violation exit qualification bits (SDM Vol. 3C, Table 28-7; arch/x86/include/asm/vmx.h).
EPT_VIOLATION_ACC_READ = 1 << 0
EPT_VIOLATION_ACC_WRITE = 1 << 1
EPT_VIOLATION_ACC_INSTR = 1 << 2
EPT_VIOLATION_GVA_IS_VALID = 1 << 7
EPT_VIOLATION_GVA_TRANSLATED = 1 << 8

#: IDT-vectoring information (SDM Vol. 3C, 24.9.3): vector, type (3 = hardware exception), error-code valid,
#: valid.
INTR_TYPE_HARD_EXCEPTION = 3 << 8
INTR_TYPE_SOFT_INTR = 4 << 8
VECTORING_INFO_DELIVER_CODE_MASK = 1 << 11
VECTORING_INFO_VALID_MASK = 1 << 31

#: Exceptions that push an error code (x86_exception_has_error_code).
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

#: ``vcpu->arch.last_vmentry_cpu``: the host CPU of the last VM entry; the sim's vCPUs have none, so 0.
LAST_VMENTRY_CPU = 0


def ept_violation_qualification(fetch: bool = False, write: bool = False) -> int:
    """The exit qualification of an EPT violation on a gpa with no EPT entry, for an access made through a
    linear address (bits 3–5, the entry's permissions, are 0: nothing is mapped)."""
    access = EPT_VIOLATION_ACC_INSTR if fetch else EPT_VIOLATION_ACC_WRITE if write else EPT_VIOLATION_ACC_READ
    return access | EPT_VIOLATION_GVA_IS_VALID | EPT_VIOLATION_GVA_TRANSLATED


def vectoring_info(vector: int, soft: bool = False) -> int:
    """The IDT-vectoring information of the event being delivered when the exit happened: a hardware
    exception (with its error-code bit), or for ``soft`` a software interrupt (INT n; the sim does not tell
    INT3/INTO's software-exception type apart)."""
    if soft:
        return VECTORING_INFO_VALID_MASK | INTR_TYPE_SOFT_INTR | vector
    info = VECTORING_INFO_VALID_MASK | INTR_TYPE_HARD_EXCEPTION | vector
    if vector in _ERROR_CODE_VECTORS:
        info |= VECTORING_INFO_DELIVER_CODE_MASK
    return info


def emulation_failure(reason: int, qualification: int, vectoring: int = 0) -> InternalErrorExit:
    """``prepare_emulation_failure_exit`` without instruction bytes: suberror KVM_INTERNAL_ERROR_EMULATION,
    data = flags (0), then the five exit-info words (reason, qualification, IDT-vectoring info, interruption
    info, error code): ndata 6."""
    return InternalErrorExit(uapi.KVM_INTERNAL_ERROR_EMULATION, (0, reason, qualification, vectoring, 0, 0))


def delivery_event(reason: int, qualification: int, vectoring: int, gpa: int) -> InternalErrorExit:
    """``kvm_prepare_event_vectoring_exit``: suberror KVM_INTERNAL_ERROR_DELIVERY_EV, data = IDT-vectoring info,
    exit reason, exit qualification, the gpa the delivery could not reach, last_vmentry_cpu: ndata 5."""
    return InternalErrorExit(
        uapi.KVM_INTERNAL_ERROR_DELIVERY_EV, (vectoring, reason, qualification, gpa, LAST_VMENTRY_CPU)
    )
