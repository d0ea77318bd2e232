#!/usr/bin/env bash
# bench/push_big_room.sh — the push evaluator's cost for ONE message in a room of 10,000 LOCAL
# members (tests/push_big_room.rs in release mode, on a copy of the faster-joins resident).
#
#   bench/push_big_room.sh                        this checkout
#   PUSH_BEFORE=<git ref> bench/push_big_room.sh  also <ref>'s evaluator, first: its tree is
#       exported to $BENCH_OUT/push-big-before (git archive) with this checkout's
#       tests/push_big_room.rs copied in, and built with its own target directory there
#       (a full release build the first time).
#
# Prints the BENCH lines: cold evaluation (fresh rule cache: every member's rules loaded), warm
# (median of PUSH_BIG_RUNS, default 10), the process's RSS and the Rust heap the rule cache
# holds. Needs the resident database tests/join_bench.rs builds (bench/joins.sh):
# PUSH_BIG_DB (/tmp/hearth-joins/resident-10000-8680.db, never modified: the test copies it).
# Synapse is not run here (its push evaluation for the same room would need the 10,000
# members built through its own API).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BENCH_OUT=${BENCH_OUT:-/tmp/hearth-bench}
export PUSH_BIG_DB=${PUSH_BIG_DB:-/tmp/hearth-joins/resident-10000-8680.db}
mkdir -p "$BENCH_OUT"
[ -f "$PUSH_BIG_DB" ] && [ -f "$PUSH_BIG_DB.room" ] ||
    { echo "no resident database at $PUSH_BIG_DB (run bench/joins.sh first)" >&2; exit 1; }

run() { # <label> <source dir>
    echo "# $1, nproc $(nproc), loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd "$2" && cargo test --release --locked --test push_big_room -- --ignored --nocapture 2>&1) |
        grep -E '^BENCH'
}

{
    echo "# bench/push_big_room.sh at $(git -C "$REPO" rev-parse --short HEAD) on $(date -u '+%Y-%m-%d %H:%M UTC')"
    if [ -n "${PUSH_BEFORE:-}" ]; then
        before=$BENCH_OUT/push-big-before
        rm -rf "$before/src" "$before/tests"
        mkdir -p "$before"
        git -C "$REPO" archive "$PUSH_BEFORE" | tar -x -C "$before"
        cp "$REPO/tests/push_big_room.rs" "$before/tests/"
        run "before: $(git -C "$REPO" rev-parse --short "$PUSH_BEFORE")" "$before"
    fi
    run "after: $(git -C "$REPO" rev-parse --short HEAD)" "$REPO"
} | tee "$BENCH_OUT/push_big_room.txt"
