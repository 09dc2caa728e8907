/*
 * kvmgmem.backends.kvm._run: a vCPU's KVM_RUN and the hot part of exit decoding, in C.
 *
 * Why this exists: a vCPU exit round trip through ctypes plus a Python-built IoExit and the Python wrapper's
 * lock costs 1.2-1.5 us more than a C KVM_RUN loop, which is 15% of a round trip when the guest runs at CPL0
 * under KVM's emulator. Runner.run() is installed as the vCPU's run() (vcpu.py), so a KVM_EXIT_IO round trip
 * runs no Python bytecode at all: busy/closed checks, KVM_RUN with the GIL released (vCPU threads run in
 * parallel, and a kick signal makes KVM_RUN return EINTR to us), and the IoExit built in C.
 *
 * Every other outcome goes to a Python callback, slow(owner, kind, value), which decodes it exactly as the
 * pure-Python path does: kind EXIT (value = exit reason), ERRNO (KVM_RUN failed with value), CLOSED, BUSY.
 * The callback gets the owner (the KvmVcpu) through a weak reference so Runner -> vCPU makes no cycle.
 *
 * The Runner owns its own MAP_SHARED mapping of the kvm_run page (the Python mmap.mmap maps the same page
 * for completions), so no Python buffer export is held. A pthread mutex held for the whole of run() plays
 * the role of the old Python run lock: a second run() gets BUSY, and close() waits (GIL released) for a
 * running run() to finish before unmapping, so kvm_run is never unmapped under a reader.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

/* slow(owner, kind, value) kinds */
/* IoExits with a payload of at most 8 bytes are reused from a small direct-mapped cache: exits are frozen and
 * compare by value, so handing out an equal object again is invisible to callers, and a VMM's ports mostly see
 * the same few values. A hit costs a compare instead of an allocation and five attribute stores (about 0.2 us
 * here, 2% of a CPL0 round trip). */
#define IO_CACHE_SIZE 64

typedef struct {
    uint64_t key;   /* direction | size << 8 | port << 16 | count << 32 */
    uint64_t data;  /* the payload, zero-extended little-endian */
    PyObject *exit; /* NULL when empty */
} IoCacheEntry;

enum { KIND_EXIT = 0, KIND_ERRNO = 1, KIND_CLOSED = 2, KIND_BUSY = 3 };

typedef struct {
    PyObject_HEAD
    int fd;                /* the vCPU fd (not owned: the Python KvmVcpu closes it) */
    int running;           /* inside KVM_RUN (GIL released); only read and written with the GIL held */
    pthread_t thread;      /* the thread holding `lock`, valid while `locked` */
    int locked;            /* `lock` is held by run(); only read and written with the GIL held */
    int closing;           /* close() has begun: run() enters KVM_RUN no more (read/written with the GIL) */
    pthread_mutex_t lock;  /* held for the whole of run(): BUSY for a second run(), close() waits for it */
    struct kvm_run *run;   /* our mapping of kvm_run, NULL once closed */
    size_t size;           /* its length (KVM_GET_VCPU_MMAP_SIZE) */
    PyObject *io_exit;     /* the kvmgmem.exits.IoExit class */
    PyObject *owner;       /* weak reference to the KvmVcpu */
    PyObject *slow;        /* slow(owner, kind, value) -> Exit, or raises */
    PyObject *pending;     /* the completion the last exit awaits: None, "io_in", or what slow() stored */
    IoCacheEntry io_cache[IO_CACHE_SIZE];
} Runner;

/* Interned attribute names of IoExit, and the pending marker of an IN exit, created once at module init. */
static PyObject *s_direction, *s_port, *s_size, *s_count, *s_data, *s_io_in;

static PyObject *
Runner_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    Runner *self = (Runner *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (pthread_mutex_init(&self->lock, NULL) != 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->fd = -1;
    Py_INCREF(Py_None);
    self->pending = Py_None;
    return (PyObject *)self;
}

static int
Runner_init(Runner *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "size", "io_exit", "owner", "slow", NULL};
    int fd;
    Py_ssize_t size;
    PyObject *io_exit, *owner, *slow;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "inO!OO:Runner", kwlist, &fd, &size, &PyType_Type, &io_exit,
                                     &owner, &slow))
        return -1;
    if (self->run != NULL || self->owner != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Runner already initialised");
        return -1;
    }
    if (!PyCallable_Check(slow)) {
        PyErr_SetString(PyExc_TypeError, "Runner: slow must be callable");
        return -1;
    }
    if (size < (Py_ssize_t)sizeof(struct kvm_run)) {
        PyErr_Format(PyExc_ValueError, "kvm_run mapping size %zd is smaller than struct kvm_run (%zu)", size,
                     sizeof(struct kvm_run));
        return -1;
    }
    PyObject *ref = PyWeakref_NewRef(owner, NULL);
    if (ref == NULL)
        return -1;
    void *map = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        Py_DECREF(ref);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->fd = fd;
    self->run = map;
    self->size = (size_t)size;
    Py_INCREF(io_exit);
    self->io_exit = io_exit;
    self->owner = ref;
    Py_INCREF(slow);
    self->slow = slow;
    return 0;
}

static void
Runner_dealloc(Runner *self)
{
    /* run() and close() hold a reference to self while they use the mutex, so nobody holds it here. */
    if (self->run != NULL)
        munmap(self->run, self->size);
    pthread_mutex_destroy(&self->lock);
    Py_CLEAR(self->io_exit);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->pending);
    for (int i = 0; i < IO_CACHE_SIZE; i++)
        Py_CLEAR(self->io_cache[i].exit);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* IoExit(direction, port, size, count, data) without the frozen dataclass __init__: object.__new__ plus a
 * generic setattr per field, which is what exits.make_io_exit does in Python; the result is an ordinary,
 * equal, still-frozen instance. */
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

/* Whether only the cache refers to `exit`: no caller holds it, not even weakly, so rewriting its fields in
 * place cannot be observed (the same reasoning as CPython reusing a tuple whose refcount is 1). */
static int
only_cached(PyObject *exit)
{
    if (Py_REFCNT(exit) != 1)
        return 0;
    if (Py_TYPE(exit)->tp_weaklistoffset > 0 && *PyObject_GET_WEAKREFS_LISTPTR(exit) != NULL)
        return 0;
    return 1;
}

static int
set_field(PyObject *exit, PyObject *name, PyObject *value)
{
    if (value == NULL)
        return -1;
    int rc = PyObject_GenericSetAttr(exit, name, value);
    Py_DECREF(value);
    return rc;
}

/* Rewrite a cached IoExit nobody else holds from (old_key, old_data) to (key, data), storing only the fields
 * that differ: one attribute store instead of an allocation and five (about 0.2 us here). */
static int
rewrite_io_exit(PyObject *exit, uint64_t old_key, uint64_t old_data, uint64_t key, uint64_t data,
                const char *payload, size_t length)
{
    if ((old_key & 0xff) != (key & 0xff) && set_field(exit, s_direction, PyLong_FromLong((long)(key & 0xff))) < 0)
        return -1;
    if (((old_key >> 8) & 0xff) != ((key >> 8) & 0xff) &&
        set_field(exit, s_size, PyLong_FromLong((long)((key >> 8) & 0xff))) < 0)
        return -1;
    if (((old_key >> 16) & 0xffff) != ((key >> 16) & 0xffff) &&
        set_field(exit, s_port, PyLong_FromLong((long)((key >> 16) & 0xffff))) < 0)
        return -1;
    if ((old_key >> 32) != (key >> 32) && set_field(exit, s_count, PyLong_FromUnsignedLong((unsigned long)(key >> 32))) < 0)
        return -1;
    /* The payload length is size * count, so equal data and equal size/count mean equal bytes. */
    if ((old_data != data || (old_key & 0xffffffff0000ff00ull) != (key & 0xffffffff0000ff00ull)) &&
        set_field(exit, s_data, PyBytes_FromStringAndSize(payload, (Py_ssize_t)length)) < 0)
        return -1;
    return 0;
}

/* make_io_exit through the cache (payloads of up to 8 bytes). A hit returns the cached equal exit; a miss
 * rewrites the evicted exit in place when nobody else holds it (a loop that drops each exit), and builds a
 * new one otherwise. */
static PyObject *
io_exit(Runner *self, const struct kvm_run *run)
{
    size_t length = (size_t)run->io.size * run->io.count;
    size_t offset = run->io.data_offset;
    if (length > 8 || offset > self->size || length > self->size - offset)
        return make_io_exit(self, run);
    const char *payload = (const char *)run + offset;
    uint64_t data = 0;
    /* Constant-size copies (inlined loads) for the usual lengths instead of a call to libc's memcpy. */
    switch (length) {
    case 1: memcpy(&data, payload, 1); break;
    case 2: memcpy(&data, payload, 2); break;
    case 4: memcpy(&data, payload, 4); break;
    case 8: memcpy(&data, payload, 8); break;
    default: memcpy(&data, payload, length); break;
    }
    uint64_t key = (uint64_t)run->io.direction | (uint64_t)run->io.size << 8 | (uint64_t)run->io.port << 16 |
                   (uint64_t)run->io.count << 32;
    uint64_t h = (key ^ (data * 0x9E3779B97F4A7C15ull)) * 0xFF51AFD7ED558CCDull;
    IoCacheEntry *entry = &self->io_cache[h >> 58]; /* top 6 bits: IO_CACHE_SIZE = 64 */
    if (entry->exit != NULL) {
        if (entry->key == key && entry->data == data) {
            Py_INCREF(entry->exit);
            return entry->exit;
        }
        if (only_cached(entry->exit)) {
            if (rewrite_io_exit(entry->exit, entry->key, entry->data, key, data, payload, length) < 0) {
                Py_CLEAR(entry->exit); /* half rewritten: drop it */
                return NULL;
            }
            entry->key = key;
            entry->data = data;
            Py_INCREF(entry->exit);
            return entry->exit;
        }
    }
    PyObject *exit = make_io_exit(self, run);
    if (exit == NULL)
        return NULL;
    Py_INCREF(exit);
    Py_XSETREF(entry->exit, exit);
    entry->key = key;
    entry->data = data;
    return exit;
}

static void
set_pending(Runner *self, PyObject *value)
{
    Py_INCREF(value);
    Py_SETREF(self->pending, value);
}

/* Hand an outcome to the Python decoder. */
static PyObject *
call_slow(Runner *self, int kind, long value)
{
    if (self->owner == NULL) {
        PyErr_SetString(PyExc_ValueError, "KVM_RUN on an uninitialised Runner");
        return NULL;
    }
    PyObject *owner = PyWeakref_GetObject(self->owner); /* borrowed */
    if (owner == NULL)
        return NULL;
    if (owner == Py_None) {
        PyErr_SetString(PyExc_ReferenceError, "KVM_RUN: the vCPU object is gone");
        return NULL;
    }
    Py_INCREF(owner);
    PyObject *result = PyObject_CallFunction(self->slow, "Oil", owner, kind, value);
    Py_DECREF(owner);
    return result;
}

PyDoc_STRVAR(Runner_run_doc,
"run() -> Exit\n\n"
"KVM_RUN until the next exit, with the GIL released. KVM_EXIT_IO is returned as an IoExit built here;\n"
"any other exit, a failure, a closed Runner or a concurrent run() goes to slow(owner, kind, value).");

static PyObject *
Runner_run(Runner *self, PyObject *const *Py_UNUSED(args), Py_ssize_t nargs)
{
    if (nargs != 0) {
        PyErr_Format(PyExc_TypeError, "run() takes no arguments (%zd given)", nargs);
        return NULL;
    }
    if (self->run == NULL || self->closing)
        return call_slow(self, KIND_CLOSED, 0);
    if (pthread_mutex_trylock(&self->lock) != 0)
        return call_slow(self, KIND_BUSY, 0);
    self->locked = 1;
    self->thread = pthread_self();
    int ret, err = 0;
    self->running = 1;
    Py_BEGIN_ALLOW_THREADS
    ret = ioctl(self->fd, KVM_RUN, 0);
    if (ret < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    self->running = 0;
    PyObject *result;
    if (ret >= 0 && self->run->exit_reason == KVM_EXIT_IO) {
        set_pending(self, self->run->io.direction == KVM_EXIT_IO_IN ? s_io_in : Py_None);
        result = io_exit(self, self->run);
    } else {
        set_pending(self, Py_None);
        /* Still holding the lock: close() cannot unmap kvm_run while Python decodes it. */
        result = ret < 0 ? call_slow(self, KIND_ERRNO, err) : call_slow(self, KIND_EXIT, (long)self->run->exit_reason);
    }
    self->locked = 0;
    pthread_mutex_unlock(&self->lock);
    return result;
}

PyDoc_STRVAR(Runner_kick_doc,
"kick(signum)\n\n"
"Set immediate_exit, and if run() is inside KVM_RUN send signum (if > 0) to its thread. The thread is\n"
"signalled only while it is known to be inside run(), which it cannot leave without the GIL we hold.");

static PyObject *
Runner_kick(Runner *self, PyObject *arg)
{
    int signum = PyLong_AsLong(arg);
    if (signum == -1 && PyErr_Occurred())
        return NULL;
    if (self->run == NULL)
        Py_RETURN_NONE;
    __atomic_store_n(&self->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (self->running && signum > 0) {
        int err = pthread_kill(self->thread, signum);
        if (err != 0 && err != ESRCH) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Runner_close_doc,
"close()\n\n"
"Unmap kvm_run (idempotent). If run() is in progress in another thread, wait for it (GIL released):\n"
"kick it first. Refused (RuntimeError) from inside run() on the same thread, which would deadlock.");

static PyObject *
Runner_close(Runner *self, PyObject *Py_UNUSED(ignored))
{
    if (self->run == NULL)
        Py_RETURN_NONE;
    if (self->locked && pthread_equal(self->thread, pthread_self())) {
        PyErr_SetString(PyExc_RuntimeError, "Runner.close() from inside its own run()");
        return NULL;
    }
    /* From here on run() refuses to enter KVM_RUN: a thread looping on run() would otherwise win the mutex
     * back each time (it is not fair), re-enter the guest after the kick was consumed, and starve us. */
    self->closing = 1;
    if (pthread_mutex_trylock(&self->lock) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&self->lock);
        Py_END_ALLOW_THREADS
    }
    if (self->run != NULL) {
        munmap(self->run, self->size);
        self->run = NULL;
    }
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *
Runner_get_closed(Runner *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->run == NULL);
}

static PyObject *
Runner_get_pending(Runner *self, void *Py_UNUSED(closure))
{
    Py_INCREF(self->pending);
    return self->pending;
}

static int
Runner_set_pending(Runner *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete pending");
        return -1;
    }
    set_pending(self, value);
    return 0;
}

static PyMethodDef Runner_methods[] = {
    /* METH_FASTCALL, not METH_NOARGS: CPython 3.11 specialises a call to a bound builtin of the former only
     * (PRECALL_NO_KW_BUILTIN_FAST calls it directly; a METH_NOARGS one goes through PyObject_Vectorcall and
     * cfunction_vectorcall_NOARGS every time), about 20 ns per exit. */
    {"run", (PyCFunction)(void (*)(void))Runner_run, METH_FASTCALL, Runner_run_doc},
    {"kick", (PyCFunction)Runner_kick, METH_O, Runner_kick_doc},
    {"close", (PyCFunction)Runner_close, METH_NOARGS, Runner_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Runner_getset[] = {
    {"closed", (getter)Runner_get_closed, NULL, "Whether kvm_run is unmapped.", NULL},
    {"pending", (getter)Runner_get_pending, (setter)Runner_set_pending,
     "The completion the last exit awaits (None or a str); run() resets it on every exit.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmgmem.backends.kvm._run.Runner",
    .tp_doc = PyDoc_STR("Runner(fd, size, io_exit, owner, slow): a vCPU's KVM_RUN loop step (see the module)."),
    .tp_basicsize = sizeof(Runner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Runner_new,
    .tp_init = (initproc)Runner_init,
    .tp_dealloc = (destructor)Runner_dealloc,
    .tp_methods = Runner_methods,
    .tp_getset = Runner_getset,
};

static struct PyModuleDef run_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvmgmem.backends.kvm._run",
    .m_doc = "A vCPU's KVM_RUN with the GIL released and KVM_EXIT_IO decoded in C (vcpu.py is the Python side).",
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
    s_io_in = PyUnicode_InternFromString("io_in");
    if (!s_direction || !s_port || !s_size || !s_count || !s_data || !s_io_in)
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
    if (PyModule_AddIntConstant(m, "EXIT", KIND_EXIT) < 0 || PyModule_AddIntConstant(m, "ERRNO", KIND_ERRNO) < 0 ||
        PyModule_AddIntConstant(m, "CLOSED", KIND_CLOSED) < 0 || PyModule_AddIntConstant(m, "BUSY", KIND_BUSY) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
