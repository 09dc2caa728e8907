"""The x86 set-up ioctls of the public API, as mixins that ``kvmgmem.api.Vm`` and ``kvmgmem.api.Vcpu`` inherit.

These are the calls a VMM makes once, before the first ``KVM_RUN``, to give the VM and its vCPUs their x86
shape: the in-kernel interrupt controllers, the TSC frequency and the shadow MMU's page budget on the VM; the
CPUID table, the multiprocessing state, the TSC frequency and pre-faulted memory on each vCPU. They live apart
from the memslot, attribute and run methods so that each class stays one screenful per job; the public names
are unchanged (``Vm.create_irqchip``, ``Vcpu.set_cpuid``, ...). As in ``kvmgmem.api``, each public method
checks the object is open and marshals its arguments, and each backend implements the ``_``-prefixed abstract
method that issues the ioctl.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kvmgmem import uapi
from kvmgmem.api_args import cpuid_entries, u32, u64, ulong

if TYPE_CHECKING:
    from kvmgmem.api import Vm


class VmX86Setup(abc.ABC):
    """The VM's x86 set-up ioctls: in-kernel irqchip, TSC frequency, shadow-MMU page budget."""

    if TYPE_CHECKING:

        def _check_open(self, op: str) -> None: ...

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: the in-kernel PIC, IOAPIC and (for vCPUs created later) local APICs.

        Takes no arguments. Errors (x86 ``kvm_arch_vm_ioctl``): EEXIST when the VM already has one, EINVAL once a
        vCPU was created. On the sim the irqchip is a recorded mode and nothing more: no PIC, IOAPIC or APIC is
        modelled, so nothing ever injects an interrupt. What it changes is what the kernel gates on it: vCPUs
        created later have a local APIC (APs start UNINITIALIZED, the ``KVM_SET_MP_STATE`` states that need one are
        accepted) and HLT halts in the kernel instead of exiting; a vCPU that is not RUNNABLE then waits in
        ``KVM_RUN`` for a wakeup that only a kick (EINTR) provides.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm:
        ...     vm.create_irqchip()
        ...     try:
        ...         vm.create_irqchip()
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno])
        EEXIST
        """
        op = "KVM_CREATE_IRQCHIP"
        self._check_open(op)
        self._create_irqchip()

    @abc.abstractmethod
    def _create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP`` on the VM fd."""

    def get_tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ`` on the VM (``KVM_CAP_GET_TSC_KHZ``): the TSC frequency new vCPUs get, in kHz.

        On the sim a fixed nominal frequency (profile field ``tsc_khz``): the guest's TSC is the CPU
        emulator's own counter, which KVM_GET_TSC_KHZ does not describe. Errors: none beyond EBADF once closed
        (``kvm_arch_vm_ioctl`` reads ``default_tsc_khz``).

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm:
        ...     vm.get_tsc_khz() > 0
        True
        """
        op = "KVM_GET_TSC_KHZ"
        self._check_open(op)
        return self._get_tsc_khz()

    @abc.abstractmethod
    def _get_tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ`` on the VM fd (the ioctl's return value)."""

    def set_nr_mmu_pages(self, pages: int) -> None:
        """``KVM_SET_NR_MMU_PAGES``: cap the shadow MMU's page-table pages (EINVAL below 64).

        Only shadow paging allocates from this pool; with two-dimensional paging (the sim) the value is
        recorded and changes nothing (``kvm_vm_ioctl_set_nr_mmu_pages``). ``pages`` is the ioctl's
        ``unsigned long`` argument, a count of 4 KiB page-table pages. Errors: EINVAL below 64
        (``KVM_MIN_ALLOC_MMU_PAGES``); EBADF once closed.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm:
        ...     vm.set_nr_mmu_pages(64)
        ...     try:
        ...         vm.set_nr_mmu_pages(63)
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno])
        EINVAL
        """
        op = "KVM_SET_NR_MMU_PAGES"
        self._check_open(op)
        self._set_nr_mmu_pages(ulong(pages, "pages", op))

    @abc.abstractmethod
    def _set_nr_mmu_pages(self, pages: int) -> None:
        """``KVM_SET_NR_MMU_PAGES`` with the 64-bit ioctl argument ``pages``."""


class VcpuX86State(abc.ABC):
    """The vCPU's x86 set-up ioctls: CPUID table, pre-faulted memory, multiprocessing state, TSC frequency."""

    if TYPE_CHECKING:
        vm: Vm

        def _check_open(self, op: str) -> None: ...

    def set_cpuid(self, entries: Iterable[uapi.kvm_cpuid_entry2] | None = None) -> None:
        """``KVM_SET_CPUID2``; ``None`` loads the system's supported CPUID (what VMMs do).

        ``entries`` is an iterable of ``uapi.kvm_cpuid_entry2`` (copied; e.g. :meth:`System.get_supported_cpuid`'s
        answer, edited). The guest's CPUID instruction then answers from this table, by KVM's lookup rules
        (``kvm_cpuid``); a vCPU without one reads zeros. Errors: TypeError naming the operation for entries that are
        not ``uapi.kvm_cpuid_entry2``; E2BIG for more than 256 entries; EINVAL for a table ``kvm_check_cpuid``
        refuses (a linear-address width other than 48, 57 or 0 in leaf 0x80000008) and, once the vCPU has run, for
        any table other than the one it has (``kvm_cpuid_check_equal``).

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        ...     vcpu.set_cpuid()
        """
        op = "KVM_SET_CPUID2"
        self._check_open(op)
        chosen = self.vm.system.get_supported_cpuid() if entries is None else cpuid_entries(entries, op)
        cpuid = uapi.cpuid2_type(len(chosen))()
        cpuid.nent = len(chosen)
        for i, entry in enumerate(chosen):
            cpuid.entries[i] = entry
        self._set_cpuid2(cpuid)

    @abc.abstractmethod
    def _set_cpuid2(self, cpuid: Any) -> None:
        """``KVM_SET_CPUID2`` with a ``struct kvm_cpuid2`` of ``cpuid.nent`` entries (``uapi.cpuid2_type``)."""

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[int, int]:
        """``KVM_PRE_FAULT_MEMORY``: map ``[gpa, gpa + size)`` ahead of the guest; returns the leftover range.

        Each page is faulted in as a guest read would be (private pages from the guest_memfd, shared ones from the
        memslot's memory), so the guest later runs without those faults. The kernel stops early — on a signal, a
        huge mapping's end, an error after some progress — and writes the range not yet done back: the returned
        ``(gpa, size)``, which a caller passes again until ``size`` is 0. It fails only when no page was mapped, and
        then the range is unchanged. Errors, in ``kvm_vcpu_pre_fault_memory`` and
        ``kvm_arch_vcpu_pre_fault_memory``'s order (``gpa`` and ``size`` are bytes, multiples of 4096): EINVAL for
        flags ≠ 0, an unaligned gpa or size, size 0 or a wrapping range (and on kernels before 6.10, which lack the
        ioctl); EINTR when a signal (a :meth:`kick`) is pending; EOPNOTSUPP without two-dimensional paging
        (``KVM_CAP_PRE_FAULT_MEMORY`` 0, as on this host's shadow-paging KVM); ENOENT when the gpa is in no memslot
        (the access would be emulated MMIO); EAGAIN when its memslot is being deleted or moved; EFAULT, EHWPOISON...
        when the fault needs the VMM (a private page without a guest_memfd behind it, a poisoned page).

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, kvmgmem.HostMemory(2 << 20) as mem:
        ...     vm.set_user_memory_region(0, 0, 2 << 20, mem)
        ...     with vm.create_vcpu() as vcpu:
        ...         vcpu.pre_fault_memory(0x1000, 0x2000)             # all mapped: nothing left
        ...         try:
        ...             vcpu.pre_fault_memory(4 << 20, 0x1000)        # no memslot there
        ...         except kvmgmem.KvmError as e:
        ...             print(errno.errorcode[e.errno])
        ...     vm.set_user_memory_region(0, 0, 0)
        (12288, 0)
        ENOENT
        """
        op = "KVM_PRE_FAULT_MEMORY"
        self._check_open(op)
        rng = uapi.kvm_pre_fault_memory(
            gpa=u64(gpa, "gpa", op), size=u64(size, "size", op), flags=u64(flags, "flags", op)
        )
        self._pre_fault_memory(rng)
        return rng.gpa, rng.size

    @abc.abstractmethod
    def _pre_fault_memory(self, rng: uapi.kvm_pre_fault_memory) -> None:
        """Issue ``KVM_PRE_FAULT_MEMORY`` with ``rng``, which the call advances in place (``gpa`` up, ``size`` down).

        Raises ``KvmError`` (with ``rng`` unchanged) when no page was mapped.
        """

    def get_cpuid(self, max_entries: int | None = None) -> list[uapi.kvm_cpuid_entry2]:
        """``KVM_GET_CPUID2``: the table the last :meth:`set_cpuid` loaded (empty before one), as copies.

        ``max_entries`` is the ``nent`` a C caller passes (the room in its buffer; None: the kernel's maximum,
        256). Errors: E2BIG when it is smaller than the table (``kvm_vcpu_ioctl_get_cpuid2``; ``nent`` is then
        not written back).

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        ...     vcpu.set_cpuid()
        ...     len(vcpu.get_cpuid()) == len(kvm.get_supported_cpuid())
        ...     try:
        ...         vcpu.get_cpuid(1)
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno])
        True
        E2BIG
        """
        op = "KVM_GET_CPUID2"
        self._check_open(op)
        nent = uapi.KVM_MAX_CPUID_ENTRIES if max_entries is None else u32(max_entries, "max_entries", op)
        cpuid = uapi.cpuid2_type(min(nent, uapi.KVM_MAX_CPUID_ENTRIES))()
        cpuid.nent = nent
        self._get_cpuid2(cpuid)
        return [uapi.kvm_cpuid_entry2.from_buffer_copy(cpuid.entries[i]) for i in range(cpuid.nent)]

    @abc.abstractmethod
    def _get_cpuid2(self, cpuid: Any) -> None:
        """Issue ``KVM_GET_CPUID2`` into ``cpuid``: fill the entries and set ``nent``, or raise E2BIG leaving it alone.

        ``cpuid`` is a ``uapi.cpuid2_type`` with room for ``min(cpuid.nent, 256)`` entries.
        """

    def get_mp_state(self) -> int:
        """``KVM_GET_MP_STATE``: the vCPU's multiprocessing state (``uapi.KVM_MP_STATE_*``; RUNNABLE at creation).

        An AP created after ``Vm.create_irqchip`` starts UNINITIALIZED; a HLT with an in-kernel local APIC makes
        the vCPU HALTED. Errors: none beyond EBADF once closed.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        ...     vcpu.get_mp_state() == kvmgmem.uapi.KVM_MP_STATE_RUNNABLE
        True
        """
        op = "KVM_GET_MP_STATE"
        self._check_open(op)
        return int(self._get_mp_state().mp_state)

    @abc.abstractmethod
    def _get_mp_state(self) -> uapi.kvm_mp_state:
        """``KVM_GET_MP_STATE`` into a new ``kvm_mp_state``."""

    def set_mp_state(self, mp_state: int) -> None:
        """``KVM_SET_MP_STATE``: set the vCPU's multiprocessing state (``uapi.KVM_MP_STATE_*``).

        ``mp_state`` is a ``uapi.KVM_MP_STATE_*`` value: RUNNABLE always; UNINITIALIZED, INIT_RECEIVED, HALTED,
        SIPI_RECEIVED (stored as INIT_RECEIVED) and AP_RESET_HOLD only with an in-kernel local APIC
        (:meth:`Vm.create_irqchip` before the vCPU). Errors: EINVAL for anything else, including those states
        without a local APIC (``kvm_arch_vcpu_ioctl_set_mpstate``); EBADF once closed.

        >>> import errno, kvmgmem
        >>> from kvmgmem import uapi
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        ...     vcpu.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)
        ...     try:
        ...         vcpu.set_mp_state(uapi.KVM_MP_STATE_HALTED)     # no in-kernel LAPIC
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno])
        EINVAL
        """
        op = "KVM_SET_MP_STATE"
        self._check_open(op)
        self._set_mp_state(uapi.kvm_mp_state(mp_state=u32(mp_state, "mp_state", op)))

    @abc.abstractmethod
    def _set_mp_state(self, state: uapi.kvm_mp_state) -> None:
        """``KVM_SET_MP_STATE`` from ``state``."""

    def get_tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ`` on the vCPU: its virtual TSC frequency in kHz (the VM's default at creation).

        Errors: none beyond EBADF once closed (``kvm_arch_vcpu_ioctl`` reads ``virtual_tsc_khz``).

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        ...     vcpu.get_tsc_khz() == vm.get_tsc_khz() > 0
        True
        """
        op = "KVM_GET_TSC_KHZ"
        self._check_open(op)
        return self._get_tsc_khz()

    @abc.abstractmethod
    def _get_tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ`` on the vCPU fd (the ioctl's return value)."""
