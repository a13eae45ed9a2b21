/* The deadline-aware latency policy as a BPF driver: the same decisions as the
 * built-in DeadlineBoostDriver with its default settings (500 µs horizon; timer
 * vectors PVSCHED_VECTOR_TIMER, the built-in VMM's, and PVSCHED_VECTOR_LINUX_TIMER). */
#include "pvsched_bpf.h"
#include <pvsched_boot.h>

PVSCHED_DRIVER("bpf-deadline-boost", PVSCHED_EVENT_VM_ENTRY | PVSCHED_EVENT_VM_EXIT |
                                     PVSCHED_EVENT_HALT | PVSCHED_EVENT_INJECTION |
                                     PVSCHED_EVENT_GUEST_UPDATE | PVSCHED_EVENT_DEADLINE);

#define RT_FLAGS (PVSCHED_FLAG_RT_TASK_RUNNING | PVSCHED_FLAG_BOOST_REQUEST)
/* An interrupt handler keeps a running boost (the one its interrupt started), never starts one. */
#define HANDLER_FLAGS (PVSCHED_FLAG_IN_IRQ | PVSCHED_FLAG_IN_SOFTIRQ | PVSCHED_FLAG_IN_NMI)
#define HORIZON_NS 500000ll
/* The timer vectors' bits in word W of ctx->pending_vectors. */
#define VECTOR_BIT(v, w) (((v) >> 6) == (w) ? 1ull << ((v) & 63) : 0)
#define TIMER_BITS(w) (VECTOR_BIT(PVSCHED_VECTOR_TIMER, w) | VECTOR_BIT(PVSCHED_VECTOR_LINUX_TIMER, w))
#define IS_TIMER(v) ((v) == PVSCHED_VECTOR_TIMER || (v) == PVSCHED_VECTOR_LINUX_TIMER)

static __attribute__((noinline)) int deadline_near(const struct pvsched_bpf_ctx *ctx) {
    if (!ctx->has_guest || ctx->next_deadline_ns == 0 || ctx->guest_now_ns == 0) return 0;
    return (long long)(ctx->next_deadline_ns - ctx->guest_now_ns) <= HORIZON_NS;
}

static int wants_boost(const struct pvsched_bpf_ctx *ctx) {
    if (ctx->event == PVSCHED_EVENT_DEADLINE) return 1;
    if (ctx->event == PVSCHED_EVENT_INJECTION) {
        if (!IS_TIMER(ctx->vector)) return 1;   /* a device interrupt */
        if (!ctx->has_guest) return 1;
        return deadline_near(ctx);
    }
    if (!ctx->has_guest) return 0;
    if (ctx->flags & RT_FLAGS) return 1;
    return ctx->boosted && ((ctx->flags & HANDLER_FLAGS) || deadline_near(ctx));
}

/* Whether an interrupt injected and not yet taken would boost by itself (a device's,
 * or the timer near the deadline): the boost lasts until the guest takes it. */
static int pending_wants_boost(const struct pvsched_bpf_ctx *ctx) {
    if (!ctx->interrupt_pending) return 0;
    if (!ctx->has_guest) return 1;
    if ((ctx->pending_vectors[0] & ~TIMER_BITS(0)) | (ctx->pending_vectors[1] & ~TIMER_BITS(1)) |
        (ctx->pending_vectors[2] & ~TIMER_BITS(2)) | (ctx->pending_vectors[3] & ~TIMER_BITS(3))) return 1;
    return deadline_near(ctx);
}

SEC("pvsched")
int deadline_boost(struct pvsched_bpf_ctx *ctx) {
    if (wants_boost(ctx)) return ctx->boosted ? PVSCHED_BPF_NONE : PVSCHED_BPF_BOOST;
    if (!ctx->boosted || pending_wants_boost(ctx) || !pvsched_guest_caused(ctx)) return PVSCHED_BPF_NONE;
    return PVSCHED_BPF_UNBOOST;
}
