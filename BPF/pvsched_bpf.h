/* Helpers and declarations for pvsched BPF drivers (compile with
 * clang -target bpf -O2 -ffreestanding -I Sources/PVSchedABI/include -c). */
#ifndef PVSCHED_BPF_H
#define PVSCHED_BPF_H
#include <pvsched_abi.h>

#define SEC(name) __attribute__((section(name), used))

/* Legacy map definitions (section "maps"). */
struct bpf_map_def {
    unsigned int type;
    unsigned int key_size;
    unsigned int value_size;
    unsigned int max_entries;
    unsigned int map_flags;
};
#define BPF_MAP_TYPE_HASH  1
#define BPF_MAP_TYPE_ARRAY 2

/* Helper ids as in Linux (the pvsched runtime implements these). */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, unsigned long long flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static unsigned long long (*bpf_ktime_get_ns)(void) = (void *)5;
static long (*bpf_trace_printk)(const char *fmt, unsigned int fmt_size, ...) = (void *)6;

#define PVSCHED_DRIVER(drv_name, event_mask)                                   \
    struct pvsched_bpf_driver_info __pvsched_driver SEC(".pvsched.driver") = { \
        .name = drv_name, .events = (event_mask),                              \
        .protocol_major = PVSCHED_PROTOCOL_LATENCY_MAJOR,                      \
        .protocol_minor = PVSCHED_PROTOCOL_LATENCY_MINOR }

/* Whether the guest's shared state is current at this event: an exit the guest
 * caused (IO, MMIO, HLT, doorbell), a halt, or a change of its line a watcher saw.
 * At entry, after a kick or an injection, the guest has not caught up yet. */
static __attribute__((noinline)) int pvsched_guest_caused(const struct pvsched_bpf_ctx *ctx) {
    if (ctx->event == PVSCHED_EVENT_HALT || ctx->event == PVSCHED_EVENT_GUEST_UPDATE) return 1;
    if (ctx->event != PVSCHED_EVENT_VM_EXIT) return 0;
    switch (ctx->exit_reason) {
    case PVSCHED_EXIT_IO: case PVSCHED_EXIT_MMIO: case PVSCHED_EXIT_HALT: case PVSCHED_EXIT_DOORBELL:
        return 1;
    default:
        return 0;
    }
}
#endif
