/* A small VMM of the project's own, in C over <linux/kvm.h>: the calls a real VMM makes for guest_memfd.
 *
 * Run directly it uses the host's KVM; under `kvmgmem run` the sim. Part 1 (every host with guest_memfd): a
 * default VM whose 64-bit guest does OUT, IN, an MMIO write and read, reads guest_memfd-backed memory
 * through a slot bound to a dup of the guest_memfd fd, and HLTs; guest_memfd file operations (fstat, read,
 * pread, pwrite, lseek, fallocate, mmap). Part 2 (when KVM_CAP_VM_TYPES has KVM_X86_SW_PROTECTED_VM): private
 * memory, a private access to a slot without guest_memfd (-1/EFAULT with KVM_EXIT_MEMORY_FAULT filled), its
 * conversion to shared and the retried access.
 *
 * Prints "ok <check>" per check, "skip <part>: <why>" for a part the host lacks, "all ok" and exit 0 at the
 * end; "FAIL <check>: ..." and exit 1 at the first failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* --- guest_memfd uapi (Linux 6.8+; older system headers lack it) ------------------------------------------ */
#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_userspace_memory_region2 {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
    __u64 guest_memfd_offset;
    __u32 guest_memfd;
    __u32 pad1;
    __u64 pad2[14];
};
struct kvm_memory_attributes {
    __u64 address;
    __u64 size;
    __u64 attributes;
    __u64 flags;
};
struct kvm_create_guest_memfd {
    __u64 size;
    __u64 flags;
    __u64 reserved[6];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#define KVM_CAP_USER_MEMORY2 231
#define KVM_CAP_MEMORY_ATTRIBUTES 233
#define KVM_CAP_GUEST_MEMFD 234
#define KVM_CAP_VM_TYPES 235
#define KVM_MEM_GUEST_MEMFD (1U << 2)
#define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ULL << 3)
#define KVM_EXIT_MEMORY_FAULT 39
#define KVM_MEMORY_EXIT_FLAG_PRIVATE (1ULL << 3)
#define KVM_X86_SW_PROTECTED_VM 1
#endif
#ifndef KVM_CAP_GUEST_MEMFD_FLAGS
#define KVM_CAP_GUEST_MEMFD_FLAGS 244
#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#endif

/* kvm_run.memory_fault, at the start of the exit union (absent from older headers) */
struct memory_fault_exit {
    __u64 flags;
    __u64 gpa;
    __u64 size;
};

#define PAGE 4096UL
#define MEM_SIZE 0x10000UL /* 64 KiB at gpa 0: slot 0 */
#define CODE_GPA 0x1000UL
#define MMIO_GPA 0x10000UL /* between slot 0 and slot 1: no memslot */
#define SLOT1_GPA 0x20000UL
#define PORT 0x3f8

#define CHECK(what, cond, ...)                                                                               \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            int err_ = errno;                                                                                \
            printf("FAIL %s: ", what);                                                                       \
            printf(__VA_ARGS__);                                                                             \
            printf(" (errno %d %s)\n", err_, strerror(err_));                                                \
            fflush(stdout);                                                                                  \
            exit(1);                                                                                         \
        } else {                                                                                             \
            printf("ok %s\n", what);                                                                         \
        }                                                                                                    \
    } while (0)

static int kvm;
static long run_size;

/* --- helpers ------------------------------------------------------------------------------------------------ */

static void *guest_memory(size_t size)
{
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK("mmap guest memory", mem != MAP_FAILED, "size %zu", size);
    return mem;
}

static void set_region(int vm, __u32 slot, __u32 flags, __u64 gpa, __u64 size, void *hva, int gmem, __u64 offset)
{
    struct kvm_userspace_memory_region2 region = {
        .slot = slot,
        .flags = flags,
        .guest_phys_addr = gpa,
        .memory_size = size,
        .userspace_addr = (__u64)(uintptr_t)hva,
        .guest_memfd_offset = offset,
        .guest_memfd = (__u32)gmem,
    };
    int r = ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &region);
    CHECK("KVM_SET_USER_MEMORY_REGION2", r == 0, "slot %u gpa 0x%llx flags 0x%x", slot, gpa, flags);
}

static void set_attributes(int vm, __u64 gpa, __u64 size, __u64 attributes)
{
    struct kvm_memory_attributes attr = {.address = gpa, .size = size, .attributes = attributes};
    int r = ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &attr);
    CHECK("KVM_SET_MEMORY_ATTRIBUTES", r == 0, "gpa 0x%llx attributes 0x%llx", gpa, attributes);
}

static int create_gmem(int vm, __u64 size, __u64 flags)
{
    struct kvm_create_guest_memfd gmem = {.size = size, .flags = flags};
    int fd = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &gmem);
    CHECK("KVM_CREATE_GUEST_MEMFD", fd >= 0, "size 0x%llx flags 0x%llx", size, flags);
    return fd;
}

/* Identity-map the first 2 MiB with one large page: PML4 at 0x4000, PDPT at 0x5000, PD at 0x6000 (shared
 * pages of slot 0). Covers the code, the MMIO gap and slot 1. */
#define PML4_GPA 0x4000UL
static void write_page_tables(__u8 *mem)
{
    __u64 *pml4 = (__u64 *)(mem + PML4_GPA), *pdpt = (__u64 *)(mem + PML4_GPA + PAGE),
          *pd = (__u64 *)(mem + PML4_GPA + 2 * PAGE);
    pml4[0] = (PML4_GPA + PAGE) | 3;      /* present, writable */
    pdpt[0] = (PML4_GPA + 2 * PAGE) | 3;
    pd[0] = 0x83;                         /* present, writable, 2 MiB page at 0 */
}

/* a vCPU in 64-bit mode at CODE_GPA, flat segments, the page tables above */
static int create_vcpu(int vm, struct kvm_run **run)
{
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    CHECK("KVM_CREATE_VCPU", vcpu >= 0, "-");
    *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    CHECK("mmap kvm_run", *run != MAP_FAILED, "size %ld", run_size);
    struct kvm_sregs sregs;
    CHECK("KVM_GET_SREGS", ioctl(vcpu, KVM_GET_SREGS, &sregs) == 0, "-");
    struct kvm_segment code = {.base = 0, .limit = 0xffffffff, .selector = 8, .type = 11, .present = 1, .s = 1,
                               .l = 1, .g = 1};
    struct kvm_segment data = {.base = 0, .limit = 0xffffffff, .selector = 16, .type = 3, .present = 1, .s = 1,
                               .db = 1, .g = 1};
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = 1 << 5;                            /* PAE */
    sregs.cr0 = (1U << 31) | (1 << 5) | 1;         /* PG, NE, PE */
    sregs.efer = (1 << 8) | (1 << 10);             /* LME, LMA */
    CHECK("KVM_SET_SREGS", ioctl(vcpu, KVM_SET_SREGS, &sregs) == 0, "-");
    struct kvm_regs regs = {.rip = CODE_GPA, .rflags = 2};
    CHECK("KVM_SET_REGS", ioctl(vcpu, KVM_SET_REGS, &regs) == 0, "-");
    return vcpu;
}

static void vcpu_run(int vcpu)
{
    int r = ioctl(vcpu, KVM_RUN, 0);
    CHECK("KVM_RUN", r == 0, "r=%d", r);
}

/* the exit in words, for failure messages */
static const char *exit_text(struct kvm_run *run)
{
    static char text[256];
    if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
        snprintf(text, sizeof text, "internal error suberror %u ndata %u data[0..1] 0x%llx 0x%llx",
                 run->internal.suberror, run->internal.ndata, run->internal.data[0], run->internal.data[1]);
    else
        snprintf(text, sizeof text, "exit %u", run->exit_reason);
    return text;
}

static __u8 *io_data(struct kvm_run *run)
{
    return (__u8 *)run + run->io.data_offset;
}

/* run until an OUT of one byte to PORT; check its value */
static void expect_out(int vcpu, struct kvm_run *run, __u8 value, const char *what)
{
    vcpu_run(vcpu);
    CHECK(what, run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT && run->io.port == PORT &&
          run->io.size == 1 && run->io.count == 1 && *io_data(run) == value,
          "%s dir %u port 0x%x data 0x%x, wanted OUT 0x%x", exit_text(run), run->io.direction,
          run->io.port, *io_data(run), value);
}

static void expect_hlt(int vcpu, struct kvm_run *run)
{
    vcpu_run(vcpu);
    CHECK("KVM_EXIT_HLT", run->exit_reason == KVM_EXIT_HLT, "exit %u", run->exit_reason);
}

/* --- part 1: a default VM ------------------------------------------------------------------------------------ */

static const __u8 default_guest[] = {
    0x66, 0xba, 0xf8, 0x03,                   /* mov dx, 0x3f8 */
    0xb0, 0x41,                               /* mov al, 'A' */
    0xee,                                     /* out dx, al */
    0xec,                                     /* in al, dx */
    0x88, 0x04, 0x25, 0x00, 0x00, 0x01, 0x00, /* mov [0x10000], al: MMIO write (no memslot there) */
    0x8a, 0x1c, 0x25, 0x04, 0x00, 0x01, 0x00, /* mov bl, [0x10004]: MMIO read */
    0x88, 0xd8,                               /* mov al, bl */
    0xee,                                     /* out dx, al */
    0x8a, 0x04, 0x25, 0x10, 0x00, 0x02, 0x00, /* mov al, [0x20010]: slot 1, guest_memfd */
    0xee,                                     /* out dx, al */
    0xf4,                                     /* hlt */
};

static void gmem_file_ops(int gmem, __u64 size, int mappable)
{
    struct stat st;
    char buf[16];
    CHECK("guest_memfd fstat", fstat(gmem, &st) == 0 && (__u64)st.st_size == size && st.st_blksize == PAGE,
          "size %lld blksize %ld", (long long)st.st_size, (long)st.st_blksize);
    errno = 0;
    CHECK("guest_memfd read fails", read(gmem, buf, sizeof buf) < 0 && errno == EINVAL, "-");
    errno = 0;
    CHECK("guest_memfd pread fails", pread(gmem, buf, sizeof buf, 0) < 0 && errno == ESPIPE, "-");
    errno = 0;
    CHECK("guest_memfd pwrite fails", pwrite(gmem, buf, sizeof buf, 0) < 0 && errno == ESPIPE, "-");
    errno = 0;
    off_t off = lseek(gmem, 0, SEEK_SET);
    CHECK("guest_memfd lseek fails", off < 0 && errno == ESPIPE, "off %lld", (long long)off); /* not seekable */
    CHECK("fallocate allocate", fallocate(gmem, FALLOC_FL_KEEP_SIZE, 0, 2 * PAGE) == 0, "-");
    errno = 0;
    CHECK("fallocate past the end fails", fallocate(gmem, FALLOC_FL_KEEP_SIZE, size, PAGE) < 0 && errno == EINVAL,
          "-");
    errno = 0;
    CHECK("fallocate unaligned fails",
          fallocate(gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 1, PAGE) < 0 && errno == EINVAL, "-");
    errno = 0;
    void *priv = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, gmem, 0);
    CHECK("guest_memfd MAP_PRIVATE refused", priv == MAP_FAILED, "-");
    if (!mappable) {
        errno = 0;
        void *m = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);
        CHECK("guest_memfd without MMAP: mmap ENODEV", m == MAP_FAILED && errno == ENODEV, "-");
    }
}

static void part_default_vm(void)
{
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    CHECK("KVM_CREATE_VM type 0", vm >= 0, "-");
    __u8 *mem = guest_memory(MEM_SIZE);
    memcpy(mem + CODE_GPA, default_guest, sizeof default_guest);
    write_page_tables(mem);
    set_region(vm, 0, 0, 0, MEM_SIZE, mem, 0, 0);

    int flags = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_FLAGS);
    int want = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    int gmem = -1, gmem_dup = -1;
    __u8 *gmap = NULL;
    if (flags >= 0 && (flags & want) == want) {
        printf("ok KVM_CAP_GUEST_MEMFD_FLAGS on the VM: 0x%x\n", flags);
        gmem = create_gmem(vm, MEM_SIZE, want);
        gmem_file_ops(gmem, MEM_SIZE, 1);
        gmap = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);
        CHECK("mmap guest_memfd", gmap != MAP_FAILED, "-");
        memset(gmap, 0x5c, 2 * PAGE);
        gmap[0x10] = 0xab;
        CHECK("guest_memfd mapping reads back", gmap[0x10] == 0xab && gmap[PAGE] == 0x5c, "-");
        CHECK("fallocate punch hole", fallocate(gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, PAGE, PAGE) == 0,
              "-");
        CHECK("punched page reads zero", gmap[PAGE] == 0 && gmap[PAGE + 1] == 0 && gmap[0x10] == 0xab, "0x%x",
              gmap[PAGE]);
        CHECK("madvise guest_memfd mapping", madvise(gmap, MEM_SIZE, MADV_DONTNEED) == 0, "-");
        CHECK("MADV_DONTNEED keeps the file's data", gmap[0x10] == 0xab, "0x%x", gmap[0x10]);
        gmem_dup = dup(gmem);
        CHECK("dup guest_memfd", gmem_dup >= 0, "-");
        set_region(vm, 1, KVM_MEM_GUEST_MEMFD, SLOT1_GPA, MEM_SIZE, gmap, gmem_dup, 0);
    } else {
        printf("skip guest_memfd on a default VM: KVM_CAP_GUEST_MEMFD_FLAGS is %d\n", flags);
    }

    struct kvm_run *run;
    int vcpu = create_vcpu(vm, &run);
    expect_out(vcpu, run, 'A', "OUT");
    vcpu_run(vcpu);
    CHECK("IN", run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_IN && run->io.port == PORT &&
          run->io.size == 1, "exit %u", run->exit_reason);
    *io_data(run) = 0x5a; /* the IN's data, read back by KVM_RUN */
    vcpu_run(vcpu);
    CHECK("MMIO write", run->exit_reason == KVM_EXIT_MMIO && run->mmio.is_write && run->mmio.phys_addr == MMIO_GPA &&
          run->mmio.len == 1 && run->mmio.data[0] == 0x5a,
          "%s write %u gpa 0x%llx data 0x%x", exit_text(run), run->mmio.is_write, run->mmio.phys_addr,
          run->mmio.data[0]);
    vcpu_run(vcpu);
    CHECK("MMIO read", run->exit_reason == KVM_EXIT_MMIO && !run->mmio.is_write &&
          run->mmio.phys_addr == MMIO_GPA + 4 && run->mmio.len == 1,
          "%s gpa 0x%llx", exit_text(run), run->mmio.phys_addr);
    run->mmio.data[0] = 0x77;
    expect_out(vcpu, run, 0x77, "MMIO read completed");
    if (gmem >= 0) {
        expect_out(vcpu, run, 0xab, "guest reads guest_memfd through a dup-bound slot");
    } else {
        vcpu_run(vcpu); /* the read of gpa 0x20010 without a slot 1: MMIO */
        CHECK("MMIO read without slot 1", run->exit_reason == KVM_EXIT_MMIO, "exit %u", run->exit_reason);
        run->mmio.data[0] = 0xab;
        expect_out(vcpu, run, 0xab, "MMIO read completed");
    }
    expect_hlt(vcpu, run);

    CHECK("munmap kvm_run", munmap(run, run_size) == 0, "-");
    CHECK("close vCPU", close(vcpu) == 0, "-");
    if (gmem >= 0) {
        CHECK("munmap guest_memfd", munmap(gmap, MEM_SIZE) == 0, "-");
        CHECK("close guest_memfd", close(gmem) == 0 && close(gmem_dup) == 0, "-");
    }
    CHECK("close VM", close(vm) == 0, "-");
    CHECK("munmap guest memory", munmap(mem, MEM_SIZE) == 0, "-");
}

/* --- part 2: private memory on a KVM_X86_SW_PROTECTED_VM ---------------------------------------------------- */

static const __u8 protected_guest[] = {
    0x66, 0xba, 0xf8, 0x03,                         /* mov dx, 0x3f8 */
    0xb0, 0x50,                                     /* mov al, 'P' */
    0xee,                                           /* out dx, al */
    0x8a, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00,       /* mov al, [0x2000]: private, in guest_memfd (fresh: 0) */
    0xee,                                           /* out dx, al */
    0xc6, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00, 0x99, /* mov byte [0x2000], 0x99 */
    0x8a, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00,       /* mov al, [0x2000] */
    0xee,                                           /* out dx, al */
    0x8a, 0x04, 0x25, 0x00, 0x00, 0x02, 0x00,       /* mov al, [0x20000]: private in a slot without guest_memfd */
    0xee,                                           /* out dx, al */
    0xf4,                                           /* hlt */
};

static void part_protected_vm(void)
{
    int vm = ioctl(kvm, KVM_CREATE_VM, KVM_X86_SW_PROTECTED_VM);
    CHECK("KVM_CREATE_VM KVM_X86_SW_PROTECTED_VM", vm >= 0, "-");
    int attrs = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_MEMORY_ATTRIBUTES);
    CHECK("KVM_CAP_MEMORY_ATTRIBUTES has PRIVATE", attrs > 0 && (attrs & KVM_MEMORY_ATTRIBUTE_PRIVATE), "%d", attrs);

    int gmem = create_gmem(vm, MEM_SIZE, 0);
    gmem_file_ops(gmem, MEM_SIZE, 0);
    int gmem_dup = dup(gmem);
    CHECK("dup guest_memfd", gmem_dup >= 0, "-");
    __u8 *mem = guest_memory(MEM_SIZE);
    memcpy(mem + CODE_GPA, protected_guest, sizeof protected_guest);
    write_page_tables(mem);
    set_region(vm, 0, KVM_MEM_GUEST_MEMFD, 0, MEM_SIZE, mem, gmem_dup, 0);
    __u8 *plain = guest_memory(PAGE);
    plain[0] = 0x42;
    set_region(vm, 1, 0, SLOT1_GPA, PAGE, plain, 0, 0);
    set_attributes(vm, 0x2000, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE);
    set_attributes(vm, SLOT1_GPA, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE);

    struct kvm_run *run;
    int vcpu = create_vcpu(vm, &run);
    expect_out(vcpu, run, 'P', "OUT on a protected VM");
    expect_out(vcpu, run, 0, "private page starts zeroed");
    expect_out(vcpu, run, 0x99, "guest reads its private write");
    CHECK("host's shared view does not see private data", mem[0x2000] == 0, "0x%x", mem[0x2000]);

    errno = 0;
    int r = ioctl(vcpu, KVM_RUN, 0);
    struct memory_fault_exit *fault = (struct memory_fault_exit *)&run->mmio;
    CHECK("private access without guest_memfd: -1/EFAULT", r == -1 && errno == EFAULT, "r=%d", r);
    CHECK("KVM_EXIT_MEMORY_FAULT filled", run->exit_reason == KVM_EXIT_MEMORY_FAULT &&
          fault->flags == KVM_MEMORY_EXIT_FLAG_PRIVATE && fault->gpa == SLOT1_GPA && fault->size == PAGE,
          "exit %u flags 0x%llx gpa 0x%llx size 0x%llx", run->exit_reason, fault->flags, fault->gpa, fault->size);
    set_attributes(vm, SLOT1_GPA, PAGE, 0); /* convert to shared, as a VMM does on this exit */
    expect_out(vcpu, run, 0x42, "access retried after the conversion");
    expect_hlt(vcpu, run);

    CHECK("punch hole in bound guest_memfd",
          fallocate(gmem, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0x2000, PAGE) == 0, "-");
    CHECK("munmap kvm_run", munmap(run, run_size) == 0, "-");
    CHECK("close vCPU", close(vcpu) == 0, "-");
    CHECK("close guest_memfd and its dup", close(gmem) == 0 && close(gmem_dup) == 0, "-");
    CHECK("close VM", close(vm) == 0, "-");
    CHECK("munmap guest memory", munmap(mem, MEM_SIZE) == 0 && munmap(plain, PAGE) == 0, "-");
}

/* --- misuse: the kernel's errnos, no crash ------------------------------------------------------------------ */

static void part_misuse(void)
{
    errno = 0;
    CHECK("ioctl on a closed fd: EBADF", ioctl(1000, KVM_GET_API_VERSION, 0) == -1 && errno == EBADF, "-");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    CHECK("KVM_CREATE_VM", vm >= 0, "-");
    errno = 0;
    CHECK("unknown VM ioctl: ENOTTY", ioctl(vm, _IO(KVMIO, 0xfe), 0) == -1 && errno == ENOTTY, "-");
    errno = 0;
    CHECK("unknown VM type: EINVAL", ioctl(kvm, KVM_CREATE_VM, 0x7f) == -1 && errno == EINVAL, "-");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    CHECK("KVM_CREATE_VCPU", vcpu >= 0, "-");
    errno = 0;
    CHECK("duplicate vCPU id: EEXIST", ioctl(vm, KVM_CREATE_VCPU, 0) == -1 && errno == EEXIST, "-");
    errno = ERANGE;
    CHECK("close VM before its vCPU", close(vm) == 0, "-");
    CHECK("successful close leaves errno alone", errno == ERANGE, "errno %d", errno);
    struct kvm_regs regs;
    CHECK("vCPU fd still works after its VM fd closed", ioctl(vcpu, KVM_GET_REGS, &regs) == 0, "-");
    CHECK("close vCPU", close(vcpu) == 0, "-");
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sigint_before, sigint_after; /* starting the sim must not take over the program's Ctrl-C */
    sigaction(SIGINT, NULL, &sigint_before);
    errno = ERANGE; /* a call that succeeds leaves errno alone, also the first open (which starts the sim) */
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    CHECK("open /dev/kvm", kvm >= 0, "-");
    CHECK("successful open leaves errno alone", errno == ERANGE, "errno %d", errno);
    sigaction(SIGINT, NULL, &sigint_after);
    CHECK("SIGINT disposition unchanged", sigint_after.sa_handler == sigint_before.sa_handler, "%p, was %p",
          (void *)sigint_after.sa_handler, (void *)sigint_before.sa_handler);
    CHECK("KVM_GET_API_VERSION", ioctl(kvm, KVM_GET_API_VERSION, 0) == KVM_API_VERSION, "-");
    CHECK("KVM_CAP_USER_MEMORY2", ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY2) > 0, "-");
    CHECK("KVM_CAP_GUEST_MEMFD", ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) > 0, "-");
    run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    CHECK("KVM_GET_VCPU_MMAP_SIZE", run_size >= (long)sizeof(struct kvm_run), "%ld", run_size);

    part_default_vm();
    int types = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES);
    if (types > 0 && (types & (1 << KVM_X86_SW_PROTECTED_VM)))
        part_protected_vm();
    else
        printf("skip private memory: KVM_CAP_VM_TYPES is 0x%x, without KVM_X86_SW_PROTECTED_VM\n", types);
    part_misuse();
    CHECK("close /dev/kvm", close(kvm) == 0, "-");
    printf("all ok\n");
    return 0;
}
