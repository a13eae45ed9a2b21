#!/usr/bin/env bash
# The BPF interpreter against another revision of itself, measured in the same run:
#   bash scripts/bench-bpf-against.sh [REV] [ROUNDS]
# builds Benchmarks/bpf-compare (the kernels of Sources/PVSchedExperiments/BPFKernels.swift)
# against this tree and against REV (default: 4ff7d88, main when issue #13 was filed),
# runs the two alternately ROUNDS times (default 5), and prints each kernel's
# median and range for both and the speed-up (REV's time / this tree's).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rev=${1:-4ff7d88}
rounds=${2:-5}
export PATH="/opt/swift/usr/bin:$PATH"
work="$root/.build/bpf-against"
mkdir -p "$work"
base="$work/tree-$rev"
if [ ! -d "$base" ]; then
    git -C "$root" worktree add --detach "$base" "$rev" >/dev/null 2>&1 || { rm -rf "$base"; git -C "$root" worktree prune; git -C "$root" worktree add --detach "$base" "$rev"; }
fi
# Older trees did not export PVSchedBPF as a library product; add it to the worktree's manifest.
if ! grep -q 'library(name: "PVSchedBPF"' "$base/Package.swift"; then
    sed -i 's/products: \[/products: [.library(name: "PVSchedBPF", targets: ["PVSchedBPF"]), /' "$base/Package.swift"
fi
build() {  # build SCRATCH ROOT
    (cd "$root/Benchmarks/bpf-compare" && PVSCHED_ROOT="$2" swift build -c release --scratch-path "$1" 2>&1 | grep -E "error|warning: unre" >&2 || true)
    echo "$(cd "$root/Benchmarks/bpf-compare" && PVSCHED_ROOT="$2" swift build -c release --scratch-path "$1" --show-bin-path)/BPFCompare"
}
echo "building the kernels against this tree and against $rev ..." >&2
new=$(build "$work/build-new" "$root")
old=$(build "$work/build-$rev" "$base")
out="$work/results"
: > "$out"
for r in $(seq "$rounds"); do
    "$old" 5 | sed "s/^/old\t/" >> "$out"
    "$new" 5 | sed "s/^/new\t/" >> "$out"
    echo "round $r of $rounds done" >&2
done
python3 - "$out" "$rev" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    who, ns, name = line.rstrip("\n").split("\t")
    rows[name][who].append(float(ns))
print(f"{'kernel':52} {sys.argv[2] + ' median [range]':>24} {'this tree median [range]':>26} {'speed-up':>9}")
for name, d in rows.items():
    o, n = d["old"], d["new"]
    mo, mn = statistics.median(o), statistics.median(n)
    print(f"{name:52} {mo:8.2f} [{min(o):.2f}-{max(o):.2f}] {mn:10.2f} [{min(n):.2f}-{max(n):.2f}] {mo / mn:8.2f}x")
PY
