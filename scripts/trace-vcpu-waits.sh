#!/usr/bin/env bash
# Shows where a boosted vCPU's latency goes, from the kernel's own scheduler trace: records
# sched_switch and sched_wakeup (tracefs) while `pvsched demo` runs one mode, then reports the
# boosted vCPU threads' run-queue waits (from a wake-up, or a preemption while runnable, to running
# again) and, for the long ones, which threads had their CPU meanwhile.
#
# usage: scripts/trace-vcpu-waits.sh MODE [GUEST] [SECONDS] [LONG_US]
#   e.g. scripts/trace-vcpu-waits.sh deadline-boost@slice:100 mixed 4
#        scripts/trace-vcpu-waits.sh deadline-boost mixed 4          (fifo:10, for comparison)
# Needs root and tracefs; PVSCHED_BIN overrides the binary (default .build/release/pvsched).
set -euo pipefail
mode="${1:?usage: trace-vcpu-waits.sh MODE [GUEST] [SECONDS] [LONG_US]}"
guest="${2:-mixed}"; seconds="${3:-4}"; long_us="${4:-500}"
bin="${PVSCHED_BIN:-.build/release/pvsched}"
[ -x "$bin" ] || { echo "no $bin: run 'swift build -c release' first" >&2; exit 1; }
t=/sys/kernel/tracing
[ -e "$t/trace" ] || mount -t tracefs nodev "$t"
out="$(mktemp /tmp/pvsched-sched-trace.XXXXXX)"
cleanup() {
    echo 0 > "$t/tracing_on"
    echo 0 > "$t/events/sched/sched_switch/enable"; echo 0 > "$t/events/sched/sched_wakeup/enable"
}
trap cleanup EXIT
echo 0 > "$t/tracing_on"; : > "$t/trace"
echo 32768 > "$t/buffer_size_kb"
echo 1 > "$t/events/sched/sched_switch/enable"; echo 1 > "$t/events/sched/sched_wakeup/enable"
echo 1 > "$t/tracing_on"
"$bin" demo --guest "$guest" --modes "$mode" --seconds "$seconds" --plot "$out.svg" > "$out.demo" 2>/dev/null || true
echo 0 > "$t/tracing_on"
cat "$t/trace" > "$out"
grep -E "^(mode|$mode) " "$out.demo" | head -3 || true
# Waits of boosted vCPU threads (kernel prio below 120: real-time, or nice below 0) and of the probe.
awk -v long_ns="$((long_us * 1000))" -v waits="$out.waits" '
function ns(ts,   p) { p = index(ts, "."); return substr(ts, 1, p - 1) * 1000000000 + substr(ts, p + 1, 6) * 1000 }
function field(name,   i) { for (i = 1; i <= NF; i++) if (index($i, name "=") == 1) return substr($i, length(name) + 2); return "" }
function group(comm, prio) { return comm ~ /^vcpu/ && prio < 120 ? "boosted vCPU" : comm == "host-probe" ? "host probe" : "" }
/sched_switch:|sched_wakeup:/ {
    cpu = ""; ts = ""
    for (i = 1; i <= NF; i++) {
        if ($i ~ /^\[[0-9]+\]$/) cpu = substr($i, 2, length($i) - 2) + 0
        if ($i ~ /^[0-9]+\.[0-9]+:$/) { ts = ns(substr($i, 1, length($i) - 1)); break }
    }
    if (ts == "") next
    if ($0 ~ /sched_wakeup:/) {
        pid = field("pid"); g = group(field("comm"), field("prio") + 0)
        if (g != "" && !(pid in since)) { since[pid] = ts; who[pid] = g }
        next
    }
    prev = field("prev_comm"); prevpid = field("prev_pid"); state = field("prev_state")
    nextpid = field("next_pid")
    # The CPU ran `prev` from its last switch until now.
    n = segs[cpu]++; segstart[cpu, n % 256] = last[cpu]; segend[cpu, n % 256] = ts; segcomm[cpu, n % 256] = prev
    last[cpu] = ts
    g = group(prev, field("prev_prio") + 0)
    if (g != "" && state ~ /^R/) { since[prevpid] = ts; who[prevpid] = g }
    if (nextpid in since) {
        g = who[nextpid]; w = ts - since[nextpid]
        print g "\t" w > waits
        count[g]++
        if (w >= long_ns) {
            longs[g]++; longsum[g] += w
            for (k = segs[cpu] - 1; k >= 0 && k >= segs[cpu] - 256; k--) {
                s0 = segstart[cpu, k % 256]; s1 = segend[cpu, k % 256]
                if (s1 <= since[nextpid]) break
                if (s0 < since[nextpid]) s0 = since[nextpid]
                held[g, segcomm[cpu, k % 256]] += s1 - s0
            }
        }
        delete since[nextpid]
    }
}
END {
    for (g in count) {
        printf "%s: %d run-queue waits, %d of them >= %d us (%.1f ms in all)\n", g, count[g], longs[g], long_ns / 1000, longsum[g] / 1e6
        for (key in held) {
            split(key, part, SUBSEP)
            if (part[1] == g) printf "  the CPU was held by %-14s %8.2f ms (%4.1f%%)\n", part[2], held[key] / 1e6, 100 * held[key] / longsum[g]
        }
    }
}' "$out"
if [ -s "$out.waits" ]; then
    sort -t "$(printf '\t')" -k1,1 -k2,2n "$out.waits" | awk -F '\t' '
    function report() { if (n) printf "%s waits: p50 %.0f us, p90 %.0f us, p99 %.0f us, max %.0f us\n", g, v[int(n * 0.5) + 1] / 1000, v[int(n * 0.9) + 1] / 1000, v[int(n * 0.99) + 1] / 1000, v[n] / 1000 }
    $1 != g { report(); g = $1; n = 0 }
    { v[++n] = $2 }
    END { report() }'
fi
rm -f "$out" "$out.demo" "$out.waits" "$out.svg"
