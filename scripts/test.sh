#!/usr/bin/env bash
# The whole test suite, as CI runs it: unit tests, then the integration tests
# against MariaDB and again against MySQL.
#
#   scripts/test.sh
#
# Run from anywhere, as root (or with sudo) on Debian 12. It installs what is
# missing (apt: mariadb-server, mariadb-client, memcached, debootstrap; it
# never starts or restarts a system service), builds the MySQL 9.7 root with
# scripts/mysql-root.sh (once; ~1 min), then runs
#
#   cargo test --locked --features failpoints                  # unit + it, MariaDB
#   TAILCACHE_TEST_FLAVOR=mysql cargo test --locked --features failpoints --test it  # it, MySQL
#
# (`failpoints` compiles in the crash points that tests/it/crash.rs needs;
# a release build has none.)
#
# (each with --no-fail-fast). Both runs always run; the script fails if
# either fails, and ends with a
# summary of what was tested. The tests start their own servers on free
# ports; TAILCACHE_TEST_MYSQL_URL is ignored here (it would replace both).
# Extra arguments go to both cargo test runs (e.g. `-- --test-threads=1`).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-always}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s\n' "$*"; }
die() { printf '\nscripts/test.sh: ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: cannot install packages or build the MySQL root"
    SUDO="sudo"
fi
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"

T0=$(date +%s)

# binary -> Debian package providing it
declare -A PKG_FOR=(
    [/usr/sbin/mariadbd]=mariadb-server
    [/usr/bin/mariadb-install-db]=mariadb-server
    [/usr/bin/mariadb]=mariadb-client
    [/usr/bin/memcached]=memcached
    [/usr/sbin/debootstrap]=debootstrap
    [/usr/bin/systemd-analyze]=systemd
)
missing=()
for bin in "${!PKG_FOR[@]}"; do
    if [ ! -x "$bin" ]; then
        pkg="${PKG_FOR[$bin]}"
        echo "missing: $bin (package $pkg)"
        case " ${missing[*]-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "Installing: ${missing[*]}"
    $SUDO apt-get update -q || die "apt-get update failed"
    # The mariadb-server postinst may start (or fail to start) a system
    # service on 3306; the tests never use it and we never restart it.
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null ||
        die "apt-get install ${missing[*]} failed (see the output above)"
    for bin in "${!PKG_FOR[@]}"; do
        [ -x "$bin" ] || die "$bin still missing after installing ${missing[*]}"
    done
else
    log "All packages present; nothing to install"
fi

# The Python readers the tests run (tests/python/): Debian's clients and
# Django, plus dogpile.cache's current release from PyPI in a venv that
# sees the Debian packages. The tests use $TAILCACHE_TEST_PYTHON.
PY_DEBS=(python3-venv python3-pylibmc python3-pymemcache python3-django python3-msgpack python3-memcache)
py_missing=()
for pkg in "${PY_DEBS[@]}"; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || py_missing+=("$pkg")
done
if [ "${#py_missing[@]}" -gt 0 ]; then
    log "Installing the Python readers: ${py_missing[*]}"
    $SUDO apt-get update -q || die "apt-get update failed"
    $SUDO apt-get install -y -q --no-install-recommends "${py_missing[@]}" </dev/null ||
        die "apt-get install ${py_missing[*]} failed (see the output above)"
fi
PY_VENV="${TAILCACHE_PY_VENV:-/var/cache/tailcache/pyenv}"
if [ ! -x "$PY_VENV/bin/python" ] || ! "$PY_VENV/bin/python" -c 'import dogpile.cache' 2>/dev/null; then
    log "Python venv for dogpile.cache at $PY_VENV"
    $SUDO mkdir -p "$(dirname "$PY_VENV")"
    $SUDO /usr/bin/python3 -m venv --system-site-packages "$PY_VENV" || die "python3 -m venv $PY_VENV failed"
    $SUDO "$PY_VENV/bin/python" -m pip install -q --upgrade dogpile.cache ||
        die "pip install dogpile.cache into $PY_VENV failed (needs PyPI)"
fi
export TAILCACHE_TEST_PYTHON="$PY_VENV/bin/python"
"$TAILCACHE_TEST_PYTHON" -c 'import pylibmc, pymemcache, django, msgpack, memcache, dogpile.cache' ||
    die "$TAILCACHE_TEST_PYTHON lacks a Python reader package"

MYSQL_ROOT="${TAILCACHE_MYSQL_ROOT:-/var/cache/tailcache/mysql-root}"
export TAILCACHE_MYSQL_ROOT="$MYSQL_ROOT"
log "MySQL root at $MYSQL_ROOT (scripts/mysql-root.sh)"
$SUDO scripts/mysql-root.sh "$MYSQL_ROOT" || die "scripts/mysql-root.sh failed (see the output above)"
T_SETUP=$(($(date +%s) - T0))

if [ -n "${TAILCACHE_TEST_MYSQL_URL:-}" ]; then
    echo "note: TAILCACHE_TEST_MYSQL_URL is set; ignored (the suite starts its own MariaDB and MySQL)"
    unset TAILCACHE_TEST_MYSQL_URL
fi

RUST_V=$(rustc --version)
MARIADB_V=$(/usr/sbin/mariadbd --version)
MYSQL_V=$(chroot "$MYSQL_ROOT" /usr/sbin/mysqld --no-defaults --version)
MEMCACHED_V=$(/usr/bin/memcached -V)
log "Versions"
printf '%s\n' "$RUST_V" "$(cargo --version)" "$MARIADB_V" "$MYSQL_V (chroot $MYSQL_ROOT)" "$MEMCACHED_V"
"$TAILCACHE_TEST_PYTHON" -c 'import sys, django, pymemcache, pylibmc, msgpack, memcache, dogpile; print("Python", sys.version.split()[0], "Django", django.get_version(), "pymemcache", pymemcache.__version__, "pylibmc", pylibmc.__version__, "msgpack", ".".join(map(str, msgpack.version)), "python-memcached", memcache.__version__, "dogpile.cache", dogpile.__version__)'

# run NAME CMD...: runs CMD, records its verdict and duration.
declare -a SUMMARY=()
FAILED=0
run() {
    local name="$1" t rc=0
    shift
    log "$name: $*"
    t=$(date +%s)
    "$@" || rc=$?
    t=$(($(date +%s) - t))
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("ok    $name (${t}s)")
    else
        SUMMARY+=("FAIL  $name (${t}s, exit $rc)")
        FAILED=1
    fi
}

run "unit + integration tests against MariaDB" \
    env TAILCACHE_TEST_FLAVOR=mariadb cargo test --locked --features failpoints --no-fail-fast "$@"
run "integration tests against MySQL" \
    env TAILCACHE_TEST_FLAVOR=mysql cargo test --locked --features failpoints --no-fail-fast --test it "$@"

log "Summary"
echo "servers tested:"
echo "  MariaDB: $MARIADB_V"
echo "  MySQL:   $MYSQL_V"
echo "  memcached: $MEMCACHED_V; $RUST_V"
printf '  %s\n' "${SUMMARY[@]}"
echo "total $(($(date +%s) - T0))s (setup ${T_SETUP}s)"
if [ "$FAILED" -ne 0 ]; then
    echo "RESULT: FAILED"
    exit 1
fi
echo "RESULT: ok"
