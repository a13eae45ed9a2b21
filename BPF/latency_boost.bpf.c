/* The latency-boost policy as a BPF driver: the same decisions as the built-in
 * LatencyBoostDriver with its default settings (1 ms preempt-disabled cap, no
 * deadline horizon). Counts decisions per kind in an array map. */
#include "pvsched_bpf.h"

PVSCHED_DRIVER("bpf-latency-boost", PVSCHED_EVENT_VM_ENTRY | PVSCHED_EVENT_VM_EXIT |
                                    PVSCHED_EVENT_HALT | PVSCHED_EVENT_INJECTION |
                                    PVSCHED_EVENT_GUEST_UPDATE | PVSCHED_EVENT_DEADLINE);

struct bpf_map_def SEC("maps") decisions = {
    .type = BPF_MAP_TYPE_ARRAY, .key_size = 4, .value_size = 8, .max_entries = 3,
};

#define BOOSTING_FLAGS (PVSCHED_FLAG_IN_IRQ | PVSCHED_FLAG_IN_SOFTIRQ | PVSCHED_FLAG_IN_NMI | \
                        PVSCHED_FLAG_RT_TASK_RUNNING | PVSCHED_FLAG_BOOST_REQUEST)
#define PREEMPT_DISABLED_CAP_NS 1000000ull

static unsigned int decide(const struct pvsched_bpf_ctx *ctx) {
    if (ctx->event == PVSCHED_EVENT_INJECTION || ctx->event == PVSCHED_EVENT_DEADLINE)
        return ctx->boosted ? PVSCHED_BPF_NONE : PVSCHED_BPF_BOOST;
    if (ctx->has_guest && (ctx->flags & BOOSTING_FLAGS))
        return ctx->boosted ? PVSCHED_BPF_NONE : PVSCHED_BPF_BOOST;
    if (!ctx->boosted || ctx->interrupt_pending || !pvsched_guest_caused(ctx))
        return PVSCHED_BPF_NONE;
    if (ctx->has_guest && (ctx->flags & PVSCHED_FLAG_PREEMPT_DISABLED) &&
        ctx->boosted_for_ns < PREEMPT_DISABLED_CAP_NS)
        return PVSCHED_BPF_NONE;
    return PVSCHED_BPF_UNBOOST;
}

SEC("pvsched")
int latency_boost(struct pvsched_bpf_ctx *ctx) {
    unsigned int d = decide(ctx);
    unsigned int key = d;
    unsigned long long *count = bpf_map_lookup_elem(&decisions, &key);
    if (count) __sync_fetch_and_add(count, 1);
    return d;
}
