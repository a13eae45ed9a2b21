/* What each boost class does for a CPU-bound vCPU thread, without a VM: a stand-alone
 * reproducer of the demo's rt+batch on one CPU.
 *
 * On one CPU: BUSY busy SCHED_OTHER threads, a CPU-bound "vCPU" thread, a SCHED_FIFO 1
 * probe (wakes every 1.618 ms, a period not commensurate with the vCPU's, and records
 * how late it woke) and a SCHED_FIFO 20 "timer" that boosts the vCPU every 5 ms. The
 * vCPU then runs 1 ms of CPU time of "real-time work" and gives the boost back; with a
 * repayment it runs at nice 19 for REPAY x 1 ms (a SCHED_FIFO 20 "enforcer" ends it).
 * Reported: the real-time work's completion time after the boost (1 ms if nothing took
 * the CPU meanwhile), the vCPU's share of the CPU against its fair share without
 * boosts, and the probe's lateness.
 *
 * usage: boost-classes CLASS REPAY BUSY SECONDS CPU
 *   CLASS: none, fifo (SCHED_FIFO 10), slice (SCHED_OTHER nice -20, a 100 us slice),
 *          placed (slice, through SCHED_FIFO 1 first: pvsched's step for a waiting thread)
 * Needs root (or CAP_SYS_NICE). Build: cc -O2 -pthread -o boost-classes boost-classes.c */
#include "sched-lab.h"

static int cpu, busy_count;
static const char *klass;
static double repay;
static void pin(void) { pin_to(cpu); }
static atomic_int stop, vcpu_tid, generation;
static atomic_ullong boosted_at, repay_until;
enum { MAX = 100000 };
static uint64_t done[MAX], late[MAX];
static int ndone, nlate;
static uint64_t busy_cpu[16], vcpu_cpu;

static void *busy(void *arg) {
    pin();
    while (!stop) for (volatile int k = 0; k < 10000; k++) {}
    busy_cpu[(long)arg] = cputime();
    return 0;
}
static void *vcpu(void *unused) {
    pin();
    vcpu_tid = (int)syscall(SYS_gettid);
    int seen = 0;
    while (!stop) {
        int g = atomic_load(&generation);
        if (g != seen) {
            seen = g;
            uint64_t end = cputime() + 1000000;
            while (cputime() < end) {}   /* the real-time work: 1 ms of CPU time */
            if (ndone < MAX) done[ndone++] = now() - boosted_at;
            if (strcmp(klass, "none") != 0) {
                if (repay > 0) { set(0, SCHED_OTHER, 19, 0, 0); repay_until = now() + (uint64_t)(repay * 1000000); }
                else set(0, SCHED_OTHER, 0, 0, 0);
            }
        }
        for (volatile int k = 0; k < 1000; k++) {}   /* batch work */
    }
    vcpu_cpu = cputime();
    return unused;
}
static void *timer(void *unused) {
    pin();
    set(0, SCHED_FIFO, 0, 20, 0);
    uint64_t next = now() + 5000000;
    while (!stop) {
        sleep_until(next);
        pid_t t = vcpu_tid;
        boosted_at = now();
        /* As pvsched does: a boost ends a repayment first (back to nice 0). */
        if (repay_until) { repay_until = 0; set(t, SCHED_OTHER, 0, 0, 0); }
        if (!strcmp(klass, "fifo")) set(t, SCHED_FIFO, 0, 10, 0);
        else if (!strcmp(klass, "slice")) set(t, SCHED_OTHER, -20, 0, 100000);
        else if (!strcmp(klass, "placed")) { set(t, SCHED_FIFO, 0, 1, 0); set(t, SCHED_OTHER, -20, 0, 100000); }
        atomic_fetch_add(&generation, 1);
        next += 5000000;
    }
    return unused;
}
static void *enforcer(void *unused) {
    pin();
    set(0, SCHED_FIFO, 0, 20, 0);
    while (!stop) {
        uint64_t u = repay_until;
        if (u && now() >= u) { repay_until = 0; set(vcpu_tid, SCHED_OTHER, 0, 0, 0); continue; }
        sleep_until(u ? u : now() + 1000000);
    }
    return unused;
}
static void *probe(void *unused) {
    pin();
    set(0, SCHED_FIFO, 0, 1, 0);
    uint64_t next = now() + 1000000;
    while (!stop) {
        sleep_until(next);
        if (nlate < MAX) late[nlate++] = now() - next;
        next += 1618033;
    }
    return unused;
}
static int cmp(const void *a, const void *b) { uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
    if (argc < 6) { fprintf(stderr, "usage: %s none|fifo|slice|placed REPAY BUSY SECONDS CPU\n", argv[0]); return 2; }
    klass = argv[1]; repay = atof(argv[2]); busy_count = atoi(argv[3]);
    int seconds = atoi(argv[4]); cpu = atoi(argv[5]);
    if (busy_count < 0 || busy_count > 16) { fprintf(stderr, "BUSY must be 0-16\n"); return 2; }
    pthread_t b[16], t[4];
    for (long i = 0; i < busy_count; i++) pthread_create(&b[i], 0, busy, (void *)i);
    pthread_create(&t[0], 0, vcpu, 0);
    while (!vcpu_tid) usleep(1000);
    pthread_create(&t[1], 0, timer, 0);
    pthread_create(&t[2], 0, enforcer, 0);
    pthread_create(&t[3], 0, probe, 0);
    sleep(seconds);
    stop = 1;
    for (int i = 0; i < 4; i++) pthread_join(t[i], 0);
    for (int i = 0; i < busy_count; i++) pthread_join(b[i], 0);
    if (!ndone || !nlate) { printf("no samples\n"); return 1; }
    qsort(done, ndone, sizeof done[0], cmp);
    qsort(late, nlate, sizeof late[0], cmp);
    double all = vcpu_cpu;
    for (int i = 0; i < busy_count; i++) all += busy_cpu[i];
    printf("%-6s repay %.1f, %d busy: 1 ms of work done in p50 %5.0f p99 %5.0f max %5.0f us | vCPU %4.1f%% of the CPU (fair %4.1f%%) | probe p99 %5.0f max %5.0f us\n",
           klass, repay, busy_count, done[ndone / 2] / 1e3, done[ndone * 99 / 100] / 1e3, done[ndone - 1] / 1e3,
           100 * vcpu_cpu / all, 100.0 / (busy_count + 1), late[nlate * 99 / 100] / 1e3, late[nlate - 1] / 1e3);
    return 0;
}
