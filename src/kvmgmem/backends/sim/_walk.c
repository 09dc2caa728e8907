/* The sim's TLB-fill fast walk in C (optional; cpu/fastwalk.py has the pure-Python fallback it must agree with).
 *
 * Why: a warm TLB refill is the sim's most frequent fill, and in Python the four-level walk is half of it.
 * This is the same plain-case walk as cpu.fastwalk.fast_walk_py: paging on, canonical address, every entry
 * present and cached, no reserved bits, access allowed; anything else returns None and the caller takes the
 * full walk (cpu.pagewalk.walk), which decides #PF, exits and caching.
 *
 * walk(ctx, tables, va, mask, c_bit, write) -> (gpa_page, writable, private) | None
 *   ctx    address of a uc_context buffer just saved (CPUX86State fields at the offsets set_layout gave)
 *   tables dict: table gpa -> host address of that 4 KiB page-table page (live store memory: the caller
 *          holds the vCPU's request lock with no request pending)
 *   mask   frame bits of an entry (without the private access bit); c_bit that bit or 0
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static Py_ssize_t off_cr, off_efer, off_eflags, off_hflags;
static int layout_set;

#define PTE_P (1ULL << 0)
#define PTE_RW (1ULL << 1)
#define PTE_US (1ULL << 2)
#define PTE_PS (1ULL << 7)
#define PTE_NX (1ULL << 63)
#define CR0_PG (1ULL << 31)
#define CR0_WP (1ULL << 16)
#define CR4_SMAP (1ULL << 21)
#define EFER_NXE (1ULL << 11)
#define EFLAGS_AC (1ULL << 18)

static uint64_t rd64(uintptr_t addr) {
    uint64_t v;
    memcpy(&v, (const void *)addr, 8);
    return v;
}

/* The table page at gpa `table`, or 0 when it is not cached (or on a lookup error, cleared). */
static uintptr_t table_page(PyObject *tables, uint64_t table) {
    PyObject *key = PyLong_FromUnsignedLongLong(table);
    if (key == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *host = PyDict_GetItemWithError(tables, key);
    Py_DECREF(key);
    if (host == NULL) {
        PyErr_Clear();
        return 0;
    }
    uintptr_t addr = (uintptr_t)PyLong_AsUnsignedLongLong(host);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return addr;
}

static PyObject *walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "walk(ctx, tables: dict, va, mask, c_bit, write)");
        return NULL;
    }
    if (!layout_set) {
        PyErr_SetString(PyExc_RuntimeError, "set_layout() first");
        return NULL;
    }
    uintptr_t ctx = (uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    uint64_t va = PyLong_AsUnsignedLongLong(args[2]);
    uint64_t mask = PyLong_AsUnsignedLongLong(args[3]);
    uint64_t c_bit = PyLong_AsUnsignedLongLong(args[4]);
    int write = PyObject_IsTrue(args[5]);
    if (PyErr_Occurred() || write < 0)
        return NULL;
    PyObject *tables = args[1];

    uint64_t cr0 = rd64(ctx + off_cr), cr3 = rd64(ctx + off_cr + 24), cr4 = rd64(ctx + off_cr + 32);
    uint64_t efer = rd64(ctx + off_efer), eflags = rd64(ctx + off_eflags);
    uint32_t hflags;
    memcpy(&hflags, (const void *)(ctx + off_hflags), 4);
    if (!(cr0 & CR0_PG))
        Py_RETURN_NONE;
    uint64_t top = va >> 47;
    if (top && top != 0x1FFFF)
        Py_RETURN_NONE;
    int nxe = (efer & EFER_NXE) != 0;

    uint64_t table = cr3 & mask, pte = 0, acc = PTE_RW | PTE_US, gpa_page = 0;
    for (int shift = 39;; shift -= 9) {
        uintptr_t page = table_page(tables, table);
        if (!page)
            Py_RETURN_NONE;
        pte = rd64(page + ((va >> shift) & 0x1FF) * 8);
        if (!(pte & PTE_P) || ((pte & PTE_NX) && !nxe))
            Py_RETURN_NONE;
        acc &= pte;
        if (shift == 12) {
            gpa_page = pte & mask;
            break;
        }
        if (pte & PTE_PS) {
            if (shift == 39)
                Py_RETURN_NONE;
            uint64_t size = 1ULL << shift;
            if (pte & mask & (size - 1) & ~0x1000ULL)
                Py_RETURN_NONE; /* reserved bits below the frame: #PF(RSVD), the full walk reports it */
            gpa_page = (pte & mask & ~(size - 1)) | (va & (size - 1) & ~0xFFFULL);
            break;
        }
        table = pte & mask;
    }
    int writable;
    if ((hflags & 3) == 3) {
        if (!(acc & PTE_US))
            Py_RETURN_NONE;
        writable = (acc & PTE_RW) != 0;
    } else {
        if ((acc & PTE_US) && (cr4 & CR4_SMAP) && !(eflags & EFLAGS_AC))
            Py_RETURN_NONE;
        writable = (acc & PTE_RW) || !(cr0 & CR0_WP);
    }
    if (write && !writable)
        Py_RETURN_NONE;
    PyObject *private_ = c_bit ? PyBool_FromLong((pte & c_bit) != 0) : Py_NewRef(Py_None);
    return Py_BuildValue("(KNN)", (unsigned long long)gpa_page, PyBool_FromLong(writable), private_);
}

static PyObject *set_layout(PyObject *self, PyObject *args) {
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnn", &off_cr, &off_efer, &off_eflags, &off_hflags))
        return NULL;
    layout_set = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL, "The fill fast path's page walk (see the source)."},
    {"set_layout", set_layout, METH_VARARGS, "set_layout(off_cr, off_efer, off_eflags, off_hflags)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_walk", "The sim's TLB-fill fast walk.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__walk(void) { return PyModule_Create(&module); }
