/* pvsched's host-side KVM event source, for VMs another process runs (QEMU,
 * crosvm, ... or our own VMM in another process): reports, for the vCPU threads
 * the daemon lists in `vcpu_threads` (and the VMM processes in `vmm_processes`),
 * the moments the built-in VMM reports itself — interrupt delivery before the
 * vCPU runs, blocking (halt), wake-up, exits — through a ring buffer.
 *
 * Attach points are BTF-enabled tracepoints only (tp_btf), which work on this
 * host (no kprobes, no fentry here). Where fentry works, kvm_vcpu_kick /
 * kvm_vcpu_wake_up name the target vCPU directly; here the scheduler's
 * sched_waking of a vCPU thread plays that role, correlated with KVM's
 * kvm_apic_accept_irq on the same CPU to recover the vector.
 *
 * Built with: clang -target bpf -O2 -g -c (CO-RE against the kernel's BTF:
 * the task_struct fields below are relocated at load time). */
#include "pvsched_kvm_events.h"

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* Only the fields used; CO-RE finds them in the running kernel's layout. */
struct task_struct {
    int pid;
    int tgid;
    unsigned int policy;
} __attribute__((preserve_access_index));

enum { BPF_MAP_TYPE_HASH = 1, BPF_MAP_TYPE_PERCPU_ARRAY = 6, BPF_MAP_TYPE_RINGBUF = 27 };
enum { BPF_RB_NO_WAKEUP = 1, BPF_RB_FORCE_WAKEUP = 2 };

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static u64 (*bpf_get_current_pid_tgid)(void) = (void *)14;
static u32 (*bpf_get_smp_processor_id)(void) = (void *)8;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, u64 size, u64 flags) = (void *)131;
static void (*bpf_ringbuf_submit)(void *data, u64 flags) = (void *)132;

char LICENSE[] SEC("license") = "GPL";

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, PVSCHED_KEV_RINGBUF_BYTES);
} events SEC(".maps");

/* tid -> (vm, vcpu): the vCPU threads of attached VMs (the daemon fills it). */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PVSCHED_KEV_MAX_THREADS);
    __type(key, u32);
    __type(value, struct pvsched_kvm_vcpu);
} vcpu_threads SEC(".maps");

/* tgid -> vm: the VMM processes of attached VMs. */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 256);
    __type(key, u32);
    __type(value, u32);
} vmm_processes SEC(".maps");

/* Per CPU: the last interrupt KVM accepted (time, vector), for correlation. */
struct last_accept { u64 time_ns; u32 vector; u32 apicid; };
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, struct last_accept);
} accepted SEC(".maps");

/* Events counted per kind, including those dropped because the ring was full. */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 16);
    __type(key, u32);
    __type(value, u64);
} dropped SEC(".maps");

static __attribute__((always_inline)) void emit_flags(u32 kind, u32 tid, u32 tgid, u32 vector, u64 arg, u32 vm, u32 vcpu, u64 flags) {
    struct pvsched_kvm_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e) {
        u32 k = kind & 15;
        u64 *n = bpf_map_lookup_elem(&dropped, &k);
        if (n) *n += 1;
        return;
    }
    e->time_ns = bpf_ktime_get_ns();
    e->kind = kind;
    e->tid = tid;
    e->tgid = tgid;
    e->vector = vector;
    e->arg = arg;
    e->cpu = bpf_get_smp_processor_id();
    e->vm = vm;
    e->vcpu = vcpu;
    e->pad = 0;
    bpf_ringbuf_submit(e, flags);
}

/* Injections wake the consumer at once (a boost must land before the vCPU runs),
 * and so does a vCPU thread going to sleep (its boost ends there). A switch to a
 * vCPU thread never does: the consumer reads it with the next records (one
 * wake-up fewer per wake-up of a vCPU thread). Other records let the ring buffer
 * decide (which, once a record was left unread, wakes no one: they come with the
 * next of the records above). */
static __attribute__((always_inline)) void emit(u32 kind, u32 tid, u32 tgid, u32 vector, u64 arg, u32 vm, u32 vcpu) {
    u64 flags = 0;
    if (kind == PVSCHED_KEV_WAKING || kind == PVSCHED_KEV_KICK || kind == PVSCHED_KEV_ACCEPT_IRQ || kind == PVSCHED_KEV_BLOCK)
        flags = BPF_RB_FORCE_WAKEUP;
    else if (kind == PVSCHED_KEV_RUN) flags = BPF_RB_NO_WAKEUP;
    emit_flags(kind, tid, tgid, vector, arg, vm, vcpu, flags);
}

/* Reports `kind` if the current thread is a watched vCPU thread (the events KVM
 * traces in the vCPU thread's own context: wake-up from halt, exits). */
static __attribute__((always_inline)) void emit_if_vcpu(u32 kind, u32 vector, u64 arg) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct pvsched_kvm_vcpu *v = bpf_map_lookup_elem(&vcpu_threads, &tid);
    if (v) emit(kind, tid, (u32)(id >> 32), vector, arg, v->vm, v->vcpu);
}

SEC("tp_btf/kvm_apic_accept_irq")
int on_accept_irq(u64 *ctx) {
    u32 apicid = (u32)ctx[0];
    u32 vector = (u8)ctx[3];
    u32 key = 0;
    struct last_accept *last = bpf_map_lookup_elem(&accepted, &key);
    if (last) {
        last->time_ns = bpf_ktime_get_ns();
        last->vector = vector;
        last->apicid = apicid;
    }
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = (u32)(id >> 32);
    u32 *vm = bpf_map_lookup_elem(&vmm_processes, &tgid);
    if (vm) emit(PVSCHED_KEV_ACCEPT_IRQ, 0, tgid, vector, apicid, *vm, apicid);
    return 0;
}

SEC("tp_btf/sched_waking")
int on_waking(u64 *ctx) {
    struct task_struct *p = (struct task_struct *)ctx[0];
    u32 tid = (u32)p->pid;
    struct pvsched_kvm_vcpu *v = bpf_map_lookup_elem(&vcpu_threads, &tid);
    if (!v) return 0;
    u32 vector = 0, key = 0;
    struct last_accept *last = bpf_map_lookup_elem(&accepted, &key);
    if (last && last->time_ns && bpf_ktime_get_ns() - last->time_ns < PVSCHED_KEV_CORRELATE_NS) {
        vector = last->vector;
        last->time_ns = 0;
    }
    v->woken = 1;
    /* A thread already real-time (boosted ahead of a deadline it published) runs at
     * once without the consumer: its waking need not wake it. */
    u32 policy = p->policy;
    u64 flags = (policy == 1 || policy == 2) ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP;
    emit_flags(PVSCHED_KEV_WAKING, tid, (u32)p->tgid, vector, 0, v->vm, v->vcpu, flags);
    return 0;
}

SEC("tp_btf/sched_switch")
int on_switch(u64 *ctx) {
    struct task_struct *prev = (struct task_struct *)ctx[1];
    struct task_struct *next = (struct task_struct *)ctx[2];
    u32 prev_state = (u32)ctx[3];
    u32 tid = (u32)prev->pid;
    /* Blocking (not preempted, not runnable): the vCPU thread waits (a halt, or the VMM's own wait). */
    if (prev_state != 0 && !(u8)ctx[0]) {
        struct pvsched_kvm_vcpu *v = bpf_map_lookup_elem(&vcpu_threads, &tid);
        if (v) emit(PVSCHED_KEV_BLOCK, tid, (u32)prev->tgid, 0, prev_state, v->vm, v->vcpu);
    }
    /* The first run after a wake-up only (not every return from a preemption). */
    u32 next_tid = (u32)next->pid;
    struct pvsched_kvm_vcpu *n = bpf_map_lookup_elem(&vcpu_threads, &next_tid);
    if (n && n->woken) {
        n->woken = 0;
        emit(PVSCHED_KEV_RUN, next_tid, (u32)next->tgid, 0, 0, n->vm, n->vcpu);
    }
    return 0;
}

SEC("tp_btf/signal_generate")
int on_signal(u64 *ctx) {
    struct task_struct *task = (struct task_struct *)ctx[2];
    u32 tid = (u32)task->pid;
    struct pvsched_kvm_vcpu *v = bpf_map_lookup_elem(&vcpu_threads, &tid);
    if (v) emit(PVSCHED_KEV_KICK, tid, (u32)task->tgid, (u32)ctx[0], 0, v->vm, v->vcpu);
    return 0;
}

SEC("tp_btf/kvm_vcpu_wakeup")
int on_vcpu_wakeup(u64 *ctx) {
    emit_if_vcpu(PVSCHED_KEV_HALT_WAKEUP, 0, ctx[0]);
    return 0;
}

SEC("tp_btf/kvm_pio")
int on_pio(u64 *ctx) {
    emit_if_vcpu(PVSCHED_KEV_EXIT_PIO, (u32)ctx[0], (u32)ctx[1]);
    return 0;
}

SEC("tp_btf/kvm_mmio")
int on_mmio(u64 *ctx) {
    emit_if_vcpu(PVSCHED_KEV_EXIT_MMIO, (u32)ctx[0], ctx[2]);
    return 0;
}

SEC("tp_btf/kvm_userspace_exit")
int on_userspace_exit(u64 *ctx) {
    emit_if_vcpu(PVSCHED_KEV_EXIT_USERSPACE, 0, (u32)ctx[0]);
    return 0;
}

SEC("tp_btf/kvm_exit")
int on_exit(u64 *ctx) {
    emit_if_vcpu(PVSCHED_KEV_EXIT, 0, 0);
    return 0;
}
