"""Image pieces without a VM: page tables, descriptors, layout, and the boot state handed to a vCPU."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable
from typing import Any, cast

import pytest

from kvmgmem import uapi
from kvmgmem.api import Vcpu
from kvmgmem.guest import PAGE_1G, PAGE_2M, PAGE_4K, Asm, GuestImage
from kvmgmem.guest import descriptors as D
from kvmgmem.guest import paging as P
from kvmgmem.guest import ucall as U

GiB = 1 << 30


def _entry(data: bytes, table_off: int, index: int) -> int:
    value: int = struct.unpack_from("<Q", data, table_off + 8 * index)[0]
    return value


def test_2m_identity_map_of_512_gib() -> None:
    pt = P.build(0x200000, 512 * GiB, PAGE_2M)
    assert pt.size == P.table_bytes(512 * GiB, PAGE_2M) == (1 + 1 + 512) * 4096
    assert _entry(pt.data, 0, 0) == 0x201000 | 3  # PML4[0] -> PDPT
    assert _entry(pt.data, 0, 1) == 0  # nothing beyond 512 GiB
    assert _entry(pt.data, 4096, 511) == (0x202000 + 511 * 4096) | 3  # PDPT[511] -> last PD
    last_pd = 4096 * (2 + 511)
    assert _entry(pt.data, last_pd, 511) == (512 * GiB - (2 << 20)) | 0x83  # identity, PS
    assert all(e & P.PTE_US == 0 for e in struct.unpack_from("<4Q", pt.data, 0))


def test_user_bit_at_every_level_and_other_page_sizes() -> None:
    pt = P.build(0, 8 * GiB, PAGE_1G, user=True)
    assert pt.size == 2 * 4096
    assert _entry(pt.data, 0, 0) == 0x1000 | 7
    assert _entry(pt.data, 4096, 5) == 5 * GiB | 0x87
    small = P.build(0, 4 << 20, PAGE_4K, user=True)
    assert small.size == P.table_bytes(4 << 20, PAGE_4K) == 5 * 4096  # PML4, PDPT, PD, 2 PTs
    assert _entry(small.data, 3 * 4096, 3) == 3 * 4096 | 7  # 4 KiB leaves, no PS


@pytest.mark.parametrize(
    ("reach", "size"), [(0, PAGE_2M), (3 << 20, PAGE_2M), (8 * GiB, PAGE_4K), (1 << 48, PAGE_1G), (GiB, 12345)]
)
def test_bad_page_table_requests(reach: int, size: int) -> None:
    with pytest.raises(ValueError):
        P.build(0, reach, size)


def test_gdt_tss_idt_encodings() -> None:
    gdt = D.gdt([(0x12000, 0x3000)])
    entries = struct.unpack_from("<8Q", gdt)
    assert entries[1] == 0x00AF9A000000FFFF and entries[2] == 0x00CF92000000FFFF  # code64, data: measured working here
    assert entries[5] == 0x00CFF2000000FFFF and entries[6] == 0x00AFFA000000FFFF  # DPL3 data / code
    low, high = struct.unpack_from("<QQ", gdt, D.TSS_FIRST)
    assert (low & 0xFFFF, (low >> 16) & 0xFFFFFF, (low >> 40) & 0xFF, high) == (0x3000, 0x12000, 0x8B, 0)
    tss = D.tss(0x70000, 0x1000)
    assert struct.unpack_from("<Q", tss, 4)[0] == 0x70000 and struct.unpack_from("<H", tss, 0x66)[0] == 0x1000
    idt = D.idt({3: 0x1234_5678_9ABC, 6: 0x4000})
    lo, sel, _, attr, mid, hi = struct.unpack_from("<HHBBHI", idt, 3 * 16)
    assert (lo | mid << 16 | hi << 32, sel, attr) == (0x1234_5678_9ABC, D.KERNEL_CS, 0xEE)  # DPL3 for int3
    assert struct.unpack_from("<HHBB", idt, 6 * 16)[3] == 0x8E
    assert idt[7 * 16 : 8 * 16] == bytes(16)  # absent vector
    assert D.io_bitmap()[-1] == 0xFF and not any(D.io_bitmap()[:-1])


def _image(**kw: Any) -> GuestImage:
    a = Asm()
    U.sync(a, 1)
    U.done(a)
    return GuestImage(a, **kw)


def test_layout_is_disjoint_and_below_4_gib() -> None:
    image = _image(nvcpus=3, user=True)
    segs = sorted(image.segments())
    for (g1, b1), (g2, _) in itertools.pairwise(segs):
        assert g1 + len(b1) <= g2
    assert image.base <= segs[0][0] and segs[-1][0] + len(segs[-1][1]) == image.end < 1 << 32
    stacks = [(a.kstack_top, a.stack_top) for a in image.areas]
    assert all(k % 16 == 0 and s % 16 == 0 for k, s in stacks)
    assert len({a.data for a in image.areas}) == 3
    assert image.end <= image.tables.base + image.tables.size


def test_image_must_fit_in_its_reach() -> None:
    with pytest.raises(ValueError, match="beyond the mapped reach"):
        _image(base=2 << 20, reach=2 << 20)


def test_load_writes_through_any_buffer() -> None:
    image = _image()
    buf = bytearray(image.end)
    image.load(buf, 0)
    code = image.program.code
    assert buf[image.code : image.code + len(code)] == code
    high = bytearray(image.end - image.base)
    image.load(high, image.base)  # a buffer that starts at the image base
    assert high == buf[image.base :]


class _FakeVcpu:
    """Records what setup_vcpu hands to a vCPU."""

    def __init__(self) -> None:
        self.sregs = uapi.kvm_sregs()
        self.regs: uapi.kvm_regs | None = None
        self.cpuid_calls: list[Iterable[uapi.kvm_cpuid_entry2] | None] = []

    def set_cpuid(self, entries: Iterable[uapi.kvm_cpuid_entry2] | None = None) -> None:
        self.cpuid_calls.append(entries)

    def get_sregs(self) -> uapi.kvm_sregs:
        return self.sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        self.sregs = sregs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        self.regs = regs


@pytest.mark.parametrize("user", [False, True])
def test_setup_vcpu_boot_state(user: bool) -> None:
    image = _image(nvcpus=2, user=user)
    fake = _FakeVcpu()
    image.setup_vcpu(cast(Vcpu, fake), 1, args=(5, 6))
    s, r = fake.sregs, fake.regs
    assert r is not None and fake.cpuid_calls == [None]  # the system's supported CPUID
    assert (s.cr0, s.cr3, s.cr4, s.efer) == (0x80050033, image.tables.cr3, 0x620, 0x500)
    assert (s.cs.selector, s.cs.l, s.cs.type, s.ss.selector) == (D.KERNEL_CS, 1, 0xB, D.KERNEL_DS)
    area = image.area(1)
    assert (s.tr.selector, s.tr.base, s.tr.limit, s.tr.type) == (D.tss_selector(1), area.tss, area.tss_limit, 11)
    assert (s.gdt.base, s.idt.base, s.idt.limit) == (image.gdt, image.idt, 4095)
    assert (r.rdi, r.rsi, r.rdx, r.rcx, r.rflags) == (1, area.data, 5, 6, 2)
    entry = image.address("main")
    if user:
        assert (r.rip, r.rsp, r.r12, r.r13) == (
            image.program.address("enter_user"),
            area.kstack_top,
            entry,
            area.stack_top,
        )
    else:
        assert (r.rip, r.rsp) == (entry, area.stack_top)
