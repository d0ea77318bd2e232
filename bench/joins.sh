#!/usr/bin/env bash
# bench/joins.sh — issue 12: faster remote joins, Hearth and Synapse joining the same room.
#
#   bench/joins.sh                       N = 1,000 and 10,000, 3 repeats, 4 kinds of joiner
#   JOINS_N=1000 JOINS_REPEATS=1 bench/joins.sh      a quick check
#
# 1. Builds the resident's database once per N (tests/join_bench.rs in release mode: one
#    public room, an owner and N local members joined through `ops::rooms::join` in-process;
#    kept in $JOINS_OUT/resident-N.db and reused by later runs with the same port).
# 2. bench/joins.py: per kind of joiner (hearth-partial, hearth-full, synapse-partial,
#    synapse-full) and repeat, a fresh resident (copy of that database, the `hearth` binary,
#    loopback TLS, name 127.0.0.1:$JOINS_RESIDENT_PORT) and a fresh joiner; a user of the
#    joiner joins; time to the join's 200, to the end of the resync, the joiner's peak RSS.
# Results: $JOINS_OUT/joins-N.json, summary in $JOINS_OUT/summary.txt, logs beside them.
#
# Knobs (environment): JOINS_N ("1000 10000"), JOINS_REPEATS (3), JOINS_KINDS (all four),
#   JOINS_OUT (/tmp/hearth-joins), JOINS_RESIDENT_PORT (8680), JOINS_JOINER_PORT (8690),
#   HEARTH_BIN (target/release/hearth, copied into $JOINS_OUT), SYNPEER_DIR
#   (/work/shared/synapse-peer), SYNPEER_HOME (/tmp/synpeer), PY (python3).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=${JOINS_OUT:-/tmp/hearth-joins}
NS=${JOINS_N:-1000 10000}
REPEATS=${JOINS_REPEATS:-3}
KINDS=${JOINS_KINDS:-hearth-partial,hearth-full,synapse-partial,synapse-full}
RPORT=${JOINS_RESIDENT_PORT:-8680}
JPORT=${JOINS_JOINER_PORT:-8690}
PY=${PY:-python3}   # joins.py needs only the standard library
SRC_BIN=${HEARTH_BIN:-$REPO/target/release/hearth}
mkdir -p "$OUT"
cd "$REPO"

log() { printf '[joins.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

timeout 600 bash "${SYNPEER_DIR:-/work/shared/synapse-peer}/start.sh" --install >/dev/null 2>&1

{
    echo "# bench/joins.sh at $(git rev-parse --short HEAD) on $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/summary.txt"

for n in $NS; do
    db=$OUT/resident-$n-$RPORT.db
    if [ ! -f "$db.room" ]; then
        rm -f "$db" "$db-wal" "$db-shm"
        log "building the resident database: $n members"
        JOINBENCH_DB=$db JOINBENCH_SERVER_NAME=127.0.0.1:$RPORT JOINBENCH_MEMBERS=$n \
            timeout 3600 cargo test --release --locked --test join_bench -- --ignored --nocapture 2>&1 |
            grep -E '^setup:' >&2
    fi
    # After the build above: `cargo test` also builds the binary its tests may run.
    [ -x "$SRC_BIN" ] || { log "no Hearth binary at $SRC_BIN (cargo build --release --locked)"; exit 1; }
    cp "$SRC_BIN" "$OUT/hearth"
    room=$(cat "$db.room")
    log "n=$n room $room ($(du -h "$db" | cut -f1)), kinds $KINDS, $REPEATS repeats"
    timeout 7200 "$PY" "$HERE/joins.py" --bin "$OUT/hearth" --resident-db "$db" \
        --resident-port "$RPORT" --joiner-port "$JPORT" --room "$room" --n "$n" \
        --kinds "$KINDS" --repeats "$REPEATS" --out "$OUT/runs-$n" \
        --synapse-dir "${SYNPEER_DIR:-/work/shared/synapse-peer}" \
        --synapse-home "${SYNPEER_HOME:-/tmp/synpeer}" >"$OUT/joins-$n.json"
    "$PY" - "$OUT/joins-$n.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"n={d['n']}: medians of {len(d['runs']) // max(1, len(d['medians']))} (join s, resync s, VmHWM MiB, joiner CPU s)")
for k, m in d["medians"].items():
    print(f"  {k:16} join {m['join_s']:8.3f}  resync {m['resync_s']:8.3f}  hwm {m['hwm_mib']:7.1f}  cpu {m['cpu_s']:7.2f}")
EOF
    JPORT=$((JPORT + 50))
done
log "done: $OUT/summary.txt, load $(cut -d' ' -f1-3 /proc/loadavg)"
