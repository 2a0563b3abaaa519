#!/usr/bin/env bash
# Load test of /auth: the service (embedded mode, bundled seed) against the performance ceiling
# (examples/ceiling.rs: the same hyper stack answering the same twelve headers with no work at all).
#
# Usage: scripts/bench.sh            (from anywhere; runs in the repository root)
# Environment: DURATION (default 10s), THREADS (wrk threads, default 1), CONNECTIONS (default 32).
set -euo pipefail

DURATION=${DURATION:-10s}
THREADS=${THREADS:-1}
CONNECTIONS=${CONNECTIONS:-32}
WARMUP=2s
API_KEY='user1-secret-key-12345'
ORIGINAL_URI='/midm-base/chat'
EXPECTED_CONSUMER_ID='kt-midm-base'

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "bench: $*" >&2; exit 1; }

# --- wrk -------------------------------------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "bench: wrk not found; installing it with apt-get" >&2
        apt-get update >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y wrk >/dev/null
    else
        die "wrk is not installed (Debian/Ubuntu: sudo apt-get install wrk)"
    fi
fi
command -v wrk >/dev/null 2>&1 || die "wrk is still not available after apt-get install"
command -v curl >/dev/null 2>&1 || die "curl is required"

# --- build -----------------------------------------------------------------------------------------
cargo build --release --bins --examples

# --- ports and servers -----------------------------------------------------------------------------
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    else
        # Try random high ports until one refuses connections (nothing listening).
        local port
        for _ in $(seq 1 50); do
            port=$((20000 + RANDOM % 40000))
            if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                echo "$port"
                return 0
            fi
        done
        die "could not find a free port"
    fi
}

SERVICE_PORT=$(free_port)
CEILING_PORT=$(free_port)
while [[ $CEILING_PORT == "$SERVICE_PORT" ]]; do CEILING_PORT=$(free_port); done

WORKDIR=$(mktemp -d)
SERVICE_PID=
CEILING_PID=
cleanup() {
    local pid
    for pid in "$SERVICE_PID" "$CEILING_PID"; do
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$WORKDIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

UMA_LISTEN="127.0.0.1:$SERVICE_PORT" UMA_REDIS__URL='' \
    target/release/user-metadata-auth serve --config config/default.toml \
    >"$WORKDIR/service.log" 2>&1 &
SERVICE_PID=$!
target/release/examples/ceiling "127.0.0.1:$CEILING_PORT" >"$WORKDIR/ceiling.log" 2>&1 &
CEILING_PID=$!

# wait_for NAME PID URL: until URL answers (any HTTP status), at most ~15 s.
wait_for() {
    local name=$1 pid=$2 url=$3
    for _ in $(seq 1 150); do
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$WORKDIR/$name.log" >&2 || true
            die "$name exited before answering"
        fi
        if curl -s -o /dev/null --max-time 1 "$url"; then
            return 0
        fi
        sleep 0.1
    done
    cat "$WORKDIR/$name.log" >&2 || true
    die "$name did not answer on $url within 15 s"
}
wait_for service "$SERVICE_PID" "http://127.0.0.1:$SERVICE_PORT/healthz"
wait_for ceiling "$CEILING_PID" "http://127.0.0.1:$CEILING_PORT/"

# --- sanity check: the service allows this request with the expected entry --------------------------
check() {
    local name=$1 url=$2 head status consumer
    head=$(curl -s -o /dev/null -D - --max-time 5 \
        -H "apikey: $API_KEY" -H "X-Forwarded-Uri: $ORIGINAL_URI" "$url") \
        || die "$name: curl $url failed"
    status=$(printf '%s\n' "$head" | awk 'NR == 1 { print $2 }')
    consumer=$(printf '%s\n' "$head" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-consumer-id" { print $2 }')
    [[ $status == 200 ]] || die "$name: expected 200, got '${status}' from $url"
    [[ $consumer == "$EXPECTED_CONSUMER_ID" ]] \
        || die "$name: expected x-consumer-id: $EXPECTED_CONSUMER_ID, got '${consumer}'"
}
check service "http://127.0.0.1:$SERVICE_PORT/auth"
check ceiling "http://127.0.0.1:$CEILING_PORT/auth"

# --- load ------------------------------------------------------------------------------------------
run_wrk() { # run_wrk DURATION URL [extra wrk args...]
    local duration=$1 url=$2
    shift 2
    wrk -t "$THREADS" -c "$CONNECTIONS" -d "$duration" "$@" \
        -H "apikey: $API_KEY" -H "X-Forwarded-Uri: $ORIGINAL_URI" "$url"
}

declare -A RPS P50 P99
for target in service ceiling; do
    if [[ $target == service ]]; then port=$SERVICE_PORT; else port=$CEILING_PORT; fi
    url="http://127.0.0.1:$port/auth"
    echo "== $target: warm-up $WARMUP" >&2
    run_wrk "$WARMUP" "$url" >/dev/null
    echo "== $target: $DURATION, $THREADS thread(s), $CONNECTIONS connections" >&2
    out=$(run_wrk "$DURATION" "$url" --latency)
    printf '%s\n' "$out" >"$WORKDIR/wrk-$target.txt"
    RPS[$target]=$(printf '%s\n' "$out" | awk '/^Requests\/sec:/ { print $2 }')
    P50[$target]=$(printf '%s\n' "$out" | awk '$1 == "50%" { print $2; exit }')
    P99[$target]=$(printf '%s\n' "$out" | awk '$1 == "99%" { print $2; exit }')
    [[ -n ${RPS[$target]} ]] || { printf '%s\n' "$out" >&2; die "$target: could not parse wrk output"; }
    if grep -qE 'Non-2xx or 3xx responses|Socket errors' <<<"$out"; then
        echo "bench: WARNING: $target:" >&2
        grep -E 'Non-2xx or 3xx responses|Socket errors' <<<"$out" >&2
    fi
done

# --- report ----------------------------------------------------------------------------------------
echo
echo "wrk: $THREADS thread(s), $CONNECTIONS connections, $DURATION per target (after a $WARMUP warm-up)"
echo "request: GET /auth, apikey: $API_KEY, X-Forwarded-Uri: $ORIGINAL_URI"
printf '%-10s %14s %10s %10s %10s\n' target 'requests/s' p50 p99 'ratio'
for target in service ceiling; do
    ratio=$(awk -v a="${RPS[$target]}" -v b="${RPS[ceiling]}" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    printf '%-10s %14s %10s %10s %10s\n' "$target" "${RPS[$target]}" "${P50[$target]}" "${P99[$target]}" "$ratio"
done
echo
echo "note: wrk and both servers share this machine's $(nproc) core(s): only the measured server is"
echo "      loaded at a time, but wrk competes with it for CPU, so absolute numbers understate a dedicated"
echo "      host; the ratio to the ceiling is the figure to compare between runs and machines."
