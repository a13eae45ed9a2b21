#!/usr/bin/env bash
# Shows why a fair-class boost passes through SCHED_FIFO 1 (LinuxScheduling.placeAfresh): runs the
# stand-alone reproducer scripts/eevdf-lag.c with and without that step, for a vCPU thread that sleeps
# between boosts and for one that stays runnable (see the C file for the set-up). Needs root and cc.
# usage: scripts/eevdf-lag.sh [SECONDS] [CPU]
set -euo pipefail
seconds="${1:-5}"; cpu="${2:-0}"
dir="$(cd "$(dirname "$0")" && pwd)"
bin="$(mktemp /tmp/eevdf-lag.XXXXXX)"
trap 'rm -f "$bin"' EXIT
cc -O2 -pthread -o "$bin" "$dir/eevdf-lag.c"
for runnable in 0 1; do
    for place in 0 1; do "$bin" "$place" "$runnable" "$seconds" "$cpu"; done
done
