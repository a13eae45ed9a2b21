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
struct rq {
    unsigned int nr_running;
    struct task_struct *curr;
} __attribute__((preserve_access_index));
struct cfs_rq {
    struct rq *rq;  /* CONFIG_FAIR_GROUP_SCHED only: checked with field_exists */
} __attribute__((preserve_access_index));
struct sched_entity {
    struct cfs_rq *cfs_rq;
    unsigned long long sum_exec_runtime;
    unsigned long long custom_slice;  /* Linux 6.12+: checked with field_exists */
} __attribute__((preserve_access_index));
struct task_struct {
    int pid;
    int tgid;
    int static_prio;
    unsigned int policy;
    struct sched_entity se;
} __attribute__((preserve_access_index));

#define FIELD_EXISTS(field) __builtin_preserve_field_info(field, 2 /* BPF_FIELD_EXISTS */)

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

/* tid -> the window of the wake-up for which the daemon holds the vCPU thread's
 * boost through its halts (struct pvsched_kvm_held). */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PVSCHED_KEV_MAX_THREADS);
    __type(key, u32);
    __type(value, struct pvsched_kvm_held);
} held_threads SEC(".maps");

/* A wake-up of a held thread: whether it is the one the boost is held for (in the
 * window). If so, and the guest's period is known from the last one, the window
 * moves on by the period; if not, what was learnt is dropped. */
static __attribute__((always_inline)) int held_wake_on_time(struct pvsched_kvm_held *h, u64 w) {
    if (w < h->earliest || w > h->latest) {
        h->last_wake = 0;
        h->period = 0;
        return 0;
    }
    if (h->last_wake && w > h->last_wake) h->period = w - h->last_wake;
    h->last_wake = w;
    if (h->period) {
        u64 half = (h->latest - h->earliest) / 2;
        h->earliest = w + h->period - half;
        h->latest = w + h->period + half;
    }
    return 1;
}

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

/* `runtime_ns`: the thread's run time, read only where it is current (the thread
 * is not running: woken, switched out, or about to be switched in), else 0. */
static __attribute__((always_inline)) void emit_at(u64 time_ns, u32 kind, u32 tid, u32 tgid, u32 vector, u64 arg, u32 vm, u32 vcpu, u64 flags,
                                                   u64 runtime_ns) {
    struct pvsched_kvm_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e) {
        u32 k = kind & 15;
        u64 *n = bpf_map_lookup_elem(&dropped, &k);
        if (n) *n += 1;
        return;
    }
    e->time_ns = time_ns;
    e->kind = kind;
    e->tid = tid;
    e->tgid = tgid;
    e->vector = vector;
    e->arg = arg;
    e->cpu = bpf_get_smp_processor_id();
    e->vm = vm;
    e->vcpu = vcpu;
    e->urgent = flags == BPF_RB_FORCE_WAKEUP;
    e->runtime_ns = runtime_ns;
    bpf_ringbuf_submit(e, flags);
}

static __attribute__((always_inline)) void emit_flags(u32 kind, u32 tid, u32 tgid, u32 vector, u64 arg, u32 vm, u32 vcpu, u64 flags,
                                                      u64 runtime_ns) {
    emit_at(bpf_ktime_get_ns(), kind, tid, tgid, vector, arg, vm, vcpu, flags, runtime_ns);
}

/* Real-time or deadline class. */
static __attribute__((always_inline)) int real_time(struct task_struct *p) {
    u32 policy = p->policy;
    return policy == 1 || policy == 2 || policy == 6;
}

/* Whether the thread runs with parameters a boost gives (real time, a nice
 * below 0, an EEVDF slice of its own): its sleep must reach the daemon at once,
 * which ends the boost. A thread at nice 0 or above has nothing to end. */
static __attribute__((always_inline)) int looks_boosted(struct task_struct *p) {
    if (real_time(p) || p->static_prio < 120) return 1;
    if (FIELD_EXISTS(p->se.custom_slice) && p->se.custom_slice) return 1;
    return 0;
}

/* Whether `p`, just woken and queued, runs at once: its CPU is idle and nothing
 * else waits there. Unknown (no cfs_rq->rq in this kernel) counts as no. */
static __attribute__((always_inline)) int runs_at_once(struct task_struct *p) {
    if (!FIELD_EXISTS(((struct cfs_rq *)0)->rq)) return 0;
    struct cfs_rq *c = p->se.cfs_rq;
    if (!c) return 0;
    struct rq *rq = c->rq;
    if (!rq) return 0;
    struct task_struct *curr = rq->curr;
    if (!curr) return 0;
    return curr->pid == 0 && rq->nr_running <= 1;
}

/* Injections wake the consumer at once (a boost must land before the vCPU runs).
 * A switch to a vCPU thread never does: the consumer reads it with the next
 * records (one wake-up fewer per wake-up of a vCPU thread). Other records let the
 * ring buffer decide (which, once a record was left unread, wakes no one: they
 * come with the next of the records above). Wake-ups and sleeps choose their own
 * flags (`on_wakeup`, `on_switch`). */
static __attribute__((always_inline)) void emit(u32 kind, u32 tid, u32 tgid, u32 vector, u64 arg, u32 vm, u32 vcpu, u64 runtime_ns) {
    u64 flags = 0;
    if (kind == PVSCHED_KEV_KICK || kind == PVSCHED_KEV_ACCEPT_IRQ)
        flags = BPF_RB_FORCE_WAKEUP;
    else if (kind == PVSCHED_KEV_RUN) flags = BPF_RB_NO_WAKEUP;
    emit_flags(kind, tid, tgid, vector, arg, vm, vcpu, flags, runtime_ns);
}

/* Reports `kind` if the current thread is a watched vCPU thread (the events KVM
 * traces in the vCPU thread's own context: wake-up from halt, exits). */
static __attribute__((always_inline)) void emit_if_vcpu(u32 kind, u32 vector, u64 arg) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct pvsched_kvm_vcpu *v = bpf_map_lookup_elem(&vcpu_threads, &tid);
    if (v) emit(kind, tid, (u32)(id >> 32), vector, arg, v->vm, v->vcpu, 0);
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
    if (vm) emit(PVSCHED_KEV_ACCEPT_IRQ, 0, tgid, vector, apicid, *vm, apicid, 0);
    return 0;
}

/* A vCPU thread is being woken: noted (time, the vector KVM accepted for it just
 * before on this CPU), sent once its CPU is known (`on_wakeup`). */
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
    v->waking_ns = bpf_ktime_get_ns();
    v->vector = vector;
    return 0;
}

/* The woken vCPU thread is queued on its CPU. Its WAKING record wakes the consumer
 * when the thread must wait for that CPU. A thread already real-time (boosted
 * ahead of a deadline it published, or held through its halt for it) runs at once
 * without the consumer: its record wakes no one, unless the thread was held for a
 * deadline whose window this wake-up misses. A thread whose CPU is idle runs at
 * once as well: no record now (`deferred`), and none at all if it sleeps again
 * unpreempted (`settled`). */
SEC("tp_btf/sched_wakeup")
int on_wakeup(u64 *ctx) {
    struct task_struct *p = (struct task_struct *)ctx[0];
    u32 tid = (u32)p->pid;
    struct pvsched_kvm_vcpu *v = bpf_map_lookup_elem(&vcpu_threads, &tid);
    if (!v || !v->woken) return 0;
    if (real_time(p)) {
        /* Held for a deadline: a wake-up outside its window is for something else. */
        struct pvsched_kvm_held *held = bpf_map_lookup_elem(&held_threads, &tid);
        u64 flags = held && !held_wake_on_time(held, v->waking_ns) ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
        v->deferred = 0;
        emit_at(v->waking_ns, PVSCHED_KEV_WAKING, tid, (u32)p->tgid, v->vector, 0, v->vm, v->vcpu, flags, p->se.sum_exec_runtime);
    } else if (runs_at_once(p)) {
        v->deferred = 1;
    } else {
        v->deferred = 0;
        emit_at(v->waking_ns, PVSCHED_KEV_WAKING, tid, (u32)p->tgid, v->vector, 0, v->vm, v->vcpu, BPF_RB_FORCE_WAKEUP,
                p->se.sum_exec_runtime);
    }
    return 0;
}

SEC("tp_btf/sched_switch")
int on_switch(u64 *ctx) {
    struct task_struct *prev = (struct task_struct *)ctx[1];
    struct task_struct *next = (struct task_struct *)ctx[2];
    u32 prev_state = (u32)ctx[3];
    u32 tid = (u32)prev->pid;
    struct pvsched_kvm_vcpu *v = bpf_map_lookup_elem(&vcpu_threads, &tid);
    if (v) {
        if (prev_state != 0 && !(u8)ctx[0]) {
            /* Blocking (not preempted, not runnable): the vCPU thread waits (a halt, or
             * the VMM's own wait). After a wake-up that never waited: nothing to send.
             * Otherwise the consumer is woken if a boost may have to end (or be held
             * through this halt), unless the daemon holds it and the kernel knows
             * when the next wake-up it is held for comes (the guest's period). */
            if (v->deferred) {
                v->deferred = 0;
                v->settled += 1;
            } else {
                struct pvsched_kvm_held *held = bpf_map_lookup_elem(&held_threads, &tid);
                int predicted = held && held->period && held->last_wake;
                u64 flags = looks_boosted(prev) && !predicted ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
                emit_flags(PVSCHED_KEV_BLOCK, tid, (u32)prev->tgid, 0, prev_state, v->vm, v->vcpu, flags, prev->se.sum_exec_runtime);
            }
        } else if (v->deferred) {
            /* Preempted after a wake-up that found its CPU idle: it waits for its CPU
             * now, and its wake-up is sent (with its own time; `arg`: the preemption's),
             * then the run that followed it and was not sent: without it, the wake-up's
             * interrupt would stay pending for the daemon, and a driver that keeps a
             * boost while an interrupt is pending would keep it through the next sleep. */
            v->deferred = 0;
            u64 ran = prev->se.sum_exec_runtime;
            emit_at(v->waking_ns, PVSCHED_KEV_WAKING, tid, (u32)prev->tgid, v->vector, bpf_ktime_get_ns(), v->vm, v->vcpu,
                    BPF_RB_FORCE_WAKEUP, ran);
            emit(PVSCHED_KEV_RUN, tid, (u32)prev->tgid, 0, 0, v->vm, v->vcpu, ran);
        }
    }
    /* The first run after a wake-up only (not every return from a preemption), and
     * not after a wake-up left unsent (it comes, if at all, with the WAKING record). */
    u32 next_tid = (u32)next->pid;
    struct pvsched_kvm_vcpu *n = bpf_map_lookup_elem(&vcpu_threads, &next_tid);
    if (n && n->woken) {
        n->woken = 0;
        if (!n->deferred) emit(PVSCHED_KEV_RUN, next_tid, (u32)next->tgid, 0, 0, n->vm, n->vcpu, next->se.sum_exec_runtime);
    }
    return 0;
}

SEC("tp_btf/signal_generate")
int on_signal(u64 *ctx) {
    struct task_struct *task = (struct task_struct *)ctx[2];
    u32 tid = (u32)task->pid;
    struct pvsched_kvm_vcpu *v = bpf_map_lookup_elem(&vcpu_threads, &tid);
    if (v) emit(PVSCHED_KEV_KICK, tid, (u32)task->tgid, (u32)ctx[0], 0, v->vm, v->vcpu, 0);
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
