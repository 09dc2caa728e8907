/* The preload library of `kvmgmem run`: libc wrappers that route a program's calls on /dev/kvm and on the fds
 * the sim owns to the Python server (kvmgmem.run.server), in the program's own process.
 *
 * Every wrapper first asks two cheap questions: is this thread already running Python for a wrapper (then the
 * call is the interpreter's own and goes to the real function), and is the fd one the server owns (a bitmap
 * the server maintains through kvmgmem_preload_mark)? Anything else goes straight to the real function found
 * with dlsym(RTLD_NEXT), with errno untouched. Python starts on the first open of /dev/kvm or of an emulated
 * sysfs file; before that, and for programs that never open them, the library costs one bitmap test per call.
 *
 * This file must not include Python.h: its pyconfig.h defines _FILE_OFFSET_BITS=64, under which glibc's
 * headers rename open to open64 (and so on), and both names are defined here.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "_preload.h"

#define EXPORT __attribute__((visibility("default")))

/* --- the managed-fd bitmap ------------------------------------------------------------------------------ */

#define KG_MAX_FD (1 << 20) /* the kernel's default hard RLIMIT_NOFILE (fs.nr_open) */
#define KG_WORD_BITS (8 * sizeof(unsigned long))
static unsigned long kg_managed[KG_MAX_FD / KG_WORD_BITS];

/* The server marks an fd it owns (managed=1) or releases it (managed=0). Called through ctypes. */
EXPORT void kvmgmem_preload_mark(int fd, int managed)
{
    if (fd < 0 || fd >= KG_MAX_FD) {
        if (managed)
            fprintf(stderr, "kvmgmem run: fd %d is above the %d fds the preload library tracks; its calls "
                            "will not reach the sim\n", fd, KG_MAX_FD);
        return;
    }
    unsigned long bit = 1UL << (fd % KG_WORD_BITS);
    if (managed)
        __atomic_fetch_or(&kg_managed[fd / KG_WORD_BITS], bit, __ATOMIC_RELEASE);
    else
        __atomic_fetch_and(&kg_managed[fd / KG_WORD_BITS], ~bit, __ATOMIC_RELEASE);
}

/* 1 if the server owns fd (for tests and the server's own checks) */
EXPORT int kvmgmem_preload_is_managed(int fd)
{
    if (fd < 0 || fd >= KG_MAX_FD)
        return 0;
    return (__atomic_load_n(&kg_managed[fd / KG_WORD_BITS], __ATOMIC_ACQUIRE) >> (fd % KG_WORD_BITS)) & 1;
}

/* Route this call on fd to the server? Not from inside Python, not from a thread Python created. */
static inline int routed(int fd)
{
    return !kg_in_python && kvmgmem_preload_is_managed(fd) && kg_program_thread();
}

/* Route a call that is not about an fd (munmap, madvise)? Only once the server runs. */
static inline int routed_any(void)
{
    return !kg_in_python && __atomic_load_n(&kg_state, __ATOMIC_ACQUIRE) == KG_RUNNING && kg_program_thread();
}

/* --- the real functions ------------------------------------------------------------------------------- */

static void *kg_resolve(const char *name)
{
    void *f = dlsym(RTLD_NEXT, name);
    if (!f) {
        fprintf(stderr, "kvmgmem run: the C library has no %s (%s)\n", name, dlerror());
        abort(); /* cannot happen with glibc: every name below is one of its symbols */
    }
    return f;
}

/* `REAL(open)` is the C library's open, looked up on first use (a wrapper may run before our constructor) */
#define DECLARE_REAL(name, ret, ...) static ret (*real_##name)(__VA_ARGS__)
#define REAL(name)                                                                                           \
    (__atomic_load_n(&real_##name, __ATOMIC_RELAXED)                                                         \
         ? real_##name                                                                                       \
         : (__atomic_store_n(&real_##name, (__typeof__(real_##name))kg_resolve(#name), __ATOMIC_RELAXED),     \
            real_##name))

DECLARE_REAL(open, int, const char *, int, ...);
DECLARE_REAL(open64, int, const char *, int, ...);
DECLARE_REAL(openat, int, int, const char *, int, ...);
DECLARE_REAL(openat64, int, int, const char *, int, ...);
DECLARE_REAL(__open_2, int, const char *, int);
DECLARE_REAL(__open64_2, int, const char *, int);
DECLARE_REAL(__openat_2, int, int, const char *, int);
DECLARE_REAL(__openat64_2, int, int, const char *, int);
DECLARE_REAL(fopen, FILE *, const char *, const char *);
DECLARE_REAL(fopen64, FILE *, const char *, const char *);
DECLARE_REAL(ioctl, int, int, unsigned long, ...);
DECLARE_REAL(close, int, int);
DECLARE_REAL(dup, int, int);
DECLARE_REAL(dup2, int, int, int);
DECLARE_REAL(dup3, int, int, int, int);
DECLARE_REAL(fcntl, int, int, int, ...);
DECLARE_REAL(fcntl64, int, int, int, ...);
DECLARE_REAL(read, ssize_t, int, void *, size_t);
DECLARE_REAL(__read_chk, ssize_t, int, void *, size_t, size_t);
DECLARE_REAL(write, ssize_t, int, const void *, size_t);
DECLARE_REAL(pread, ssize_t, int, void *, size_t, off_t);
DECLARE_REAL(pread64, ssize_t, int, void *, size_t, off64_t);
DECLARE_REAL(__pread_chk, ssize_t, int, void *, size_t, off_t, size_t);
DECLARE_REAL(__pread64_chk, ssize_t, int, void *, size_t, off64_t, size_t);
DECLARE_REAL(pwrite, ssize_t, int, const void *, size_t, off_t);
DECLARE_REAL(pwrite64, ssize_t, int, const void *, size_t, off64_t);
DECLARE_REAL(lseek, off_t, int, off_t, int);
DECLARE_REAL(lseek64, off64_t, int, off64_t, int);
DECLARE_REAL(ftruncate, int, int, off_t);
DECLARE_REAL(ftruncate64, int, int, off64_t);
DECLARE_REAL(fallocate, int, int, int, off_t, off_t);
DECLARE_REAL(fallocate64, int, int, int, off64_t, off64_t);
DECLARE_REAL(fstat, int, int, struct stat *);
DECLARE_REAL(fstat64, int, int, struct stat64 *);
DECLARE_REAL(fstatat, int, int, const char *, struct stat *, int);
DECLARE_REAL(fstatat64, int, int, const char *, struct stat64 *, int);
DECLARE_REAL(__fxstat, int, int, int, struct stat *);
DECLARE_REAL(__fxstat64, int, int, int, struct stat64 *);
DECLARE_REAL(__fxstatat, int, int, int, const char *, struct stat *, int);
DECLARE_REAL(__fxstatat64, int, int, int, const char *, struct stat64 *, int);
DECLARE_REAL(mmap, void *, void *, size_t, int, int, int, off_t);
DECLARE_REAL(mmap64, void *, void *, size_t, int, int, int, off64_t);
DECLARE_REAL(munmap, int, void *, size_t);
DECLARE_REAL(madvise, int, void *, size_t, int);

/* --- calling the server ------------------------------------------------------------------------------- */

/* Call a server function with integer arguments: its result, or -1 with errno set. */
static long long call(enum kg_op op, const char *fmt, const long long *args)
{
    long long result;
    int err = kg_call(op, fmt, args, NULL, &result);
    if (err) {
        errno = err;
        return -1;
    }
    return result;
}

#define CALL(op, fmt, ...) call(op, fmt, (const long long[]){__VA_ARGS__})

/* --- open: /dev/kvm and the emulated sysfs files ---------------------------------------------------------- */

static int is_dev_kvm(const char *path)
{
    return path && strcmp(path, "/dev/kvm") == 0;
}

/* The paths the server answers: /dev/kvm, /sys/module/kvm* (parameters of kvm, kvm_intel, kvm_amd) and the
 * transparent hugepage settings. Only absolute paths: a relative path that happens to reach them (from a
 * working directory inside /dev or /sys) opens the host's file. */
static int is_emulated_path(const char *path)
{
    if (!path || path[0] != '/')
        return 0;
    if (path[1] == 'd')
        return is_dev_kvm(path);
    return path[1] == 's' && (strncmp(path, "/sys/module/kvm", 15) == 0 ||
                              strncmp(path, "/sys/kernel/mm/transparent_hugepage/", 36) == 0);
}

/* Ask the server to open path. Returns 1 with *fd set (an fd, or -1 with errno set) when the call is
 * answered here, 0 when the real open must run. */
static int open_emulated(const char *path, int flags, mode_t mode, int *fd)
{
    if (kg_in_python || !is_emulated_path(path))
        return 0;
    int state = __atomic_load_n(&kg_state, __ATOMIC_ACQUIRE);
    if (state == KG_NOT_STARTED) {
        int saved_errno = errno; /* starting Python makes many calls of its own; a successful open shows none */
        state = kg_start();
        errno = saved_errno;
    }
    if (state != KG_RUNNING) {
        if (!is_dev_kvm(path))
            return 0; /* the host's sysfs file, if any */
        errno = ENOENT; /* as on a host without the kvm module; kg_start printed why */
        *fd = -1;
        return 1;
    }
    if (!kg_program_thread())
        return 0;
    long long result;
    long long args[2] = {flags, mode};
    int err = kg_call(KG_OPEN_PATH, "pii", args, path, &result);
    if (err) {
        errno = err;
        *fd = -1;
        return 1;
    }
    if (result == -1)
        return 0; /* not the server's: pass through */
    *fd = (int)result;
    return 1;
}

static int open_mode_needed(int flags)
{
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
}

#define OPEN_MODE(flags, last)                                                                               \
    mode_t mode = 0;                                                                                         \
    if (open_mode_needed(flags)) {                                                                           \
        va_list ap;                                                                                          \
        va_start(ap, last);                                                                                  \
        mode = va_arg(ap, mode_t);                                                                           \
        va_end(ap);                                                                                          \
    }

EXPORT int open(const char *path, int flags, ...)
{
    OPEN_MODE(flags, flags);
    int fd;
    if (open_emulated(path, flags, mode, &fd))
        return fd;
    return REAL(open)(path, flags, mode);
}

EXPORT int open64(const char *path, int flags, ...)
{
    OPEN_MODE(flags, flags);
    int fd;
    if (open_emulated(path, flags, mode, &fd))
        return fd;
    return REAL(open64)(path, flags, mode);
}

/* openat: an absolute path ignores dirfd, as in the kernel */
EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    OPEN_MODE(flags, flags);
    int fd;
    if (open_emulated(path, flags, mode, &fd))
        return fd;
    return REAL(openat)(dirfd, path, flags, mode);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
    OPEN_MODE(flags, flags);
    int fd;
    if (open_emulated(path, flags, mode, &fd))
        return fd;
    return REAL(openat64)(dirfd, path, flags, mode);
}

/* the _FORTIFY_SOURCE entry points (open without a constant flags argument) */
EXPORT int __open_2(const char *path, int flags)
{
    int fd;
    if (open_emulated(path, flags, 0, &fd))
        return fd;
    return REAL(__open_2)(path, flags);
}

EXPORT int __open64_2(const char *path, int flags)
{
    int fd;
    if (open_emulated(path, flags, 0, &fd))
        return fd;
    return REAL(__open64_2)(path, flags);
}

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
    int fd;
    if (open_emulated(path, flags, 0, &fd))
        return fd;
    return REAL(__openat_2)(dirfd, path, flags);
}

EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
    int fd;
    if (open_emulated(path, flags, 0, &fd))
        return fd;
    return REAL(__openat64_2)(dirfd, path, flags);
}

/* fopen opens through the C library's internal open, which no wrapper sees: for the emulated paths open the
 * server's fd here and wrap it. The stream then reads with the C library's internal read, so the server
 * serves these files as real fds holding the contents (not marked as managed). */
static int fopen_flags(const char *mode)
{
    int flags;
    switch (mode[0]) {
    case 'r':
        flags = O_RDONLY;
        break;
    case 'w':
        flags = O_WRONLY | O_CREAT | O_TRUNC;
        break;
    case 'a':
        flags = O_WRONLY | O_CREAT | O_APPEND;
        break;
    default:
        return -1;
    }
    for (const char *m = mode + 1; *m && *m != ','; m++) {
        if (*m == '+')
            flags = (flags & ~O_ACCMODE) | O_RDWR;
        else if (*m == 'e')
            flags |= O_CLOEXEC;
        else if (*m == 'x')
            flags |= O_EXCL;
    }
    return flags;
}

static int fopen_emulated(const char *path, const char *mode, FILE **stream)
{
    int flags = mode ? fopen_flags(mode) : -1;
    int fd;
    if (flags < 0 || !open_emulated(path, flags, 0666, &fd))
        return 0;
    *stream = NULL;
    if (fd >= 0) {
        *stream = fdopen(fd, mode);
        if (!*stream) {
            int err = errno;
            close(fd);
            errno = err;
        }
    }
    return 1;
}

EXPORT FILE *fopen(const char *path, const char *mode)
{
    FILE *stream;
    if (fopen_emulated(path, mode, &stream))
        return stream;
    return REAL(fopen)(path, mode);
}

EXPORT FILE *fopen64(const char *path, const char *mode)
{
    FILE *stream;
    if (fopen_emulated(path, mode, &stream))
        return stream;
    return REAL(fopen64)(path, mode);
}

/* --- ioctl, close, dup ------------------------------------------------------------------------------------ */

/* the third argument is read as one register-sized value: a pointer or an integer, as the kernel sees it */
EXPORT int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    unsigned long arg = va_arg(ap, unsigned long);
    va_end(ap);
    if (routed(fd))
        return (int)CALL(KG_IOCTL, "iuu", fd, (long long)request, (long long)arg);
    return REAL(ioctl)(fd, request, arg);
}

EXPORT int close(int fd)
{
    if (routed(fd))
        return (int)CALL(KG_CLOSE, "i", fd); /* the server closes its placeholder fd itself */
    return REAL(close)(fd);
}

/* After a real dup of a managed fd, the server shares its object with the new fd (and marks it). */
static int dup_done(int oldfd, int newfd)
{
    if (newfd < 0 || !routed(oldfd))
        return newfd;
    if (CALL(KG_DUP, "ii", oldfd, newfd) < 0) {
        int err = errno;
        REAL(close)(newfd);
        errno = err;
        return -1;
    }
    return newfd;
}

/* dup2/dup3 onto an fd the server owns: the server drops that one first (it closes the placeholder), as the
 * kernel's dup2 closes the target; an invalid oldfd leaves newfd alone (EBADF first, as in the kernel). */
static int drop_managed_target(int oldfd, int newfd)
{
    if (oldfd == newfd || !routed(newfd))
        return 0;
    if (REAL(fcntl)(oldfd, F_GETFD) < 0)
        return -1;
    CALL(KG_CLOSE, "i", newfd);
    return 0;
}

EXPORT int dup(int oldfd)
{
    return dup_done(oldfd, REAL(dup)(oldfd));
}

EXPORT int dup2(int oldfd, int newfd)
{
    if (drop_managed_target(oldfd, newfd) < 0)
        return -1;
    int fd = REAL(dup2)(oldfd, newfd);
    return oldfd == newfd ? fd : dup_done(oldfd, fd);
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
    if (oldfd != newfd && drop_managed_target(oldfd, newfd) < 0)
        return -1;
    return dup_done(oldfd, REAL(dup3)(oldfd, newfd, flags));
}

/* fcntl's third argument is an int, a long or a pointer depending on cmd: read as one register-sized value,
 * which is what the kernel receives too (for commands without one the value is unused). */
#define FCNTL_BODY(realname)                                                                                 \
    va_list ap;                                                                                              \
    va_start(ap, cmd);                                                                                       \
    unsigned long arg = va_arg(ap, unsigned long);                                                           \
    va_end(ap);                                                                                              \
    int r = REAL(realname)(fd, cmd, arg);                                                                    \
    if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)                                                            \
        return dup_done(fd, r);                                                                              \
    return r;

EXPORT int fcntl(int fd, int cmd, ...)
{
    FCNTL_BODY(fcntl)
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
    FCNTL_BODY(fcntl64)
}

/* --- read, write, seek, size ------------------------------------------------------------------------------ */

EXPORT ssize_t read(int fd, void *buf, size_t count)
{
    if (routed(fd))
        return CALL(KG_READ, "iuu", fd, (long long)(size_t)buf, (long long)count);
    return REAL(read)(fd, buf, count);
}

EXPORT ssize_t __read_chk(int fd, void *buf, size_t count, size_t buflen)
{
    if (routed(fd) && count <= buflen)
        return CALL(KG_READ, "iuu", fd, (long long)(size_t)buf, (long long)count);
    return REAL(__read_chk)(fd, buf, count, buflen); /* which aborts when count > buflen */
}

EXPORT ssize_t write(int fd, const void *buf, size_t count)
{
    if (routed(fd))
        return CALL(KG_WRITE, "iuu", fd, (long long)(size_t)buf, (long long)count);
    return REAL(write)(fd, buf, count);
}

#define PREAD(fd, buf, count, offset)                                                                        \
    CALL(KG_PREAD, "iuui", fd, (long long)(size_t)(buf), (long long)(count), (long long)(offset))
#define PWRITE(fd, buf, count, offset)                                                                       \
    CALL(KG_PWRITE, "iuui", fd, (long long)(size_t)(buf), (long long)(count), (long long)(offset))

EXPORT ssize_t pread(int fd, void *buf, size_t count, off_t offset)
{
    if (routed(fd))
        return PREAD(fd, buf, count, offset);
    return REAL(pread)(fd, buf, count, offset);
}

EXPORT ssize_t pread64(int fd, void *buf, size_t count, off64_t offset)
{
    if (routed(fd))
        return PREAD(fd, buf, count, offset);
    return REAL(pread64)(fd, buf, count, offset);
}

EXPORT ssize_t __pread_chk(int fd, void *buf, size_t count, off_t offset, size_t buflen)
{
    if (routed(fd) && count <= buflen)
        return PREAD(fd, buf, count, offset);
    return REAL(__pread_chk)(fd, buf, count, offset, buflen);
}

EXPORT ssize_t __pread64_chk(int fd, void *buf, size_t count, off64_t offset, size_t buflen)
{
    if (routed(fd) && count <= buflen)
        return PREAD(fd, buf, count, offset);
    return REAL(__pread64_chk)(fd, buf, count, offset, buflen);
}

EXPORT ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
{
    if (routed(fd))
        return PWRITE(fd, buf, count, offset);
    return REAL(pwrite)(fd, buf, count, offset);
}

EXPORT ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset)
{
    if (routed(fd))
        return PWRITE(fd, buf, count, offset);
    return REAL(pwrite64)(fd, buf, count, offset);
}

EXPORT off_t lseek(int fd, off_t offset, int whence)
{
    if (routed(fd))
        return CALL(KG_LSEEK, "iii", fd, (long long)offset, whence);
    return REAL(lseek)(fd, offset, whence);
}

EXPORT off64_t lseek64(int fd, off64_t offset, int whence)
{
    if (routed(fd))
        return CALL(KG_LSEEK, "iii", fd, (long long)offset, whence);
    return REAL(lseek64)(fd, offset, whence);
}

EXPORT int ftruncate(int fd, off_t length)
{
    if (routed(fd))
        return (int)CALL(KG_FTRUNCATE, "ii", fd, (long long)length);
    return REAL(ftruncate)(fd, length);
}

EXPORT int ftruncate64(int fd, off64_t length)
{
    if (routed(fd))
        return (int)CALL(KG_FTRUNCATE, "ii", fd, (long long)length);
    return REAL(ftruncate64)(fd, length);
}

EXPORT int fallocate(int fd, int mode, off_t offset, off_t length)
{
    if (routed(fd))
        return (int)CALL(KG_FALLOCATE, "iiii", fd, mode, (long long)offset, (long long)length);
    return REAL(fallocate)(fd, mode, offset, length);
}

EXPORT int fallocate64(int fd, int mode, off64_t offset, off64_t length)
{
    if (routed(fd))
        return (int)CALL(KG_FALLOCATE, "iiii", fd, mode, (long long)offset, (long long)length);
    return REAL(fallocate64)(fd, mode, offset, length);
}

/* --- fstat: on x86-64 struct stat and struct stat64 are the same layout ------------------------------------ */

#define FSTAT(fd, buf) (int)CALL(KG_FSTAT, "iu", fd, (long long)(size_t)(buf))

/* fstatat(fd, "", buf, AT_EMPTY_PATH) is fstat(fd) */
static int fstatat_is_fstat(int dirfd, const char *path, int flags)
{
    return (flags & AT_EMPTY_PATH) && path && !path[0] && routed(dirfd);
}

EXPORT int fstat(int fd, struct stat *buf)
{
    if (routed(fd))
        return FSTAT(fd, buf);
    return REAL(fstat)(fd, buf);
}

EXPORT int fstat64(int fd, struct stat64 *buf)
{
    if (routed(fd))
        return FSTAT(fd, buf);
    return REAL(fstat64)(fd, buf);
}

EXPORT int fstatat(int dirfd, const char *path, struct stat *buf, int flags)
{
    if (fstatat_is_fstat(dirfd, path, flags))
        return FSTAT(dirfd, buf);
    return REAL(fstatat)(dirfd, path, buf, flags);
}

EXPORT int fstatat64(int dirfd, const char *path, struct stat64 *buf, int flags)
{
    if (fstatat_is_fstat(dirfd, path, flags))
        return FSTAT(dirfd, buf);
    return REAL(fstatat64)(dirfd, path, buf, flags);
}

/* programs built against a C library older than glibc 2.33 call fstat through these */
EXPORT int __fxstat(int ver, int fd, struct stat *buf)
{
    if (routed(fd))
        return FSTAT(fd, buf);
    return REAL(__fxstat)(ver, fd, buf);
}

EXPORT int __fxstat64(int ver, int fd, struct stat64 *buf)
{
    if (routed(fd))
        return FSTAT(fd, buf);
    return REAL(__fxstat64)(ver, fd, buf);
}

EXPORT int __fxstatat(int ver, int dirfd, const char *path, struct stat *buf, int flags)
{
    if (fstatat_is_fstat(dirfd, path, flags))
        return FSTAT(dirfd, buf);
    return REAL(__fxstatat)(ver, dirfd, path, buf, flags);
}

EXPORT int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *buf, int flags)
{
    if (fstatat_is_fstat(dirfd, path, flags))
        return FSTAT(dirfd, buf);
    return REAL(__fxstatat64)(ver, dirfd, path, buf, flags);
}

/* --- mappings ---------------------------------------------------------------------------------------------- */

static void *mmap_managed(void *addr, size_t length, int prot, int flags, int fd, long long offset)
{
    long long r = CALL(KG_MMAP, "uuiiii", (long long)(size_t)addr, (long long)length, prot, flags, fd, offset);
    return r == -1 ? MAP_FAILED : (void *)(size_t)r;
}

EXPORT void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    if (!(flags & MAP_ANONYMOUS) && routed(fd))
        return mmap_managed(addr, length, prot, flags, fd, offset);
    return REAL(mmap)(addr, length, prot, flags, fd, offset);
}

EXPORT void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off64_t offset)
{
    if (!(flags & MAP_ANONYMOUS) && routed(fd))
        return mmap_managed(addr, length, prot, flags, fd, offset);
    return REAL(mmap64)(addr, length, prot, flags, fd, offset);
}

/* Every munmap once the server runs: it may be a mapping of the server's, or guest memory of a memslot
 * (the server runs the kernel's mmu-notifier invalidation before the range goes away). */
EXPORT int munmap(void *addr, size_t length)
{
    if (routed_any() && kg_has(KG_MUNMAP)) {
        long long r = CALL(KG_MUNMAP, "uu", (long long)(size_t)addr, (long long)length);
        if (r < 0)
            return -1;
        if (r == 1)
            return 0; /* the server released its own mapping */
    }
    return REAL(munmap)(addr, length);
}

EXPORT int madvise(void *addr, size_t length, int advice)
{
    if (routed_any() && kg_has(KG_MADVISE)) {
        long long r = CALL(KG_MADVISE, "uui", (long long)(size_t)addr, (long long)length, advice);
        if (r != -2)
            return (int)r;
    }
    return REAL(madvise)(addr, length, advice);
}

/* --- load time --------------------------------------------------------------------------------------------- */

/* Remove this library from LD_PRELOAD so the program's children (addr2line, a shell from system()) run
 * without the sim; other entries stay. Runs before main, while the process has one thread. */
__attribute__((constructor)) static void kg_forget_preload(void)
{
    const char *preload = getenv("LD_PRELOAD");
    Dl_info info;
    if (!preload || !dladdr((void *)kg_forget_preload, &info) || !info.dli_fname)
        return;
    char self[4096];
    if (!realpath(info.dli_fname, self))
        snprintf(self, sizeof self, "%s", info.dli_fname);
    size_t len = strlen(preload);
    char *kept = malloc(len + 1), *copy = strdup(preload);
    if (!kept || !copy) {
        free(kept);
        free(copy);
        return;
    }
    kept[0] = 0;
    char *save = NULL, resolved[4096];
    for (char *entry = strtok_r(copy, ": ", &save); entry; entry = strtok_r(NULL, ": ", &save)) {
        if (strcmp(entry, info.dli_fname) == 0 || (realpath(entry, resolved) && strcmp(resolved, self) == 0))
            continue;
        if (kept[0])
            strcat(kept, ":");
        strcat(kept, entry);
    }
    if (kept[0])
        setenv("LD_PRELOAD", kept, 1);
    else
        unsetenv("LD_PRELOAD");
    free(kept);
    free(copy);
}
