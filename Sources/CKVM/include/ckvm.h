/* Thin C shims for the KVM API: ioctl request numbers re-exported as constants
 * (the <linux/kvm.h> macros do not import into Swift), non-variadic ioctl and
 * mmap wrappers returning -errno, and the signal used to kick a vCPU thread
 * out of KVM_RUN. */
#ifndef CKVM_H
#define CKVM_H
#include <linux/kvm.h>
#include <stdint.h>
#include <stddef.h>

static const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long CKVM_SIGNAL_MSI = KVM_SIGNAL_MSI;
static const unsigned long CKVM_GET_STATS_FD = KVM_GET_STATS_FD;
static const unsigned long CKVM_RUN = KVM_RUN;
static const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
static const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
static const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long CKVM_INTERRUPT = KVM_INTERRUPT;
static const unsigned long CKVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long CKVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;

/* ioctl(fd, request, arg); returns the result or -errno. */
long ckvm_ioctl(int fd, unsigned long request, void *arg);
/* ioctl(fd, request, value) with an integer argument; result or -errno. */
long ckvm_ioctl_value(int fd, unsigned long request, unsigned long value);
/* Shared mapping of fd (the vCPU's kvm_run); NULL on failure. */
void *ckvm_mmap_shared(int fd, size_t size);
/* Anonymous private mapping (guest memory), NORESERVE; NULL on failure. */
void *ckvm_mmap_anonymous(size_t size);
int ckvm_munmap(void *address, size_t size);

/* A kvm_cpuid2 with room for `entries` entries (free with ckvm_free). */
struct kvm_cpuid2 *ckvm_alloc_cpuid(uint32_t entries);
void ckvm_free(void *p);

/* The signal that kicks a vCPU thread out of KVM_RUN (installed without
 * SA_RESTART, with a handler that does nothing). */
int ckvm_kick_signal(void);
void ckvm_install_kick_handler(void);
/* Unblocks the kick signal on the calling thread (threads inherit their creator's mask). */
int ckvm_unblock_kick_signal(void);
/* Sends the kick signal to a thread of this process. */
int ckvm_kick_thread(int tid);

/* futex wait/wake on a 32-bit word: wait returns 0 when woken or the value
 * differs, -ETIMEDOUT, or -EINTR; timeout_ns < 0 waits forever. */
int ckvm_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns);
int ckvm_futex_wake(uint32_t *word, int count);

/* Sets XCR0 (KVM_SET_XCRS); result or -errno. */
long ckvm_set_xcr0(int vcpu_fd, uint64_t value);

/* Puts the FPU/SSE state at its reset values (FCW 0x37f, MXCSR 0x1f80). */
long ckvm_reset_fpu(int vcpu_fd);

/* Accessors for kvm_run's unions (Swift imports anonymous unions awkwardly). */
static inline struct kvm_run *ckvm_run(void *p) { return (struct kvm_run *)p; }
static inline uint8_t *ckvm_io_data(struct kvm_run *r) { return (uint8_t *)r + r->io.data_offset; }
#endif
