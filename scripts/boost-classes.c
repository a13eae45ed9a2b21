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
 * With LAYOUT "libvirt" (cgroup v1's cpu controller), the vCPU thread runs alone in a
 * cgroup two levels down (LAB/dom/vcpu0, as libvirt's machine/DOMAIN/vcpuN), the busy
 * threads and the probe where the program started: the scheduler then compares the
 * cgroups, not the threads. New cgroups have no real-time runtime (cpu.rt_runtime_us 0).
 *
 * usage: boost-classes CLASS REPAY BUSY SECONDS CPU [LAYOUT]
 *   CLASS: none, fifo (SCHED_FIFO 10), slice (SCHED_OTHER nice -20, a 100 us slice),
 *          placed (slice, through SCHED_FIFO 1 first: pvsched's step for a waiting thread),
 *          weighted (placed, and the vCPU's cgroup and those above it at cpu.shares 88761
 *          while boosted: pvsched's cgroup weights), weighted-all (weighted, and every
 *          one of those cgroups at 15 while it repays), fifo-granted (fifo, the cgroups given
 *          real-time runtime first: 95% of each second above, 40% of every 10 ms for the vCPU)
 *   LAYOUT: flat (default: every thread in one cgroup) or libvirt
 * Needs root (or CAP_SYS_NICE). Build: cc -O2 -pthread -o boost-classes boost-classes.c */
#include "sched-lab.h"
#include <errno.h>
#include <sys/stat.h>

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
static int libvirt_layout, refused;
static char cg_top[256], cg_dom[300], cg_vcpu[320];
static const char *cpu_mount = "/sys/fs/cgroup/cpu";

static int put(const char *dir, const char *file, unsigned long long v) {
    char path[400]; snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "w"); if (!f) return -1;
    int ok = fprintf(f, "%llu\n", v) > 0; return fclose(f) == 0 && ok ? 0 : -1;
}
/* The vCPU's cgroups weigh as a nice -20 thread (88761) while boosted, else their own 1024. */
static void weigh(unsigned long long shares) {
    put(cg_vcpu, "cpu.shares", shares); put(cg_dom, "cpu.shares", shares); put(cg_top, "cpu.shares", shares);
}
static void unboost_self(void) {
    if (!strncmp(klass, "weighted", 8)) weigh(1024);
}
/* A repayment at nice 19 counts inside the vCPU's cgroup only ("weighted": pvsched leaves the
 * cgroups at their own weights while it repays); "weighted-all" lowers every cgroup to a nice
 * 19 thread's (15) meanwhile, which repays the host but lowers the VM's other threads too. */
static void repay_weight(int repaying) {
    if (!strcmp(klass, "weighted-all")) weigh(repaying ? 15 : 1024);
}

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
                unboost_self();
                if (repay > 0) { set(0, SCHED_OTHER, 19, 0, 0); repay_weight(1); repay_until = now() + (uint64_t)(repay * 1000000); }
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
        if (repay_until) { repay_until = 0; set(t, SCHED_OTHER, 0, 0, 0); repay_weight(0); }
        if (!strcmp(klass, "fifo") || !strcmp(klass, "fifo-granted")) { if (set(t, SCHED_FIFO, 0, 10, 0) && errno == EPERM) refused++; }
        else if (!strncmp(klass, "weighted", 8)) { set(t, SCHED_FIFO, 0, 1, 0); set(t, SCHED_OTHER, -20, 0, 100000); weigh(88761); }
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
        if (u && now() >= u) { repay_until = 0; set(vcpu_tid, SCHED_OTHER, 0, 0, 0); repay_weight(0); continue; }
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
    if (argc < 6) { fprintf(stderr, "usage: %s none|fifo|slice|placed|weighted|weighted-all|fifo-granted REPAY BUSY SECONDS CPU [flat|libvirt]\n", argv[0]); return 2; }
    klass = argv[1]; repay = atof(argv[2]); busy_count = atoi(argv[3]);
    int seconds = atoi(argv[4]); cpu = atoi(argv[5]);
    libvirt_layout = argc > 6 && !strcmp(argv[6], "libvirt");
    if (busy_count < 0 || busy_count > 16) { fprintf(stderr, "BUSY must be 0-16\n"); return 2; }
    pthread_t b[16], t[4];
    for (long i = 0; i < busy_count; i++) pthread_create(&b[i], 0, busy, (void *)i);
    pthread_create(&t[0], 0, vcpu, 0);
    while (!vcpu_tid) usleep(1000);
    if (libvirt_layout) {
        snprintf(cg_top, sizeof cg_top, "%s/pvsched-lab-%d", cpu_mount, (int)getpid());
        snprintf(cg_dom, sizeof cg_dom, "%s/dom", cg_top);
        snprintf(cg_vcpu, sizeof cg_vcpu, "%s/vcpu0", cg_dom);
        if (mkdir(cg_top, 0755) || mkdir(cg_dom, 0755) || mkdir(cg_vcpu, 0755) || put(cg_vcpu, "tasks", (unsigned long long)vcpu_tid)) {
            perror("the libvirt-like cgroups (cgroup v1 cpu controller at /sys/fs/cgroup/cpu)"); return 1;
        }
        if (!strcmp(klass, "fifo-granted")
            && (put(cg_top, "cpu.rt_runtime_us", 950000) || put(cg_dom, "cpu.rt_runtime_us", 950000)
                || put(cg_vcpu, "cpu.rt_period_us", 10000) || put(cg_vcpu, "cpu.rt_runtime_us", 4000))) {
            perror("granting real-time runtime"); return 1;
        }
    }
    pthread_create(&t[1], 0, timer, 0);
    pthread_create(&t[2], 0, enforcer, 0);
    pthread_create(&t[3], 0, probe, 0);
    sleep(seconds);
    stop = 1;
    for (int i = 0; i < 4; i++) pthread_join(t[i], 0);
    for (int i = 0; i < busy_count; i++) pthread_join(b[i], 0);
    if (libvirt_layout) {
        /* Back where it started (the vCPU thread has ended: its cgroup is empty), then gone. */
        put(cg_vcpu, "cpu.rt_runtime_us", 0); put(cg_dom, "cpu.rt_runtime_us", 0); put(cg_top, "cpu.rt_runtime_us", 0);
        rmdir(cg_vcpu); rmdir(cg_dom); rmdir(cg_top);
    }
    if (refused) printf("(%s: %d of the boosts refused: the cgroup has no real-time runtime)\n", klass, refused);
    if (!ndone || !nlate) { printf("no samples\n"); return 1; }
    qsort(done, ndone, sizeof done[0], cmp);
    qsort(late, nlate, sizeof late[0], cmp);
    double all = vcpu_cpu;
    for (int i = 0; i < busy_count; i++) all += busy_cpu[i];
    printf("%-12s %s repay %.1f, %d busy: 1 ms of work done in p50 %5.0f p99 %5.0f max %5.0f us | vCPU %4.1f%% of the CPU (fair %4.1f%%) | probe p99 %5.0f max %5.0f us\n",
           klass, libvirt_layout ? "libvirt" : "flat   ", repay, busy_count, done[ndone / 2] / 1e3, done[ndone * 99 / 100] / 1e3, done[ndone - 1] / 1e3,
           100 * vcpu_cpu / all, 100.0 / (busy_count + 1), late[nlate * 99 / 100] / 1e3, late[nlate - 1] / 1e3);
    return 0;
}
