/*
 * The floor for exit round trips: a plain C KVM_RUN loop over the same guest image the Python bench runs.
 *
 * usage: exitloop IMAGE MEM_BYTES STATE N_EXITS
 *   IMAGE      raw guest-physical memory contents, loaded at gpa 0 (built by kvmgmem.guest in Python)
 *   MEM_BYTES  size of slot 0 (>= image size)
 *   STATE      struct kvm_regs (144 bytes) followed by struct kvm_sregs (312 bytes), as KVM_SET_* take them
 *   N_EXITS    number of KVM_EXIT_IO exits to time
 * prints one JSON line: {"exits": N, "seconds": S, "exits_per_second": R, "cpu_seconds": C}
 *   (C is this thread's CPU time over the loop, guest time included: unlike S it leaves out time the thread
 *   spent waiting for a CPU while other jobs ran)
 *
 * Built with -shared -DEXITLOOP_LIBRARY instead, it is a library with the same timed loop as
 * exitloop_timed(vcpu_fd, kvm_run, n, &seconds, &cpu_seconds), for a loop inside the Python process on
 * kvmgmem's own vCPU (KVM_RUN only works from the process that created the VM): the same kernel round trip
 * as vcpu.run() with no Python in it, so the difference is what the Python side adds.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double elapsed(const struct timespec *a, const struct timespec *b)
{
    return (b->tv_sec - a->tv_sec) + (b->tv_nsec - a->tv_nsec) / 1e9;
}

/* n_exits KVM_RUNs, each expected to end in KVM_EXIT_IO. Returns -1 after a failed KVM_RUN (errno set), the
 * number of exits done before an unexpected exit reason, or n_exits; times the loop (wall and thread CPU). */
long exitloop_timed(int vcpu, struct kvm_run *run, long n_exits, double *seconds, double *cpu_seconds)
{
    struct timespec t0, t1, c0, c1;
    long i;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (i = 0; i < n_exits; i++) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0)
            return -1;
        if (run->exit_reason != KVM_EXIT_IO)
            break;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
    *seconds = elapsed(&t0, &t1);
    *cpu_seconds = elapsed(&c0, &c1);
    return i;
}

#ifndef EXITLOOP_LIBRARY
static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv)
{
    if (argc != 5) { fprintf(stderr, "usage: %s IMAGE MEM_BYTES STATE N_EXITS\n", argv[0]); return 2; }
    size_t mem_size = strtoull(argv[2], NULL, 0);
    long n_exits = strtol(argv[4], NULL, 0);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap guest memory");
    FILE *image = fopen(argv[1], "rb");
    if (!image) die("open image");
    fread(mem, 1, mem_size, image);
    fclose(image);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uint64_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");

    struct { struct kvm_cpuid2 head; struct kvm_cpuid_entry2 entries[256]; } cpuid = { .head.nent = 256 };
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0) die("KVM_SET_CPUID2");

    struct kvm_regs regs;
    struct kvm_sregs sregs;
    FILE *state = fopen(argv[3], "rb");
    if (!state) die("open state");
    if (fread(&regs, sizeof regs, 1, state) != 1 || fread(&sregs, sizeof sregs, 1, state) != 1) die("read state");
    fclose(state);
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    /* one warm-up exit, then the timed loop */
    if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
    double seconds, cpu;
    long done = exitloop_timed(vcpu, run, n_exits, &seconds, &cpu);
    if (done < 0) die("KVM_RUN");
    if (done < n_exits) {
        fprintf(stderr, "unexpected exit %u after %ld exits\n", run->exit_reason, done);
        return 1;
    }
    printf("{\"exits\": %ld, \"seconds\": %.6f, \"exits_per_second\": %.1f, \"cpu_seconds\": %.6f}\n", n_exits,
           seconds, n_exits / seconds, cpu);
    return 0;
}
#endif
