#define _GNU_SOURCE
#include "clinux_sched.h"
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sys/mman.h>
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
    int pidfd;
    struct pvs_sched_attr original;
};
static struct restore_slot slots[PVS_RESTORE_SLOTS];

static int find_slot(pid_t tid) {
    for (int i = 0; i < PVS_RESTORE_SLOTS; i++)
        if (__atomic_load_n(&slots[i].state, __ATOMIC_ACQUIRE) == 2 && slots[i].tid == tid) return i;
    return -1;
}

int pvs_restore_table_remember(pid_t tid, int pidfd, const struct pvs_sched_attr *original) {
    if (find_slot(tid) >= 0) return 0;
    for (int i = 0; i < PVS_RESTORE_SLOTS; i++) {
        int expected = 0;
        if (__atomic_compare_exchange_n(&slots[i].state, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            slots[i].tid = tid;
            slots[i].pidfd = pidfd;
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
            struct pollfd p = { .fd = slots[i].pidfd, .events = POLLIN };
            int gone = slots[i].pidfd >= 0 && poll(&p, 1, 0) > 0;
            if (!gone && syscall(SYS_sched_setattr, slots[i].tid, &a, 0) == 0) restored++;
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

#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif

int pvs_thread_pidfd(pid_t tid) {
    long fd = syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
    if (fd >= 0) return (int)fd;
    int e = errno;
    /* Kernels before 6.9 know no PIDFD_THREAD: a thread-group leader still works. */
    if (e == EINVAL) {
        fd = syscall(SYS_pidfd_open, tid, 0);
        if (fd >= 0) return (int)fd;
        e = errno;
    }
    return -e;
}

int pvs_pidfd_exited(int pidfd) {
    struct pollfd p = { .fd = pidfd, .events = POLLIN };
    for (;;) {
        int r = poll(&p, 1, 0);
        if (r >= 0) return r > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)) ? 1 : 0;
        if (errno != EINTR) return -errno;
    }
}

static int read_small_file(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    ssize_t n;
    do { n = read(fd, buf, cap - 1); } while (n < 0 && errno == EINTR);
    int e = errno;
    close(fd);
    if (n < 0) return -e;
    buf[n] = 0;
    return (int)n;
}

int pvs_thread_start_time(pid_t tid, uint64_t *ticks) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)tid);
    int n = read_small_file(path, buf, sizeof buf);
    if (n < 0) return n;
    /* "TID (comm) S ...": fields after the last ')' start at field 3; start time is field 22. */
    char *p = strrchr(buf, ')');
    if (!p) return -EINVAL;
    p++;
    for (int field = 3; field < 22; field++) {
        while (*p == ' ') p++;
        while (*p && *p != ' ') p++;
        if (!*p) return -EINVAL;
    }
    char *end = NULL;
    unsigned long long v = strtoull(p, &end, 10);
    if (end == p) return -EINVAL;
    *ticks = v;
    return 0;
}

int pvs_thread_tgid(pid_t tid) {
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/status", (int)tid);
    int n = read_small_file(path, buf, sizeof buf);
    if (n < 0) return n;
    char *t = strstr(buf, "\nTgid:");
    if (!t) return -EINVAL;
    long v = strtol(t + 6, NULL, 10);
    return v > 0 ? (int)v : -EINVAL;
}

/* Region slots: 0 free, 1 being written, 2 valid. */
struct region_slot {
    int state;
    int faulted;
    char *base;
    size_t len;
};
static struct region_slot regions[PVS_REGION_SLOTS];
static long region_faults;

static int region_find(const void *base) {
    for (int i = 0; i < PVS_REGION_SLOTS; i++)
        if (__atomic_load_n(&regions[i].state, __ATOMIC_ACQUIRE) == 2 && regions[i].base == base) return i;
    return -1;
}

int pvs_region_guard_add(void *base, size_t len) {
    pvs_install_restore_handlers();
    for (int i = 0; i < PVS_REGION_SLOTS; i++) {
        int expected = 0;
        if (__atomic_compare_exchange_n(&regions[i].state, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            regions[i].base = base;
            regions[i].len = len;
            __atomic_store_n(&regions[i].faulted, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&regions[i].state, 2, __ATOMIC_RELEASE);
            return 0;
        }
    }
    return -ENOSPC;
}

void pvs_region_guard_remove(void *base) {
    int i = region_find(base);
    if (i < 0) return;
    int expected = 2;
    __atomic_compare_exchange_n(&regions[i].state, &expected, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

int pvs_region_guard_faulted(void *base) {
    int i = region_find(base);
    return i >= 0 && __atomic_load_n(&regions[i].faulted, __ATOMIC_ACQUIRE);
}

long pvs_region_guard_fault_count(void) { return __atomic_load_n(&region_faults, __ATOMIC_RELAXED); }

/* A SIGBUS inside a registered region: zero-filled memory replaces the region and
 * the read goes on. Returns 1 when recovered. */
static int recover_region_fault(void *addr) {
    char *a = addr;
    for (int i = 0; i < PVS_REGION_SLOTS; i++) {
        if (__atomic_load_n(&regions[i].state, __ATOMIC_ACQUIRE) != 2) continue;
        char *b = regions[i].base;
        if (a < b || a >= b + regions[i].len) continue;
        void *m = mmap(b, regions[i].len, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return 0;
        __atomic_store_n(&regions[i].faulted, 1, __ATOMIC_RELEASE);
        __atomic_add_fetch(&region_faults, 1, __ATOMIC_RELAXED);
        return 1;
    }
    return 0;
}

#define PVS_EXIT_PATHS 8
static char exit_paths[PVS_EXIT_PATHS][256];
static int exit_path_used[PVS_EXIT_PATHS];

void pvs_remove_at_exit(const char *path) {
    for (int i = 0; i < PVS_EXIT_PATHS; i++) {
        int expected = 0;
        if (__atomic_compare_exchange_n(&exit_path_used[i], &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            strncpy(exit_paths[i], path, sizeof exit_paths[i] - 1);
            __atomic_store_n(&exit_path_used[i], 2, __ATOMIC_RELEASE);
            return;
        }
    }
}

static void remove_exit_paths(void) {
    for (int i = 0; i < PVS_EXIT_PATHS; i++)
        if (__atomic_load_n(&exit_path_used[i], __ATOMIC_ACQUIRE) == 2) unlink(exit_paths[i]);
}

static int handler_runs;
static int installed;
static const int restore_signals[] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT };

static void restore_and_reraise(int sig) {
    int saved = errno;
    pvs_restore_table_restore_all();
    remove_exit_paths();
    __atomic_add_fetch(&handler_runs, 1, __ATOMIC_RELAXED);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    errno = saved;
    raise(sig);
}

static void bus_handler(int sig, siginfo_t *info, void *context) {
    (void)context;
    int saved = errno;
    if (info && info->si_addr && recover_region_fault(info->si_addr)) { errno = saved; return; }
    errno = saved;
    restore_and_reraise(sig);
}

static void restore_at_exit(void) {
    remove_exit_paths();
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
        sigemptyset(&sa.sa_mask);
        if (restore_signals[i] == SIGBUS) {
            /* Stays installed: a recovered region fault returns, any other resets and dies. */
            sa.sa_sigaction = bus_handler;
            sa.sa_flags = SA_SIGINFO;
        } else {
            sa.sa_handler = restore_and_reraise;
            sa.sa_flags = SA_RESETHAND;
        }
        sigaction(restore_signals[i], NULL, &old);
        /* Leave signals the embedding program ignores ignored. */
        if (old.sa_handler == SIG_IGN) continue;
        sigaction(restore_signals[i], &sa, NULL);
    }
    atexit(restore_at_exit);
}

int pvs_restore_handler_runs(void) { return __atomic_load_n(&handler_runs, __ATOMIC_RELAXED); }

#include <sys/vfs.h>
int pvs_fd_on_cgroupfs(int fd) {
    struct statfs s;
    if (fstatfs(fd, &s) != 0) return 0;
    return s.f_type == 0x27e0eb /* CGROUP_SUPER_MAGIC */ || s.f_type == 0x63677270 /* CGROUP2_SUPER_MAGIC */;
}
