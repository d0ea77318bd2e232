#!/usr/bin/env bash
# bench/push.sh — the cost of push-rule evaluation in a 1,000-member room (Hearth only).
#
#   bench/push.sh            results on stdout and in $BENCH_OUT/push.txt
#
# Runs tests/push_bench.rs in release mode (an in-process Hearth on loopback, a temporary
# database): 1,000 local members join one room, then
# - one message is evaluated for every member (`ops::push::evaluate`, the evaluator's read:
#   one `Ruleset::get_actions` per member), cold and warm (median of 20);
# - 400 messages are sent by 4 clients with the evaluator running, and the time until it has
#   stored the last one is taken;
# - the same burst into a fresh 1,000-member room with `push.evaluate = false`.
#
# Knobs: BENCH_OUT (/tmp/hearth-bench).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BENCH_OUT=${BENCH_OUT:-/tmp/hearth-bench}
mkdir -p "$BENCH_OUT"
cd "$REPO"
{
    echo "# bench/push.sh at $(git rev-parse --short HEAD) on $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc)"
    cargo test --release --locked --test push_bench -- --ignored --nocapture --test-threads=1 2>&1 |
        grep -E '^(BENCH|setup:)'
} | tee "$BENCH_OUT/push.txt"
