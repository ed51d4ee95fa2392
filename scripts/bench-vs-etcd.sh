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
# Storage rows, each on fresh clusters after the workloads: disk under overwrite churn, memory with a
# large state (and a wiped follower's rebuild), restart time with that state. "" skips them.
STORAGE=${BENCH_STORAGE-"disk memory restart"}
CHURN_WRITES=${BENCH_CHURN_WRITES:-40000} # per churn round, over CHURN_KEYS keys of CHURN_VALUE_SIZE B
CHURN_KEYS=${BENCH_CHURN_KEYS:-1000}
CHURN_VALUE_SIZE=${BENCH_CHURN_VALUE_SIZE:-10240} # above 128 KiB a value is a file of its own in sled
BIG_KEYS=${BENCH_BIG_KEYS:-1000000}       # memory and restart rows: keys of 100 B
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

# Data directories are $WORK/<system><n>$GEN; the storage rows bump GEN to start from empty ones.
GEN=""
data_dir() { echo "$WORK/$1$2$GEN"; }

start_raftkv() {
    local n=$1
    "$SERVER_BIN" server --id "$n" --listen "$(rk_addr "$n")" --peer-listen "$(rk_peer "$n")" --peers "$RK_PEERS" \
        --data-dir "$(data_dir raftkv "$n")" >>"$WORK/raftkv$n.log" 2>&1 &
    PIDS[raftkv$n]=$!
}

# etcd with its defaults (100 ms heartbeat, 1 s election timeout, fsync on every commit).
start_etcd() {
    local n=$1
    etcd --name "e$n" --data-dir "$(data_dir etcd "$n")" \
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

# --- storage rows: disk, memory, restart --------------------------------------------------------
# Each on clusters started from empty data directories, etcd and raftkv side by side as above.
STORAGE_ROWS=$OUT/storage.txt
: >"$STORAGE_ROWS"
row() { printf '| %-44s | %24s | %24s |\n' "$@" >>"$STORAGE_ROWS"; }

stop_cluster() {
    local system=$1 n
    for n in 1 2 3; do kill "${PIDS[$system$n]}" 2>/dev/null || true; done
    for n in 1 2 3; do wait "${PIDS[$system$n]}" 2>/dev/null || true; done
}

fresh_clusters() {
    stop_cluster etcd
    stop_cluster raftkv
    GEN=".$1"
    for n in 1 2 3; do start_etcd "$n"; start_raftkv "$n"; done
    wait_ready etcd >/dev/null
    wait_ready raftkv >/dev/null
}

node_of() { # node_of SYSTEM ENDPOINT -> 1..3
    local n
    for n in 1 2 3; do
        if [[ $1 == raftkv && $2 == "$(rk_addr "$n")" ]] || [[ $1 == etcd && $2 == "$(etcd_addr "$n")" ]]; then
            echo "$n"
            return
        fi
    done
    die "$2 is not a $1 node"
}
endpoint_of() { if [[ $1 == raftkv ]]; then rk_addr "$2"; else etcd_addr "$2"; fi; }
follower_of() { # a node of SYSTEM that is not its leader
    local leader n
    leader=$(node_of "$1" "$(wait_ready "$1")")
    for n in 1 2 3; do [[ $n == "$leader" ]] || { echo "$n"; return; }; done
}
status_kb() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }
mb() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1e6}'; }
# du still prints the total when a file goes while it runs (sled removes replaced blob files).
dir_bytes() { { du -sb "$1" 2>/dev/null || true; } | cut -f1; }

# Succeeds once ENDPOINT answers one linearizable read (raftkv STRONG, etcd's default range).
strong_read() {
    "$BIN" bench get --target "$1" --endpoints "$2" --clients 1 --connections 1 --total 1 --key-space 1 \
        --no-prefill --timeout-ms 500 --quiet --json - 2>/dev/null | jq -e '.ops == 1' >/dev/null
}
# Milliseconds from SINCE (ns) until ENDPOINT answers a strong read; dies after 120 s.
ms_until_strong() {
    local system=$1 ep=$2 since=$3 deadline=$((SECONDS + 120))
    until strong_read "$system" "$ep"; do
        ((SECONDS < deadline)) || die "$system $ep did not answer a strong read within 120 s"
        sleep 0.05
    done
    echo $((($(date +%s%N) - since) / 1000000))
}

storage_disk() {
    local live=$((CHURN_KEYS * CHURN_VALUE_SIZE)) round system n b max writes dir logb maxlog
    log "storage: disk under churn ($CHURN_KEYS keys x $CHURN_VALUE_SIZE B, $CHURN_WRITES writes per round)"
    fresh_clusters disk
    for round in 1 2; do
        declare -A cell=() rss=()
        for system in etcd raftkv; do
            "$BIN" bench put --target "$system" --endpoints "$(endpoints_of "$system")" --clients 16 \
                --connections 8 --total "$CHURN_WRITES" --key-space "$CHURN_KEYS" --value-size "$CHURN_VALUE_SIZE" --quiet \
                --json "$OUT/churn$round.$system.json" >&2
            # The target is on the data directory less the retained Raft log (raftkv's raft-log/;
            # etcd's member/wal holds its log and its snapshots together, so it counts whole).
            max=0 maxlog=0
            for n in 1 2 3; do
                dir=$(data_dir "$system" "$n")
                b=$(dir_bytes "$dir") logb=0
                [[ $system != raftkv ]] || logb=$(dir_bytes "$dir/raft-log")
                if ((b - logb > max - maxlog)); then max=$b maxlog=$logb; fi
            done
            cell[$system]="$(mb "$max") MB: $(awk -v a="$((max - maxlog))" -v l="$live" 'BEGIN {printf "%.1f", a / l}')x live"
            [[ $system != raftkv ]] || cell[$system]+=" + log $(mb "$maxlog")"
            b=0
            for n in 1 2 3; do
                k=$(status_kb "${PIDS[$system$n]}" VmRSS)
                ((k <= b)) || b=$k
            done
            rss[$system]="$((b / 1024)) MB"
        done
        writes=$((round * CHURN_WRITES))
        row "disk after $writes overwrites (largest node)" "${cell[raftkv]}" "${cell[etcd]}"
        row "RSS after $writes overwrites (largest node)" "${rss[raftkv]}" "${rss[etcd]}"
    done
    for n in 1 2 3; do
        log "raftkv node $n: $({ du -sm "$(data_dir raftkv "$n")"/* 2>/dev/null || true; } | awk '{printf "%s %s MB  ", $2, $1}')"
    done
}

BIG_STATE=""
big_state() { # clusters holding BIG_KEYS keys of 100 B
    [[ -z $BIG_STATE ]] || return 0
    log "storage: writing $BIG_KEYS keys of 100 B into each system"
    fresh_clusters big
    local system
    for system in etcd raftkv; do
        "$BIN" bench get --target "$system" --endpoints "$(endpoints_of "$system")" --key-space "$BIG_KEYS" \
            --value-size 100 --total 1 --quiet >/dev/null
    done
    BIG_STATE=1
}

storage_memory() {
    local system n max rss victim steady since ms hwm
    big_state
    declare -A cell=()
    for system in etcd raftkv; do
        max=0
        for n in 1 2 3; do
            rss=$(status_kb "${PIDS[$system$n]}" VmRSS)
            max=$((rss > max ? rss : max))
        done
        cell[$system]="$((max / 1024)) MB"
    done
    row "RSS with $BIG_KEYS keys x 100 B, largest node" "${cell[raftkv]}" "${cell[etcd]}"
    # A wiped raftkv follower rebuilt from a snapshot while the cluster serves (etcd would need its
    # member replaced, which is not the same operation, so there is no etcd cell).
    victim=$(follower_of raftkv)
    steady=$(status_kb "${PIDS[raftkv$victim]}" VmRSS)
    kill -9 "${PIDS[raftkv$victim]}"
    wait "${PIDS[raftkv$victim]}" 2>/dev/null || true
    rm -rf "$(data_dir raftkv "$victim")"
    since=$(date +%s%N)
    start_raftkv "$victim"
    ms=$(ms_until_strong raftkv "$(rk_addr "$victim")" "$since")
    hwm=$(status_kb "${PIDS[raftkv$victim]}" VmHWM)
    rss=$(status_kb "${PIDS[raftkv$victim]}" VmRSS)
    row "wiped follower: serving strong reads after" "$ms ms" "-"
    row "wiped follower: peak RSS (now; before wipe)" "$((hwm / 1024)) MB ($((rss / 1024)); $((steady / 1024)))" "-"
}

storage_restart() {
    local system n since how
    big_state
    for how in TERM KILL; do
        declare -A cell=()
        for system in etcd raftkv; do
            n=$(follower_of "$system")
            kill -"$how" "${PIDS[$system$n]}"
            wait "${PIDS[$system$n]}" 2>/dev/null || true
            since=$(date +%s%N)
            if [[ $system == raftkv ]]; then start_raftkv "$n"; else start_etcd "$n"; fi
            cell[$system]="$(ms_until_strong "$system" "$(endpoint_of "$system" "$n")" "$since") ms"
        done
        row "restart after SIG$how: strong read after" "${cell[raftkv]}" "${cell[etcd]}"
    done
}

for s in $STORAGE; do
    case $s in
    disk) storage_disk ;;
    memory) storage_memory ;;
    restart) storage_restart ;;
    *) die "unknown storage row $s" ;;
    esac
done

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
if [[ -s $STORAGE_ROWS ]]; then
    echo
    printf '| %-44s | %24s | %24s |\n' storage raftkv etcd
    echo '|:---------------------------------------------|-------------------------:|-------------------------:|'
    cat "$STORAGE_ROWS"
fi
echo
echo "JSON per run: $OUT (kept only with BENCH_OUT set or BENCH_KEEP=1)"
