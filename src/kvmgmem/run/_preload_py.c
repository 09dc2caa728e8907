/* The Python half of the preload library: start the interpreter inside the program, call the server.
 *
 * Python starts once, on the first open of /dev/kvm or of an emulated sysfs file, on whichever program
 * thread gets there first. It is configured so that the program cannot tell: no signal handlers (the
 * program's stay), no locale change, no PYTHON* variables read from the program's environment, the module
 * search path the launcher had (KVMGMEM_RUN_PATH) and its interpreter (KVMGMEM_RUN_PYTHON). After the start
 * the GIL is released; each routed call takes it on the calling thread, with a thread state kept per program
 * thread for the thread's life (created on its first call, deleted when the thread exits).
 *
 * Nothing here may crash the program: a failed start prints one line and leaves /dev/kvm absent (ENOENT); a
 * server exception other than OSError prints its traceback and fails the call with EIO.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "_preload.h"

int kg_state = KG_NOT_STARTED;
__thread int kg_in_python __attribute__((tls_model("initial-exec")));

/* the server's function names, indexed by enum kg_op */
static const char *const kg_op_names[KG_NOPS] = {
    [KG_OPEN_PATH] = "open_path", [KG_IOCTL] = "ioctl",   [KG_CLOSE] = "close",           [KG_DUP] = "dup",
    [KG_READ] = "read",           [KG_WRITE] = "write",   [KG_PREAD] = "pread",           [KG_PWRITE] = "pwrite",
    [KG_LSEEK] = "lseek",         [KG_FTRUNCATE] = "ftruncate", [KG_FALLOCATE] = "fallocate",
    [KG_FSTAT] = "fstat",         [KG_MMAP] = "mmap",     [KG_MUNMAP] = "munmap",         [KG_MADVISE] = "madvise",
};
static PyObject *kg_funcs[KG_NOPS];
static PyObject *kg_server;
static PyInterpreterState *kg_interp;

static pthread_mutex_t kg_start_lock = PTHREAD_MUTEX_INITIALIZER;
static pid_t kg_start_pid; /* the process that started Python (a forked child inherits it running) */
static pthread_key_t kg_thread_key;

/* per thread: 0 not yet known, 1 a program thread, 2 a thread Python created */
static __thread int kg_thread_kind __attribute__((tls_model("initial-exec")));
/* the program thread's own Python thread state */
static __thread PyThreadState *kg_tstate __attribute__((tls_model("initial-exec")));

/* This thread holds the GIL: whatever it calls is the interpreter's own, whichever thread it is. The case the
 * thread kind misses: a thread of Python's whose thread state is already detached, tearing down with the GIL
 * held (CPython frees its frame stack with munmap after clearing the thread's state); routing that call would
 * wait for the GIL the thread holds. */
static int kg_holds_gil(void)
{
    PyThreadState *current = _PyThreadState_UncheckedGet();
    return current && current->thread_id == PyThread_get_thread_ident();
}

int kg_program_thread(void)
{
    if (kg_thread_kind == 0) {
        if (__atomic_load_n(&kg_state, __ATOMIC_ACQUIRE) != KG_RUNNING)
            return 1; /* Python does not exist yet: every thread is the program's */
        if (kg_holds_gil())
            return 0; /* a Python thread tearing down: do not remember it as the program's */
        kg_thread_kind = PyGILState_GetThisThreadState() ? 2 : 1;
    }
    return kg_thread_kind == 1 && !kg_holds_gil();
}

int kg_has(enum kg_op op)
{
    return kg_funcs[op] != NULL;
}

/* --- entering and leaving Python on a program thread ------------------------------------------------------ */

static void kg_thread_exit(void *tstate)
{
    /* the program thread ends: drop its thread state (not at process exit, where no destructor runs) */
    if (!tstate || __atomic_load_n(&kg_state, __ATOMIC_ACQUIRE) != KG_RUNNING)
        return;
    kg_in_python = 1;
    PyEval_RestoreThread(tstate);
    PyThreadState_Clear(tstate);
    PyThreadState_DeleteCurrent();
    kg_tstate = NULL;
    kg_in_python = 0;
}

static void kg_enter(void)
{
    kg_in_python = 1;
    if (!kg_tstate) {
        kg_tstate = PyThreadState_New(kg_interp);
        pthread_setspecific(kg_thread_key, kg_tstate);
    }
    PyEval_RestoreThread(kg_tstate);
}

static void kg_leave(void)
{
    PyEval_SaveThread();
    kg_in_python = 0;
}

/* --- errors ------------------------------------------------------------------------------------------------ */

/* The pending exception as an errno: an OSError's errno, else EIO after printing the traceback. */
static int kg_exception_errno(void)
{
    int err = EIO;
    if (PyErr_ExceptionMatches(PyExc_OSError)) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        PyObject *e = value ? PyObject_GetAttrString(value, "errno") : NULL;
        if (e && PyLong_Check(e)) {
            long v = PyLong_AsLong(e);
            if (v > 0 && v < 4096)
                err = (int)v;
        }
        Py_XDECREF(e);
        PyErr_Clear();
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return err;
    }
    /* PyErr_Print would exit the process on SystemExit: display only */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value)
        PyException_SetTraceback(value, tb);
    fprintf(stderr, "kvmgmem run: the sim failed; the call returns EIO:\n");
    PyErr_Display(type, value, tb);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return EIO;
}

/* --- calls ------------------------------------------------------------------------------------------------- */

#define KG_MAX_ARGS 8

int kg_call(enum kg_op op, const char *fmt, const long long *args, const char *path, long long *result)
{
    PyObject *func = kg_funcs[op];
    if (!func)
        return ENOSYS;
    /* A system call that succeeds leaves errno alone; the interpreter's own calls in between must not show
     * through (a program may print errno after a successful call, as the selftests' assertion report does). */
    int saved_errno = errno;
    kg_enter();
    PyObject *argv[KG_MAX_ARGS];
    size_t n = 0;
    int err = 0;
    for (const char *f = fmt; *f && n < KG_MAX_ARGS; f++, n++) {
        if (*f == 'p')
            argv[n] = PyBytes_FromString(path);
        else if (*f == 'u')
            argv[n] = PyLong_FromUnsignedLongLong((unsigned long long)*args++);
        else
            argv[n] = PyLong_FromLongLong(*args++);
        if (!argv[n]) {
            err = kg_exception_errno();
            break;
        }
    }
    if (!err) {
        PyObject *r = PyObject_Vectorcall(func, argv, n, NULL);
        if (!r) {
            err = kg_exception_errno();
        } else if (r == Py_None) {
            *result = 0;
        } else {
            *result = PyLong_AsLongLong(r);
            if (*result == -1 && PyErr_Occurred()) {
                fprintf(stderr, "kvmgmem run: server.%s returned %s, not an int\n", kg_op_names[op],
                        Py_TYPE(r)->tp_name);
                PyErr_Clear();
                err = EIO;
            }
        }
        Py_XDECREF(r);
    }
    for (size_t i = 0; i < n; i++)
        Py_XDECREF(argv[i]);
    kg_leave();
    errno = saved_errno;
    return err;
}

/* --- exit and fork ----------------------------------------------------------------------------------------- */

/* At exit: let the server finish (server.stop() if it has one, then the functions registered with Python's
 * atexit, e.g. writing the trace) and flush Python's stdout/stderr; only in the process that started it.
 * Python itself is not finalized: other program threads may still be inside it. */
static void kg_at_exit(void)
{
    if (__atomic_load_n(&kg_state, __ATOMIC_ACQUIRE) != KG_RUNNING || kg_in_python || !kg_program_thread())
        return;
    if (getpid() != kg_start_pid)
        return; /* a forked child leaving by exit(): the parent finishes the server (one trace, not one per child) */
    kg_enter();
    PyObject *stop = PyObject_GetAttrString(kg_server, "stop");
    if (!stop) {
        PyErr_Clear();
    } else {
        PyObject *r = PyObject_CallNoArgs(stop);
        if (!r)
            kg_exception_errno();
        Py_XDECREF(r);
        Py_DECREF(stop);
    }
    /* the interpreter is not finalized, so run what Python code registered with atexit here */
    PyObject *atexit_module = PyImport_ImportModule("atexit");
    PyObject *ran = atexit_module ? PyObject_CallMethod(atexit_module, "_run_exitfuncs", NULL) : NULL;
    if (!ran)
        kg_exception_errno();
    Py_XDECREF(ran);
    Py_XDECREF(atexit_module);
    const char *streams[] = {"stdout", "stderr"};
    for (int i = 0; i < 2; i++) {
        PyObject *s = PySys_GetObject(streams[i]); /* borrowed */
        PyObject *r = s && s != Py_None ? PyObject_CallMethod(s, "flush", NULL) : NULL;
        if (!r)
            PyErr_Clear();
        Py_XDECREF(r);
    }
    kg_leave();
}

/* fork() in a program that started Python: hold the GIL across the fork so the child's interpreter is
 * consistent, and let Python reset its thread bookkeeping in the child (only the forking thread survives). */
static __thread int kg_fork_entered;

static void kg_before_fork(void)
{
    kg_fork_entered = 0;
    if (__atomic_load_n(&kg_state, __ATOMIC_ACQUIRE) != KG_RUNNING || kg_in_python || !kg_program_thread())
        return;
    kg_enter();
    PyOS_BeforeFork();
    kg_fork_entered = 1;
}

static void kg_after_fork_parent(void)
{
    if (!kg_fork_entered)
        return;
    PyOS_AfterFork_Parent();
    kg_leave();
}

static void kg_after_fork_child(void)
{
    if (!kg_fork_entered)
        return;
    PyOS_AfterFork_Child();
    kg_leave();
}

/* --- the start --------------------------------------------------------------------------------------------- */

static void kg_start_failed(const char *why)
{
    fprintf(stderr, "kvmgmem run: the sim could not start (%s); /dev/kvm is absent for this program "
                    "(open fails with ENOENT)\n", why);
}

/* The pending exception as "Type: message" for the one-line failure report. */
static void kg_start_failed_exception(const char *what)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *text = value ? PyObject_Str(value) : NULL;
    const char *msg = text ? PyUnicode_AsUTF8(text) : NULL;
    char line[1024];
    snprintf(line, sizeof line, "%s: %s: %s", what, type ? ((PyTypeObject *)type)->tp_name : "error",
             msg ? msg : "?");
    PyErr_Clear();
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    kg_start_failed(line);
}

static int kg_configure(PyConfig *config, const char *python, const char *path)
{
    PyConfig_InitIsolatedConfig(config);
    config->install_signal_handlers = 0; /* the program's handlers stay its own */
    config->configure_c_stdio = 0;       /* and so do its stdio modes */
    config->parse_argv = 0;
    config->pathconfig_warnings = 0;
    if (PyStatus_Exception(PyConfig_SetBytesString(config, &config->program_name, python)) ||
        PyStatus_Exception(PyConfig_SetBytesString(config, &config->executable, python)))
        return -1;
    char *argv[] = {"kvmgmem-run"};
    if (PyStatus_Exception(PyConfig_SetBytesArgv(config, 1, argv)))
        return -1;
    if (path && *path) {
        /* the launcher's sys.path, after its site-packages and .pth files: complete, so no site import */
        config->module_search_paths_set = 1;
        config->site_import = 0;
        char *copy = strdup(path), *save = NULL;
        if (!copy)
            return -1;
        for (char *entry = strtok_r(copy, ":", &save); entry; entry = strtok_r(NULL, ":", &save)) {
            wchar_t *w = Py_DecodeLocale(entry, NULL);
            if (!w || PyStatus_Exception(PyWideStringList_Append(&config->module_search_paths, w))) {
                PyMem_RawFree(w);
                free(copy);
                return -1;
            }
            PyMem_RawFree(w);
        }
        free(copy);
    }
    return 0;
}

static int kg_start_locked(void)
{
    const char *python = getenv("KVMGMEM_RUN_PYTHON");
    if (!python || !*python) {
        kg_start_failed("KVMGMEM_RUN_PYTHON is not set: start the program with `kvmgmem run`");
        return KG_FAILED;
    }
    if (Py_IsInitialized()) {
        kg_start_failed("this process already runs a Python interpreter");
        return KG_FAILED;
    }
    PyPreConfig preconfig;
    PyPreConfig_InitIsolatedConfig(&preconfig);
    preconfig.utf8_mode = 1;        /* paths and bytes decode the same whatever the program's locale */
    preconfig.configure_locale = 0; /* and the locale stays the program's */
    PyStatus status = Py_PreInitialize(&preconfig);
    if (PyStatus_Exception(status)) {
        kg_start_failed(status.err_msg ? status.err_msg : "Py_PreInitialize failed");
        return KG_FAILED;
    }
    PyConfig config;
    if (kg_configure(&config, python, getenv("KVMGMEM_RUN_PATH")) < 0) {
        PyConfig_Clear(&config);
        kg_start_failed("cannot build the interpreter's configuration");
        return KG_FAILED;
    }
    status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        kg_start_failed(status.err_msg ? status.err_msg : "Py_InitializeFromConfig failed");
        return KG_FAILED;
    }
    /* this thread is a program thread whose thread state is the main one */
    kg_interp = PyInterpreterState_Get();
    kg_tstate = PyThreadState_Get();
    kg_thread_kind = 1;
    /* CPython 3.11's signal module installs its SIGINT handler when it is first imported, whatever
     * install_signal_handlers says (signal_get_set_handlers, where SIGINT is SIG_DFL): import it now, while
     * kg_start() can still put the program's own disposition back (a later import does not run it again). */
    Py_XDECREF(PyImport_ImportModule("signal"));
    PyErr_Clear();

    const char *name = getenv("KVMGMEM_RUN_SERVER");
    if (!name || !*name)
        name = "kvmgmem.run.server";
    int state = KG_FAILED;
    kg_server = PyImport_ImportModule(name);
    if (!kg_server) {
        kg_start_failed_exception(name);
        goto out;
    }
    for (int op = 0; op < KG_NOPS; op++) {
        kg_funcs[op] = PyObject_GetAttrString(kg_server, kg_op_names[op]);
        if (!kg_funcs[op])
            PyErr_Clear(); /* a call to it fails with ENOSYS; munmap and madvise pass through */
    }
    if (!kg_funcs[KG_OPEN_PATH]) {
        char line[512];
        snprintf(line, sizeof line, "%s has no open_path()", name);
        kg_start_failed(line);
        goto out;
    }
    PyObject *r = PyObject_CallMethod(kg_server, "start", NULL);
    if (!r) {
        char what[512];
        snprintf(what, sizeof what, "%s.start()", name);
        kg_start_failed_exception(what);
        goto out;
    }
    Py_DECREF(r);
    kg_start_pid = getpid();
    pthread_key_create(&kg_thread_key, kg_thread_exit);
    pthread_setspecific(kg_thread_key, NULL); /* the main thread state is never deleted */
    pthread_atfork(kg_before_fork, kg_after_fork_parent, kg_after_fork_child);
    atexit(kg_at_exit);
    state = KG_RUNNING;
out:
    PyEval_SaveThread();
    return state;
}

int kg_start(void)
{
    pthread_mutex_lock(&kg_start_lock);
    int state = __atomic_load_n(&kg_state, __ATOMIC_ACQUIRE);
    if (state == KG_NOT_STARTED) {
        struct sigaction sigint; /* the program's Ctrl-C stays the program's (see kg_start_locked) */
        sigaction(SIGINT, NULL, &sigint);
        kg_in_python = 1;
        state = kg_start_locked();
        kg_in_python = 0;
        sigaction(SIGINT, &sigint, NULL);
        __atomic_store_n(&kg_state, state, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&kg_start_lock);
    return state;
}
