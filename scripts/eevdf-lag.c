/* Why a fair-class (EEVDF) boost passes through SCHED_FIFO 1 (LinuxScheduling.placeAfresh):
 * a stand-alone reproducer of a boosted vCPU thread among busy host threads.
 *
 * On one CPU: two busy SCHED_OTHER threads, a "vCPU" thread and a SCHED_FIFO "timer" thread.
 * Every 5 ms the timer boosts the vCPU (SCHED_OTHER nice -20, a 100 us slice) and wakes it;
 * the vCPU runs 1.5 ms boosted, is given back nice 0, runs 0.3 ms more and waits again.
 * Reported: how long the boosted vCPU waited for the CPU after each wake-up.
 *
 * usage: eevdf-lag PLACE RUNNABLE SECONDS [CPU]
 *   PLACE 1: the boost first sets SCHED_FIFO 1, then the fair boost (pvsched's way); 0: directly
 *   RUNNABLE 1: the vCPU spins between boosts instead of sleeping (a vCPU running batch work)
 * Needs root (or CAP_SYS_NICE). Build: cc -O2 -pthread -o eevdf-lag eevdf-lag.c */
#include "sched-lab.h"

static int cpu, place, runnable;
static void pin(void) { pin_to(cpu); }

static atomic_int word, stop;
static atomic_int vcpu_tid;
static atomic_ullong woken_at;
enum { MAX = 20000 };
static uint64_t waits[MAX];
static int n;

static void *busy(void *unused) { pin(); while (!stop) spin(100000); return unused; }
static void *vcpu(void *unused) {
    pin();
    vcpu_tid = (int)syscall(SYS_gettid);
    int seen = 0;
    while (!stop) {
        while (atomic_load(&word) == seen && !stop)
            if (!runnable) syscall(SYS_futex, &word, FUTEX_WAIT, seen, 0, 0, 0);
        seen = atomic_load(&word);
        if (n < MAX) waits[n++] = now() - woken_at;
        spin(1500000);                      /* boosted work */
        set(0, SCHED_OTHER, 0, 0, 0);       /* the boost is given back... */
        spin(300000);                       /* ...and the vCPU runs on a little */
    }
    return unused;
}
static void *timer(void *unused) {
    pin();
    set(0, SCHED_FIFO, 0, 9, 0);
    uint64_t next = now() + 5000000;
    while (!stop) {
        struct timespec ts = { (time_t)(next / 1000000000), (long)(next % 1000000000) };
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, 0);
        if (place) set(vcpu_tid, SCHED_FIFO, 0, 1, 0);
        set(vcpu_tid, SCHED_OTHER, -20, 0, 100000);
        woken_at = now();
        atomic_fetch_add(&word, 1);
        syscall(SYS_futex, &word, FUTEX_WAKE, 1, 0, 0, 0);
        next += 5000000;
    }
    return unused;
}
static int cmp(const void *a, const void *b) { uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s PLACE RUNNABLE SECONDS [CPU]\n", argv[0]); return 2; }
    place = atoi(argv[1]); runnable = atoi(argv[2]);
    int seconds = atoi(argv[3]);
    cpu = argc > 4 ? atoi(argv[4]) : 0;
    pthread_t t[4];
    pthread_create(&t[0], 0, busy, 0);
    pthread_create(&t[1], 0, busy, 0);
    pthread_create(&t[2], 0, vcpu, 0);
    while (!vcpu_tid) usleep(1000);
    pthread_create(&t[3], 0, timer, 0);
    sleep(seconds);
    stop = 1;
    atomic_fetch_add(&word, 1);
    syscall(SYS_futex, &word, FUTEX_WAKE, 1, 0, 0, 0);
    if (n == 0) { printf("no wake-ups\n"); return 1; }
    qsort(waits, n, sizeof waits[0], cmp);
    int late = 0;
    for (int i = 0; i < n; i++) if (waits[i] > 500000) late++;
    printf("placement step %-3s vCPU %-8s wake-ups %5d  wait p50 %5llu us  p90 %5llu us  p99 %5llu us  max %5llu us  over 500 us: %d (%.1f%%)\n",
           place ? "yes" : "no", runnable ? "runnable" : "sleeping", n,
           (unsigned long long)(waits[n / 2] / 1000), (unsigned long long)(waits[n * 9 / 10] / 1000),
           (unsigned long long)(waits[n * 99 / 100] / 1000), (unsigned long long)(waits[n - 1] / 1000), late, 100.0 * late / n);
    fflush(stdout);
    _exit(0);  /* the threads spin: do not join them */
}
