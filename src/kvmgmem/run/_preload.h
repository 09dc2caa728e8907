/* Internal interface between the two halves of the preload library (not installed, not exported).
 *
 * _preload.c holds the libc wrappers and must see glibc's headers without _FILE_OFFSET_BITS=64 (Python.h
 * defines it, which would rename open to open64 and so on); _preload_py.c embeds Python. They share only
 * what is declared here, all with hidden visibility.
 */
#ifndef KVMGMEM_PRELOAD_H
#define KVMGMEM_PRELOAD_H

#define KG_HIDDEN __attribute__((visibility("hidden")))

/* one per server function, in the order of kg_op_names in _preload_py.c */
enum kg_op {
    KG_OPEN_PATH,
    KG_IOCTL,
    KG_CLOSE,
    KG_DUP,
    KG_READ,
    KG_WRITE,
    KG_PREAD,
    KG_PWRITE,
    KG_LSEEK,
    KG_FTRUNCATE,
    KG_FALLOCATE,
    KG_FSTAT,
    KG_MMAP,
    KG_MUNMAP,
    KG_MADVISE,
    KG_NOPS
};

enum kg_state { KG_NOT_STARTED, KG_RUNNING, KG_FAILED };

/* KG_RUNNING once the server started; read with acquire ordering */
KG_HIDDEN extern int kg_state;
/* set on a thread while it runs Python for a wrapper: libc calls made meanwhile go to the real functions */
KG_HIDDEN extern __thread int kg_in_python __attribute__((tls_model("initial-exec")));

/* Start Python and the server once (thread-safe); returns the resulting state. */
KG_HIDDEN int kg_start(void);
/* 0 on a thread that Python itself created (its libc calls are the interpreter's own), else 1 */
KG_HIDDEN int kg_program_thread(void);
/* 1 if the server module has this function */
KG_HIDDEN int kg_has(enum kg_op op);
/* Call a server function. fmt has one letter per argument: 'i' signed, 'u' unsigned, 'p' the path (bytes).
 * Returns 0 with *result set, or an errno value (the OSError's errno; EIO after printing any other exception's
 * traceback). */
KG_HIDDEN int kg_call(enum kg_op op, const char *fmt, const long long *args, const char *path, long long *result);

#endif
