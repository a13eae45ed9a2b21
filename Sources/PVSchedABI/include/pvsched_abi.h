/*
 * pvsched_abi.h — the pvsched guest/host protocol ABI.
 *
 * This header is the single source of truth for the shared area that a guest
 * and the host use to cooperate on vCPU scheduling. The host (Swift, through the
 * PVSchedABI C module), the guest kernel (Embedded Swift) and BPF programs (C)
 * all include it. Never restate these layouts elsewhere.
 *
 * Layout of a shared area (guest memory, registered by the guest):
 *
 *   offset 0                      struct pvsched_region_header   (64 bytes)
 *   offset header.vcpu_offset     struct pvsched_vcpu_area  [vcpu 0]
 *   + header.vcpu_stride * i      struct pvsched_vcpu_area  [vcpu i]
 *
 * Each per-vCPU area has a guest-written cache line and a host-written cache line.
 * The guest line is written under a sequence counter: the guest makes it odd,
 * writes the fields, then makes it even. Readers retry while it is odd or changes.
 */
#ifndef PVSCHED_ABI_H
#define PVSCHED_ABI_H

#ifdef __cplusplus
extern "C" {
#endif

/* Freestanding users (guest kernel, BPF) compile with -ffreestanding: clang's own
 * stdint.h is enough. A Linux kernel module (the Linux guest component) has no
 * stdint.h; <linux/types.h> gives the same fixed-width names. */
#ifdef __KERNEL__
#include <linux/types.h>
#else
#include <stdint.h>
#endif

#define PVSCHED_MAGIC            0x43535650u /* "PVSC" little-endian */
#define PVSCHED_ABI_VERSION      1u
#define PVSCHED_PROTOCOL_NAME_LEN 32
#define PVSCHED_CACHE_LINE       64
#define PVSCHED_MAX_VCPUS        256

/* The protocol the reference guest speaks and the built-in drivers implement. */
#define PVSCHED_PROTOCOL_LATENCY       "pvsched-latency"
#define PVSCHED_PROTOCOL_LATENCY_MAJOR 1u
#define PVSCHED_PROTOCOL_LATENCY_MINOR 0u
static inline const char *pvsched_protocol_latency_name(void) { return PVSCHED_PROTOCOL_LATENCY; }

/* Guest flags (pvsched_vcpu_guest.flags). */
#define PVSCHED_FLAG_IN_IRQ           (1u << 0)
#define PVSCHED_FLAG_IN_SOFTIRQ       (1u << 1)
#define PVSCHED_FLAG_IN_NMI           (1u << 2)
#define PVSCHED_FLAG_PREEMPT_DISABLED (1u << 3)
#define PVSCHED_FLAG_RT_TASK_RUNNING  (1u << 4)
#define PVSCHED_FLAG_BOOST_REQUEST    (1u << 5)
#define PVSCHED_FLAG_IDLE             (1u << 6)
#define PVSCHED_FLAGS_KNOWN           0x7Fu

/* Guest task policies (pvsched_vcpu_guest.task_policy). */
#define PVSCHED_TASK_NORMAL 0u
#define PVSCHED_TASK_FIFO   1u
#define PVSCHED_TASK_RR     2u
#define PVSCHED_TASK_IDLE   3u
#define PVSCHED_TASK_POLICY_MAX 3u

#define PVSCHED_RT_PRIORITY_MAX 99
#define PVSCHED_NICE_MIN (-20)
#define PVSCHED_NICE_MAX 19

/* Host status (pvsched_vcpu_host.status). */
#define PVSCHED_STATUS_DISABLED  0u
#define PVSCHED_STATUS_NORMAL    1u
#define PVSCHED_STATUS_BOOSTED   2u
#define PVSCHED_STATUS_THROTTLED 3u

/* The region header, at offset 0 of the shared area. Written by the guest once,
 * before registration; the host validates it and never trusts it again without
 * re-validation. */
struct pvsched_region_header {
    uint32_t magic;                                /* PVSCHED_MAGIC */
    uint16_t abi_version;                          /* PVSCHED_ABI_VERSION */
    uint16_t header_size;                          /* sizeof(struct pvsched_region_header) */
    char     protocol_name[PVSCHED_PROTOCOL_NAME_LEN]; /* NUL-terminated */
    uint16_t protocol_major;
    uint16_t protocol_minor;
    uint16_t vcpu_count;                           /* 1 ... PVSCHED_MAX_VCPUS */
    uint16_t vcpu_stride;                          /* >= sizeof(struct pvsched_vcpu_area) */
    uint32_t vcpu_offset;                          /* offset of vCPU 0's area, cache-line aligned */
    /* Shared-memory transport only (an ivshmem region, which has no registers):
     * the host writes the negotiation result here, the guest bumps its generation
     * each time it (re)writes the header. The pvsched device transport ignores them. */
    uint32_t host_negotiation;                     /* host-written: PVSCHED_DEV_* (IDLE until the host looked) */
    uint32_t host_reason;                          /* host-written: PVSCHED_REASON_* when REFUSED */
    uint32_t guest_generation;                     /* guest-written: changes on every (re)registration */
};

/* The guest-written cache line of a vCPU. */
struct pvsched_vcpu_guest {
    uint32_t seq;               /* odd while the guest writes */
    uint32_t flags;             /* PVSCHED_FLAG_* */
    uint32_t task_policy;       /* PVSCHED_TASK_* of the task running now */
    int32_t  task_priority;     /* 1..99 for FIFO/RR, 0 otherwise */
    int32_t  task_nice;         /* -20..19 for NORMAL, 0 otherwise */
    uint32_t reserved0;
    uint64_t next_deadline_ns;  /* guest clock; 0 = none pending */
    uint64_t guest_clock_ns;    /* guest clock when this line was last written */
    uint8_t  pad[PVSCHED_CACHE_LINE - 40];
};

/* The host-written cache line of a vCPU. The guest reads it (e.g. to ring the
 * deboost doorbell only while boosted) and must never write it. */
struct pvsched_vcpu_host {
    uint32_t status;            /* PVSCHED_STATUS_* */
    uint32_t reserved0;
    uint64_t boost_count;
    uint64_t boosted_ns;
    uint64_t throttle_count;
    uint8_t  pad[PVSCHED_CACHE_LINE - 32];
};

/* A vCPU's area. */
struct pvsched_vcpu_area {
    struct pvsched_vcpu_guest guest;
    struct pvsched_vcpu_host  host;
};

_Static_assert(sizeof(struct pvsched_region_header) == 64, "region header is one cache line");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, magic) == 0, "magic");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, abi_version) == 4, "abi_version");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, header_size) == 6, "header_size");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, protocol_name) == 8, "protocol_name");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, protocol_major) == 40, "protocol_major");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, protocol_minor) == 42, "protocol_minor");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, vcpu_count) == 44, "vcpu_count");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, vcpu_stride) == 46, "vcpu_stride");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, vcpu_offset) == 48, "vcpu_offset");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, host_negotiation) == 52, "host_negotiation");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, host_reason) == 56, "host_reason");
_Static_assert(__builtin_offsetof(struct pvsched_region_header, guest_generation) == 60, "guest_generation");
_Static_assert(sizeof(struct pvsched_vcpu_guest) == PVSCHED_CACHE_LINE, "guest line");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_guest, seq) == 0, "seq");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_guest, flags) == 4, "flags");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_guest, task_policy) == 8, "task_policy");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_guest, task_priority) == 12, "task_priority");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_guest, task_nice) == 16, "task_nice");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_guest, next_deadline_ns) == 24, "next_deadline_ns");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_guest, guest_clock_ns) == 32, "guest_clock_ns");
_Static_assert(sizeof(struct pvsched_vcpu_host) == PVSCHED_CACHE_LINE, "host line");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_host, status) == 0, "status");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_host, boost_count) == 8, "boost_count");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_host, boosted_ns) == 16, "boosted_ns");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_host, throttle_count) == 24, "throttle_count");
_Static_assert(sizeof(struct pvsched_vcpu_area) == 2 * PVSCHED_CACHE_LINE, "vcpu area");
_Static_assert(__builtin_offsetof(struct pvsched_vcpu_area, host) == PVSCHED_CACHE_LINE, "host line offset");

/* Byte offsets and sizes, as constants a Swift or BPF consumer can use without
 * re-deriving them. */
enum {
    PVSCHED_REGION_HEADER_SIZE = sizeof(struct pvsched_region_header),
    PVSCHED_VCPU_AREA_SIZE     = sizeof(struct pvsched_vcpu_area),
    PVSCHED_OFF_MAGIC          = __builtin_offsetof(struct pvsched_region_header, magic),
    PVSCHED_OFF_ABI_VERSION    = __builtin_offsetof(struct pvsched_region_header, abi_version),
    PVSCHED_OFF_HEADER_SIZE    = __builtin_offsetof(struct pvsched_region_header, header_size),
    PVSCHED_OFF_PROTOCOL_NAME  = __builtin_offsetof(struct pvsched_region_header, protocol_name),
    PVSCHED_OFF_PROTOCOL_MAJOR = __builtin_offsetof(struct pvsched_region_header, protocol_major),
    PVSCHED_OFF_PROTOCOL_MINOR = __builtin_offsetof(struct pvsched_region_header, protocol_minor),
    PVSCHED_OFF_VCPU_COUNT     = __builtin_offsetof(struct pvsched_region_header, vcpu_count),
    PVSCHED_OFF_VCPU_STRIDE    = __builtin_offsetof(struct pvsched_region_header, vcpu_stride),
    PVSCHED_OFF_VCPU_OFFSET    = __builtin_offsetof(struct pvsched_region_header, vcpu_offset),
    PVSCHED_OFF_HOST_NEGOTIATION = __builtin_offsetof(struct pvsched_region_header, host_negotiation),
    PVSCHED_OFF_HOST_REASON    = __builtin_offsetof(struct pvsched_region_header, host_reason),
    PVSCHED_OFF_GUEST_GENERATION = __builtin_offsetof(struct pvsched_region_header, guest_generation),
    PVSCHED_OFF_SEQ            = __builtin_offsetof(struct pvsched_vcpu_area, guest.seq),
    PVSCHED_OFF_FLAGS          = __builtin_offsetof(struct pvsched_vcpu_area, guest.flags),
    PVSCHED_OFF_TASK_POLICY    = __builtin_offsetof(struct pvsched_vcpu_area, guest.task_policy),
    PVSCHED_OFF_TASK_PRIORITY  = __builtin_offsetof(struct pvsched_vcpu_area, guest.task_priority),
    PVSCHED_OFF_TASK_NICE      = __builtin_offsetof(struct pvsched_vcpu_area, guest.task_nice),
    PVSCHED_OFF_NEXT_DEADLINE  = __builtin_offsetof(struct pvsched_vcpu_area, guest.next_deadline_ns),
    PVSCHED_OFF_GUEST_CLOCK    = __builtin_offsetof(struct pvsched_vcpu_area, guest.guest_clock_ns),
    PVSCHED_OFF_HOST_STATUS    = __builtin_offsetof(struct pvsched_vcpu_area, host.status),
    PVSCHED_OFF_BOOST_COUNT    = __builtin_offsetof(struct pvsched_vcpu_area, host.boost_count),
    PVSCHED_OFF_BOOSTED_NS     = __builtin_offsetof(struct pvsched_vcpu_area, host.boosted_ns),
    PVSCHED_OFF_THROTTLE_COUNT = __builtin_offsetof(struct pvsched_vcpu_area, host.throttle_count),
};

/*
 * The pvsched virtual device (port IO), through which a guest registers its
 * area and advertises its protocol. All registers are 32 bits wide.
 *
 *   AREA_LO/AREA_HI  write: guest-physical address of the shared area
 *   AREA_SIZE        write: size of the shared area in bytes
 *   COMMAND          write: PVSCHED_CMD_*
 *   STATUS           read:  PVSCHED_DEV_* result of the last command
 *   REASON           read:  PVSCHED_REASON_* why the last register was refused
 *   DOORBELL         write: vCPU index that asks to be deboosted now (synchronous exit)
 *   VCPU_ID          read:  index of the vCPU doing the read
 */
#define PVSCHED_DEV_PORT_BASE   0x0510u
#define PVSCHED_DEV_AREA_LO     (PVSCHED_DEV_PORT_BASE + 0x00u)
#define PVSCHED_DEV_AREA_HI     (PVSCHED_DEV_PORT_BASE + 0x04u)
#define PVSCHED_DEV_AREA_SIZE   (PVSCHED_DEV_PORT_BASE + 0x08u)
#define PVSCHED_DEV_COMMAND     (PVSCHED_DEV_PORT_BASE + 0x0Cu)
#define PVSCHED_DEV_STATUS      (PVSCHED_DEV_PORT_BASE + 0x10u)
#define PVSCHED_DEV_REASON      (PVSCHED_DEV_PORT_BASE + 0x14u)
#define PVSCHED_DEV_DOORBELL    (PVSCHED_DEV_PORT_BASE + 0x18u)
#define PVSCHED_DEV_VCPU_ID     (PVSCHED_DEV_PORT_BASE + 0x1Cu)
#define PVSCHED_DEV_PORT_END    (PVSCHED_DEV_PORT_BASE + 0x20u)

#define PVSCHED_CMD_REGISTER    1u
#define PVSCHED_CMD_UNREGISTER  2u

#define PVSCHED_DEV_IDLE        0u
#define PVSCHED_DEV_ACCEPTED    1u
#define PVSCHED_DEV_REFUSED     2u

/* Why a registration was refused (PVSCHED_DEV_REASON). */
#define PVSCHED_REASON_NONE            0u
#define PVSCHED_REASON_OUT_OF_RAM      1u  /* area not inside guest RAM */
#define PVSCHED_REASON_TOO_SMALL       2u  /* area_size too small for header + vCPUs */
#define PVSCHED_REASON_BAD_HEADER      3u  /* a header field failed validation */
#define PVSCHED_REASON_NO_DRIVER       4u  /* no driver implements the protocol/version */
#define PVSCHED_REASON_VCPU_MISMATCH   5u  /* vcpu_count differs from the VM's */
#define PVSCHED_REASON_BAD_LINE        6u  /* later: a vCPU line failed validation; pvsched disabled */

/* Seqlock helpers for the guest writer. A guest that is itself a C or Swift
 * program calls these around every update of its guest line. */
static inline void pvsched_guest_write_begin(volatile struct pvsched_vcpu_guest *g) {
    uint32_t s = __atomic_load_n(&g->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&g->seq, s + 1u, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}
static inline void pvsched_guest_write_end(volatile struct pvsched_vcpu_guest *g) {
    uint32_t s = __atomic_load_n(&g->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&g->seq, s + 1u, __ATOMIC_RELEASE);
}

/*
 * BPF drivers. A pvsched BPF program (ELF section "pvsched") is called with a
 * read-only struct pvsched_bpf_ctx and returns its decision in r0:
 *   PVSCHED_BPF_NONE, PVSCHED_BPF_UNBOOST, or PVSCHED_BPF_BOOST | (priority << 8)
 *   (priority 0 = the binding's default). The object declares its driver in a
 * struct pvsched_bpf_driver_info in section ".pvsched.driver".
 */
#define PVSCHED_BPF_NONE     0u
#define PVSCHED_BPF_BOOST    1u
#define PVSCHED_BPF_UNBOOST  2u

#define PVSCHED_EVENT_VM_ENTRY      1u
#define PVSCHED_EVENT_VM_EXIT       2u
#define PVSCHED_EVENT_HALT          4u
#define PVSCHED_EVENT_INJECTION     8u  /* vector in pvsched_bpf_ctx.vector */
#define PVSCHED_EVENT_GUEST_UPDATE  16u /* a watcher saw the guest line change (VMs without exits) */
#define PVSCHED_EVENT_DEADLINE      32u /* the guest's published deadline is near (the host announces it) */

/* Exit reasons in pvsched_bpf_ctx.exit_reason. */
#define PVSCHED_EXIT_NONE      0u
#define PVSCHED_EXIT_IO        1u
#define PVSCHED_EXIT_MMIO      2u
#define PVSCHED_EXIT_HALT      3u
#define PVSCHED_EXIT_IRQ_WINDOW 4u
#define PVSCHED_EXIT_DOORBELL  5u
#define PVSCHED_EXIT_INTR      6u
#define PVSCHED_EXIT_SHUTDOWN  7u
#define PVSCHED_EXIT_OTHER     8u

struct pvsched_bpf_ctx {
    uint32_t event;             /* PVSCHED_EVENT_* (one bit) */
    uint32_t exit_reason;       /* PVSCHED_EXIT_* for VM_EXIT */
    uint32_t vector;            /* for INJECTION */
    uint32_t vcpu;
    uint32_t boosted;           /* 1 if the vCPU thread is boosted now */
    uint32_t interrupt_pending; /* an injection the guest has not entered for yet */
    uint64_t now_ns;
    uint64_t boosted_for_ns;    /* how long the current boost has lasted */
    uint32_t has_guest;         /* 1 if the fields below come from a registered area */
    uint32_t flags;             /* PVSCHED_FLAG_* */
    uint32_t task_policy;
    int32_t  task_priority;
    int32_t  task_nice;
    uint32_t reserved;
    uint64_t next_deadline_ns;
    uint64_t guest_clock_ns;
    uint64_t guest_now_ns;      /* the guest's clock now, mapped from the host's (0: not known yet) */
    /* The vectors of interrupt_pending: bit (v % 64) of word (v / 64) is vector v,
     * injected and not yet taken by the guest (see pvsched_vector_pending). */
    uint64_t pending_vectors[4];
};
_Static_assert(sizeof(struct pvsched_bpf_ctx) == 120, "bpf ctx");
_Static_assert(__builtin_offsetof(struct pvsched_bpf_ctx, pending_vectors) == 88, "bpf ctx pending_vectors");

/* Whether vector v is among the context's pending vectors. */
static inline int pvsched_vector_pending(const struct pvsched_bpf_ctx *ctx, uint32_t v) {
    return (ctx->pending_vectors[(v >> 6) & 3] >> (v & 63)) & 1;
}

/* A stock Linux guest's timer interrupt (its local APIC timer, LOCAL_TIMER_VECTOR);
 * the built-in VMM's is PVSCHED_VECTOR_TIMER (pvsched_boot.h). */
#define PVSCHED_VECTOR_LINUX_TIMER  0xECu

struct pvsched_bpf_driver_info {
    char     name[PVSCHED_PROTOCOL_NAME_LEN];
    uint32_t events;            /* PVSCHED_EVENT_* mask */
    uint16_t protocol_major;
    uint16_t protocol_minor;
};

#ifdef __cplusplus
}
#endif
#endif /* PVSCHED_ABI_H */
