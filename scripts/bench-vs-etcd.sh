#!/usr/bin/env bash
# Side-by-side benchmark: a three-node etcd and a three-node raftkv on loopback, the same workloads
# through the same client (`raftkv bench`), one table with both figures and their ratio, then failover
# timing (SIGKILL the leader, time to the first write acknowledged through a survivor) for both.
#
# Usage: scripts/bench-vs-etcd.sh            (see the variables below to change sizes and ports)
#        BENCH_SERVER_BIN=/path/to/raftkv scripts/bench-vs-etcd.sh   (runs those nodes instead)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

DURATION=${BENCH_DURATION:-10s}     # per workload and system
CLIENTS=${BENCH_CLIENTS:-64}
CONNECTIONS=${BENCH_CONNECTIONS:-8}
KEYS=${BENCH_KEYS:-10000}
VALUE_SIZE=${BENCH_VALUE_SIZE:-256}
KILLS=${BENCH_KILLS:-5}             # failover samples per system
PORT_BASE=${BENCH_PORT_BASE:-30000} # raftkv: +1..3, etcd client: +11..13, etcd peer: +21..23
WORKLOADS=${BENCH_WORKLOADS:-"put get-strong get-eventual txn mix put-1client put-1c-follower"}
HOST=127.0.0.1

die() { echo "bench-vs-etcd.sh: $*" >&2; exit 1; }
log() { echo "--- $*" >&2; }

# --- prerequisites: etcd, protoc (etcd-client's build script), jq ---------------------------------
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v jq >/dev/null || missing+=(jq)
if ((${#missing[@]})); then
    log "installing ${missing[*]} with apt-get"
    SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BIN=$TARGET_DIR/release/raftkv
# The raftkv nodes run this binary (default: the one just built). Point it at another build to compare
# two raftkv versions through the same client, one run each.
SERVER_BIN=${BENCH_SERVER_BIN:-$BIN}
log "building raftkv with etcd support"
(cd "$REPO" && cargo build --release --quiet && cargo build --release --quiet -p raftkv-bench --features etcd) || die "build failed"

WORK=$(mktemp -d -t raftkv-bench.XXXXXX)
OUT=${BENCH_OUT:-$WORK/results}
mkdir -p "$OUT"
declare -A PIDS=()

cleanup() {
    local key
    for key in "${!PIDS[@]}"; do
        kill -9 "${PIDS[$key]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    [[ -n ${BENCH_KEEP:-} ]] || rm -rf "$WORK"
}
trap cleanup EXIT

rk_addr() { echo "$HOST:$((PORT_BASE + $1))"; }
etcd_addr() { echo "$HOST:$((PORT_BASE + 10 + $1))"; }
etcd_peer() { echo "http://$HOST:$((PORT_BASE + 20 + $1))"; }
rk_peer() { echo "$HOST:$((PORT_BASE + 30 + $1))"; }
RK_ENDPOINTS="$(rk_addr 1),$(rk_addr 2),$(rk_addr 3)"
ETCD_ENDPOINTS="$(etcd_addr 1),$(etcd_addr 2),$(etcd_addr 3)"
RK_PEERS="1=$(rk_addr 1)/$(rk_peer 1),2=$(rk_addr 2)/$(rk_peer 2),3=$(rk_addr 3)/$(rk_peer 3)"
ETCD_CLUSTER="e1=$(etcd_peer 1),e2=$(etcd_peer 2),e3=$(etcd_peer 3)"

start_raftkv() {
    local n=$1
    "$SERVER_BIN" server --id "$n" --listen "$(rk_addr "$n")" --peer-listen "$(rk_peer "$n")" --peers "$RK_PEERS" \
        --data-dir "$WORK/raftkv$n" >>"$WORK/raftkv$n.log" 2>&1 &
    PIDS[raftkv$n]=$!
}

# etcd with its defaults (100 ms heartbeat, 1 s election timeout, fsync on every commit).
start_etcd() {
    local n=$1
    etcd --name "e$n" --data-dir "$WORK/etcd$n" \
        --listen-client-urls "http://$(etcd_addr "$n")" --advertise-client-urls "http://$(etcd_addr "$n")" \
        --listen-peer-urls "$(etcd_peer "$n")" --initial-advertise-peer-urls "$(etcd_peer "$n")" \
        --initial-cluster "$ETCD_CLUSTER" --initial-cluster-state new --initial-cluster-token raftkv-bench \
        --log-level error >>"$WORK/etcd$n.log" 2>&1 &
    PIDS[etcd$n]=$!
}

endpoints_of() { if [[ $1 == raftkv ]]; then echo "$RK_ENDPOINTS"; else echo "$ETCD_ENDPOINTS"; fi; }

# Prints the leader's endpoint once there is one and every node answers.
wait_ready() {
    local system=$1 deadline=$((SECONDS + 30)) leader
    while ((SECONDS < deadline)); do
        if leader=$("$BIN" bench leader --target "$system" --endpoints "$(endpoints_of "$system")" \
            --timeout-ms 500 2>/dev/null) &&
            "$BIN" bench probe --target "$system" --endpoints "$(endpoints_of "$system")" \
                --timeout-ms 2000 >/dev/null 2>&1; then
            echo "$leader"
            return 0
        fi
        sleep 0.2
    done
    die "$system cluster did not become ready; logs in $WORK"
}

# --- machine -------------------------------------------------------------------------------------
CORES=$(nproc)
# Synchronous 4 KiB writes on the disk that holds the data: what one fsync'd log append costs.
FSYNC_US=$(dd if=/dev/zero of="$WORK/fsync-probe" bs=4k count=2000 oflag=dsync 2>&1 |
    awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^s,?$/) t = $(i-1); print int(t * 1e6 / 2000) }')
rm -f "$WORK/fsync-probe"
ETCD_VERSION=$(etcd --version | awk '/etcd Version/ {print $3}')
RAFTKV_VERSION=$("$SERVER_BIN" --version | awk '{print $2}')
log "machine: $CORES cores, fsync'd 4 KiB write ${FSYNC_US} µs (dd oflag=dsync), etcd $ETCD_VERSION, raftkv $RAFTKV_VERSION"

for n in 1 2 3; do start_etcd "$n"; start_raftkv "$n"; done
wait_ready etcd >/dev/null
wait_ready raftkv >/dev/null
log "both clusters up; data under $WORK"

# CPU time (user + system, in clock ticks) used so far by a system's three server processes. Per
# operation it shows how much work each system does for the same request, a figure that the machine's
# noise moves far less than throughput.
TICK_US=$((1000000 / $(getconf CLK_TCK)))
cpu_ticks() {
    local system=$1 n total=0 t
    for n in 1 2 3; do
        t=$(awk '{print $14 + $15}' "/proc/${PIDS[$system$n]}/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}

run() { # run SYSTEM NAME ARGS...   (endpoints: $RUN_ENDPOINTS if set, else all three nodes)
    local system=$1 name=$2 before after ops prefilled=()
    shift 2
    local endpoints=${RUN_ENDPOINTS:-$(endpoints_of "$system")}
    if [[ $1 != put ]]; then
        # Writes every key once, outside the measured run (and its CPU count): one operation after it.
        "$BIN" bench "$@" --target "$system" --endpoints "$endpoints" --total 1 --key-space "$KEYS" \
            --value-size "$VALUE_SIZE" --quiet >/dev/null
        prefilled=(--no-prefill)
    fi
    before=$(cpu_ticks "$system")
    "$BIN" bench "$@" "${prefilled[@]}" --target "$system" --endpoints "$endpoints" \
        --duration "$DURATION" --key-space "$KEYS" --value-size "$VALUE_SIZE" --quiet \
        --json "$OUT/$name.$system.json" >&2
    after=$(cpu_ticks "$system")
    ops=$(jq .ops "$OUT/$name.$system.json")
    if ((ops > 0)); then echo $(((after - before) * TICK_US / ops)) >"$OUT/$name.$system.cpu"; fi
}

for w in $WORKLOADS; do
    # etcd first in one workload and raftkv first in the next, so slow drift on a noisy machine does not
    # always favour the same system.
    order="etcd raftkv"
    [[ $((${#w} % 2)) == 0 ]] || order="raftkv etcd"
    for system in $order; do
        log "$w on $system"
        case $w in
        put) run "$system" "$w" put --clients "$CLIENTS" --connections "$CONNECTIONS" ;;
        get-strong) run "$system" "$w" get --consistency strong --clients "$CLIENTS" --connections "$CONNECTIONS" ;;
        get-eventual) run "$system" "$w" get --consistency eventual --clients "$CLIENTS" --connections "$CONNECTIONS" ;;
        txn) run "$system" "$w" txn --clients "$CLIENTS" --connections "$CONNECTIONS" ;;
        mix) run "$system" "$w" mix --read-percent 90 --consistency strong --clients "$CLIENTS" --connections "$CONNECTIONS" ;;
        # One client, one connection, pinned to the leader or to a follower of each system, so both
        # systems are measured on the same path (the first endpoint is raftkv's leader more often).
        put-1client | put-1c-follower)
            leader=$("$BIN" bench leader --target "$system" --endpoints "$(endpoints_of "$system")" --timeout-ms 1000)
            ep=$leader
            [[ $w == put-1client ]] || ep=$(endpoints_of "$system" | tr ',' '\n' | grep -vx "$leader" | head -1)
            RUN_ENDPOINTS=$ep run "$system" "$w" put --clients 1 --connections 1
            ;;
        *) die "unknown workload $w" ;;
        esac
    done
done

# --- failover --------------------------------------------------------------------------------------
failover() {
    local system=$1 i leader n survivors since ms
    for ((i = 1; i <= KILLS; i++)); do
        leader=$(wait_ready "$system")
        sleep 1 # a settled cluster, not one still finishing the previous election
        for n in 1 2 3; do
            if [[ $system == raftkv && $leader == "$(rk_addr "$n")" ]] ||
                [[ $system == etcd && $leader == "$(etcd_addr "$n")" ]]; then break; fi
        done
        survivors=$(endpoints_of "$system" | tr ',' '\n' | grep -vx "$leader" | paste -sd,)
        since=$(date +%s%N)
        kill -9 "${PIDS[$system$n]}"
        wait "${PIDS[$system$n]}" 2>/dev/null || true
        ms=$("$BIN" bench probe --target "$system" --endpoints "$survivors" --since-unix-ns "$since" \
            --timeout-ms 1000)
        log "failover $system #$i: leader $leader killed, first write after $ms ms"
        echo "$ms" >>"$OUT/failover.$system.txt"
        if [[ $system == raftkv ]]; then start_raftkv "$n"; else start_etcd "$n"; fi
    done
}
failover etcd
failover raftkv

# --- table ---------------------------------------------------------------------------------------
median() { sort -n "$1" | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

echo
echo "raftkv $RAFTKV_VERSION vs etcd $ETCD_VERSION, 3 nodes each on loopback, $CORES cores, fsync ${FSYNC_US} µs;"
echo "$DURATION per run, $KEYS keys, $VALUE_SIZE B values, $CONNECTIONS connections over 3 endpoints; $(date -u +%Y-%m-%d)"
echo
printf '| %-13s | %7s | %12s | %12s | %6s | %18s | %18s | %9s | %12s |\n' \
    workload clients "raftkv ops/s" "etcd ops/s" ratio "raftkv p50/p99 ms" "etcd p50/p99 ms" "errors r/e" "CPU µs/op r/e"
echo '|:--------------|--------:|-------------:|-------------:|-------:|-------------------:|-------------------:|-----------:|-------------:|'
for w in $WORKLOADS; do
    r=$OUT/$w.raftkv.json e=$OUT/$w.etcd.json
    [[ -f $r && -f $e ]] || continue
    cpu="$(cat "$OUT/$w.raftkv.cpu" 2>/dev/null || echo ?) / $(cat "$OUT/$w.etcd.cpu" 2>/dev/null || echo ?)"
    jq -rn --slurpfile r "$r" --slurpfile e "$e" --arg w "$w" --arg cpu "$cpu" '
        def ms: . / 1000 | (. * 100 | round) / 100 | tostring;
        def errs: [.errors[]] | add // 0;
        ($r[0]) as $r | ($e[0]) as $e |
        [$w, ($r.clients | tostring), ($r.ops_per_s | round | tostring), ($e.ops_per_s | round | tostring),
         (($r.ops_per_s / $e.ops_per_s) * 100 | round / 100 | tostring + "x"),
         ($r.latency_us.p50 | ms) + " / " + ($r.latency_us.p99 | ms),
         ($e.latency_us.p50 | ms) + " / " + ($e.latency_us.p99 | ms),
         ($r | errs | tostring) + " / " + ($e | errs | tostring), $cpu] | @tsv' |
        awk -F'\t' '{printf "| %-13s | %7s | %12s | %12s | %6s | %18s | %18s | %9s | %12s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9}'
done
if [[ -f $OUT/failover.raftkv.txt && -f $OUT/failover.etcd.txt ]]; then
    rm_med=$(median "$OUT/failover.raftkv.txt")
    et_med=$(median "$OUT/failover.etcd.txt")
    echo
    echo "failover (SIGKILL the leader -> first acknowledged write through a survivor), median of $KILLS:"
    echo "  raftkv $rm_med ms   [$(sort -n "$OUT/failover.raftkv.txt" | paste -sd' ')]"
    echo "  etcd   $et_med ms   [$(sort -n "$OUT/failover.etcd.txt" | paste -sd' ')]"
    echo "  ratio  $(awk -v a="$rm_med" -v b="$et_med" 'BEGIN {printf "%.2fx", a / b}')"
fi
echo
echo "JSON per run: $OUT (kept only with BENCH_OUT set or BENCH_KEEP=1)"
