"""Low-level unicorn 2.1.x plumbing for the sim's vCPUs: engine setup, CPU-state layout, a native insn hook.

Three things here go below unicorn's Python API, each because the API cannot express what KVM needs:

* **Hidden segment state** (KVM_SET_SREGS semantics). In ``UC_MODE_64`` unicorn's ``reg_write(CS/SS/DS/ES)``
  only stores the selector; the descriptor cache and the CPL (in QEMU's ``hflags``) stay as they were. KVM
  loads base/limit/attributes straight from ``kvm_segment``. We do the same by editing the CPU state through
  ``uc_context_save``/``uc_context_restore``: the context is QEMU's ``CPUX86State`` prefix, and the offsets
  below (``segs[]``, ``hflags``, ``efer``) are verified at runtime against values written through the
  public API (``verify_layout``) — a unicorn with another layout is refused instead of corrupted.
* **Precise stops.** ``emu_stop`` (from a hook or another thread) is honoured only at a translation-block
  boundary, except before an instruction that a ``UC_HOOK_CODE`` hook covers: there unicorn checks for a
  stop request right after calling the hook. The hook's range is evaluated when the block is translated, so
  a hook bounded to one address costs nothing anywhere else; but each run of a hooked instruction calls
  ``helper_uc_tracecode``, which walks *every* code hook of the engine (~2.5 ns each here), so hooks must
  sit only on instructions that end ``emu_start`` anyway (``sites``). ``CodeHooks`` registers 4-byte
  *native* hooks (no Python call): each stores the address of the instruction about to run into a
  per-vCPU slot and, when armed, calls ``uc_emu_stop`` so the engine stops before it. A hook covering every
  instruction would cost three quarters of unicorn's speed (measured ~450 → ~100 M instructions/s for
  ``dec rcx; jnz``); a Python code hook gives ~3 M.
* **No ``until`` address** (``ctl_exits_enabled`` with an empty set), see ``new_engine``.
* **TLB flush**, which the binding has no named wrapper for: ``uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)``.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
from typing import Any

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_TLB_VIRTUAL, Uc, UcError
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_ERR_OK, UC_HOOK_CODE, UC_HOOK_TLB_FILL
from unicorn.unicorn_py3.arch.intel import UcIntel
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import UC_X86_REG_CR4, UC_X86_REG_FS_BASE, UC_X86_REG_GDTR, UC_X86_REG_TR

MSR_EFER = 0xC0000080

# --- CPUX86State layout inside a uc_context (unicorn 2.1.x, x86_64 target) -----------------------------------
# uc_context header: size_t context_size, uc_mode, uc_arch, int snapshot_level, bool ramblock_freed,
# RAMBlock *last_block  -> 40 bytes, then the CPUX86State bytes.
CTX_DATA = 40
OFF_REGS = CTX_DATA + 0  # target_ulong regs[16]
OFF_EIP = CTX_DATA + 128
OFF_EFLAGS = CTX_DATA + 136
OFF_HFLAGS = CTX_DATA + 176  # uint32_t hflags
OFF_SEGS = CTX_DATA + 184  # SegmentCache segs[6]: ES CS SS DS FS GS, then ldt, tr, gdt, idt
SEGCACHE_SIZE = 24  # uint32 selector, pad, uint64 base, uint32 limit, uint32 flags
OFF_CR = CTX_DATA + 424  # target_ulong cr[5]
OFF_EFER = CTX_DATA + 592  # uint64_t efer

# QEMU segment-cache indices
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS, R_LDT, R_TR = range(8)

# QEMU hflags bits (target/i386/cpu.h)
HF_CPL_MASK = 3
HF_CS32_MASK = 1 << 4
HF_SS32_MASK = 1 << 5
HF_ADDSEG_MASK = 1 << 6
HF_PE_MASK = 1 << 7
HF_TF_MASK = 1 << 8
HF_MP_MASK = 1 << 9
HF_EM_MASK = 1 << 10
HF_TS_MASK = 1 << 11
HF_IOPL_MASK = 3 << 12
HF_LMA_MASK = 1 << 14
HF_CS64_MASK = 1 << 15
HF_VM_MASK = 1 << 17
HF_OSFXSR_MASK = 1 << 22

# QEMU descriptor-cache flag bits (the descriptor's high dword)
DESC_TYPE_SHIFT = 8
DESC_S_MASK = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P_MASK = 1 << 15
DESC_AVL_MASK = 1 << 20
DESC_L_SHIFT = 21
DESC_B_SHIFT = 22
DESC_G_MASK = 1 << 23


#: unicorn's ``Uc`` factory returns an ``UcIntel``; its API is only partly visible to type checkers.
Engine = Any


class LayoutError(RuntimeError):
    """The installed unicorn's CPU-state layout is not the one this module was written against."""


class CpuState:
    """A reusable context buffer: ``load()`` snapshots the CPU state, ``store()`` writes it back.

    Field accessors read and patch the raw bytes; only ``store()`` touches the engine.
    """

    def __init__(self, uc: Engine) -> None:
        self._uc = uc
        self._ctx = uc.context_save()
        size = self._ctx.size
        addr = self._ctx.context.value
        if addr is None:  # pragma: no cover - context_save raised otherwise
            raise LayoutError("uc_context_save returned NULL")
        self.buf = (ctypes.c_uint8 * size).from_address(addr)

    def load(self) -> CpuState:
        self._uc.context_update(self._ctx)  # uc_context_save into the existing buffer
        return self

    def store(self) -> None:
        self._uc.context_restore(self._ctx)

    # raw fields
    def u32(self, off: int) -> int:
        return int(struct.unpack_from("<I", self.buf, off)[0])

    def u64(self, off: int) -> int:
        return int(struct.unpack_from("<Q", self.buf, off)[0])

    def set_u32(self, off: int, value: int) -> None:
        struct.pack_into("<I", self.buf, off, value & 0xFFFFFFFF)

    def set_u64(self, off: int, value: int) -> None:
        struct.pack_into("<Q", self.buf, off, value & 0xFFFFFFFFFFFFFFFF)

    @property
    def hflags(self) -> int:
        return self.u32(OFF_HFLAGS)

    @property
    def cpl(self) -> int:
        return self.hflags & HF_CPL_MASK

    def cr(self, n: int) -> int:
        return self.u64(OFF_CR + 8 * n)

    @property
    def efer(self) -> int:
        return self.u64(OFF_EFER)

    @property
    def eflags(self) -> int:
        return self.u64(OFF_EFLAGS)

    def segment(self, index: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of segment cache ``index`` (R_ES ... R_TR)."""
        sel, _pad, base, limit, flags = struct.unpack_from("<IIQII", self.buf, OFF_SEGS + SEGCACHE_SIZE * index)
        return sel & 0xFFFF, base, limit, flags

    def set_segment(self, index: int, selector: int, base: int, limit: int, flags: int) -> None:
        struct.pack_into(
            "<IIQII",
            self.buf,
            OFF_SEGS + SEGCACHE_SIZE * index,
            selector & 0xFFFF,
            0,
            base & 0xFFFFFFFFFFFFFFFF,
            limit & 0xFFFFFFFF,
            flags & 0xFFFFFFFF,
        )


def compute_hflags(state: CpuState) -> int:
    """QEMU's ``x86_update_hflags`` over the (patched) state: CPL from SS.DPL, code size from CS.L/D."""
    keep = ~(
        HF_CPL_MASK | HF_PE_MASK | HF_MP_MASK | HF_EM_MASK | HF_TS_MASK | HF_TF_MASK | HF_VM_MASK
        | HF_IOPL_MASK | HF_OSFXSR_MASK | HF_LMA_MASK | HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK
        | HF_ADDSEG_MASK
    )  # fmt: skip
    hflags = state.hflags & keep
    _, ss_base, _, ss_flags = state.segment(R_SS)
    _, _, _, cs_flags = state.segment(R_CS)
    cr0, cr4, efer, eflags = state.cr(0), state.cr(4), state.efer, state.eflags
    hflags |= (ss_flags >> DESC_DPL_SHIFT) & HF_CPL_MASK
    hflags |= (cr0 & 1) << 7  # PE
    hflags |= (cr0 << (9 - 1)) & (HF_MP_MASK | HF_EM_MASK | HF_TS_MASK)
    hflags |= eflags & (HF_TF_MASK | HF_VM_MASK | HF_IOPL_MASK)
    if cr4 & (1 << 9):  # OSFXSR
        hflags |= HF_OSFXSR_MASK
    if efer & (1 << 10):  # LMA
        hflags |= HF_LMA_MASK
    if (hflags & HF_LMA_MASK) and (cs_flags >> DESC_L_SHIFT) & 1:
        hflags |= HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK
    else:
        hflags |= ((cs_flags >> DESC_B_SHIFT) & 1) << 4
        hflags |= ((ss_flags >> DESC_B_SHIFT) & 1) << 5
        if not (cr0 & 1) or (eflags & HF_VM_MASK) or not (hflags & HF_CS32_MASK):
            hflags |= HF_ADDSEG_MASK
        else:
            ds_base = state.segment(R_DS)[1]
            es_base = state.segment(R_ES)[1]
            hflags |= int((ds_base | es_base | ss_base) != 0) << 6
    return hflags


def verify_layout(uc: Engine) -> None:
    """Check the offsets above against values written through unicorn's public API (on a scratch engine)."""
    uc.reg_write(UC_X86_REG_FS_BASE, 0x1122334455667788)
    uc.reg_write(UC_X86_REG_GDTR, (0, 0x0BADC0DE000, 0x57, 0))
    uc.reg_write(UC_X86_REG_TR, (0x28, 0x0FEEDF00D000, 0x67, 0x8B00))
    uc.msr_write(MSR_EFER, 0xD01)
    st = CpuState(uc).load()
    problems = []
    if st.segment(R_FS)[1] != 0x1122334455667788:
        problems.append("segs[FS].base")
    if st.u64(OFF_SEGS + SEGCACHE_SIZE * 8 + 8) != 0x0BADC0DE000:
        problems.append("gdt.base")
    if st.segment(R_TR) != (0x28, 0x0FEEDF00D000, 0x67, 0x8B00):
        problems.append("tr")
    if st.cr(4) != uc.reg_read(UC_X86_REG_CR4):
        problems.append("cr[4]")
    if st.efer != 0xD01:
        problems.append("efer")
    if not st.hflags & HF_CS64_MASK:
        problems.append("hflags")
    if problems:
        raise LayoutError(f"unsupported unicorn CPU-state layout ({', '.join(problems)} mismatch)")


_layout_lock = threading.Lock()
_layout_checked = False


def ensure_layout() -> None:
    global _layout_checked
    with _layout_lock:
        if not _layout_checked:
            scratch = Uc(UC_ARCH_X86, UC_MODE_64)
            try:
                verify_layout(scratch)
            finally:
                del scratch
            _layout_checked = True


# --- the native bounded code hooks --------------------------------------------------------------------------

# cb(uc, address, size, user_data) with user_data -> HookRecord {u64 *slot; u64 stop}:
#   mov rax, [rcx]; mov [rax], rsi; cmp qword [rcx+8], 0; jne 1f; ret; 1: jmp [rip+0] -> uc_emu_stop(uc)
_STUB_HEAD = bytes.fromhex("488b01" "488930" "4883790800" "7501" "c3" "ff2500000000")  # fmt: skip
_stub_lock = threading.Lock()
_stub_page: mmap.mmap | None = None  # never unmapped: every engine may call into it until it is closed
_stub_addr = 0


def _native_stub() -> int:
    global _stub_page, _stub_addr
    with _stub_lock:
        if _stub_page is None:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            page = mmap.mmap(-1, mmap.PAGESIZE, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
            code = _STUB_HEAD + struct.pack("<Q", emu_stop or 0)
            page[: len(code)] = code
            _stub_addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
            _stub_page = page
        return _stub_addr


# unicorn 2.1.x ``struct hook``: int type, insn, refs, op, op_flags; bool to_delete; uint64_t begin, end;
# void *callback, *user_data (the handle uc_hook_add returns is its address); checked by CodeHooks._verify.
HOOK_BEGIN, HOOK_END, HOOK_CALLBACK, HOOK_USER_DATA = 24, 32, 40, 48
#: where a retired hook points: non-canonical, so no instruction ever starts there
RETIRED = 0xDEAD_0000_0000_0000
_RECORDS_PER_CHUNK = 256


class CodeHooks:
    """The native code hooks of one engine, each bounded to one address, reused instead of deleted.

    Every hook runs the same 4-instruction stub: it stores the address into the shared ``slot`` and, if its
    record's ``stop`` word is set, tail-calls ``uc_emu_stop`` so the engine stops *before* the instruction.
    Why a pool: unicorn's ``helper_uc_tracecode`` walks the whole UC_HOOK_CODE list on every hooked
    instruction it runs, and ``uc_hook_del`` invalidates the hook's translated blocks through a fetch TLB
    fill outside the CPU loop (which our fill hook may refuse: a longjmp into a dead frame). So a hook is
    never deleted; ``retire`` moves its bounds to a non-canonical address (the next translation of the
    old address no longer calls it) and ``place`` reuses retired hooks, which keeps the list as short as the
    set of live addresses. Moving bounds writes unicorn's ``struct hook`` in place; its layout is checked
    on the first hook, and without it hooks are only disarmed (``stop`` cleared), never moved.
    """

    def __init__(self, uc: Engine) -> None:
        self._uc = uc
        self.slot = ctypes.c_uint64(0)
        self._chunks: list[Any] = []  # ctypes arrays of records: referenced by the engine, never freed
        self._records: list[int] = []  # hook id -> address of its (slot, stop) record
        self._handles: list[int] = []  # hook id -> struct hook address
        self._free: list[int] = []
        self.movable: bool | None = None  # None until the first hook has been checked

    def __len__(self) -> int:
        """Hooks in the engine's code-hook list (live and retired)."""
        return len(self._handles)

    def place(self, address: int, stop: bool) -> int:
        """A hook on ``address`` (a retired one moved there if possible); returns its id."""
        if self._free:
            hid = self._free.pop()
            self._set_stop(hid, stop)
            self._bounds(hid, address)
            return hid
        return self._add(address, stop)

    def set_stop(self, hid: int, stop: bool) -> None:
        self._set_stop(hid, stop)

    def retire(self, hid: int) -> None:
        """Stop calling hook ``hid`` from newly translated code (and reuse it later, if hooks can move)."""
        self._set_stop(hid, False)
        if self.movable:
            self._bounds(hid, RETIRED)
            self._free.append(hid)

    def bounds(self, hid: int) -> tuple[int, int]:
        h = self._handles[hid]
        return _u64(h + HOOK_BEGIN), _u64(h + HOOK_END)

    def _set_stop(self, hid: int, stop: bool) -> None:
        ctypes.c_uint64.from_address(self._records[hid] + 8).value = int(stop)

    def _bounds(self, hid: int, address: int) -> None:
        h = self._handles[hid]
        ctypes.c_uint64.from_address(h + HOOK_BEGIN).value = address
        ctypes.c_uint64.from_address(h + HOOK_END).value = address

    def _add(self, address: int, stop: bool) -> int:
        hid = len(self._handles)
        if hid % _RECORDS_PER_CHUNK == 0:
            self._chunks.append((ctypes.c_uint64 * (2 * _RECORDS_PER_CHUNK))())
        record = ctypes.addressof(self._chunks[-1]) + 16 * (hid % _RECORDS_PER_CHUNK)
        ctypes.c_uint64.from_address(record).value = ctypes.addressof(self.slot)
        ctypes.c_uint64.from_address(record + 8).value = int(stop)
        handle = ctypes.c_size_t()
        stub, bound = ctypes.c_void_p(_native_stub()), ctypes.c_uint64(address)
        err = uclib.uc_hook_add(self._uc._uch, ctypes.byref(handle), UC_HOOK_CODE, stub, ctypes.c_void_p(record),
                                bound, bound)  # fmt: skip
        if err != UC_ERR_OK:  # pragma: no cover - only on a broken unicorn
            raise LayoutError(f"uc_hook_add(native code hook) failed: {err}")
        self._records.append(record)
        self._handles.append(handle.value)
        if self.movable is None:
            self.movable = self._verify(handle.value, address, record)
        return hid

    @staticmethod
    def _verify(handle: int, address: int, record: int) -> bool:
        """Whether ``struct hook`` has the fields we move where we expect them (else hooks stay put)."""
        seen = (_u64(handle + HOOK_BEGIN), _u64(handle + HOOK_END), _u64(handle + HOOK_CALLBACK),
                _u64(handle + HOOK_USER_DATA))  # fmt: skip
        return seen == (address, address, _native_stub(), record)


def _u64(address: int) -> int:
    return int(ctypes.c_uint64.from_address(address).value)


# uc_context_save (and the engine's other short calls, ``GilEngine``) through a PyDLL: the call is ~0.3 µs, so
# releasing and re-taking the GIL around it (what a CDLL call does) would cost more than the call and let
# another thread in mid-fill.
_pylib = ctypes.PyDLL(uclib._name)
_pylib.uc_context_save.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
_pylib.uc_context_save.restype = ctypes.c_int
for _name in ("uc_reg_read", "uc_reg_write", "uc_reg_read_batch", "uc_reg_write_batch", "uc_emu_stop",
              "uc_context_restore", "uc_ctl"):  # fmt: skip
    _src, _dst = getattr(uclib, _name), getattr(_pylib, _name)
    _dst.argtypes, _dst.restype = _src.argtypes, _src.restype


class GilEngine(UcIntel):
    """A unicorn x86 engine whose short calls keep the GIL; only ``emu_start`` (guest code) releases it.

    Why: the binding calls libunicorn through a ``CDLL``, which drops the GIL around every call. For a
    register read or a TLB flush (well under a microsecond) that is pure cost once other vCPU threads wait
    for the GIL: each drop wakes one of them (a futex call) and may hand it the GIL, so the vCPU waits out that
    thread's Python before its own 0.1 µs call returns — and if it held a lock meanwhile (a vCPU's request
    lock around ``emu_stop`` or a TLB flush), every thread wanting that lock queues behind it too. Measured
    on bench 7's implicit conversions with 4 vCPUs: ~6 such drops per conversion. Same calls, same argument
    types and errors as the binding (only the ``_do_*`` primitives and the stop/restore/ctl entry points
    change which library object they go through); ``emu_start`` keeps the binding's GIL release, so guest
    code of several vCPUs runs in parallel."""

    def __new__(cls, arch: int, mode: int, cpu: int | None = None) -> GilEngine:
        return object.__new__(cls)  # Uc.__new__ would return a plain UcIntel for UC_ARCH_X86

    def _do_reg_read(self, reg_id: int, reg_obj: Any) -> int:
        return int(_pylib.uc_reg_read(self._uch, reg_id, reg_obj))

    def _do_reg_write(self, reg_id: int, reg_obj: Any) -> int:
        return int(_pylib.uc_reg_write(self._uch, reg_id, reg_obj))

    def _do_reg_read_batch(self, reglist: Any, vallist: Any, count: int) -> int:
        return int(_pylib.uc_reg_read_batch(self._uch, reglist, vallist, count))

    def _do_reg_write_batch(self, reglist: Any, vallist: Any, count: int) -> int:
        return int(_pylib.uc_reg_write_batch(self._uch, reglist, vallist, count))

    def emu_stop(self) -> None:
        status = _pylib.uc_emu_stop(self._uch)
        if status != UC_ERR_OK:
            raise UcError(status)

    def context_update(self, context: Any) -> None:
        status = _pylib.uc_context_save(self._uch, context.context)
        if status != UC_ERR_OK:
            raise UcError(status)

    def context_restore(self, context: Any) -> None:
        status = _pylib.uc_context_restore(self._uch, context.context)
        if status != UC_ERR_OK:
            raise UcError(status)

    def ctl(self, ctl: int, op: int, *args: Any) -> None:
        code = (op << 30) | (len(args) << 26) | ctl  # the binding's encoding (Uc.__ctl_encode)
        status = _pylib.uc_ctl(self._uch, code, *args)
        if status != UC_ERR_OK:
            raise UcError(status)


def new_engine() -> Engine:
    """A ``UC_MODE_64`` engine in virtual-TLB mode (our TLB-fill hook is the only address translation)."""
    ensure_layout()
    uc: Engine = GilEngine(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    # Use the (empty) exit-address set instead of emu_start's ``until``: after every emu_start unicorn
    # invalidates the code at ``until - 1`` through a *fetch TLB fill*, i.e. it would call our hook for a
    # made-up address after the CPU loop has ended (a refusal there longjmps into a dead frame).
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    return uc


def tlb_flush(uc: Engine) -> None:
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)


class PageFlush:
    """Drops single pages from one engine's TLB: QEMU's ``tlb_flush_page`` on the engine's CPU.

    Why: unicorn's API only flushes the whole TLB (``UC_CTL_TLB_FLUSH``), so a vCPU that must forget one
    zapped gfn refilled every page it used next — its code page through the full walk and code scan, its
    stack, its data — a Python callback each. libunicorn exports QEMU's own ``tlb_flush_page_x86_64(cpu,
    vaddr)`` (synchronous for the calling CPU: every MMU index, the victim TLB and the jump cache of that
    page) and ``qemu_get_cpu_x86_64(uc, index)``, which returns the engine's one CPU if ``index`` is its
    index (NULL otherwise, checked before any flush). ``available`` is False
    when either symbol is missing (another unicorn build): callers then flush everything, as before."""

    def __init__(self, uc: Engine) -> None:
        self.cpu = 0
        flush = getattr(_pylib, "tlb_flush_page_x86_64", None)
        get_cpu = getattr(_pylib, "qemu_get_cpu_x86_64", None)
        if flush is None or get_cpu is None or getattr(uc, "_uch", None) is None:  # no symbol, or not an engine
            return
        uc.reg_read(UC_X86_REG_CR4)  # the engine creates its CPU on first use: make sure it exists
        get_cpu.argtypes, get_cpu.restype = (ctypes.c_void_p, ctypes.c_int), ctypes.c_void_p
        flush.argtypes, flush.restype = (ctypes.c_void_p, ctypes.c_uint64), None
        # unicorn leaves the CPU's index unassigned (QEMU's UNASSIGNED_CPU_INDEX, -1); 0 is what QEMU would give
        self.cpu = get_cpu(uc._uch, -1) or get_cpu(uc._uch, 0) or 0
        self._flush = flush

    @property
    def available(self) -> bool:
        return self.cpu != 0

    def __call__(self, vaddr: int) -> None:
        """Drop the 4 KiB page at ``vaddr`` (engine stopped, on its own thread)."""
        self._flush(self.cpu, vaddr)


# --- the TLB-fill hook without the binding's wrappers -------------------------------------------------------

#: ``bool cb(uc_engine *uc, uint64_t vaddr, uc_mem_type type, uc_tlb_entry *result, void *user_data)``; the
#: entry is passed as a plain address (one ``from_address`` per fill instead of a pointer object's contents).
TLB_FILL_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_void_p)  # fmt: skip


class TlbEntry(ctypes.Structure):
    """unicorn's ``uc_tlb_entry``: what the fill hook hands back (window address and UC_PROT_* bits)."""

    _fields_ = (("paddr", ctypes.c_uint64), ("perms", ctypes.c_uint32))


def add_tlb_fill_hook(uc: Engine, callback: Any) -> Any:
    """Register ``callback(uch, vaddr, access, entry_address, user_data) -> bool`` as the engine's TLB-fill
    hook, straight through ctypes: the binding's hook_add wraps it in two more Python frames and a pointer
    dereference per fill, a third of a warm refill. The callback must guard itself as the binding's wrapper
    does (record an exception in ``uc._hook_exception``, which ``emu_start`` re-raises, stop the engine and
    return False): an exception escaping a ctypes callback is only printed. Returns the C callback; keep it
    alive with the engine."""
    cfunc = TLB_FILL_CFUNC(callback)
    handle = ctypes.c_size_t()
    err = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_TLB_FILL, ctypes.cast(cfunc, ctypes.c_void_p),
                            None, ctypes.c_uint64(1), ctypes.c_uint64(0))  # fmt: skip
    if err != UC_ERR_OK:  # pragma: no cover - only on a broken unicorn
        raise LayoutError(f"uc_hook_add(TLB fill) failed: {err}")
    return cfunc


class PagingView:
    """A private context buffer of one engine for the TLB-fill fast path: ``load()`` snapshots the CPU state
    with the GIL held, and ``q`` indexes it as u64s (the control registers a page walk needs)."""

    CR0 = (OFF_CR) // 8
    CR3 = (OFF_CR + 24) // 8
    CR4 = (OFF_CR + 32) // 8
    EFER = OFF_EFER // 8
    EFLAGS = OFF_EFLAGS // 8
    HFLAGS = OFF_HFLAGS // 8  # low half is hflags (little endian)

    def __init__(self, uc: Engine) -> None:
        self._ctx = uc.context_save()  # owns the buffer
        addr = self._ctx.context.value
        if addr is None:  # pragma: no cover
            raise LayoutError("uc_context_save returned NULL")
        self._uch = uc._uch.value if isinstance(uc._uch, ctypes.c_void_p) else uc._uch
        self._addr = addr
        self.address = addr  # of the saved state (for the C walk)
        self._array = (ctypes.c_uint64 * (self._ctx.size // 8)).from_address(addr)
        self.q = memoryview(self._array).cast("B").cast("Q")  # indexing a memoryview is ~2× a ctypes array
        self._save = _pylib.uc_context_save

    def load(self) -> Any:
        self._save(self._uch, self._addr)
        return self.q
