#!/usr/bin/env bash
# Shows where a boosted vCPU's latency goes, and the host probe's, from the kernel's own trace:
# records sched_switch, sched_wakeup and the hrtimer events (tracefs) while `pvsched demo` runs one
# mode, then reports
# - the boosted vCPU threads' run-queue waits (from a wake-up, a preemption while runnable, or a
#   boost that began while the thread waited for its CPU, to running again; a thread's boost is
#   seen as pvsched's sched_setattr call, where the kernel traces system calls, or as a priority
#   lent by a waiter on a priority-inheriting lock the thread holds) and, for the long
#   ones, which threads had their CPU meanwhile (a thread's priority is the one it left the CPU with);
# - the host probe's latency from its timer's expiry to running, split into the timer interrupt's
#   delay (expiry to the interrupt handler: the CPU had interrupts off, or was not running at all,
#   which on a machine that is itself a VM includes the hypervisor beneath it) and the run-queue
#   wait after the wake-up, and for the long ones, which thread was current when the interrupt
#   came late and which threads held the CPU until the probe ran.
#
# usage: scripts/trace-vcpu-waits.sh MODE [GUEST] [SECONDS] [LONG_US] [PROBE_LONG_US]
#   e.g. scripts/trace-vcpu-waits.sh deadline-boost@slice:100 mixed 4
#        scripts/trace-vcpu-waits.sh deadline-boost mixed 4          (fifo:10, for comparison)
#        scripts/trace-vcpu-waits.sh vanilla cyclic 4                 (the probe without boosts)
# LONG_US (default 500) marks a long vCPU wait, PROBE_LONG_US (default 200) a long probe latency.
# Needs root and tracefs; PVSCHED_BIN overrides the binary (default .build/release/pvsched).
set -euo pipefail
mode="${1:?usage: trace-vcpu-waits.sh MODE [GUEST] [SECONDS] [LONG_US] [PROBE_LONG_US]}"
guest="${2:-mixed}"; seconds="${3:-4}"; long_us="${4:-500}"; probe_long_us="${5:-200}"
bin="${PVSCHED_BIN:-.build/release/pvsched}"
[ -x "$bin" ] || { echo "no $bin: run 'swift build -c release' first" >&2; exit 1; }
t=/sys/kernel/tracing
[ -e "$t/trace" ] || mount -t tracefs nodev "$t"
out="$(mktemp /tmp/pvsched-sched-trace.XXXXXX)"
events="sched/sched_switch sched/sched_wakeup sched/sched_pi_setprio timer/hrtimer_start timer/hrtimer_expire_entry"
# When a boost began (pvsched's sched_setattr calls), where the kernel traces system calls.
[ -e "$t/events/syscalls/sys_enter_sched_setattr" ] && events="$events syscalls/sys_enter_sched_setattr"
cleanup() {
    echo 0 > "$t/tracing_on"
    for e in $events; do echo 0 > "$t/events/$e/enable"; done
}
trap cleanup EXIT
echo 0 > "$t/tracing_on"; : > "$t/trace"
echo 65536 > "$t/buffer_size_kb"
for e in $events; do echo 1 > "$t/events/$e/enable"; done
echo 1 > "$t/tracing_on"
"$bin" demo --guest "$guest" --modes "$mode" --seconds "$seconds" --plot "$out.svg" > "$out.demo" 2>/dev/null || true
echo 0 > "$t/tracing_on"
cat "$t/trace" > "$out"
grep -E "^(mode|$mode) " "$out.demo" | head -3 || true
# Waits of boosted vCPU threads (kernel prio below 120: real-time, or nice below 0) and of the probe;
# the probe's latency from its timer's expiry, split into the interrupt's delay and the wait after it.
awk -v long_ns="$((long_us * 1000))" -v probe_long_ns="$((probe_long_us * 1000))" -v waits="$out.waits" -v probelong="$out.probelong" '
function ns(ts,   p) { p = index(ts, "."); return substr(ts, 1, p - 1) * 1000000000 + substr(ts, p + 1, 6) * 1000 }
function field(name,   i) { for (i = 1; i <= NF; i++) if (index($i, name "=") == 1) return substr($i, length(name) + 2); return "" }
function group(comm) { return comm ~ /^vcpu/ ? "vCPU" : comm == "host-probe" ? "host probe" : "" }
function hex(h,   i, v) { v = 0; h = tolower(h); sub(/^0x/, "", h); for (i = 1; i <= length(h); i++) v = v * 16 + index("0123456789abcdef", substr(h, i, 1)) - 1; return v }
# Adds to held[g, comm] the time each thread ran on `cpu` between `from` and `to` (the recent switches).
function holders(g, cpu, from, to,   k, s0, s1) {
    for (k = segs[cpu] - 1; k >= 0 && k >= segs[cpu] - 256; k--) {
        s0 = segstart[cpu, k % 256]; s1 = segend[cpu, k % 256]
        if (s1 <= from) break
        if (s0 < from) s0 = from
        if (s1 > to) s1 = to
        if (s1 > s0) held[g, segcomm[cpu, k % 256]] += s1 - s0
    }
}
/sched_switch:|sched_wakeup:|sched_pi_setprio:|hrtimer_start:|hrtimer_expire_entry:|sys_sched_setattr\(/ {
    cpu = ""; ts = ""
    for (i = 1; i <= NF; i++) {
        if ($i ~ /^\[[0-9]+\]$/) cpu = substr($i, 2, length($i) - 2) + 0
        if ($i ~ /^[0-9]+\.[0-9]+:$/) { ts = ns(substr($i, 1, length($i) - 1)); break }
    }
    if (ts == "") next
    task = $1; sub(/-[0-9]+$/, "", task); taskpid = $1; sub(/.*-/, "", taskpid)
    if ($0 ~ /sys_sched_setattr\(/) {
        # "sys_sched_setattr(pid: 0x24c1, ...": the parameters of a thread changed (pid 0: the caller).
        m = $0; sub(/.*sys_sched_setattr\(pid: /, "", m); sub(/,.*/, "", m)
        p = hex(m); if (p == 0) p = taskpid
        lastset[p] = ts
        next
    }
    # A thread that holds a lock a higher thread waits for runs at its priority meanwhile
    # (priority inheritance): counted as a boost from then.
    if ($0 ~ /sched_pi_setprio:/) { lastset[field("pid")] = ts; next }
    if ($0 ~ /hrtimer_start:/) {
        # The probe sleeps with clock_nanosleep: its timer is armed in its own context.
        if (task == "host-probe" && field("function") ~ /^hrtimer_wakeup/) { expires[field("hrtimer")] = field("expires") + 0; owner[field("hrtimer")] = taskpid }
        next
    }
    if ($0 ~ /hrtimer_expire_entry:/) {
        h = field("hrtimer")
        if (h in expires) {
            p = owner[h]; irqdelay[p] = field("now") - expires[h]; irqts[p] = ts
            irqcur[p] = task "(" (cpu in curprio ? curprio[cpu] : "?") ")"
            delete expires[h]; delete owner[h]
        }
        next
    }
    if ($0 ~ /sched_wakeup:/) {
        pid = field("pid"); g = group(field("comm"))
        if (g != "" && !(pid in since)) { since[pid] = ts; who[pid] = g }
        next
    }
    prev = field("prev_comm"); prevpid = field("prev_pid"); state = field("prev_state")
    nextpid = field("next_pid"); curprio[cpu] = field("next_prio")
    # The CPU ran `prev` from its last switch until now.
    n = segs[cpu]++; segstart[cpu, n % 256] = last[cpu]; segend[cpu, n % 256] = ts; segcomm[cpu, n % 256] = prev "(" field("prev_prio") ")"
    last[cpu] = ts
    g = group(prev)
    if (g != "" && state ~ /^R/) { since[prevpid] = ts; who[prevpid] = g }
    if (nextpid in since) {
        g = who[nextpid]; start = since[nextpid]
        if (g == "vCPU") {
            # Only a vCPU boosted when it gets its CPU counts, from its wake-up or preemption,
            # or from its boost when that began during the wait (a runnable vCPU boosted).
            if (field("next_prio") + 0 >= 120) { delete since[nextpid]; next }
            g = "boosted vCPU"
            if ((nextpid in lastset) && lastset[nextpid] > start) start = lastset[nextpid]
        }
        w = ts - start
        print g "\t" w > waits
        count[g]++
        if (w >= long_ns) { longs[g]++; longsum[g] += w; holders(g, cpu, start, ts) }
        if (g == "host probe" && (nextpid in irqdelay)) {
            d = irqdelay[nextpid]; if (d < 0) d = 0
            q = ts - irqts[nextpid]; lat = d + q
            print "probe latency\t" lat > waits
            if (lat >= probe_long_ns) {
                plongs++; pirq += d; pwait += q; irqby[irqcur[nextpid]] += d
                holders("probe latency", cpu, irqts[nextpid], ts)
                printf "%.0f\t%.0f us: timer interrupt %.0f us late (current: %s), then %.0f us to run\n", lat / 1000, lat / 1000, d / 1000, irqcur[nextpid], q / 1000 > probelong
            }
            delete irqdelay[nextpid]
        }
        delete since[nextpid]
    }
}
END {
    for (g in count) {
        printf "%s: %d run-queue waits, %d of them >= %d us (%.1f ms in all)\n", g, count[g], longs[g], long_ns / 1000, longsum[g] / 1e6
        for (key in held) {
            split(key, part, SUBSEP)
            if (part[1] == g) printf "  the CPU was held by %-18s %8.2f ms (%4.1f%%)\n", part[2], held[key] / 1e6, 100 * held[key] / longsum[g]
        }
    }
    if (plongs) {
        printf "host probe: %d latencies >= %d us from timer expiry to running: %.2f ms of timer interrupt delay, %.2f ms of waiting after it\n", plongs, probe_long_ns / 1000, pirq / 1e6, pwait / 1e6
        for (c in irqby) printf "  interrupt delay with %-18s current %8.2f ms (%4.1f%%)\n", c, irqby[c] / 1e6, 100 * irqby[c] / (pirq > 0 ? pirq : 1)
        for (key in held) {
            split(key, part, SUBSEP)
            if (part[1] == "probe latency") printf "  from the interrupt to the probe running, the CPU was held by %-18s %8.2f ms\n", part[2], held[key] / 1e6
        }
    }
}' "$out"
if [ -s "$out.probelong" ]; then
    echo "the longest probe latencies:"
    sort -n "$out.probelong" | tail -5 | cut -f2 | sed 's/^/  /'
fi
if [ -s "$out.waits" ]; then
    sort -t "$(printf '\t')" -k1,1 -k2,2n "$out.waits" | awk -F '\t' '
    function report() { if (n) printf "%s: p50 %.0f us, p90 %.0f us, p99 %.0f us, max %.0f us\n", g, v[int(n * 0.5) + 1] / 1000, v[int(n * 0.9) + 1] / 1000, v[int(n * 0.99) + 1] / 1000, v[n] / 1000 }
    $1 != key { report(); key = $1; g = key == "probe latency" ? "host probe, from timer expiry to running" : key " waits"; n = 0 }
    { v[++n] = $2 }
    END { report() }'
fi
rm -f "$out" "$out.demo" "$out.waits" "$out.probelong" "$out.svg"
