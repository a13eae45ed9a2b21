#define _GNU_SOURCE
#include "ckvm.h"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/futex.h>
#include <time.h>

long ckvm_ioctl(int fd, unsigned long request, void *arg) {
    long r;
    do { r = ioctl(fd, request, arg); } while (r < 0 && errno == EINTR && request != KVM_RUN);
    return r < 0 ? -errno : r;
}

long ckvm_ioctl_value(int fd, unsigned long request, unsigned long value) {
    long r = ioctl(fd, request, value);
    return r < 0 ? -errno : r;
}

void *ckvm_mmap_shared(int fd, size_t size) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

void *ckvm_mmap_anonymous(size_t size) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

int ckvm_munmap(void *address, size_t size) { return munmap(address, size) == 0 ? 0 : -errno; }

struct kvm_cpuid2 *ckvm_alloc_cpuid(uint32_t entries) {
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + entries * sizeof(struct kvm_cpuid_entry2));
    if (c) c->nent = entries;
    return c;
}

void ckvm_free(void *p) { free(p); }

int ckvm_kick_signal(void) { return SIGRTMIN + 1; }

static void kick_handler(int sig) { (void)sig; }

void ckvm_install_kick_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: KVM_RUN returns EINTR */
    sigaction(ckvm_kick_signal(), &sa, NULL);
}

int ckvm_kick_thread(int tid) {
    return syscall(SYS_tgkill, getpid(), tid, ckvm_kick_signal()) == 0 ? 0 : -errno;
}

int ckvm_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tp = &ts;
    }
    long r = syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, expected, tp, NULL, 0);
    if (r == 0) return 0;
    return errno == EAGAIN ? 0 : -errno;
}

int ckvm_futex_wake(uint32_t *word, int count) {
    long r = syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, count, NULL, NULL, 0);
    return r < 0 ? -errno : (int)r;
}

long ckvm_set_xcr0(int vcpu_fd, uint64_t value) {
    struct kvm_xcrs x;
    memset(&x, 0, sizeof(x));
    x.nr_xcrs = 1;
    x.xcrs[0].xcr = 0;
    x.xcrs[0].value = value;
    return ckvm_ioctl(vcpu_fd, KVM_SET_XCRS, &x);
}

long ckvm_reset_fpu(int vcpu_fd) {
    struct kvm_fpu f;
    memset(&f, 0, sizeof(f));
    f.fcw = 0x37f;
    f.mxcsr = 0x1f80;
    return ckvm_ioctl(vcpu_fd, KVM_SET_FPU, &f);
}

int ckvm_unblock_kick_signal(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, ckvm_kick_signal());
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL) == 0 ? 0 : -1;
}
