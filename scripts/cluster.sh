#!/usr/bin/env bash
# Runs a three-node raftkv cluster on this machine. See usage() below, or `scripts/cluster.sh help`.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

DATA_ROOT=${RAFTKV_DATA_DIR:-$REPO/data}
[[ $DATA_ROOT == /* ]] || DATA_ROOT=$PWD/$DATA_ROOT
HOST=${RAFTKV_HOST:-127.0.0.1}
PORT_BASE=${RAFTKV_PORT_BASE:-7000}
METRICS_PORT_BASE=${RAFTKV_METRICS_PORT_BASE:-9000}
START_TIMEOUT=${RAFTKV_START_TIMEOUT:-20}
STOP_TIMEOUT=${RAFTKV_STOP_TIMEOUT:-10}
BIN=${RAFTKV_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/raftkv}
# The three initial voters, then every node 'add' started since (its data directory nN is kept until
# 'remove N'), less the removed ones ('remove N' leaves nN.removed).
NODES=()
for n in 1 2 3; do
    [[ -e $DATA_ROOT/n$n.removed ]] || NODES+=("$n")
done
for dir in "$DATA_ROOT"/n[0-9]*; do
    n=${dir##*/n}
    [[ -d $dir && $n =~ ^[0-9]+$ ]] && ((n > 3)) && NODES+=("$n")
done
unset dir n
TLS_DIR=$DATA_ROOT/tls
# TLS mode: on with RAFTKV_TLS=1, off with 0; unset, on when this data root already has certificates
# (so status, restart and stop after a TLS start need no variable).
case ${RAFTKV_TLS:-} in
1 | true | yes) TLS=1 ;;
0 | false | no) TLS=0 ;;
"") if [[ -f $TLS_DIR/ca.pem ]]; then TLS=1; else TLS=0; fi ;;
*)
    echo "cluster.sh: RAFTKV_TLS must be 1 or 0, got '$RAFTKV_TLS'" >&2
    exit 1
    ;;
esac
# What every client of the cluster (this script's own status calls included) passes in TLS mode.
CLIENT_TLS=()
((TLS)) && CLIENT_TLS=(--cacert "$TLS_DIR/ca.pem" --cert "$TLS_DIR/client.pem" --key "$TLS_DIR/client-key.pem")

usage() {
    cat <<EOF
Usage: scripts/cluster.sh COMMAND

Runs a three-node raftkv cluster on this machine (node N serves clients on
\$RAFTKV_HOST:\$((RAFTKV_PORT_BASE+N)) and its peers on \$RAFTKV_HOST:\$((RAFTKV_PORT_BASE+100+N))).

Commands:
  start        Start whichever of the three nodes are not running (builds the release binary first;
               a no-op when it is up to date), wait until they agree on a leader, and print how to
               talk to the cluster. A cluster started again after 'stop' keeps its data.
  stop         SIGTERM every node, wait for them to exit (SIGKILL after \$RAFTKV_STOP_TIMEOUT s).
               The data is kept; delete \$RAFTKV_DATA_DIR to start from scratch.
  status       Show each node's process and 'raftkv status' (role, term, leader, indexes).
  kill N       SIGKILL node N (a crash: no clean shutdown).
  restart N    Stop node N if it is running (SIGTERM), start it again on its data and wait until it
               answers Status.
  add N        Start node N (4 or more) with --join: the cluster adds it as a learner, it catches
               up, and is promoted to voter. Afterwards start, stop and status include it.
  remove N     Remove node N from the membership ('raftkv member remove'), stop it and delete its
               data directory: an id is never reused, so node N cannot come back.
  restore FILE Make the stopped cluster a new cluster from a backup ('raftkv snapshot save'): each
               node's data directory is moved to nN.before-restore and restored from FILE
               ('raftkv snapshot restore'), then the nodes start.
  help         Show this text.

Environment:
  RAFTKV_DATA_DIR       data root (default: <repo>/data); node N keeps its database in
                        \$RAFTKV_DATA_DIR/nN, its log in nN.log and its pid in nN.pid there
  RAFTKV_HOST           address the nodes listen on (default: 127.0.0.1)
  RAFTKV_PORT_BASE      node N serves clients on port RAFTKV_PORT_BASE+N and peers on
                        RAFTKV_PORT_BASE+100+N (default: 7000, so 7001-7003 and 7101-7103)
  RAFTKV_METRICS_PORT_BASE  node N serves /metrics, /livez and /readyz over HTTP on port
                        RAFTKV_METRICS_PORT_BASE+N (default: 9000, so 9001-9003)
  RAFTKV_BIN            raftkv binary to run (default: <repo>/target/release/raftkv, built with
                        'cargo build --release'; when set, nothing is built)
  RAFTKV_START_TIMEOUT  seconds 'start' and 'restart' wait for the cluster (default: 20)
  RAFTKV_STOP_TIMEOUT   seconds to wait after SIGTERM before SIGKILL (default: 10)
  RAFTKV_LOG            server log filter (default: info,openraft=warn,...)
  RAFTKV_TLS            1: TLS on both ports, client certificates required; certificates are made
                        once with 'raftkv certs' in \$RAFTKV_DATA_DIR/tls (default: on when that
                        directory has them, so later commands need no variable; 0 forces plaintext)
EOF
}

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

port_of() { echo $((PORT_BASE + $1)); }
addr_of() { echo "$HOST:$(port_of "$1")"; }
# Raft traffic has a port of its own, 100 above the client port (7101-7103 by default).
peer_addr_of() { echo "$HOST:$((PORT_BASE + 100 + $1))"; }
metrics_addr_of() { echo "$HOST:$((METRICS_PORT_BASE + $1))"; }
node_dir() { echo "$DATA_ROOT/n$1"; }
log_of() { echo "$DATA_ROOT/n$1.log"; }
pidfile_of() { echo "$DATA_ROOT/n$1.pid"; }

endpoints() {
    local out="" n
    for n in "${NODES[@]}"; do out+="${out:+,}$(addr_of "$n")"; done
    echo "$out"
}

# The bootstrap voters, the same on every node (the cluster id is derived from them).
initial_peers() {
    local out="" n
    for n in 1 2 3; do out+="${out:+,}$n=$(addr_of "$n")/$(peer_addr_of "$n")"; done
    echo "$out"
}

check_node_arg() {
    local n
    for n in "${NODES[@]}"; do
        [[ ${1:-} == "$n" ]] && return 0
    done
    die "expected a node number (${NODES[*]}), got '${1:-}'"
}

# Milliseconds since the epoch, for deadlines.
now_ms() {
    local t=${EPOCHREALTIME:-}
    if [[ -n $t ]]; then
        t=${t//[.,]/}
        echo $((10#$t / 1000))
    else
        echo $(($(date +%s) * 1000))
    fi
}

# Builds the release binary unless RAFTKV_BIN names one. cargo makes this a no-op when it is up to date.
ensure_bin() {
    if [[ -n ${RAFTKV_BIN:-} ]]; then
        [[ -x $BIN ]] || die "RAFTKV_BIN=$BIN is not an executable file"
        return
    fi
    if command -v cargo >/dev/null 2>&1; then
        echo "Building raftkv (cargo build --release; a no-op when up to date)..." >&2
        (cd "$REPO" && cargo build --release --quiet --bin raftkv) >&2 || die "cargo build --release failed"
    elif [[ -x $BIN ]]; then
        echo "cluster.sh: cargo not found; using the existing $BIN" >&2
    else
        die "cargo not found and $BIN does not exist; install Rust or set RAFTKV_BIN"
    fi
    [[ -x $BIN ]] || die "$BIN was not built"
}

# For commands that only talk to a running cluster: build only when there is no binary at all.
ensure_bin_exists() {
    [[ -x $BIN ]] || ensure_bin
}

# True if PID is a live (not zombie) process.
pid_alive() {
    local pid=$1 state
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r /proc/$pid/stat ]]; then
        # The state is the field after the parenthesised command name.
        state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
        [[ $state != Z && $state != X ]] || return 1
    fi
    return 0
}

# True if PID is a running 'raftkv server' for node N of this data root (not a recycled pid).
pid_is_node() {
    local pid=$1 n=$2 args
    pid_alive "$pid" || return 1
    if [[ -r /proc/$pid/cmdline ]]; then
        local -a argv=()
        mapfile -d '' argv <"/proc/$pid/cmdline" 2>/dev/null || return 1
        ((${#argv[@]} > 0)) || return 1
        [[ ${argv[0]##*/} == *raftkv* ]] || return 1
        local i have_server=0 have_id=0 have_dir=0
        for ((i = 1; i < ${#argv[@]}; i++)); do
            case ${argv[i]} in
            server) have_server=1 ;;
            --id) [[ ${argv[i + 1]:-} == "$n" ]] && have_id=1 ;;
            --data-dir) [[ ${argv[i + 1]:-} == "$(node_dir "$n")" ]] && have_dir=1 ;;
            esac
        done
        ((have_server && have_id && have_dir))
    else
        args=$(ps -o args= -p "$pid" 2>/dev/null) || return 1
        [[ $args == *raftkv*server* && $args == *"--id $n "* ]]
    fi
}

# Prints node N's pid if it is running; removes a stale pid file.
running_pid() {
    local n=$1 pidfile pid
    pidfile=$(pidfile_of "$n")
    [[ -f $pidfile ]] || return 1
    pid=$(tr -dc '0-9' 2>/dev/null <"$pidfile" || true)
    if [[ -n $pid ]] && pid_is_node "$pid" "$n"; then
        echo "$pid"
        return 0
    fi
    rm -f "$pidfile"
    return 1
}

spawn_node() {
    local n=$1 log pid
    mkdir -p "$DATA_ROOT"
    rm -f "$(pidfile_of "$n")"
    log=$(log_of "$n")
    echo "=== $(date '+%F %T') starting node $n on $(addr_of "$n") ===" >>"$log"
    # The node runs in its own session (setsid), so neither a terminal's hangup or Ctrl-C nor whatever
    # ran this script can take it down; the inner shell records its own pid and execs the server, so
    # the pid file holds the server's pid even if setsid forks. NO_COLOR: the log is a file.
    local -a detach=(nohup)
    command -v setsid >/dev/null 2>&1 && detach=(setsid)
    # shellcheck disable=SC2016 # $$ and $1 are the inner shell's.
    local -a tls=() join=()
    # Nodes past the initial three join the running cluster through its other members (a node that
    # has joined once restarts from its own data and ignores the list).
    if ((n > 3)); then
        local m others=""
        for m in "${NODES[@]}"; do
            [[ $m == "$n" ]] || others+="${others:+,}$(addr_of "$m")"
        done
        join=(--join "$others")
    fi
    if ((TLS)); then
        tls=(--cert-file "$TLS_DIR/node$n.pem" --key-file "$TLS_DIR/node$n-key.pem"
            --trusted-ca-file "$TLS_DIR/client-ca.pem" --client-cert-auth
            --peer-cert-file "$TLS_DIR/node$n.pem" --peer-key-file "$TLS_DIR/node$n-key.pem"
            --peer-trusted-ca-file "$TLS_DIR/ca.pem")
    fi
    NO_COLOR=1 "${detach[@]}" bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$(pidfile_of "$n")" \
        "$BIN" server --id "$n" --listen "$(addr_of "$n")" --peer-listen "$(peer_addr_of "$n")" \
        --metrics-listen "$(metrics_addr_of "$n")" \
        --peers "$(initial_peers)" --data-dir "$(node_dir "$n")" "${tls[@]}" "${join[@]}" \
        </dev/null >>"$log" 2>&1 &
    # Wait (briefly) until the inner shell has written the pid file and become the server, so that
    # nothing mistakes the moment before its exec for a dead node.
    local i
    pid=""
    for ((i = 0; i < 100; i++)); do
        pid=$(tr -dc '0-9' 2>/dev/null <"$(pidfile_of "$n")" || true)
        if [[ -n $pid ]] && { pid_is_node "$pid" "$n" || ! pid_alive "$pid"; }; then
            break
        fi
        sleep 0.02
    done
    echo "node $n: started, pid ${pid:-?}, $(addr_of "$n"), data $(node_dir "$n")"
}

# Waits up to TIMEOUT seconds for PID to exit. Returns 1 if it is still alive.
wait_gone() {
    local pid=$1 timeout=$2 deadline
    deadline=$(($(now_ms) + timeout * 1000))
    while pid_alive "$pid"; do
        (($(now_ms) < deadline)) || return 1
        sleep 0.1
    done
}

# Stops node N, whose pid is PID and to which SIGTERM has already been sent: waits for it to exit,
# SIGKILLs it if it does not within $STOP_TIMEOUT seconds, and removes its pid file.
finish_stop() {
    local n=$1 pid=$2
    if wait_gone "$pid" "$STOP_TIMEOUT"; then
        echo "node $n: stopped (pid $pid)"
    else
        echo "node $n: did not exit within ${STOP_TIMEOUT}s of SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || die "node $n (pid $pid) survived SIGKILL"
        echo "node $n: killed (pid $pid)"
    fi
    rm -f "$(pidfile_of "$n")"
}

# SIGTERM, then SIGKILL if it does not exit in time. A node that is not running is left alone.
stop_node() {
    local n=$1 pid
    pid=$(running_pid "$n") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    finish_stop "$n" "$pid"
}

tail_logs() {
    local n log
    for n in "$@"; do
        log=$(log_of "$n")
        echo "----- node $n: last lines of $log -----" >&2
        tail -n 25 "$log" >&2 2>/dev/null || echo "(no log)" >&2
    done
}

status_json() {
    "$BIN" status --json --endpoints "$1" --timeout-ms 1000 "${CLIENT_TLS[@]}" 2>/dev/null || true
}

# In TLS mode, makes the CA and the certificates once (valid for \$RAFTKV_HOST and loopback).
ensure_certs() {
    ((TLS)) || return 0
    [[ -f $TLS_DIR/ca.pem ]] && return 0
    local hosts=127.0.0.1,localhost,::1
    [[ ,$hosts, == *",$HOST,"* ]] || hosts="$HOST,$hosts"
    echo "Making TLS certificates in $TLS_DIR (raftkv certs)..."
    "$BIN" certs --out "$TLS_DIR" --hosts "$hosts" --nodes 1,2,3 >/dev/null ||
        die "raftkv certs failed (a half-written $TLS_DIR? remove it and try again)"
}

# From `raftkv status --json` output on stdin, prints the leader id if every node answered, all name
# the same leader, and that node says it is the leader. Prints nothing otherwise.
agreed_leader() {
    local json rows leaders leader
    json=$(cat)
    [[ $json == \[*\] ]] || return 0
    [[ $json != *'"error"'* ]] || return 0
    rows=$(printf '%s' "$json" | tr '}' '\n' | grep '"id"' || true)
    [[ -n $rows ]] || return 0
    leaders=$(printf '%s\n' "$rows" | grep -o '"leader_id":[0-9]*' | cut -d: -f2 | sort -u)
    [[ $leaders =~ ^[1-9][0-9]*$ ]] || return 0
    leader=$leaders
    printf '%s\n' "$rows" | grep "\"id\":${leader}[,}]\|\"id\":${leader}\$" | grep -q '"role":"leader"' || return 0
    echo "$leader"
}

# A field of one node's row in `raftkv status --json` output.
json_field() {
    local json=$1 id=$2 field=$3
    printf '%s' "$json" | tr '}' '\n' | grep "\"id\":${id}[,}]\|\"id\":${id}\$" | grep -o "\"$field\":[^,]*" |
        head -n1 | cut -d: -f2- | tr -d '"'
}

# Waits until every node in "$@" answers Status and they agree on a leader; prints its id.
wait_leader() {
    local eps="" n deadline json leader
    for n in "$@"; do eps+="${eps:+,}$(addr_of "$n")"; done
    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    while :; do
        for n in "$@"; do
            if ! running_pid "$n" >/dev/null; then
                echo "cluster.sh: node $n exited during start-up" >&2
                tail_logs "$n"
                return 1
            fi
        done
        json=$(status_json "$eps")
        leader=$(agreed_leader <<<"$json")
        if [[ -n $leader ]]; then
            echo "$leader"
            return 0
        fi
        if (($(now_ms) >= deadline)); then
            echo "cluster.sh: no agreed leader among nodes $* within ${START_TIMEOUT}s; last status:" >&2
            echo "${json:-(no answer)}" >&2
            tail_logs "$@"
            return 1
        fi
        sleep 0.2
    done
}

# Waits until node N answers Status.
wait_answers() {
    local n=$1 deadline json
    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    while :; do
        if ! running_pid "$n" >/dev/null; then
            echo "cluster.sh: node $n exited during start-up" >&2
            tail_logs "$n"
            return 1
        fi
        json=$(status_json "$(addr_of "$n")")
        if [[ $json == \[*\"id\"* ]]; then
            return 0
        fi
        if (($(now_ms) >= deadline)); then
            echo "cluster.sh: node $n did not answer Status within ${START_TIMEOUT}s: ${json:-(no answer)}" >&2
            tail_logs "$n"
            return 1
        fi
        sleep 0.2
    done
}

cmd_start() {
    local n pid leader json term bin_hint env_hint script_env var
    ensure_bin
    mkdir -p "$DATA_ROOT"
    ensure_certs
    for n in "${NODES[@]}"; do
        if pid=$(running_pid "$n"); then
            echo "node $n: already running, pid $pid"
        else
            spawn_node "$n"
        fi
    done
    echo "Waiting up to ${START_TIMEOUT}s for the nodes to agree on a leader..."
    leader=$(wait_leader "${NODES[@]}") ||
        die "the cluster did not come up (logs above; data in $DATA_ROOT). Nodes that started are still running: 'scripts/cluster.sh stop' stops them."
    json=$(status_json "$(endpoints)")
    term=$(json_field "$json" "$leader" term)

    bin_hint=$BIN
    [[ $bin_hint == "$REPO"/* ]] && bin_hint=${bin_hint#"$REPO"/}
    env_hint=""
    [[ $(endpoints) == "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003" ]] || env_hint="RAFTKV_ENDPOINTS=$(endpoints) "
    # The settings this cluster was started with, for the stop hint.
    script_env=""
    for var in RAFTKV_DATA_DIR RAFTKV_HOST RAFTKV_PORT_BASE RAFTKV_BIN; do
        [[ -n ${!var:-} ]] && script_env+="$var=${!var} "
    done
    local tls_hint="" grpcurl_tls="-plaintext" mode="plaintext"
    if ((TLS)); then
        tls_hint="  export RAFTKV_CACERT=$TLS_DIR/ca.pem RAFTKV_CERT=$TLS_DIR/client.pem RAFTKV_KEY=$TLS_DIR/client-key.pem
"
        grpcurl_tls="-cacert $TLS_DIR/ca.pem -cert $TLS_DIR/client.pem -key $TLS_DIR/client-key.pem"
        mode="TLS on both ports, client certificates required (certificates in $TLS_DIR)"
    fi
    cat <<EOF

raftkv cluster is up: leader is node $leader at $(addr_of "$leader") (term ${term:-?}).
  nodes: $(endpoints)
  data:  $DATA_ROOT (logs in $(for n in "${NODES[@]}"; do printf "n%s.log " "$n"; done))
  mode:  $mode

Talk to it (any node serves any request):
${tls_hint}  ${env_hint}$bin_hint put greeting hello
  ${env_hint}$bin_hint get greeting
  ${env_hint}$bin_hint status
  grpcurl $grpcurl_tls -format text -d 'key: "greeting"' $(addr_of 1) raftkv.v1.KV/Get
  curl -s http://$(metrics_addr_of 1)/metrics | grep ^raftkv_server     # also /livez, /readyz?verbose
Stop it with: ${script_env}scripts/cluster.sh stop
EOF
}

cmd_stop() {
    local n pid any=0
    local -a pids=()
    # Signal every node first so they shut down in parallel, then wait for each.
    for n in "${NODES[@]}"; do
        if pid=$(running_pid "$n"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids[n]=$pid
            any=1
        fi
    done
    if ((!any)); then
        echo "No node is running (data in $DATA_ROOT)."
        return 0
    fi
    for n in "${NODES[@]}"; do
        [[ -n ${pids[n]:-} ]] && finish_stop "$n" "${pids[n]}"
    done
    echo "Stopped. Data kept in $DATA_ROOT; 'scripts/cluster.sh start' resumes on it."
}

cmd_status() {
    local n pid
    ensure_bin_exists
    for n in "${NODES[@]}"; do
        if pid=$(running_pid "$n"); then
            echo "node $n: running, pid $pid, $(addr_of "$n")"
        else
            echo "node $n: not running ($(addr_of "$n"))"
        fi
    done
    echo
    if ((TLS)); then
        echo "TLS on both ports; clients pass: ${CLIENT_TLS[*]}"
        echo
    fi
    "$BIN" status --endpoints "$(endpoints)" --timeout-ms 2000 "${CLIENT_TLS[@]}"
}

cmd_kill() {
    local n=$1 pid
    check_node_arg "$n"
    if ! pid=$(running_pid "$n"); then
        echo "node $n: not running"
        return 0
    fi
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 5 || die "node $n (pid $pid) survived SIGKILL"
    rm -f "$(pidfile_of "$n")"
    echo "node $n: killed (SIGKILL, pid $pid)"
}

cmd_restart() {
    local n=$1 json
    check_node_arg "$n"
    ensure_bin
    stop_node "$n"
    spawn_node "$n"
    wait_answers "$n" || die "node $n did not come back (log above)"
    json=$(status_json "$(addr_of "$n")")
    echo "node $n: answering; role $(json_field "$json" "$n" role), term $(json_field "$json" "$n" term), leader $(json_field "$json" "$n" leader_id)"
}

cmd_add() {
    local n=$1 json
    [[ $n =~ ^[0-9]+$ ]] && ((n > 3)) || die "add: expected a new node number, 4 or more, got '$n'"
    ((TLS)) && die "add: a TLS cluster needs a certificate for node $n first; not supported by this script yet"
    [[ -d $(node_dir "$n") ]] && die "node $n exists already (its data is in $(node_dir "$n")); 'restart $n' starts it"
    [[ -e $DATA_ROOT/n$n.removed ]] && die "node $n was removed; ids are never reused: add another number"
    ensure_bin
    NODES+=("$n")
    spawn_node "$n"
    wait_answers "$n" || die "node $n did not come up (log above)"
    local deadline
    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    while :; do
        json=$(status_json "$(addr_of "$n")")
        if [[ $json == *'"role":"follower"'* || $json == *'"role":"leader"'* ]]; then
            break
        fi
        if (($(now_ms) >= deadline)); then
            tail_logs "$n"
            die "node $n did not become a voter within ${START_TIMEOUT}s (last status: ${json:-none})"
        fi
        sleep 0.2
    done
    echo "node $n: joined as a voter; role $(json_field "$json" "$n" role), term $(json_field "$json" "$n" term)"
    "$BIN" member list --endpoints "$(endpoints)" "${CLIENT_TLS[@]}"
}

# Makes the stopped cluster a new one from a backup file: every member's data directory is moved
# aside (to nN.before-restore, replacing an older one) and restored from FILE with the current
# members, then the cluster starts.
cmd_restore() {
    local file=$1 n peers=""
    [[ -f $file ]] || die "restore: no file $file"
    ensure_bin_exists
    for n in "${NODES[@]}"; do
        running_pid "$n" >/dev/null && die "restore: node $n is running; 'scripts/cluster.sh stop' first"
    done
    "$BIN" snapshot status "$file" >/dev/null || die "restore: $file does not check (above); nothing changed"
    for n in "${NODES[@]}"; do peers+="${peers:+,}$n=$(addr_of "$n")/$(peer_addr_of "$n")"; done
    for n in "${NODES[@]}"; do
        rm -rf "$(node_dir "$n").before-restore"
        [[ -e $(node_dir "$n") ]] && mv "$(node_dir "$n")" "$(node_dir "$n").before-restore"
        "$BIN" snapshot restore "$file" --data-dir "$(node_dir "$n")" --id "$n" --peers "$peers" ||
            die "restore: node $n (above); the old data is in $(node_dir "$n").before-restore"
    done
    cmd_start
}

cmd_remove() {
    local n=$1
    check_node_arg "$n"
    ensure_bin_exists
    local others=() m
    for m in "${NODES[@]}"; do [[ $m == "$n" ]] || others+=("$(addr_of "$m")"); done
    local eps
    eps=$(
        IFS=,
        echo "${others[*]}"
    )
    "$BIN" member remove "$n" --endpoints "$eps" "${CLIENT_TLS[@]}" || die "the cluster refused to remove node $n (above)"
    stop_node "$n"
    rm -rf "$(node_dir "$n")"
    touch "$DATA_ROOT/n$n.removed"
    echo "node $n: removed, stopped, data deleted (its log stays in $(log_of "$n"))"
}

main() {
    local cmd=${1:-help}
    case $cmd in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    kill)
        [[ $# -eq 2 ]] || die "usage: scripts/cluster.sh kill N"
        cmd_kill "$2"
        ;;
    restart)
        [[ $# -eq 2 ]] || die "usage: scripts/cluster.sh restart N"
        cmd_restart "$2"
        ;;
    add)
        [[ $# -eq 2 ]] || die "usage: scripts/cluster.sh add N"
        cmd_add "$2"
        ;;
    remove)
        [[ $# -eq 2 ]] || die "usage: scripts/cluster.sh remove N"
        cmd_remove "$2"
        ;;
    restore)
        [[ $# -eq 2 ]] || die "usage: scripts/cluster.sh restore FILE"
        cmd_restore "$2"
        ;;
    help | -h | --help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
