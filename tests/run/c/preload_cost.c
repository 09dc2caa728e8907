/* What the preload library costs a program: prints ns per call for the calls programs make most.
 *
 *   open+close /dev/kvm  (after the start: selftests open it once per capability check)
 *   ioctl on an ordinary fd (pass-through: FIONREAD on a pipe)
 *   ioctl KVM_CHECK_EXTENSION on /dev/kvm (a managed round trip through the server)
 *
 * Run it directly for the baseline (the host's KVM) and under `kvmgmem run` for the sim.
 * Each figure is the best of 5 rounds (the machine is shared). Usage: preload_cost [ITERATIONS]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define KVM_CHECK_EXTENSION 0xAE03
#define KVM_CAP_USER_MEMORY 3

#define ROUNDS 5
#define BEST(var, body)                                                                                      \
    double var = 1e30;                                                                                       \
    for (int round = 0; round < ROUNDS; round++) {                                                           \
        double t0_ = now_ns();                                                                               \
        body;                                                                                                \
        double t_ = now_ns() - t0_;                                                                          \
        if (t_ < var)                                                                                        \
            var = t_;                                                                                        \
    }

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 2000;
    double t0 = now_ns();
    int kvm = open("/dev/kvm", O_RDWR);
    double first = now_ns() - t0;
    if (kvm < 0) {
        perror("open /dev/kvm");
        return 1;
    }
    printf("first open /dev/kvm (starts the sim under kvmgmem run): %.0f us\n", first / 1e3);

    BEST(t_open, for (int i = 0; i < n; i++) {
        int fd = open("/dev/kvm", O_RDWR);
        if (fd < 0 || close(fd) != 0) {
            perror("open/close");
            return 1;
        }
    })
    printf("open+close /dev/kvm: %.0f ns\n", t_open / n);

    int p[2];
    if (pipe(p) != 0)
        return 1;
    int avail;
    BEST(t_pass, for (int i = 0; i < n * 10; i++) ioctl(p[0], FIONREAD, &avail))
    printf("pass-through ioctl (FIONREAD on a pipe): %.0f ns\n", t_pass / (n * 10));

    BEST(t_managed, for (int i = 0; i < n; i++) if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) < 0) {
        perror("KVM_CHECK_EXTENSION");
        return 1;
    })
    printf("managed ioctl KVM_CHECK_EXTENSION: %.0f ns\n", t_managed / n);
    return 0;
}
