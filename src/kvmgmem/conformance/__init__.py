"""The kvmgmem conformance suite: the kernel's guest_memfd selftest cases (spec §4: GM-n, SR-n, PK-n, PC-n)
and the spec §2 edge cases, as pytest tests parametrized over the backends.

Installed with the package so ``kvmgmem selftest`` (or ``pytest --pyargs kvmgmem.conformance``) can check a
kernel — or the sim — without a checkout. ``KVMGMEM_BACKENDS=kvm`` (or ``sim``) restricts the backends.
"""
