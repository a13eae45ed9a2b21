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
/* Record tid's original attributes if not yet recorded; 0, or -ENOSPC. pidfd (or
 * -1) holds the thread's identity: a thread that exited is never restored (its id
 * may belong to another thread by then). The caller keeps pidfd open until it
 * forgets the entry. */
int pvs_restore_table_remember(pid_t tid, int pidfd, const struct pvs_sched_attr *original);
/* Copy tid's original into *out; 1 if found, 0 if not. */
int pvs_restore_table_lookup(pid_t tid, struct pvs_sched_attr *out);
/* Forget tid's entry; 1 if it was present. */
int pvs_restore_table_forget(pid_t tid);
/* Restore every recorded thread to its original parameters and forget them;
 * returns the number restored. Async-signal-safe. */
int pvs_restore_table_restore_all(void);
/* Number of recorded threads. */
int pvs_restore_table_count(void);

/* Thread identity: a thread is held by a pidfd (PIDFD_THREAD, Linux 6.9+; a
 * process's main thread also on older kernels), never by its bare id, which the
 * kernel hands to a new thread once the old one is gone. */
/* pidfd_open(tid, PIDFD_THREAD) (or flags 0 for a thread-group leader when the
 * kernel lacks PIDFD_THREAD); fd or -errno. */
int pvs_thread_pidfd(pid_t tid);
/* 1 if the thread (or process) behind pidfd has exited, 0 if it still runs, -errno. */
int pvs_pidfd_exited(int pidfd);
/* The thread's start time (/proc/TID/stat field 22, clock ticks since boot); 0 or -errno. */
int pvs_thread_start_time(pid_t tid, uint64_t *ticks);
/* The process (thread group) of tid (/proc/TID/status Tgid); >0 or -errno. */
int pvs_thread_tgid(pid_t tid);

/* Memory another process can truncate (a file under /dev/shm that a VMM maps):
 * a read past the file's end raises SIGBUS. A region registered here is
 * recovered instead: the SIGBUS handler maps zero-filled anonymous memory over
 * the whole region, marks it faulted and returns, so the faulting read sees
 * zeros; the owner checks `pvs_region_guard_faulted` and stops using it.
 * Faults elsewhere keep their fatal path (restore, then die). The table holds
 * PVS_REGION_SLOTS regions; every operation is lock-free. */
#define PVS_REGION_SLOTS 4096
/* Registers [base, base+len) (page-aligned base); 0, or -ENOSPC. Installs the handlers. */
int pvs_region_guard_add(void *base, size_t len);
/* Forgets the region that starts at base (before munmap). */
void pvs_region_guard_remove(void *base);
/* 1 if the region at base faulted (and now holds zeros), else 0. */
int pvs_region_guard_faulted(void *base);
/* Number of faults recovered since the process started (for tests and metrics). */
long pvs_region_guard_fault_count(void);

/* A file to remove when the process exits or dies of one of the signals below
 * (a VM's shared guest memory under /dev/shm); at most 8, the path copied. */
void pvs_remove_at_exit(const char *path);

/* Install handlers for SIGINT, SIGTERM, SIGHUP, SIGQUIT and the fatal
 * synchronous signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) that restore
 * every boosted thread, then re-raise the signal with its default action; and
 * an atexit hook that does the same. Idempotent. */
void pvs_install_restore_handlers(void);
/* Number of times a handler has restored threads (for tests). */
int pvs_restore_handler_runs(void);

/* 1 if fd is a file of a cgroup file system (v1 or v2), 0 if not or unknown. */
int pvs_fd_on_cgroupfs(int fd);

#endif
