/* What the stand-alone scheduler reproducers (scripts/eevdf-lag.c, scripts/boost-classes.c)
 * share: sched_setattr(2) on a thread, the monotonic and thread CPU clocks, pinning to a CPU. */
#ifndef PVSCHED_SCHED_LAB_H
#define PVSCHED_SCHED_LAB_H
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>

struct lab_attr { uint32_t size, policy; uint64_t flags; int32_t nice; uint32_t priority; uint64_t runtime, deadline, period; uint32_t umin, umax; };
/* Sets thread `t` (0: the caller) to `policy` at `nice`/`prio`, with a slice of `runtime` ns (0: the default). */
static inline int set(pid_t t, int policy, int nice, int prio, uint64_t runtime) {
    struct lab_attr a; memset(&a, 0, sizeof a); a.size = sizeof a; a.policy = policy; a.nice = nice; a.priority = prio; a.runtime = runtime;
    return (int)syscall(SYS_sched_setattr, t, &a, 0);
}
static inline uint64_t now(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec * 1000000000ull + ts.tv_nsec; }
static inline uint64_t cputime(void) { struct timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); return ts.tv_sec * 1000000000ull + ts.tv_nsec; }
static inline void spin(uint64_t ns) { uint64_t end = now() + ns; while (now() < end) {} }
static inline void pin_to(int cpu) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu, &s); pthread_setaffinity_np(pthread_self(), sizeof s, &s); }
static inline void sleep_until(uint64_t t) { struct timespec ts = { (time_t)(t / 1000000000), (long)(t % 1000000000) }; clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, 0); }
#endif
