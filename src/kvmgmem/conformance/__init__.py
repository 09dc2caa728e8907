"""The kvmgmem conformance suite: the kernel's guest_memfd selftest cases and the edge cases they skip, as pytest
tests parametrized over the backends.

The case ids are this project's names for the upstream selftests' cases (tools/testing/selftests/kvm/):
- GM-n: ``guest_memfd_test.c`` — KVM_CREATE_GUEST_MEMFD (`kvm_gmem_create`), fallocate (`kvm_gmem_fallocate`),
  the file ops (`kvm_gmem_fops`) and host mmap (`kvm_gmem_mmap`, `kvm_gmem_fault_user_mapping`), in
  virt/kvm/guest_memfd.c;
- SR-n: the guest_memfd parts of ``set_memory_region_test.c`` — KVM_SET_USER_MEMORY_REGION2
  (`__kvm_set_memory_region`, `check_memory_region_flags`) and `kvm_gmem_bind`;
- PK-n: ``x86/private_mem_kvm_exits_test.c`` — KVM_EXIT_MEMORY_FAULT from the x86 fault path
  (`kvm_mmu_faultin_pfn`, `kvm_mmu_prepare_memory_fault_exit`);
- PC-n: ``x86/private_mem_conversions_test.c`` — KVM_HC_MAP_GPA_RANGE exits (`kvm_emulate_hypercall`),
  KVM_SET_MEMORY_ATTRIBUTES (`kvm_vm_ioctl_set_mem_attributes`) and punch-hole.
The other tests cover the errno paths and lifetime rules of the same functions (docs/conformance.md).

Installed with the package so ``kvmgmem selftest`` (or ``pytest --pyargs kvmgmem.conformance``) can check a
kernel — or the sim — without a checkout. ``KVMGMEM_BACKENDS=kvm`` (or ``sim``) restricts the backends.
"""
