/* Exercise every wrapper of the preload library against the fake server (tests/run/preload_fake_server.py).
 *
 * Prints one "ok <what>" line per check and exits 0 when all hold; on the first failure prints "FAIL <what>"
 * with the values and exits 1. The test also reads the fake server's log, which shows what reached it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define KVM_GET_API_VERSION 0xAE00
#define KVM_CHECK_EXTENSION 0xAE03
#define REQ_FAIL 0xAEF0
#define REQ_CRASH 0xAEF1
#define REQ_THREAD 0xAEF2

#define CHECK(what, cond, ...)                                                                               \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            printf("FAIL %s: ", what);                                                                       \
            printf(__VA_ARGS__);                                                                             \
            printf(" (errno %d %s)\n", errno, strerror(errno));                                              \
            fflush(stdout);                                                                                  \
            exit(1);                                                                                         \
        }                                                                                                    \
        printf("ok %s\n", what);                                                                             \
    } while (0)

static volatile sig_atomic_t got_sigint_a, got_sigint_b;
static void on_sigint_a(int sig) { (void)sig; got_sigint_a = 1; }
static void on_sigint_b(int sig) { (void)sig; got_sigint_b = 1; }

static void (*current_sigint(void))(int)
{
    struct sigaction sa;
    sigaction(SIGINT, NULL, &sa);
    return sa.sa_handler;
}

#define NTHREADS 8
#define NCALLS 300

struct worker {
    int kvm;
    int failures;
};

static void *worker_main(void *p)
{
    struct worker *w = p;
    long tid = syscall(SYS_gettid);
    for (int i = 0; i < NCALLS; i++) {
        if (ioctl(w->kvm, REQ_THREAD, 0) != tid)
            w->failures++;
        if (i % 50 == 0) { /* opens and closes of its own, concurrently with the others */
            int fd = open("/dev/kvm", O_RDWR);
            if (fd < 0 || ioctl(fd, KVM_CHECK_EXTENSION, i) != i || close(fd) != 0)
                w->failures++;
        }
        void *anon = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (anon == MAP_FAILED || munmap(anon, 4096) != 0)
            w->failures++;
    }
    return NULL;
}

int main(void)
{
    char buf[64];
    struct stat st;

    /* a handler installed before the sim starts stays */
    signal(SIGINT, on_sigint_a);
    CHECK("no python before /dev/kvm", getenv("LD_PRELOAD") == NULL, "LD_PRELOAD=%s", getenv("LD_PRELOAD"));

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    CHECK("open /dev/kvm", kvm >= 0, "fd %d", kvm);
    CHECK("sigint handler kept", current_sigint() == on_sigint_a, "handler %p", (void *)current_sigint());
    raise(SIGINT);
    CHECK("sigint delivered to the program", got_sigint_a == 1, "a=%d", got_sigint_a);
    signal(SIGINT, on_sigint_b);
    raise(SIGINT);
    CHECK("sigint handler installed after start", got_sigint_b == 1, "b=%d", got_sigint_b);

    int kvm2 = openat(AT_FDCWD, "/dev/kvm", O_RDWR);
    CHECK("openat routed", kvm2 >= 0 && ioctl(kvm2, KVM_GET_API_VERSION, 0) == 12, "fd %d", kvm2);
    CHECK("close openat fd", close(kvm2) == 0, "-");

    int r = ioctl(kvm, KVM_GET_API_VERSION, 0);
    CHECK("KVM_GET_API_VERSION", r == 12, "r=%d", r);
    r = ioctl(kvm, KVM_CHECK_EXTENSION, 42);
    CHECK("KVM_CHECK_EXTENSION", r == 42, "r=%d", r);
    errno = 0;
    r = ioctl(kvm, REQ_FAIL, 0);
    CHECK("OSError -> -1/errno", r == -1 && errno == EINVAL, "r=%d", r);
    errno = 0;
    r = ioctl(kvm, REQ_CRASH, 0);
    CHECK("other exception -> -1/EIO", r == -1 && errno == EIO, "r=%d", r);

    /* an unmanaged fd: the real ioctl */
    int pipefd[2];
    CHECK("pipe", pipe(pipefd) == 0, "-");
    CHECK("pipe write", write(pipefd[1], "abc", 3) == 3, "-");
    int avail = -1;
    r = ioctl(pipefd[0], FIONREAD, &avail);
    CHECK("pass-through ioctl", r == 0 && avail == 3, "r=%d avail=%d", r, avail);
    CHECK("pass-through read", read(pipefd[0], buf, 3) == 3 && memcmp(buf, "abc", 3) == 0, "-");
    close(pipefd[0]);
    close(pipefd[1]);

    /* dups share the server's object */
    int d1 = dup(kvm);
    CHECK("dup routed", d1 >= 0 && ioctl(d1, KVM_GET_API_VERSION, 0) == 12, "d1=%d", d1);
    int d2 = dup2(kvm, 100);
    CHECK("dup2 routed", d2 == 100 && ioctl(100, KVM_CHECK_EXTENSION, 7) == 7, "d2=%d", d2);
    int d3 = dup3(d1, 100, O_CLOEXEC); /* onto a managed fd: the server drops it first */
    CHECK("dup3 onto a managed fd", d3 == 100 && ioctl(100, KVM_CHECK_EXTENSION, 8) == 8, "d3=%d", d3);
    errno = 0;
    CHECK("dup2 of a bad fd leaves the target", dup2(999, 100) == -1 && errno == EBADF &&
          ioctl(100, KVM_CHECK_EXTENSION, 9) == 9, "-");
    int d4 = fcntl(kvm, F_DUPFD_CLOEXEC, 200);
    CHECK("fcntl F_DUPFD_CLOEXEC routed", d4 >= 200 && ioctl(d4, KVM_GET_API_VERSION, 0) == 12, "d4=%d", d4);
    CHECK("fcntl F_GETFD passes through", fcntl(d4, F_GETFD) == FD_CLOEXEC, "-");
    CHECK("close dups", close(d1) == 0 && close(100) == 0 && close(d4) == 0, "-");
    errno = 0;
    CHECK("closed dup is gone", ioctl(d1, KVM_GET_API_VERSION, 0) == -1 && errno == EBADF, "-");

    /* file operations; sizes and flags the compiler cannot see make a _FORTIFY_SOURCE build call __read_chk,
     * __pread_chk and __open_2 */
    volatile size_t four = 4;
    volatile int rdwr = O_RDWR;
    int kvm3 = open("/dev/kvm", rdwr);
    CHECK("open with runtime flags", kvm3 >= 0 && ioctl(kvm3, KVM_GET_API_VERSION, 0) == 12 && close(kvm3) == 0, "-");
    memset(buf, 0, sizeof buf);
    CHECK("read", read(kvm, buf, four) == 4 && memcmp(buf, "kvm!", 4) == 0, "buf=%s", buf);
    CHECK("pread runtime size", pread(kvm, buf, four, 0) == 4 && memcmp(buf, "pppp", 4) == 0, "-");
    CHECK("write", write(kvm, "hello", 5) == 5, "-");
    CHECK("pread", pread(kvm, buf, 3, 4096) == 3 && memcmp(buf, "ppp", 3) == 0, "-");
    CHECK("pwrite", pwrite(kvm, "xyz", 3, 8192) == 3, "-");
    CHECK("lseek", lseek(kvm, 5, SEEK_SET) == 1005, "-");
    CHECK("ftruncate", ftruncate(kvm, 1 << 20) == 0, "-");
    CHECK("fallocate", fallocate(kvm, 3, 0, 4096) == 0, "-");
    errno = 0;
    CHECK("fallocate error", fallocate(kvm, 0, 0, 0) == -1 && errno == EINVAL, "-");
    CHECK("fstat", fstat(kvm, &st) == 0 && st.st_size == 8192 && S_ISREG(st.st_mode), "size %ld", (long)st.st_size);
    memset(&st, 0, sizeof st);
    CHECK("fstatat AT_EMPTY_PATH", fstatat(kvm, "", &st, AT_EMPTY_PATH) == 0 && st.st_size == 8192, "-");

    /* mappings */
    char *map = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, kvm, 0);
    CHECK("mmap routed", map != MAP_FAILED && memcmp(map, "MAPPED", 6) == 0, "map=%p", (void *)map);
    CHECK("madvise routed", madvise(map, 8192, MADV_DONTNEED) == 0, "-");
    CHECK("munmap routed", munmap(map, 8192) == 0, "-");
    char *anon = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK("anonymous mmap", anon != MAP_FAILED, "-");
    CHECK("madvise passes through", madvise(anon, 4096, MADV_DONTNEED) == 0, "-");
    CHECK("munmap passes through", munmap(anon, 4096) == 0, "-");

    /* sysfs: a server-provided real fd, read through stdio */
    FILE *f = fopen("/sys/module/kvm/parameters/fake_param", "r");
    CHECK("fopen sysfs", f && fgets(buf, sizeof buf, f) && strcmp(buf, "Y\n") == 0, "f=%p", (void *)f);
    fclose(f);
    errno = 0;
    int denied = open("/sys/module/kvm/parameters/denied", O_RDONLY);
    CHECK("sysfs open error", denied == -1 && errno == EACCES, "fd %d", denied);

    /* children do not load the sim */
    fflush(stdout);
    r = system("test -z \"$LD_PRELOAD\" && echo child-env-clean");
    CHECK("system() child without LD_PRELOAD", r == 0, "r=%d", r);

    /* threads */
    pthread_t threads[NTHREADS];
    struct worker workers[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        workers[i] = (struct worker){.kvm = kvm};
        pthread_create(&threads[i], NULL, worker_main, &workers[i]);
    }
    int failures = 0;
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(threads[i], NULL);
        failures += workers[i].failures;
    }
    CHECK("threads routed to their own thread", failures == 0, "%d failures", failures);

    /* fork: the child has its own copy of the server */
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        int ok = ioctl(kvm, KVM_GET_API_VERSION, 0) == 12;
        int fd = open("/dev/kvm", O_RDWR);
        ok = ok && fd >= 0 && ioctl(fd, KVM_CHECK_EXTENSION, 5) == 5 && close(fd) == 0;
        exit(ok ? 0 : 1); /* exit, not _exit: the server's exit work must still run only in the parent */
    }
    int status = -1;
    waitpid(pid, &status, 0);
    CHECK("fork child uses the server", WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d", status);

    CHECK("close /dev/kvm", close(kvm) == 0, "-");
    errno = 0;
    CHECK("closed fd is gone", close(kvm) == -1 && errno == EBADF, "-");
    printf("all ok\n");
    return 0;
}
