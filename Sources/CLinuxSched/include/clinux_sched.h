/* Thin, non-variadic wrappers over the Linux scheduling syscalls that Swift
 * cannot call directly, and an async-signal-safe table of the original
 * scheduling parameters of boosted threads (restored on fatal signals). */
#ifndef CLINUX_SCHED_H
#define CLINUX_SCHED_H
#include <stdint.h>
#include <sys/types.h>

/* struct sched_attr (include/uapi/linux/sched/types.h), version 1 (56 bytes). */
struct pvs_sched_attr {
    uint32_t size;
    uint32_t sched_policy;
    uint64_t sched_flags;
    int32_t  sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime;
    uint64_t sched_deadline;
    uint64_t sched_period;
    uint32_t sched_util_min;
    uint32_t sched_util_max;
};

enum {
    PVS_SCHED_OTHER = 0,
    PVS_SCHED_FIFO = 1,
    PVS_SCHED_RR = 2,
    PVS_SCHED_BATCH = 3,
    PVS_SCHED_IDLE = 5,
    PVS_SCHED_DEADLINE = 6,
    PVS_SCHED_FLAG_RESET_ON_FORK = 1,
};

/* Return 0 or -errno. */
int pvs_sched_setattr(pid_t tid, const struct pvs_sched_attr *attr);
int pvs_sched_getattr(pid_t tid, struct pvs_sched_attr *attr);
pid_t pvs_gettid(void);
/* Pin the calling thread to one CPU (or to a mask of the first 64 CPUs); 0 or -errno. */
int pvs_set_affinity(pid_t tid, uint64_t cpu_mask);
int pvs_get_affinity(pid_t tid, uint64_t *cpu_mask);

/* The restore table: originals of threads whose parameters the actuator
 * changed. Operations are lock-free and async-signal-safe (fixed array,
 * atomic slots), so a fatal-signal handler can walk it. */
#define PVS_RESTORE_SLOTS 1024
/* Record tid's original attributes if not yet recorded; 0, or -ENOSPC. */
int pvs_restore_table_remember(pid_t tid, const struct pvs_sched_attr *original);
/* Copy tid's original into *out; 1 if found, 0 if not. */
int pvs_restore_table_lookup(pid_t tid, struct pvs_sched_attr *out);
/* Forget tid's entry; 1 if it was present. */
int pvs_restore_table_forget(pid_t tid);
/* Restore every recorded thread to its original parameters and forget them;
 * returns the number restored. Async-signal-safe. */
int pvs_restore_table_restore_all(void);
/* Number of recorded threads. */
int pvs_restore_table_count(void);

/* Install handlers for SIGINT, SIGTERM, SIGHUP, SIGQUIT and the fatal
 * synchronous signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) that restore
 * every boosted thread, then re-raise the signal with its default action; and
 * an atexit hook that does the same. Idempotent. */
void pvs_install_restore_handlers(void);
/* Number of times a handler has restored threads (for tests). */
int pvs_restore_handler_runs(void);

#endif
