#!/usr/bin/env bash
# What each boost class does for a CPU-bound vCPU thread (the demo's rt+batch) without a VM:
# runs scripts/boost-classes.c (see it for the set-up) for each class, without and with a
# repayment, beside 2 busy threads, and the real-time class beside 1 and 4; then, where the
# cgroup v1 cpu controller is mounted, each class with the vCPU thread alone in a cgroup two
# levels down as libvirt places it. Needs root and cc.
# usage: scripts/boost-classes.sh [SECONDS] [CPU]
set -euo pipefail
seconds="${1:-3}"; cpu="${2:-0}"
dir="$(cd "$(dirname "$0")" && pwd)"
bin="$(mktemp /tmp/boost-classes.XXXXXX)"
trap 'rm -f "$bin"' EXIT
cc -O2 -pthread -o "$bin" "$dir/boost-classes.c"
"$bin" none 0 2 "$seconds" "$cpu"
for class in fifo slice placed; do
    for repay in 0 2; do "$bin" "$class" "$repay" 2 "$seconds" "$cpu"; done
done
for busy in 1 4; do
    for repay in 0 "$busy"; do "$bin" fifo "$repay" "$busy" "$seconds" "$cpu"; done
done
if [ -w /sys/fs/cgroup/cpu/cpu.shares ]; then
    echo "# libvirt's layout: the vCPU thread alone in LAB/dom/vcpu0"
    for class in none slice weighted fifo fifo-granted; do "$bin" "$class" 0 2 "$seconds" "$cpu" libvirt; done
    for class in weighted weighted-all; do "$bin" "$class" 2 2 "$seconds" "$cpu" libvirt; done
fi
