# bench/common.sh — sourced by the bench scripts that put Hearth and Synapse side by side
# (search.sh, push.sh): start and stop one Hearth and one synapse-peer Synapse, and stop
# whatever is still running when the script exits (error or Ctrl-C included).
#
# The caller defines log() and die() and sets SYNPEER_DIR and SYNPEER_HOME (exported).
# Synapse is given a second, plain-HTTP client listener on PORT+1 beside synapse-peer's TLS
# port, so that both servers are measured over plain HTTP on loopback, and logs at WARNING
# (its INFO line per request costs CPU that Hearth, at warn, does not spend).

HPID=""
SNAME_UP=""
bench_cleanup() {
    if [ -n "$HPID" ] && kill -0 "$HPID" 2>/dev/null; then
        kill -TERM "$HPID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$HPID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$HPID" 2>/dev/null || true
    fi
    if [ -n "$SNAME_UP" ]; then "$SYNPEER_DIR/stop.sh" "$SNAME_UP" 2>/dev/null || true; fi
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# hearth_up BIN DIR PORT LOG: a Hearth on a fresh database in DIR (wiped); sets HPID.
hearth_up() {
    local bin=$1 dir=$2 port=$3
    rm -rf "$dir"; mkdir -p "$dir"
    RUST_LOG=${RUST_LOG:-warn} "$bin" --database "$dir/hearth.db" --listen "127.0.0.1:$port" \
        --server-name "127.0.0.1:$port" --no-rate-limit >"$4" 2>&1 &
    HPID=$!
    for _ in $(seq 1 600); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/_matrix/client/versions" && return 0
        kill -0 "$HPID" 2>/dev/null || die "hearth exited during start-up"
        sleep 0.05
    done
    die "hearth not ready after 30 s"
}

hearth_down() {
    kill -TERM "$HPID"
    for _ in $(seq 1 150); do kill -0 "$HPID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$HPID" 2>/dev/null && kill -KILL "$HPID"
    wait "$HPID" || true
    HPID=""
}

# synapse_up NAME PORT LISTENERS_YAML RESET ERRLOG: start.sh NAME PORT with the extra plain-HTTP
# listener on PORT+1 (config written to LISTENERS_YAML); RESET non-empty wipes the instance
# first. Sets SPID.
synapse_up() {
    local name=$1 port=$2 yaml=$3
    cat > "$yaml" <<YAML
listeners:
  - {port: $port, bind_addresses: ['127.0.0.1'], type: http, tls: true,
     resources: [{names: [client, federation], compress: false}]}
  - {port: $((port + 1)), bind_addresses: ['127.0.0.1'], type: http, tls: false,
     resources: [{names: [client], compress: false}]}
YAML
    SNAME_UP=$name
    SYNPEER_RESET=$4 SYNPEER_LOG_LEVEL=WARNING SYNPEER_EXTRA_CONFIG=$yaml timeout 180 \
        "$SYNPEER_DIR/start.sh" "$name" "$port" >/dev/null 2>"$5" || die "synapse did not start ($5)"
    SPID=$(cat "$SYNPEER_HOME/$name/synapse.pid")
}

synapse_down() {
    "$SYNPEER_DIR/stop.sh" "$SNAME_UP" 2>/dev/null || true
    SNAME_UP=""
}

synapse_version() {
    "$SYNPEER_HOME/venv/bin/python" -c 'import synapse; print(synapse.__version__)' 2>/dev/null || echo '?'
}
