#!/usr/bin/env bash
# Start/stop a private MySQL server from the root built by scripts/mysql-root.sh.
#
#   scripts/mysql-start.sh start [DIR [PORT]]   initialize (if needed) and start
#   scripts/mysql-start.sh stop DIR [--rm]      shut down (and delete DIR)
#   scripts/mysql-start.sh client DIR [ARGS..]  the root's mysql client, as root
#                                               over TCP 127.0.0.1 (no TLS)
#
# The root is ${TAILCACHE_MYSQL_ROOT:-/var/cache/tailcache/mysql-root}. DIR is
# the server's private dir *inside* the root, e.g. /tmp/tc-abc (given either as
# that or as ROOT/tmp/tc-abc); `start` without DIR makes a fresh ROOT/tmp/tc-*.
# It holds data/ (datadir, binlogs), tmp/, mysqld.pid, mysql.sock, error.log.
# `start` prints shell assignments to eval:
#   MYSQL_DIR (host path) MYSQL_PORT MYSQL_PID MYSQL_SOCKET (host path)
# Root logs in as root@localhost with an empty password.
#
# Mounts: mysqld runs in its own private mount namespace (unshare --mount) in
# which /proc and /dev are bind-mounted into the root before the chroot. The
# mounts exist only in that namespace, so any number of servers can run from
# one root at once, nothing needs refcounting, and they vanish when mysqld
# exits, even if it is killed. The host never sees them (no mountpoint in ROOT).
set -euo pipefail

ROOT="${TAILCACHE_MYSQL_ROOT:-/var/cache/tailcache/mysql-root}"
ROOT="${ROOT%/}"
START_TIMEOUT="${TAILCACHE_MYSQL_START_TIMEOUT:-60}"
# TAILCACHE_MYSQLD_EXTRA_ARGS: more mysqld options (whitespace-separated),
# appended to both --initialize-insecure and the server.

die() { printf 'mysql-start.sh: ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,8p' "$0" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (chroot, unshare, mount)"
[ -x "$ROOT/usr/sbin/mysqld" ] || die "no mysqld in $ROOT: run scripts/mysql-root.sh first"

# DIR as given -> path inside the root.
inner_dir() {
    local d="${1%/}"
    case "$d" in
        "$ROOT"/*) d="${d#"$ROOT"}" ;;
        /*) ;;
        *) die "DIR must be absolute: $1" ;;
    esac
    if [ "$d" = / ] || [ -z "$d" ]; then die "bad DIR: $1"; fi
    printf '%s\n' "$d"
}

port_free() { [ -z "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
pick_port() {
    local p _
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 40000))
        port_free "$p" && { echo "$p"; return; }
    done
    die "no free port found"
}

mysqld_args() { # $1 = inner dir, $2 = port
    local d="$1"
    printf '%s\n' \
        --no-defaults --user=root \
        --datadir="$d/data" --tmpdir="$d/tmp" --secure-file-priv="$d/tmp" \
        --socket="$d/mysql.sock" --pid-file="$d/mysqld.pid" --log-error="$d/error.log" \
        --bind-address=127.0.0.1 --port="$2" --mysqlx=OFF \
        --server-id=1 --log-bin=binlog --binlog-format=ROW \
        --binlog-row-image=FULL --binlog-row-metadata=FULL \
        --gtid-mode=ON --enforce-gtid-consistency=ON \
        --performance-schema=OFF --innodb-buffer-pool-size=32M \
        --innodb-log-buffer-size=4M --innodb-redo-log-capacity=32M \
        --key-buffer-size=1M --temptable-max-ram=32M --table-open-cache=256 \
        --max-connections=100 \
        --innodb-doublewrite=OFF --innodb-flush-log-at-trx-commit=2 --sync-binlog=0
    # Extra options, split on whitespace, e.g. --binlog-transaction-compression=ON
    # shellcheck disable=SC2086
    printf '%s\n' ${TAILCACHE_MYSQLD_EXTRA_ARGS:-}
}

# in_root CMD...: runs CMD chrooted in ROOT with /proc and /dev bind-mounted
# in a private mount namespace. exec all the way down (unshare -> sh ->
# chroot -> CMD), so the PID of this command is CMD's.
# shellcheck disable=SC2016
IN_ROOT_SH='r=$1; shift
mount --bind /proc "$r/proc" && mount --rbind /dev "$r/dev" && exec chroot "$r" "$@"'
in_root() {
    unshare --mount --propagation private -- sh -c "$IN_ROOT_SH" in_root "$ROOT" "$@"
}

client() { # $1 = inner dir; runs the root's mysql client over TCP as root
    local d="$1"; shift
    local port
    port=$(cat "$ROOT$d/port")
    chroot "$ROOT" /usr/bin/mysql --no-defaults --protocol=TCP -h127.0.0.1 -P"$port" \
        -uroot --ssl-mode=DISABLED --get-server-public-key "$@"
}

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { print b - a }'; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

start() {
    local d port="${2:-}" pid t0 deadline _ args
    if [ -n "${1:-}" ]; then
        d=$(inner_dir "$1")
    else
        mkdir -p "$ROOT/tmp"
        d=$(mktemp -d "$ROOT/tmp/tc-XXXXXX"); d="${d#"$ROOT"}"
    fi
    local h="$ROOT$d"
    if [ -f "$h/mysqld.pid" ] && alive "$(cat "$h/mysqld.pid")"; then
        die "a server already runs in $h (pid $(cat "$h/mysqld.pid"))"
    fi
    mkdir -p "$h/tmp"
    chmod 755 "$h"

    if [ ! -d "$h/data/mysql" ]; then
        rm -rf "$h/data"
        t0=$(date +%s.%N)
        mapfile -t args < <(mysqld_args "$d" 0)
        if ! in_root /usr/sbin/mysqld "${args[@]}" --log-error="$d/init.log" \
                --initialize-insecure </dev/null >"$h/init.out" 2>&1; then
            tail -n 20 "$h/init.log" "$h/init.out" >&2 2>/dev/null
            die "mysqld --initialize-insecure failed (log: $h/init.log)"
        fi
        printf 'initialized %s in %.2fs\n' "$h/data" "$(elapsed "$t0")" >&2
    fi

    for _ in 1 2 3 4 5; do
        [ -n "$port" ] || port=$(pick_port)
        echo "$port" >"$h/port"
        rm -f "$h/mysqld.pid"
        : >"$h/error.log"
        t0=$(date +%s.%N)
        # setsid: the server outlives this script and its terminal.
        mapfile -t args < <(mysqld_args "$d" "$port")
        setsid unshare --mount --propagation private -- sh -c "$IN_ROOT_SH" \
            in_root "$ROOT" /usr/sbin/mysqld "${args[@]}" \
            </dev/null >"$h/mysqld.out" 2>&1 &
        pid=$!
        deadline=$(($(date +%s) + START_TIMEOUT))
        while :; do
            if ! alive "$pid"; then
                wait "$pid" 2>/dev/null || true
                if [ -z "${2:-}" ] && grep -q 'Address already in use\|Do you already have another mysqld server running on port' "$h/error.log"; then
                    port=; continue 2 # lost a race for the port: pick another
                fi
                tail -n 20 "$h/error.log" "$h/mysqld.out" >&2
                die "mysqld exited during startup (log: $h/error.log)"
            fi
            # Ask for the datadir: another server may hold the port (a race
            # with a port we thought free), and answering would not be ours.
            if [ "$(client "$d" -N -e 'SELECT @@datadir' 2>/dev/null)" = "$d/data/" ]; then
                break 2
            fi
            if [ "$(date +%s)" -ge "$deadline" ]; then
                kill -KILL "$pid" 2>/dev/null || true
                tail -n 20 "$h/error.log" >&2
                die "mysqld did not accept connections within ${START_TIMEOUT}s"
            fi
            sleep 0.05
        done
    done
    alive "$pid" || die "could not start mysqld"
    printf 'started pid %s on 127.0.0.1:%s in %.2fs\n' "$pid" "$port" \
        "$(elapsed "$t0")" >&2
    printf 'MYSQL_DIR=%s\nMYSQL_PORT=%s\nMYSQL_PID=%s\nMYSQL_SOCKET=%s\n' \
        "$h" "$port" "$pid" "$h/mysql.sock"
}

stop() {
    local d h pid deadline
    d=$(inner_dir "$1"); h="$ROOT$d"
    [ -d "$h" ] || die "no such dir: $h"
    pid=$(cat "$h/mysqld.pid" 2>/dev/null || true)
    if alive "$pid"; then
        kill -TERM "$pid" # clean shutdown, same as SHUTDOWN / mysqladmin shutdown
        deadline=$(($(date +%s) + 60))
        while alive "$pid"; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "mysqld $pid ignored SIGTERM for 60s; killing" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
            sleep 0.05
        done
        echo "stopped pid $pid" >&2
    else
        echo "no server running in $h" >&2
    fi
    if [ "${2:-}" = --rm ]; then
        [ "$(awk -v d="$h/" 'index($2, d) == 1' /proc/mounts)" = "" ] || die "something is mounted below $h"
        rm -rf --one-file-system "$h"
    fi
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) [ $# -ge 2 ] || usage; shift; stop "$@" ;;
    client) [ $# -ge 2 ] || usage; d=$(inner_dir "$2"); shift 2; client "$d" "$@" ;;
    *) usage ;;
esac
