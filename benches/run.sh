#!/usr/bin/env bash
# The benchmark suite: every figure of the service next to the ceiling measured in the same run
# (examples/ceiling.rs: the same hyper stack answering every request 200 with the same twelve
# headers fixed in memory, no lookup, no counting). Prints one table.
#
# Usage: benches/run.sh                 (every scenario, about 15 minutes on 2 cores)
#        ONLY=14,15,16 benches/run.sh   (only these scenarios, against a ceiling of one run)
# Scenario 11 posts bodies to /auth-body (benches/body.lua), scenario 12 usage records to /usage
# (benches/usage.lua); scenario 13 is the hot path of an entry with a cost budget. Scenarios 14-16
# use the admin API (benches/admin.py: keep-alive clients, a monotonic clock): 14 how soon a key
# revoked on one replica is refused by another, 15 the hot path on one replica while another makes
# ~20 admin writes a second, 16 POST /admin/reload of scenario 7's seed (its time against `check`,
# and /auth while reloads run back to back).
# Environment: DURATION (per wrk run, default 5s), ROUNDS (alternating rounds: hot path vs ceiling,
# and the with/without rounds of 10, 11, 13, 15, 16; default 3), CONNECTIONS (default 32),
# SEED_CONSUMERS (scenarios 7 and 16, default 100000), ONLY (comma-separated scenario numbers).
# Needs wrk, redis-server, redis-cli, nginx, curl, python3 (installed from Debian's packages when run
# as root).
# wrk and the servers share this machine's cores; compare ratios, not absolute numbers.
set -euo pipefail

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-32}
SEED_CONSUMERS=${SEED_CONSUMERS:-100000}
# ONLY=14,15,16: run only these scenarios (the ceiling is then measured in one run for the others).
# The scenario blocks below are not indented under their `if wanted N`.
ONLY=${ONLY:-}
wanted() { [[ -z $ONLY || ,${ONLY// /}, == *,$1,* ]]; }
KEY='user1-secret-key-12345'
URI='/midm-base/chat'
# /usage's bearer token (usage.token) for the services that take usage records (12, 13).
USAGE_TOKEN="bench-usage-token-$RANDOM$RANDOM"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg) # other work on the machine shows in every figure
die() {
    echo "bench: $*" >&2
    [[ -n ${WORK:-} ]] && tail -n 5 "$WORK"/*.log >&2 2>/dev/null
    exit 1
}

# --- tools ------------------------------------------------------------------------------------------
declare -A package=([wrk]=wrk [redis-server]=redis-server [redis-cli]=redis-tools [nginx]=nginx [curl]=curl
    [python3]=python3)
missing=()
for tool in "${!package[@]}"; do command -v "$tool" >/dev/null 2>&1 || missing+=("${package[$tool]}"); done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing: ${missing[*]} (install them, or run as root)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --release --locked --bins --examples 2>&1 | tail -1 >&2

# --- processes --------------------------------------------------------------------------------------
WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Below Linux's ephemeral range (32768+), where wrk's and the clients' own connections take ports.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 12000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
    done
}

wait_http() { # URL: until it answers at all, at most 30 s
    for _ in $(seq 1 1500); do curl -s -o /dev/null --max-time 1 "$1" && return 0; sleep 0.02; done
    die "nothing answers at $1"
}

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

# start_service NAME [VAR=VALUE ...]: the service with the bundled config; sets PORT_<NAME>.
start_service() {
    local name=$1 port
    shift
    port=$(free_port)
    env UMA_LISTEN="127.0.0.1:$port" UMA_LOG__LEVEL=warn "$@" \
        target/release/user-metadata-auth serve --config config/default.toml >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    printf -v "PORT_$name" '%s' "$port"
    printf -v "PID_$name" '%s' "$!"
    wait_http "http://127.0.0.1:$port/healthz"
}

CEILING_PORT=$(free_port)
target/release/examples/ceiling "127.0.0.1:$CEILING_PORT" >"$WORK/ceiling.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$CEILING_PORT/"

# wrk_run CONNECTIONS URL [wrk args...] -> "rps p50 p99 requests errors"
wrk_run() {
    local connections=$1 url=$2
    shift 2
    wrk -t1 -c "$connections" -d "$DURATION" --latency "$@" "$url" | awk '
        /requests in/ { n = $1 }
        /^Requests\/sec:/ { rps = $2 }
        $1 == "50%" { p50 = $2 }
        $1 == "99%" { p99 = $2 }
        /Non-2xx or 3xx responses:/ { bad = $5 }
        /Socket errors/ { bad = bad "+socket" }
        /^usage answers without accepted/ { usage_bad = $NF } # benches/usage.lua only
        END { printf "%s %s %s %s %s%s\n", rps, p50, p99, n, (bad == "" ? 0 : bad), (usage_bad == "" ? "" : " " usage_bad) }'
}
hot() { wrk_run "${2:-$CONNECTIONS}" "http://127.0.0.1:$1/auth" -H "apikey: $KEY" -H "X-Forwarded-Uri: $URI"; }
median() { tr ' ' '\n' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
redis_stat() { redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | awk -F'[:=,]' -v cmd="$1" '
    /^cmdstat_/ { name = substr($1, 9); if (cmd == "all" || name == cmd) s += $3 } END { print s + 0 }'; }
reset_stats() { redis-cli -p "$REDIS_PORT" config resetstat >/dev/null; }

# The service's CPU time so far, in clock ticks (user + system).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# The admin API (scenarios 14-16): a token of its own, the listener on a port of its own.
ADMIN_TOKEN="bench-admin-token-$RANDOM$RANDOM-$(date +%s%N)"
# start_admin_service NAME [VAR=VALUE ...]: start_service with the admin API; sets ADMIN_<NAME>.
start_admin_service() {
    local name=$1 port
    shift
    port=$(free_port)
    start_service "$name" UMA_ADMIN__TOKEN="$ADMIN_TOKEN" UMA_ADMIN__LISTEN="127.0.0.1:$port" "$@"
    printf -v "ADMIN_$name" '%s' "$port"
    wait_http "http://127.0.0.1:$port/admin/consumers"
}
wait_ready() { # URL: until it answers 200 (the seed's Redis copies written), at most 60 s
    for _ in $(seq 1 600); do curl -sf -o /dev/null --max-time 1 "$1" && return 0; sleep 0.1; done
    die "not ready: $1"
}
settle() { # PID: until the process is idle (< 3 clock ticks in half a second), at most 15 s
    local before
    for _ in $(seq 1 30); do
        before=$(cpu_ticks "$1")
        sleep 0.5
        (($(cpu_ticks "$1") - before < 3)) && return 0
    done
    echo "bench: process $1 still busy after 15 s" >&2
}

ROWS=()
row() { ROWS+=("$(printf '%-44s %11s %9s %10s %10s  %s' "$@")"); }

# Check a target answers the benchmark request with the expected entry before measuring it.
expect_allow() {
    curl -s -D - -o /dev/null -H "apikey: $KEY" -H "X-Forwarded-Uri: $URI" "http://127.0.0.1:$1/auth" | tr -d '\r' \
        | grep -qi '^x-consumer-id: kt-midm-base' || die "port $1 does not allow the benchmark request"
}

# --- 1, 6, 8: hot path, async TDL, against the ceiling -----------------------------------------------
start_service async UMA_REDIS__URL="$REDIS_URL" UMA_TDL__MODE=async
expect_allow "$PORT_async"
expect_allow "$CEILING_PORT"
hot "$PORT_async" >/dev/null
hot "$CEILING_PORT" >/dev/null
if wanted 1; then
service_rps=() ceiling_rps=() async_calls=0
reset_stats
for round in $(seq 1 "$ROUNDS"); do
    read -r rps p50 p99 n bad < <(hot "$PORT_async")
    [[ $bad == 0 ]] || die "hot path: $bad failed requests"
    service_rps+=("$rps") service_p50=$p50 service_p99=$p99 async_calls=$((async_calls + n))
    read -r rps p50 p99 n bad < <(hot "$CEILING_PORT")
    ceiling_rps+=("$rps") ceiling_p50=$p50 ceiling_p99=$p99
    echo "round $round: service ${service_rps[-1]} req/s, ceiling ${ceiling_rps[-1]} req/s" >&2
done
sleep 1 # the last async flush
async_cmds=$(redis_stat all) async_evalsha=$(redis_stat evalsha)
CEILING=$(echo "${ceiling_rps[@]}" | median)
SERVICE=$(echo "${service_rps[@]}" | median)
row "ceiling: fixed headers, no work" "$CEILING" 1.00 "$ceiling_p50" "$ceiling_p99" "median of $ROUNDS rounds"
row "1 hot path: valid key, warm cache, async" "$SERVICE" "$(ratio "$SERVICE" "$CEILING")" "$service_p50" "$service_p99" "median of $ROUNDS rounds, alternating with the ceiling"
else # the ceiling the other rows are set against: one run
read -r CEILING ceiling_p50 ceiling_p99 n bad < <(hot "$CEILING_PORT")
row "ceiling: fixed headers, no work" "$CEILING" 1.00 "$ceiling_p50" "$ceiling_p99" "one run (ONLY=$ONLY)"
fi

# --- 2: sync TDL -----------------------------------------------------------------------------------
if wanted 2; then
start_service sync UMA_REDIS__URL="$REDIS_URL" UMA_TDL__MODE=sync
expect_allow "$PORT_sync"
hot "$PORT_sync" >/dev/null
reset_stats
read -r rps p50 p99 sync_calls bad < <(hot "$PORT_sync")
sync_cmds=$(redis_stat all) sync_evalsha=$(redis_stat evalsha) sync_pings=$(redis_stat ping)
row "2 sync TDL (increment in Redis before 200)" "$rps" "$(ratio "$rps" "$CEILING")" "$p50" "$p99" ""
kill "$PID_sync"
fi

# --- 3: cold key path --------------------------------------------------------------------------------
if wanted 3; then
start_service cold UMA_REDIS__URL="$REDIS_URL" UMA_CACHE__LOCAL_TTL_MS=0
expect_allow "$PORT_cold"
reset_stats
read -r rps p50 p99 cold_calls bad < <(hot "$PORT_cold")
cold_gets=$(redis_stat get)
row "3 cold key: cache off, Redis every call" "$rps" "$(ratio "$rps" "$CEILING")" "$p50" "$p99" \
    "$(awk -v g="$cold_gets" -v n="$cold_calls" 'BEGIN { printf "%.1f GET per call", g / n }')"
kill "$PID_cold"
fi

# --- 4: unknown keys ---------------------------------------------------------------------------------
if wanted 4; then
reset_stats
read -r rps p50 p99 unknown_calls bad < <(KEY_PREFIX=unknown-key- KEY_COUNT=1000 \
    wrk_run "$CONNECTIONS" "http://127.0.0.1:$PORT_async/auth" -s benches/keys.lua)
unknown_gets=$(redis_stat get)
row "4 unknown keys: 1000 keys, negative cache" "$rps" "$(ratio "$rps" "$CEILING")" "$p50" "$p99" \
    "401s; $(awk -v g="$unknown_gets" -v n="$unknown_calls" 'BEGIN { printf "%.4f GET per call", g / n }')"
fi

# --- 6: latency at 8 connections ---------------------------------------------------------------------
if wanted 6; then
read -r rps p50 p99 n bad < <(hot "$PORT_async" 8)
read -r crps cp50 cp99 n bad < <(hot "$CEILING_PORT" 8)
row "6 latency at 8 connections: service" "$rps" "$(ratio "$rps" "$crps")" "$p50" "$p99" ""
row "6 latency at 8 connections: ceiling" "$crps" 1.00 "$cp50" "$cp99" ""
fi

# --- 5: nginx auth_request against nginx without auth -------------------------------------------------
if wanted 5; then
nginx_conf() { # FILE LISTEN_PORT WITH_AUTH
    sed -e "s/listen 8080;/listen 127.0.0.1:$2;/" -e "s/server 127.0.0.1:8089;/server 127.0.0.1:$PORT_async;/" \
        -e "s/server 127.0.0.1:9000;/server 127.0.0.1:$CEILING_PORT;/" deploy/nginx/nginx.conf >"$1"
    [[ $3 == yes ]] || sed -i '/auth_request \/_uma_auth;/d' "$1"
}
for variant in auth noauth; do
    port=$(free_port)
    mkdir -p "$WORK/nginx-$variant"
    nginx_conf "$WORK/nginx-$variant/nginx.conf" "$port" "$([[ $variant == auth ]] && echo yes || echo no)"
    nginx -p "$WORK/nginx-$variant" -c "$WORK/nginx-$variant/nginx.conf" -e "$WORK/nginx-$variant/error.log" \
        -g "daemon off; pid $WORK/nginx-$variant/nginx.pid;" &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$port/"
    printf -v "NGINX_$variant" '%s' "$port"
done
url() { echo "http://127.0.0.1:$1$URI"; }
wrk_run "$CONNECTIONS" "$(url "$NGINX_auth")" -H "apikey: $KEY" >/dev/null
read -r arps ap50 ap99 n abad < <(wrk_run "$CONNECTIONS" "$(url "$NGINX_auth")" -H "apikey: $KEY")
read -r nrps np50 np99 n nbad < <(wrk_run "$CONNECTIONS" "$(url "$NGINX_noauth")" -H "apikey: $KEY")
[[ $abad == 0 ]] || die "nginx with auth: $abad failed requests"
row "5 nginx without auth (same upstream)" "$nrps" "" "$np50" "$np99" "upstream: the ceiling server"
row "5 nginx + auth_request + service" "$arps" "$(ratio "$arps" "$nrps")" "$ap50" "$ap99" "ratio to nginx without auth"
fi

# --- 7: a seed of many consumers ---------------------------------------------------------------------
if wanted 7; then
target/release/examples/gen_seed "$SEED_CONSUMERS" "$WORK/seed.json" 2>/dev/null
port=$(free_port)
started=$(date +%s%N)
UMA_LISTEN="127.0.0.1:$port" UMA_REDIS__URL='' UMA_SEED__PATH="$WORK/seed.json" UMA_LOG__LEVEL=warn \
    target/release/user-metadata-auth serve --config config/default.toml >"$WORK/big.log" 2>&1 &
big_pid=$!
PIDS+=($big_pid)
wait_http "http://127.0.0.1:$port/healthz"
startup=$(awk -v a="$started" -v b="$(date +%s%N)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
read -r rps p50 p99 n bad < <(KEY_PREFIX=bench-key- KEY_COUNT="$SEED_CONSUMERS" KEY_STEP=2 \
    wrk_run "$CONNECTIONS" "http://127.0.0.1:$port/auth" -s benches/keys.lua)
[[ $bad == 0 ]] || die "big seed: $bad failed requests"
rss=$(awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$big_pid/status")
row "7 $SEED_CONSUMERS consumers, keys spread over all" "$rps" "$(ratio "$rps" "$CEILING")" "$p50" "$p99" \
    "startup ${startup}s, resident ${rss} MB (JSON seed, embedded)"
fi

# --- 10: an entry with request limits far from reached ----------------------------------------------
# The same consumer and entry as the hot path, with limits of ten million a day and a million a
# slot: every call takes quota from this replica's lease, leases come from Redis. Alternating rounds
# against the unlimited hot path; then Redis commands per allowed call for the limited one alone.
if wanted 10; then
sed -e 's/              output_cost_per_token: 0.0000002$/&\n              limits: {requests_per_day: 10000000, requests_per_slot: 1000000}/' \
    config/seed.yaml >"$WORK/limited-seed.yaml"
grep -q 'requests_per_day: 10000000' "$WORK/limited-seed.yaml" || die "scenario 10: could not add limits to the seed"
start_service limited UMA_REDIS__URL="$REDIS_URL" UMA_SEED__PATH="$WORK/limited-seed.yaml"
curl -s -D - -o /dev/null -H "apikey: $KEY" -H "X-Forwarded-Uri: $URI" "http://127.0.0.1:$PORT_limited/auth" | tr -d '\r' \
    | grep -qi '^ratelimit: "slot"' || die "scenario 10: the limited entry answers without RateLimit fields"
hot "$PORT_limited" >/dev/null
limited_rps=() unlimited_rps=()
for round in $(seq 1 "$ROUNDS"); do
    read -r rps p50 p99 n bad < <(hot "$PORT_limited")
    [[ $bad == 0 ]] || die "scenario 10: $bad failed requests"
    limited_rps+=("$rps") limited_p50=$p50 limited_p99=$p99
    read -r rps p50 p99 n bad < <(hot "$PORT_async")
    unlimited_rps+=("$rps")
done
LIMITED=$(echo "${limited_rps[@]}" | median)
UNLIMITED=$(echo "${unlimited_rps[@]}" | median)
reset_stats
read -r rps p50 p99 limited_calls bad < <(hot "$PORT_limited")
sleep 1 # the last flush and any lease in flight
limited_cmds=$(redis_stat all) limited_evalsha=$(redis_stat evalsha)
row "10 limited entry (10M/day), far from the limit" "$LIMITED" "$(ratio "$LIMITED" "$CEILING")" "$limited_p50" "$limited_p99" \
    "$(ratio "$LIMITED" "$UNLIMITED") × unlimited hot path ($UNLIMITED, same rounds; target >= 0.9)"
kill "$PID_limited"
fi

# --- 11: /auth-body with a chat body ----------------------------------------------------------------
# The hot path's consumer and entry, the body read, parsed and counted (o200k_base): a 4 KB chat
# body (about 1000 tokens, counted on the runtime thread) in rounds alternating with /auth on the
# same service, then the same with a new text on every call (no count cache hit: the BPE's cost),
# then a 100 KB body (counted on a blocking thread). Target: 4 KB >= 0.5 × /auth.
if wanted 11; then
chat_body() { # FILE BYTES: a chat completion request whose user message fills about BYTES
    local LC_ALL=C # ${#text} in bytes
    local sentence='The quick brown fox jumps over the lazy dog; 안녕하세요, 믿음 모델입니다. fn main() { x += 1; } '
    local text=''
    while ((${#text} < $2)); do text+="$sentence"; done
    printf '{"model":"gpt-4o","max_tokens":1000,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"%s"}]}' \
        "$text" >"$1"
}
chat_body "$WORK/body-4k.json" 3900
chat_body "$WORK/body-100k.json" 98000
body_run() { BODY_FILE=$2 KEY=$KEY URI=$URI UNIQUE=${3:-0} wrk_run "$CONNECTIONS" "http://127.0.0.1:$1/auth-body" -s benches/body.lua; }
tokens=$(curl -s -D - -o /dev/null -X POST -H "apikey: $KEY" -H "X-Forwarded-Uri: $URI" -H 'Content-Type: application/json' \
    --data-binary "@$WORK/body-4k.json" "http://127.0.0.1:$PORT_async/auth-body" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-user-input-tokens" { print $2 }')
[[ -n $tokens ]] || die "scenario 11: /auth-body does not allow the 4 KB body"
tokens_100k=$(curl -s -D - -o /dev/null -X POST -H "apikey: $KEY" -H "X-Forwarded-Uri: $URI" -H 'Content-Type: application/json' \
    --data-binary "@$WORK/body-100k.json" "http://127.0.0.1:$PORT_async/auth-body" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-user-input-tokens" { print $2 }')
[[ -n $tokens_100k ]] || die "scenario 11: /auth-body does not allow the 100 KB body"
body_run "$PORT_async" "$WORK/body-4k.json" >/dev/null
body_rps=() auth_rps=()
for round in $(seq 1 "$ROUNDS"); do
    read -r rps p50 p99 n bad < <(body_run "$PORT_async" "$WORK/body-4k.json")
    [[ $bad == 0 ]] || die "scenario 11: $bad failed requests"
    body_rps+=("$rps") body_p50=$p50 body_p99=$p99
    read -r rps p50 p99 n bad < <(hot "$PORT_async")
    auth_rps+=("$rps")
done
BODY=$(echo "${body_rps[@]}" | median)
AUTH=$(echo "${auth_rps[@]}" | median)
row "11 /auth-body, 4 KB chat body ($tokens tokens)" "$BODY" "$(ratio "$BODY" "$CEILING")" "$body_p50" "$body_p99" \
    "$(ratio "$BODY" "$AUTH") × /auth ($AUTH, same rounds; target >= 0.5); the same body: counts cached"
read -r rps p50 p99 n bad < <(body_run "$PORT_async" "$WORK/body-4k.json" 1)
[[ $bad == 0 ]] || die "scenario 11: $bad failed requests (new texts)"
row "11 /auth-body, 4 KB, a new text every call" "$rps" "$(ratio "$rps" "$CEILING")" "$p50" "$p99" \
    "$(ratio "$rps" "$AUTH") × /auth; every count a cache miss"
read -r rps p50 p99 n bad < <(body_run "$PORT_async" "$WORK/body-100k.json")
[[ $bad == 0 ]] || die "scenario 11: $bad failed requests (100 KB)"
row "11 /auth-body, 100 KB body ($tokens_100k tokens)" "$rps" "$(ratio "$rps" "$CEILING")" "$p50" "$p99" \
    "$(ratio "$rps" "$AUTH") × /auth; counted on a blocking thread"
fi

# --- 12: usage ingest ---------------------------------------------------------------------------------
# POST /usage with batches of 100 native records (benches/usage.lua: the hot path's consumer and
# entry, a new request id for every record, no time), against Redis (seen ids and sums kept there,
# shared by all replicas) and embedded (in process). A batch is checked with curl first: all 100
# accepted; during the runs every answer must say so too. Target: >= 50,000 records/s against Redis.
if wanted 12; then
usage_batch() { # ID_PREFIX -> a JSON array of 100 native records
    local i sep='' out='['
    for ((i = 1; i <= 100; i++)); do
        out+="$sep{\"request_id\":\"$1-$i\",\"consumer\":\"user1-client\",\"metadata_id\":\"kt-midm-base\",\"input_tokens\":14,\"output_tokens\":21}"
        sep=','
    done
    printf '%s]' "$out"
}
post_usage() { # PORT BODY -> the answer's body
    curl -s -X POST -H "Authorization: Bearer $USAGE_TOKEN" -H 'Content-Type: application/json' \
        --data-binary "$2" "http://127.0.0.1:$1/usage"
}
usage_run() { # PORT -> wrk_run's fields, then the answers without "accepted":100
    RUN_ID="run$RANDOM$(date +%s%N)" USAGE_TOKEN=$USAGE_TOKEN BATCH=100 \
        wrk_run "$CONNECTIONS" "http://127.0.0.1:$1/usage" -s benches/usage.lua
}
start_service usage UMA_REDIS__URL="$REDIS_URL" UMA_USAGE__TOKEN="$USAGE_TOKEN"
start_service usage_embedded UMA_REDIS__URL='' UMA_USAGE__TOKEN="$USAGE_TOKEN"
for name in usage usage_embedded; do
    port_var="PORT_$name"
    answer=$(post_usage "${!port_var}" "$(usage_batch "check-$name-$RANDOM$RANDOM")")
    [[ $answer =~ \"accepted\":[[:space:]]*100[,}] ]] || die "scenario 12 ($name): a batch of 100 records was not all accepted: $answer"
done
for name in usage usage_embedded; do
    port_var="PORT_$name"
    DURATION=1s usage_run "${!port_var}" >/dev/null
    read -r rps p50 p99 n bad unaccepted < <(usage_run "${!port_var}")
    [[ $bad == 0 ]] || die "scenario 12 ($name): $bad failed requests"
    [[ ${unaccepted:-missing} == 0 ]] || die "scenario 12 ($name): ${unaccepted:-no} answers without \"accepted\":100"
    records=$(awk -v r="$rps" 'BEGIN { printf "%.0f", r * 100 }')
    where=$([[ $name == usage ]] && echo Redis || echo embedded)
    row "12 usage ingest, batches of 100 ($where)" "$rps" "" "$p50" "$p99" \
        "$records records/s$([[ $name == usage ]] && echo ' (target >= 50000)')"
done
kill "$PID_usage" "$PID_usage_embedded"
fi

# --- 13: an entry with a cost budget far from reached -------------------------------------------------
# The same consumer and entry as the hot path, with a cost budget of a million a day: every call
# checks the recorded cost against it, which must cost no Redis round trip per call (the totals are
# pushed or polled). Alternating rounds against the unlimited hot path; then Redis commands per
# allowed call for the budgeted one alone. Then two replicas on one Redis (a database of their own)
# and a budget of 10 tokens: a record crossing it is posted to one, and /auth is polled on the
# other with curl until it answers 429.
if wanted 13; then
sed -e 's/              output_cost_per_token: 0.0000002$/&\n              limits: {cost_per_day: 1000000}/' \
    config/seed.yaml >"$WORK/budget-seed.yaml"
grep -q 'cost_per_day: 1000000' "$WORK/budget-seed.yaml" || die "scenario 13: could not add a budget to the seed"
start_service budget UMA_REDIS__URL="$REDIS_URL" UMA_SEED__PATH="$WORK/budget-seed.yaml"
curl -s -D - -o /dev/null -H "apikey: $KEY" -H "X-Forwarded-Uri: $URI" "http://127.0.0.1:$PORT_budget/auth" | tr -d '\r' \
    | grep -qi '^ratelimit: "cost-day"' || die "scenario 13: the budgeted entry answers without a cost-day RateLimit member"
hot "$PORT_budget" >/dev/null
budget_rps=() unbudgeted_rps=()
for round in $(seq 1 "$ROUNDS"); do
    read -r rps p50 p99 n bad < <(hot "$PORT_budget")
    [[ $bad == 0 ]] || die "scenario 13: $bad failed requests"
    budget_rps+=("$rps") budget_p50=$p50 budget_p99=$p99
    read -r rps p50 p99 n bad < <(hot "$PORT_async")
    unbudgeted_rps+=("$rps")
done
BUDGETED=$(echo "${budget_rps[@]}" | median)
UNBUDGETED=$(echo "${unbudgeted_rps[@]}" | median)
# Throughput on two shared cores is noisy; the service's own CPU time per call is not.
cpu_per_call() { # PID PORT -> the service's CPU microseconds per call over one hot run
    local before after n
    before=$(cpu_ticks "$1")
    read -r _ _ _ n _ < <(hot "$2")
    after=$(cpu_ticks "$1")
    awk -v a="$before" -v b="$after" -v n="$n" -v t="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", (b - a) / t * 1e6 / n }'
}
budget_cpu=$(cpu_per_call "$PID_budget" "$PORT_budget")
unbudgeted_cpu=$(cpu_per_call "$PID_async" "$PORT_async")
reset_stats
read -r rps p50 p99 budget_calls bad < <(hot "$PORT_budget")
sleep 1 # the last flush
budget_cmds=$(redis_stat all) budget_evalsha=$(redis_stat evalsha)
row "13 cost budget (1000000/day), far from it" "$BUDGETED" "$(ratio "$BUDGETED" "$CEILING")" "$budget_p50" "$budget_p99" \
    "$(ratio "$BUDGETED" "$UNBUDGETED") × unlimited hot path ($UNBUDGETED, same rounds; target >= 0.9); CPU $budget_cpu µs/call vs $unbudgeted_cpu ($(ratio "$unbudgeted_cpu" "$budget_cpu") ×)"
kill "$PID_budget"

sed -e 's/              output_cost_per_token: 0.0000002$/&\n              limits: {tokens_per_day: 10}/' \
    config/seed.yaml >"$WORK/tiny-budget-seed.yaml"
grep -q 'tokens_per_day: 10}' "$WORK/tiny-budget-seed.yaml" || die "scenario 13: could not add a token budget to the seed"
# Database 2: no usage of scenario 12 (same consumer and entry, same day) is counted there.
for replica in replica_a replica_b; do
    start_service "$replica" UMA_REDIS__URL="$REDIS_URL/2" UMA_SEED__PATH="$WORK/tiny-budget-seed.yaml" UMA_USAGE__TOKEN="$USAGE_TOKEN"
done
auth_code() { curl -s -o /dev/null -w '%{http_code}' -H "apikey: $KEY" -H "X-Forwarded-Uri: $URI" "http://127.0.0.1:$1/auth"; }
[[ $(auth_code "$PORT_replica_b") == 200 ]] || die "scenario 13: replica B refuses before any usage"
started=$(date +%s%N)
answer=$(post_usage "$PORT_replica_a" '{"request_id":"cross-1","consumer":"user1-client","metadata_id":"kt-midm-base","input_tokens":10,"output_tokens":1}')
[[ $answer =~ \"accepted\":[[:space:]]*1[,}] ]] || die "scenario 13: replica A did not accept the record: $answer"
seen=''
while (($(date +%s%N) - started < 5000000000)); do
    if [[ $(auth_code "$PORT_replica_b") == 429 ]]; then seen=$(date +%s%N); break; fi
done
[[ -n $seen ]] || die "scenario 13: replica B still allows 5 s after the record crossed the budget at replica A"
seen_ms=$(awk -v a="$started" -v b="$seen" 'BEGIN { printf "%.0f", (b - a) / 1e6 }')
row "13 budget seen by another replica" "" "<=1000 ms" "$seen_ms ms" "" \
    "record crossing 10 tokens/day posted to replica A, /auth polled on replica B with curl until 429"
kill "$PID_replica_a" "$PID_replica_b"
fi

# --- 9: a Kong file's placements, as nginx asks ------------------------------------------------------
# 1000 routes under a service with acl + key-auth and a global acl (the route table is hashed past 32
# prefixes), requests in nginx's shape: X-Original-URI/-Method and the X-Forwarded-* copies, all of
# which must agree (auth.original_request = auto).
if wanted 9; then
ROUTES=1000 target/release/examples/gen_seed 1000 "$WORK/routes.json" 2>/dev/null
port=$(free_port)
UMA_LISTEN="127.0.0.1:$port" UMA_REDIS__URL='' UMA_SEED__PATH="$WORK/routes.json" UMA_LOG__LEVEL=warn \
    target/release/user-metadata-auth serve --config config/default.toml >"$WORK/routes.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$port/healthz"
nginx_shape=(-H "apikey: bench-key-0" -H "X-Original-URI: /bench-route-777/chat?stream=true"
    -H "X-Forwarded-Uri: /bench-route-777/chat?stream=true" -H "X-Original-Method: POST" -H "X-Forwarded-Method: POST")
code=$(curl -s -o /dev/null -w '%{http_code}' "${nginx_shape[@]}" "http://127.0.0.1:$port/auth")
[[ $code == 200 ]] || die "scenario 9: the nginx-shaped request got $code"
read -r rps p50 p99 n bad < <(wrk_run "$CONNECTIONS" "http://127.0.0.1:$port/auth" "${nginx_shape[@]}")
[[ $bad == 0 ]] || die "scenario 9: $bad failed requests"
row "9 1000 routes, service acl + key-auth, nginx shape" "$rps" "$(ratio "$rps" "$CEILING")" "$p50" "$p99" \
    "two URI and two method sources checked; route table hashed"
fi

# --- 14: revocation seen by another replica ----------------------------------------------------------
# Two replicas with the admin API on one Redis (a database of their own) and the default 5 s local
# cache, so only the invalidation message explains a refusal within it. 50 trials (benches/admin.py
# revoke, one keep-alive connection each way, a monotonic clock): a key for user1-client made on
# replica A, /auth on replica B until 200 and once more (now cached), the key revoked on A, and /auth
# on B as fast as one connection goes until 401; from sending the DELETE to B's first 401.
if wanted 14 || wanted 15; then
for replica in admin_a admin_b; do
    start_admin_service "$replica" UMA_REDIS__URL="$REDIS_URL/3"
done
fi
if wanted 14; then
python3 benches/admin.py revoke "$ADMIN_admin_a:$PORT_admin_a" "$ADMIN_admin_b:$PORT_admin_b" "$ADMIN_TOKEN" \
    50 "bench-$RANDOM$RANDOM" "$URI" >"$WORK/revocations.txt" || die "scenario 14: benches/admin.py revoke failed"
(($(wc -l <"$WORK/revocations.txt") == 50)) || die "scenario 14: $(wc -l <"$WORK/revocations.txt") of 50 trials"
revoke_timeouts=$(awk '$1 == "timeout"' "$WORK/revocations.txt" | wc -l)
revoke_stale=$(awk '{ s += $2 } END { print s + 0 }' "$WORK/revocations.txt")
revoke_median=$(awk '{ print ($1 == "timeout" ? 5000 : $1) }' "$WORK/revocations.txt" | tr '\n' ' ' | median)
revoke_worst=$(awk '{ v = ($1 == "timeout" ? 5000 : $1); if (v > w) w = v } END { print w }' "$WORK/revocations.txt")
row "14 revocation seen by another replica" "" "<=1000 ms" "$revoke_median ms" "$revoke_worst ms" \
    "median, worst of 50 trials (SPEC: 1 s; Kong 5 s, LiteLLM/Unkey 60 s); DELETE on A until B's first 401; $revoke_stale stale 200s after the DELETE answered, $revoke_timeouts trials over 5 s"
fi

# --- 15: the hot path while admin writes happen -----------------------------------------------------
# The same two replicas: wrk on the hot path on replica A, in rounds alternating with and without
# ~20 admin writes a second on replica B (benches/admin.py writes: PUTs of an operator consumer
# nothing else uses, its content alternating; each publishes an invalidation A receives). Then Redis
# commands per allowed call on A during the write rounds, the writes' own commands (measured alone
# first: the handler's reads, the script and what it runs) subtracted: a message makes A read again
# only the consumer it names, so it stays ~0.
if wanted 15; then
expect_allow "$PORT_admin_a"
reset_stats
# Alone and as fast as they go (20 in a fraction of a second), so the replicas' own background
# commands hardly count in the writes' share.
read -r calibration_writes failed _ < <(python3 benches/admin.py writes "$ADMIN_admin_b" "$ADMIN_TOKEN" 1000 20)
[[ $failed == 0 ]] || die "scenario 15: $failed of $calibration_writes admin writes failed"
per_write=$(awk -v c="$(redis_stat all)" -v n="$calibration_writes" 'BEGIN { printf "%.1f", c / n }')
hot "$PORT_admin_a" >/dev/null
writes_rps=() quiet_rps=() write_calls=0 write_cmds=0 writes_made=0 writes_time=0 quiet_calls=0 quiet_cmds=0
for round in $(seq 1 "$ROUNDS"); do
    reset_stats
    python3 benches/admin.py writes "$ADMIN_admin_b" "$ADMIN_TOKEN" 20 >"$WORK/writes.txt" &
    writer=$!
    read -r rps p50 p99 n bad < <(hot "$PORT_admin_a")
    kill -TERM "$writer"
    wait "$writer" || die "scenario 15: benches/admin.py writes failed"
    cmds=$(redis_stat all)
    read -r made failed took <"$WORK/writes.txt"
    [[ $bad == 0 && $failed == 0 ]] || die "scenario 15: $bad failed requests, $failed of $made admin writes failed"
    writes_rps+=("$rps") writes_p50=$p50 writes_p99=$p99
    write_calls=$((write_calls + n)) write_cmds=$((write_cmds + cmds)) writes_made=$((writes_made + made))
    writes_time=$(awk -v a="$writes_time" -v b="$took" 'BEGIN { print a + b }')
    reset_stats
    read -r rps p50 p99 n bad < <(hot "$PORT_admin_a")
    quiet_rps+=("$rps") quiet_calls=$((quiet_calls + n)) quiet_cmds=$((quiet_cmds + $(redis_stat all)))
done
WRITES=$(echo "${writes_rps[@]}" | median)
QUIET=$(echo "${quiet_rps[@]}" | median)
write_per_call=$(awk -v c="$write_cmds" -v w="$writes_made" -v p="$per_write" -v n="$write_calls" \
    'BEGIN { v = (c - w * p) / n; printf "%.4f", (v < 0 ? 0 : v) }')
quiet_per_call=$(awk -v c="$quiet_cmds" -v n="$quiet_calls" 'BEGIN { printf "%.4f", c / n }')
writes_per_s=$(awk -v w="$writes_made" -v t="$writes_time" 'BEGIN { printf "%.1f", w / t }')
row "15 hot path, admin writes on another replica" "$WRITES" "$(ratio "$WRITES" "$CEILING")" "$writes_p50" "$writes_p99" \
    "$(ratio "$WRITES" "$QUIET") × no writes ($QUIET, same rounds; target >= 0.9); $writes_per_s writes/s on B; Redis $write_per_call commands/call with writes ($per_write per write subtracted) vs $quiet_per_call without (target ~0)"
fi
if wanted 14 || wanted 15; then
kill "$PID_admin_a" "$PID_admin_b"
fi

# --- 16: seed reload ----------------------------------------------------------------------------------
# Scenario 7's seed (SEED_CONSUMERS consumers, Kong JSON), served with Redis (a database of its own:
# every reload rewrites the seed's Redis copies) and the admin API. POST /admin/reload, which
# answers after the swap, three times with the service idle in between, against `check` on the same
# file once. Then /auth on a key of the seed in rounds alternating with and without reloads back to
# back (benches/admin.py reloads); every non-200 answer during the reloads is counted.
if wanted 16; then
[[ -f $WORK/seed.json ]] || target/release/examples/gen_seed "$SEED_CONSUMERS" "$WORK/seed.json" 2>/dev/null
started=$(date +%s%N)
target/release/user-metadata-auth check --config config/default.toml --seed "$WORK/seed.json" >/dev/null \
    || die "scenario 16: check refuses the seed"
check_ms=$(awk -v a="$started" -v b="$(date +%s%N)" 'BEGIN { printf "%.0f", (b - a) / 1e6 }')
start_admin_service reload UMA_REDIS__URL="$REDIS_URL/4" UMA_SEED__PATH="$WORK/seed.json"
wait_ready "http://127.0.0.1:$PORT_reload/readyz"
seed_request=(-H "apikey: bench-key-0" -H "X-Forwarded-Uri: $URI")
code=$(curl -s -o /dev/null -w '%{http_code}' "${seed_request[@]}" "http://127.0.0.1:$PORT_reload/auth")
[[ $code == 200 ]] || die "scenario 16: bench-key-0 got $code"
reload_ms=()
for _ in 1 2 3; do
    settle "$PID_reload"
    read -r ms result < <(python3 benches/admin.py reloads "$ADMIN_reload" "$ADMIN_TOKEN" 1)
    [[ $result == ok ]] || die "scenario 16: a reload answered $result"
    reload_ms+=("$ms")
done
RELOAD_MS=$(echo "${reload_ms[@]}" | median)
row "16 seed reload, $SEED_CONSUMERS consumers" "" "<=${check_ms} ms" "$RELOAD_MS ms" "" \
    "POST /admin/reload, median of 3 (${reload_ms[*]} ms), against check on the same file once ($check_ms ms; target: reload <= check); Redis copies rewritten after each"
seed_run() { wrk_run "$CONNECTIONS" "http://127.0.0.1:$PORT_reload/auth" "${seed_request[@]}"; }
settle "$PID_reload"
seed_run >/dev/null
reloading_rps=() steady_rps=() reload_errors=0 reloads_made=0 reloads_failed=0
for round in $(seq 1 "$ROUNDS"); do
    settle "$PID_reload"
    python3 benches/admin.py reloads "$ADMIN_reload" "$ADMIN_TOKEN" >"$WORK/reloads.txt" &
    reloader=$!
    read -r rps p50 p99 n bad < <(seed_run)
    kill -TERM "$reloader"
    wait "$reloader" || die "scenario 16: benches/admin.py reloads failed"
    read -r made failed < <(tail -n 1 "$WORK/reloads.txt")
    reloading_rps+=("$rps") reloading_p50=$p50 reloading_p99=$p99
    reload_errors=$((reload_errors + ${bad%+socket})) reloads_made=$((reloads_made + made)) reloads_failed=$((reloads_failed + failed))
    [[ $bad == *socket* ]] && reload_errors_socket=' (and socket errors)'
    settle "$PID_reload"
    read -r rps p50 p99 n bad < <(seed_run)
    [[ $bad == 0 ]] || die "scenario 16: $bad failed requests without reloads"
    steady_rps+=("$rps") steady_p99=$p99
done
RELOADING=$(echo "${reloading_rps[@]}" | median)
STEADY=$(echo "${steady_rps[@]}" | median)
row "16 /auth during back-to-back reloads" "$RELOADING" "$(ratio "$RELOADING" "$CEILING")" "$reloading_p50" "$reloading_p99" \
    "$(ratio "$RELOADING" "$STEADY") × no reloads ($STEADY, p99 $steady_p99, same rounds); errors (non-200) during reloads: $reload_errors${reload_errors_socket:-}; $reloads_made reloads, $reloads_failed failed"
kill "$PID_reload"
fi

# --- report ------------------------------------------------------------------------------------------
per() { awk -v a="$1" -v n="$2" 'BEGIN { printf "%.4f", a / n }'; }
echo
echo "user-metadata-auth benchmarks — $(date -u +%Y-%m-%d), $(nproc) cores shared by wrk and the servers"
echo "wrk: 1 thread, $CONNECTIONS connections (8 for scenario 6), $DURATION per run; request: GET /auth,"
echo "apikey + X-Forwarded-Uri: $URI (bundled seed and config, Redis on loopback)"
echo "load average (1, 5, 15 min) at the start: $LOAD_START, at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '%-44s %11s %9s %10s %10s  %s\n' scenario 'requests/s' '×ceiling' p50 p99 notes
printf '%s\n' "${ROWS[@]}"
wanted 1 || wanted 2 || wanted 10 || wanted 13 || exit 0
echo
echo "8 Redis commands per allowed call (INFO commandstats, all commands incl. those inside scripts,"
echo "  health checks and pool PINGs):"
wanted 1 && echo "  async: $(per "$async_cmds" "$async_calls") commands/call, $(per "$async_evalsha" "$async_calls") EVALSHA/call ($async_calls calls)"
wanted 10 && echo "  limited entry (10): $(per "$limited_cmds" "$limited_calls") commands/call, $(per "$limited_evalsha" "$limited_calls") EVALSHA/call" \
     "($limited_calls calls; leases plus TDL flushes; target <= 0.05 commands/call)"
wanted 13 && echo "  cost budget (13): $(per "$budget_cmds" "$budget_calls") commands/call, $(per "$budget_evalsha" "$budget_calls") EVALSHA/call" \
     "($budget_calls calls; TDL flushes plus the budget's totals, pushed or polled: no round trip per call)"
wanted 2 && echo "  sync:  $(per "$sync_cmds" "$sync_calls") commands/call, $(per "$sync_evalsha" "$sync_calls") EVALSHA/call," \
     "$(per $((sync_evalsha + sync_pings)) "$sync_calls") round trips/call ($sync_calls calls; waiting calls share one write)"
exit 0
