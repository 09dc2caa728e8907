/*
 * kvmgmem.backends.kvm._run: KVM_RUN and the hot part of exit decoding, in C.
 *
 * Why this exists: a vCPU exit round trip through ctypes plus a Python-built IoExit costs 1.2-1.5 us more than
 * a C KVM_RUN loop, which is 15% of a round trip when the guest runs at CPL0 under KVM's emulator. This module
 * does the ioctl without argument conversion, with the GIL released (so vCPU threads run in parallel and a
 * kick signal makes KVM_RUN return EINTR to us), and builds the IoExit directly for KVM_EXIT_IO, the exit a
 * VMM's loop sees most. Everything else stays in Python (vcpu.py): this returns the raw exit reason for other
 * exits and -errno for failures, and Python decodes those exactly as the pure-Python path does.
 *
 * A Runner owns its own MAP_SHARED mapping of the vCPU's kvm_run page (separate from the mmap.mmap Python uses
 * for completions and kicks; both map the same page), so no Python buffer export is held across calls and
 * the mapping cannot go away while C reads it: close() refuses while run() is inside KVM_RUN.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/kvm.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

typedef struct {
    PyObject_HEAD
    int fd;               /* the vCPU fd (not owned: the Python KvmVcpu closes it) */
    int running;          /* inside run(), GIL released: close() and a second run() are refused */
    struct kvm_run *run;  /* our mapping of kvm_run, NULL once closed */
    size_t size;          /* its length (KVM_GET_VCPU_MMAP_SIZE) */
    PyObject *io_exit;    /* the kvmgmem.exits.IoExit class */
} Runner;

/* Interned attribute names of IoExit, created once at module init. */
static PyObject *s_direction, *s_port, *s_size, *s_count, *s_data;

static int
Runner_init(Runner *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "size", "io_exit", NULL};
    int fd;
    Py_ssize_t size;
    PyObject *io_exit;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "inO!:Runner", kwlist, &fd, &size, &PyType_Type, &io_exit))
        return -1;
    if (self->run != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Runner already initialised");
        return -1;
    }
    if (size < (Py_ssize_t)sizeof(struct kvm_run)) {
        PyErr_Format(PyExc_ValueError, "kvm_run mapping size %zd is smaller than struct kvm_run (%zu)", size,
                     sizeof(struct kvm_run));
        return -1;
    }
    void *map = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->fd = fd;
    self->run = map;
    self->size = (size_t)size;
    Py_INCREF(io_exit);
    Py_XSETREF(self->io_exit, io_exit);
    return 0;
}

static void
Runner_unmap(Runner *self)
{
    if (self->run != NULL) {
        munmap(self->run, self->size);
        self->run = NULL;
    }
}

static void
Runner_dealloc(Runner *self)
{
    /* running is only set while a run() call holds a reference to self, so it is 0 here. */
    Runner_unmap(self);
    Py_CLEAR(self->io_exit);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* IoExit(direction, port, size, count, data) without the frozen dataclass __init__: object.__new__ plus a
 * generic setattr per field, which is what make_io_exit does in Python; the result is an ordinary, equal,
 * still-frozen instance. */
static PyObject *
make_io_exit(Runner *self, const struct kvm_run *run)
{
    size_t length = (size_t)run->io.size * run->io.count;
    size_t offset = run->io.data_offset;
    /* Clamp like the Python slice kvm_run[offset:offset + length] does (the kernel keeps it in range). */
    if (offset > self->size)
        offset = self->size;
    if (length > self->size - offset)
        length = self->size - offset;

    PyTypeObject *type = (PyTypeObject *)self->io_exit;
    PyObject *exit = type->tp_alloc(type, 0);
    if (exit == NULL)
        return NULL;
    PyObject *values[5];
    values[0] = PyLong_FromLong(run->io.direction);
    values[1] = PyLong_FromLong(run->io.port);
    values[2] = PyLong_FromLong(run->io.size);
    values[3] = PyLong_FromUnsignedLong(run->io.count);
    values[4] = PyBytes_FromStringAndSize((const char *)run + offset, (Py_ssize_t)length);
    PyObject *names[5] = {s_direction, s_port, s_size, s_count, s_data};
    int failed = 0;
    for (int i = 0; i < 5; i++) {
        if (values[i] == NULL || (!failed && PyObject_GenericSetAttr(exit, names[i], values[i]) < 0))
            failed = 1;
    }
    for (int i = 0; i < 5; i++)
        Py_XDECREF(values[i]);
    if (failed) {
        Py_DECREF(exit);
        return NULL;
    }
    return exit;
}

PyDoc_STRVAR(Runner_run_doc,
"run() -> IoExit | int\n\n"
"One KVM_RUN with the GIL released. Returns an IoExit for KVM_EXIT_IO, the exit reason (>= 0) for any\n"
"other exit, or -errno if KVM_RUN failed (the caller tells memory faults and EINTR from errors).");

static PyObject *
Runner_run(Runner *self, PyObject *Py_UNUSED(ignored))
{
    if (self->run == NULL) {
        PyErr_SetString(PyExc_ValueError, "KVM_RUN on a closed Runner");
        return NULL;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "KVM_RUN: this Runner is already running in another thread");
        return NULL;
    }
    int ret, err = 0;
    self->running = 1;
    Py_BEGIN_ALLOW_THREADS
    ret = ioctl(self->fd, KVM_RUN, 0);
    if (ret < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    self->running = 0;
    if (ret < 0)
        return PyLong_FromLong(-(long)err);
    struct kvm_run *run = self->run;
    if (run->exit_reason == KVM_EXIT_IO)
        return make_io_exit(self, run);
    return PyLong_FromUnsignedLong(run->exit_reason);
}

PyDoc_STRVAR(Runner_close_doc, "close()\n\nUnmap kvm_run (idempotent); refused while run() is in KVM_RUN.");

static PyObject *
Runner_close(Runner *self, PyObject *Py_UNUSED(ignored))
{
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Runner.close(): run() is in KVM_RUN in another thread");
        return NULL;
    }
    Runner_unmap(self);
    Py_RETURN_NONE;
}

static PyObject *
Runner_get_closed(Runner *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->run == NULL);
}

static PyMethodDef Runner_methods[] = {
    {"run", (PyCFunction)Runner_run, METH_NOARGS, Runner_run_doc},
    {"close", (PyCFunction)Runner_close, METH_NOARGS, Runner_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Runner_getset[] = {
    {"closed", (getter)Runner_get_closed, NULL, "Whether kvm_run is unmapped.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmgmem.backends.kvm._run.Runner",
    .tp_doc = PyDoc_STR("Runner(fd, size, io_exit): KVM_RUN on vCPU fd with its own kvm_run mapping of size bytes."),
    .tp_basicsize = sizeof(Runner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Runner_init,
    .tp_dealloc = (destructor)Runner_dealloc,
    .tp_methods = Runner_methods,
    .tp_getset = Runner_getset,
};

static struct PyModuleDef run_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvmgmem.backends.kvm._run",
    .m_doc = "KVM_RUN with the GIL released and KVM_EXIT_IO decoded in C (see vcpu.py for the Python side).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__run(void)
{
    if (PyType_Ready(&RunnerType) < 0)
        return NULL;
    s_direction = PyUnicode_InternFromString("direction");
    s_port = PyUnicode_InternFromString("port");
    s_size = PyUnicode_InternFromString("size");
    s_count = PyUnicode_InternFromString("count");
    s_data = PyUnicode_InternFromString("data");
    if (!s_direction || !s_port || !s_size || !s_count || !s_data)
        return NULL;
    PyObject *m = PyModule_Create(&run_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RunnerType);
    if (PyModule_AddObject(m, "Runner", (PyObject *)&RunnerType) < 0) {
        Py_DECREF(&RunnerType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "KVM_RUN", KVM_RUN) < 0 || PyModule_AddIntConstant(m, "KVM_EXIT_IO", KVM_EXIT_IO) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
