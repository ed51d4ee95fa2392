#!/usr/bin/env bash
# Long fault-test runs: builds the release binary once, then runs `raftkv jepsen` RUNS times with
# consecutive seeds, stopping at the first run that does not pass.
#
# Usage: scripts/jepsen.sh [--runs N] [raftkv jepsen flags...]
#   e.g. scripts/jepsen.sh --time 600                       # 10 minutes, every fault kind, 3 nodes
#        scripts/jepsen.sh --runs 3 --nodes 5 --time 300 --seed 42
#        scripts/jepsen.sh --nemesis partition-leader,pause --time 120 --net proxy
#        scripts/jepsen.sh --nemesis membership,partition,kill --time 300   # nodes added and removed
# Every flag of `raftkv jepsen --help` is accepted. Default duration: 600 s. Results (history.jsonl,
# summary.json, node logs) go to ./jepsen-results/<seed>/ unless --out is given.
# Partitions use network namespaces when run as root (else a TCP proxy per link; the output says which).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PATH="$PATH:/usr/sbin:/sbin"

runs=1
args=()
while (($#)); do
    case $1 in
    --runs) runs=$2; shift 2 ;;
    --runs=*) runs=${1#--runs=}; shift ;;
    *) args+=("$1"); shift ;;
    esac
done
have() { local a; for a in "${args[@]}"; do [[ $a == "$1" || $a == "$1="* ]] && return 0; done; return 1; }
have --time || args+=(--time 600)
seed=$RANDOM$RANDOM
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
    --seed) seed=${args[i + 1]} ;;
    --seed=*) seed=${args[i]#--seed=} ;;
    esac
done

cargo build --release --quiet  # raftkv and the raftkv-jepsen it runs
bin=${CARGO_TARGET_DIR:-$REPO/target}/release/raftkv

for ((run = 0; run < runs; run++)); do
    s=$((seed + run))
    run_args=()
    skip=0
    for a in "${args[@]}"; do
        if ((skip)); then skip=0; continue; fi
        case $a in
        --seed) skip=1; continue ;;
        --seed=*) continue ;;
        esac
        run_args+=("$a")
    done
    out=()
    have --out || out=(--out "jepsen-results/$s")
    echo "==> run $((run + 1))/$runs, seed $s"
    code=0
    "$bin" jepsen --seed "$s" "${out[@]}" "${run_args[@]}" || code=$?
    if ((code != 0)); then
        echo "scripts/jepsen.sh: run with seed $s ended with exit $code (1 = anomaly, 2 = unknown)"
        exit "$code"
    fi
done
echo "scripts/jepsen.sh: all $runs run(s) passed"
