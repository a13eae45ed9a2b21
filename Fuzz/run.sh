#!/usr/bin/env bash
# Builds the libFuzzer targets (instrumented, release) and runs each one from its
# corpus in Fuzz/Corpus for a bounded time: SECONDS each (default 20), or RUNS
# executions each with `--runs N`. New inputs go to a scratch copy of the corpus;
# a crash leaves its reproducer in Fuzz/.build/crashes/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="/opt/swift/usr/bin:$PATH"
limit=(-max_total_time="${1:-20}")
if [ "${1:-}" = "--runs" ]; then limit=(-runs="$2"); fi
swift build -c release --sanitize=fuzzer 2>&1 | grep -Ev "^\[[0-9]+/[0-9]+\]" || true
bin=$(swift build -c release --sanitize=fuzzer --show-bin-path)
# Swift's own crash reporter would take the signal before libFuzzer saves the input.
export SWIFT_BACKTRACE=enable=no
mkdir -p .build/crashes
status=0
for pair in FuzzELFLoader:elf-loader FuzzBPFProgram:bpf-program FuzzSharedArea:shared-area FuzzControlRequest:control-request FuzzGuestOutput:guest-output FuzzRegionWatch:region-watch FuzzDaemonConfig:daemon-config FuzzDomainXML:domain-xml; do
    target=${pair%%:*}; corpus=${pair##*:}
    scratch=$(mktemp -d)
    cp -r "Corpus/$corpus/." "$scratch/"
    echo "== $target (${limit[*]})"
    if ! "$bin/$target" "$scratch" -max_len=4096 -rss_limit_mb=2048 -artifact_prefix=.build/crashes/"$target"- \
          "${limit[@]}" -print_final_stats=1 2>"$scratch.log"; then
        status=1
        tail -30 "$scratch.log"
    fi
    grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$scratch.log" | tail -2 || true
    rm -rf "$scratch" "$scratch.log"
done
exit $status
