#!/usr/bin/env bash
# bench/thumbnail.sh — time and memory to thumbnail a 12-megapixel JPEG (4000x3000), Hearth and
# (unless BENCH_SKIP_SYNAPSE=1) Synapse side by side, each fresh.
#
#   bench/thumbnail.sh            results on stdout and in $BENCH_OUT/thumbnail.txt
#
# For each server: register a user, upload the photo (timed), then ask for a 320x240 `scale`
# and a 96x96 `crop` thumbnail (each timed; Hearth makes thumbnails on first request, Synapse
# at upload, so compare upload + first thumbnail). Memory: the server's VmRSS before, and its
# VmHWM (peak resident set) after, from /proc/PID/status.
#
# The photo is made with Pillow from the synapse-peer venv (Synapse depends on it): a noisy
# gradient, so the JPEG is photo-sized (~3-5 MB) rather than a trivially compressible one.
#
# Knobs: HEARTH_BIN (target/release/hearth), BENCH_OUT (/tmp/hearth-bench), HEARTH_PORT (8592),
# SYNAPSE_PORT (8593), SYNAPSE_NAME (hbench-thumb, wiped), SYNPEER_DIR
# (/work/shared/synapse-peer), SYNPEER_HOME (/tmp/synpeer).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
HEARTH_BIN=${HEARTH_BIN:-$REPO/target/release/hearth}
BENCH_OUT=${BENCH_OUT:-/tmp/hearth-bench}
HEARTH_PORT=${HEARTH_PORT:-8592}
SYNAPSE_PORT=${SYNAPSE_PORT:-8593}
SYNAPSE_NAME=${SYNAPSE_NAME:-hbench-thumb}
SYNPEER_DIR=${SYNPEER_DIR:-/work/shared/synapse-peer}
export SYNPEER_HOME=${SYNPEER_HOME:-/tmp/synpeer}
PY=$SYNPEER_HOME/venv/bin/python

mkdir -p "$BENCH_OUT"
OUT=$BENCH_OUT/thumbnail.txt
: >"$OUT"
WORK=$(mktemp -d)
HEARTH_PID=
cleanup() {
    [ -n "$HEARTH_PID" ] && kill "$HEARTH_PID" 2>/dev/null || true
    if [ "${BENCH_SKIP_SYNAPSE:-0}" != 1 ]; then
        SYNPEER_PURGE=1 bash "$SYNPEER_DIR/stop.sh" "$SYNAPSE_NAME" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

say() { echo "$*" | tee -a "$OUT"; }

[ -x "$PY" ] || bash "$SYNPEER_DIR/start.sh" --install >/dev/null
PHOTO=$WORK/photo.jpg
timeout 120 "$PY" - "$PHOTO" <<'EOF'
import os, sys
from PIL import Image
w, h = 4000, 3000
noise = Image.frombytes("L", (w, h), os.urandom(w * h)).convert("RGB")
grad = Image.linear_gradient("L").resize((w, h)).convert("RGB")
Image.blend(grad, noise, 0.25).save(sys.argv[1], "JPEG", quality=90)
EOF
say "photo: 4000x3000 JPEG, $(stat -c %s "$PHOTO") bytes"

status() { awk -v k="$2:" '$1 == k { print $2 " " $3 }' "/proc/$1/status"; }

# measure NAME BASE_URL PID CURL_OPTS...
measure() {
    local name=$1 base=$2 pid=$3
    shift 3
    local tok
    tok=$(timeout 30 curl -s "$@" -X POST "$base/_matrix/client/v3/register" \
        -H 'Content-Type: application/json' \
        -d '{"username":"thumb","password":"thumb-bench-password","auth":{"type":"m.login.dummy"}}' |
        "$PY" -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
    say "$name: VmRSS before upload $(status "$pid" VmRSS)"
    local t0 t1 mxc id
    t0=$(date +%s.%N)
    mxc=$(timeout 120 curl -s "$@" -X POST "$base/_matrix/media/v3/upload?filename=photo.jpg" \
        -H "Authorization: Bearer $tok" -H 'Content-Type: image/jpeg' --data-binary "@$PHOTO" |
        "$PY" -c 'import json,sys; print(json.load(sys.stdin)["content_uri"])')
    t1=$(date +%s.%N)
    id=${mxc##*/}
    local server=${mxc#mxc://}
    server=${server%/*}
    say "$name: upload $(echo "$t1 - $t0" | bc) s"
    for q in "width=320&height=240&method=scale" "width=96&height=96&method=crop"; do
        local code
        t0=$(date +%s.%N)
        code=$(timeout 120 curl -s "$@" -o "$WORK/thumb" -w '%{http_code}' \
            -H "Authorization: Bearer $tok" \
            "$base/_matrix/client/v1/media/thumbnail/$server/$id?$q")
        t1=$(date +%s.%N)
        say "$name: thumbnail $q -> $code, $(stat -c %s "$WORK/thumb") bytes, $(echo "$t1 - $t0" | bc) s"
    done
    say "$name: VmHWM (peak) after $(status "$pid" VmHWM), VmRSS after $(status "$pid" VmRSS)"
}

# Hearth, fresh.
mkdir -p "$WORK/hearth"
cat >"$WORK/hearth/hearth.toml" <<EOF
server_name = "127.0.0.1:$HEARTH_PORT"
listen = ["127.0.0.1:$HEARTH_PORT"]
database = "$WORK/hearth/hearth.db"
[rate_limits]
enabled = false
EOF
RUST_LOG=warn "$HEARTH_BIN" --config "$WORK/hearth/hearth.toml" 2>"$WORK/hearth/log" &
HEARTH_PID=$!
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$HEARTH_PORT/_matrix/client/versions" >/dev/null && break
    sleep 0.1
done
measure hearth "http://127.0.0.1:$HEARTH_PORT" "$HEARTH_PID"
kill "$HEARTH_PID"
wait "$HEARTH_PID" 2>/dev/null || true
HEARTH_PID=

if [ "${BENCH_SKIP_SYNAPSE:-0}" != 1 ]; then
    SYNPEER_RESET=1 bash "$SYNPEER_DIR/start.sh" "$SYNAPSE_NAME" "$SYNAPSE_PORT" >/dev/null
    measure synapse "https://127.0.0.1:$SYNAPSE_PORT" "$(cat "$SYNPEER_HOME/$SYNAPSE_NAME/synapse.pid")" -k
fi
say "results in $OUT"
