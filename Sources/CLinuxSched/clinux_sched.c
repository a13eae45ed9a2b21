#define _GNU_SOURCE
#include "clinux_sched.h"
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int pvs_sched_setattr(pid_t tid, const struct pvs_sched_attr *attr) {
    long r = syscall(SYS_sched_setattr, tid, attr, 0);
    return r == 0 ? 0 : -errno;
}

int pvs_sched_getattr(pid_t tid, struct pvs_sched_attr *attr) {
    memset(attr, 0, sizeof(*attr));
    long r = syscall(SYS_sched_getattr, tid, attr, (unsigned)sizeof(*attr), 0);
    return r == 0 ? 0 : -errno;
}

pid_t pvs_gettid(void) { return (pid_t)syscall(SYS_gettid); }

int pvs_set_affinity(pid_t tid, uint64_t cpu_mask) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < 64; i++) if (cpu_mask & (1ull << i)) CPU_SET(i, &set);
    return sched_setaffinity(tid, sizeof(set), &set) == 0 ? 0 : -errno;
}

int pvs_get_affinity(pid_t tid, uint64_t *cpu_mask) {
    cpu_set_t set;
    if (sched_getaffinity(tid, sizeof(set), &set) != 0) return -errno;
    uint64_t m = 0;
    for (int i = 0; i < 64; i++) if (CPU_ISSET(i, &set)) m |= 1ull << i;
    *cpu_mask = m;
    return 0;
}

/* Slot states: 0 free, 1 being written, 2 valid. */
struct restore_slot {
    int state;
    pid_t tid;
    struct pvs_sched_attr original;
};
static struct restore_slot slots[PVS_RESTORE_SLOTS];

static int find_slot(pid_t tid) {
    for (int i = 0; i < PVS_RESTORE_SLOTS; i++)
        if (__atomic_load_n(&slots[i].state, __ATOMIC_ACQUIRE) == 2 && slots[i].tid == tid) return i;
    return -1;
}

int pvs_restore_table_remember(pid_t tid, const struct pvs_sched_attr *original) {
    if (find_slot(tid) >= 0) return 0;
    for (int i = 0; i < PVS_RESTORE_SLOTS; i++) {
        int expected = 0;
        if (__atomic_compare_exchange_n(&slots[i].state, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            slots[i].tid = tid;
            slots[i].original = *original;
            __atomic_store_n(&slots[i].state, 2, __ATOMIC_RELEASE);
            return 0;
        }
    }
    return -ENOSPC;
}

int pvs_restore_table_lookup(pid_t tid, struct pvs_sched_attr *out) {
    int i = find_slot(tid);
    if (i < 0) return 0;
    *out = slots[i].original;
    return 1;
}

int pvs_restore_table_forget(pid_t tid) {
    int i = find_slot(tid);
    if (i < 0) return 0;
    int expected = 2;
    return __atomic_compare_exchange_n(&slots[i].state, &expected, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED) ? 1 : 0;
}

int pvs_restore_table_restore_all(void) {
    int restored = 0;
    for (int i = 0; i < PVS_RESTORE_SLOTS; i++) {
        int expected = 2;
        if (__atomic_compare_exchange_n(&slots[i].state, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            struct pvs_sched_attr a = slots[i].original;
            a.size = sizeof(a);
            if (syscall(SYS_sched_setattr, slots[i].tid, &a, 0) == 0) restored++;
            __atomic_store_n(&slots[i].state, 0, __ATOMIC_RELEASE);
        }
    }
    return restored;
}

int pvs_restore_table_count(void) {
    int n = 0;
    for (int i = 0; i < PVS_RESTORE_SLOTS; i++)
        if (__atomic_load_n(&slots[i].state, __ATOMIC_ACQUIRE) == 2) n++;
    return n;
}

static int handler_runs;
static int installed;
static const int restore_signals[] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT };

static void restore_and_reraise(int sig) {
    int saved = errno;
    pvs_restore_table_restore_all();
    __atomic_add_fetch(&handler_runs, 1, __ATOMIC_RELAXED);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    errno = saved;
    raise(sig);
}

static void restore_at_exit(void) {
    if (pvs_restore_table_count() > 0) {
        pvs_restore_table_restore_all();
        __atomic_add_fetch(&handler_runs, 1, __ATOMIC_RELAXED);
    }
}

void pvs_install_restore_handlers(void) {
    int expected = 0;
    if (!__atomic_compare_exchange_n(&installed, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) return;
    for (size_t i = 0; i < sizeof(restore_signals) / sizeof(restore_signals[0]); i++) {
        struct sigaction sa, old;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = restore_and_reraise;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESETHAND;
        sigaction(restore_signals[i], NULL, &old);
        /* Leave signals the embedding program ignores ignored. */
        if (old.sa_handler == SIG_IGN) continue;
        sigaction(restore_signals[i], &sa, NULL);
    }
    atexit(restore_at_exit);
}

int pvs_restore_handler_runs(void) { return __atomic_load_n(&handler_runs, __ATOMIC_RELAXED); }
