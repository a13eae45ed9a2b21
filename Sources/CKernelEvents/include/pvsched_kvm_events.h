/* The record format between the kernel BPF object BPF/kvm_events.bpf.c and the
 * daemon's event source (one definition, included by both). Host-internal: not
 * part of the guest/host ABI. */
#ifndef PVSCHED_KVM_EVENTS_H
#define PVSCHED_KVM_EVENTS_H

#ifdef __bpf__
typedef unsigned int pvs_u32;
typedef unsigned long long pvs_u64;
#else
#include <stdint.h>
typedef uint32_t pvs_u32;
typedef uint64_t pvs_u64;
#endif

/* What happened (pvsched_kvm_event.kind). */
enum pvsched_kvm_event_kind {
    /* A watched vCPU thread is being woken (sched_waking), before it runs.
     * `vector` is the vector KVM accepted for it just before on the same CPU, if any. */
    PVSCHED_KEV_WAKING = 1,
    /* KVM accepted an interrupt (kvm_apic_accept_irq) in a watched VMM process's
     * context: `arg` is the APIC id, `vector` the vector. */
    PVSCHED_KEV_ACCEPT_IRQ = 2,
    /* A watched vCPU thread blocked (sched_switch away in a sleeping state). */
    PVSCHED_KEV_BLOCK = 3,
    /* A watched vCPU thread woke from KVM's halt wait (kvm_vcpu_wakeup). */
    PVSCHED_KEV_HALT_WAKEUP = 4,
    /* Exits the host kernel reports, in the vCPU thread's context. */
    PVSCHED_KEV_EXIT_PIO = 5,       /* arg: port, vector: 1 for a write */
    PVSCHED_KEV_EXIT_MMIO = 6,      /* arg: guest-physical address */
    PVSCHED_KEV_EXIT_USERSPACE = 7, /* arg: the exit reason */
    PVSCHED_KEV_EXIT = 8,           /* kvm_exit (VMX/SVM hosts) */
    /* A watched vCPU thread was switched in (it runs again and goes back into the
     * guest; under PVM kvm_entry does not fire, so this stands for the entry). */
    PVSCHED_KEV_RUN = 9,
    /* (The WAKING record of a wake-up whose CPU was idle comes later, if at all:
     * when the thread is preempted before it sleeps again. Its time is the
     * wake-up's.) */
    /* A signal is being sent to a watched vCPU thread (signal_generate): how a
     * VMM with a userspace irqchip kicks a running vCPU out of the guest to
     * deliver an interrupt. `vector` is the signal number. */
    PVSCHED_KEV_KICK = 10,
};

/* One record in the ring buffer. */
struct pvsched_kvm_event {
    pvs_u64 time_ns;   /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    pvs_u32 kind;
    pvs_u32 tid;       /* the vCPU thread (0 for ACCEPT_IRQ) */
    pvs_u32 tgid;      /* its process (or the delivering process for ACCEPT_IRQ) */
    pvs_u32 vector;
    pvs_u64 arg;
    pvs_u32 cpu;
    pvs_u32 vm;        /* the daemon's slot for the VM (from the filter maps) */
    pvs_u32 vcpu;      /* the vCPU index (the APIC id for ACCEPT_IRQ) */
    pvs_u32 urgent;    /* 1: the record woke the consumer (or would have, had it been asleep) */
    pvs_u64 runtime_ns; /* the thread's run time so far (its se.sum_exec_runtime, what
                         * /proc/TID/schedstat's first field reads) when the thread is
                         * not running: WAKING, BLOCK and RUN records. 0: not known (the
                         * other kinds, read while the thread runs). */
};

/* Map entry for a watched vCPU thread: which VM (the daemon's slot) and vCPU
 * (the daemon writes them, and 0 in the rest). The BPF side's own notes:
 * - `woken`: the thread was woken and has not run since;
 * - `deferred`: its last wake-up found its CPU idle, so no record was sent for it
 *   (a boost cannot make a thread that runs at once run sooner); the WAKING
 *   record is sent if the thread is preempted before it sleeps again (with the
 *   preemption's time in `arg`);
 * - `waking_ns`, `vector`: that wake-up's time and correlated vector;
 * - `settled`: wake-ups that ran and slept again without waiting for their CPU
 *   (no record, no consumer wake-up: what the daemon was spared). */
struct pvsched_kvm_vcpu {
    pvs_u32 vm;
    pvs_u32 vcpu;
    pvs_u32 woken;
    pvs_u32 deferred;
    pvs_u64 waking_ns;
    pvs_u32 vector;
    pvs_u32 pad;
    pvs_u64 settled;
};

/* Map entry for a vCPU thread whose boost the daemon holds through its halts for
 * a deadline (`held_threads`). The daemon writes the window in which the wake-up
 * for that deadline comes; a wake-up outside it is for something else and is sent
 * at once. The BPF side learns the guest's period from the wake-ups that fall in
 * the window and moves the window on by it, so that a periodic guest's wake-ups and
 * halts wake no one while it keeps its period. */
struct pvsched_kvm_held {
    pvs_u64 earliest;   /* the window (CLOCK_MONOTONIC ns) */
    pvs_u64 latest;
    pvs_u64 last_wake;  /* BPF: the last wake-up in the window (0: none yet) */
    pvs_u64 period;     /* BPF: between the last two of them (0: not known) */
};

#define PVSCHED_KEV_MAX_THREADS 4096
#define PVSCHED_KEV_RINGBUF_BYTES (1u << 20)
/* An acceptance this recent (same CPU) is taken to be what wakes the vCPU. */
#define PVSCHED_KEV_CORRELATE_NS 200000ull

#endif
