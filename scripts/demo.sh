#!/usr/bin/env bash
# tailcache demo: a private MariaDB (binlog ROW/FULL) and memcached on free
# ports in a temp dir, the example schema and config, then the story from the
# README: an edit inside a transaction is NOT in the cache until COMMIT.
#
#   scripts/demo.sh            (as root on Debian 12; installs missing packages)
#   KEEP=1 scripts/demo.sh     (leave everything running and print how to poke at it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

need=()
[ -x /usr/sbin/mariadbd ] && [ -x /usr/bin/mariadb-install-db ] || need+=(mariadb-server)
[ -x /usr/bin/mariadb ] || need+=(mariadb-client)
[ -x /usr/bin/memcached ] || need+=(memcached)
if [ "${#need[@]}" -gt 0 ]; then
    say "Installing ${need[*]}"
    [ "$(id -u)" -eq 0 ] || die "run as root (or install ${need[*]} first)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" </dev/null
fi
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"

say "Building tailcache"
cargo build --quiet --locked
BIN="$PWD/target/debug/tailcache"

free_port() {
    local p
    for _ in $(seq 1 200); do
        # Below Linux's ephemeral range (32768+), where an outgoing connection's
        # local port refuses connections yet cannot be bound.
        p=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    die "no free port found"
}

DIR="$(mktemp -d /tmp/tailcache-demo.XXXXXX)"
MYPORT="$(free_port)"; MCPORT="$(free_port)"
SOCK="$DIR/mysql.sock"
PIDS=()
cleanup() {
    if [ "${KEEP:-}" = 1 ]; then return; fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

say "Starting a private MariaDB on 127.0.0.1:$MYPORT (binlog ROW, FULL row image) in $DIR"
USER_OPT=(); [ "$(id -u)" -eq 0 ] && USER_OPT=(--user=root)
mariadb-install-db --no-defaults "${USER_OPT[@]}" --datadir="$DIR/data" --auth-root-authentication-method=normal \
    --skip-test-db >"$DIR/install.log" 2>&1 || { cat "$DIR/install.log"; die "mariadb-install-db failed"; }
mariadbd --no-defaults "${USER_OPT[@]}" --datadir="$DIR/data" --socket="$SOCK" --port="$MYPORT" \
    --bind-address=127.0.0.1 --pid-file="$DIR/mysqld.pid" --log-error="$DIR/mysqld.err" --tmpdir="$DIR" \
    --server-id=1 --log-bin=mysql-bin --binlog-format=ROW --binlog-row-image=FULL --binlog-row-metadata=FULL \
    --character-set-server=utf8mb4 --innodb-buffer-pool-size=64M --skip-name-resolve &
PIDS+=($!)
for _ in $(seq 1 300); do
    mariadb --no-defaults -uroot --socket="$SOCK" -e 'SELECT 1' >/dev/null 2>&1 && break
    sleep 0.1
done
mariadb --no-defaults -uroot --socket="$SOCK" -e 'SELECT 1' >/dev/null || { tail "$DIR/mysqld.err"; die "MariaDB did not start"; }

MC_USER=(); [ "$(id -u)" -eq 0 ] && MC_USER=(-u root)
for attempt in 1 2 3 4 5; do
    say "Starting memcached on 127.0.0.1:$MCPORT"
    memcached -l 127.0.0.1 -p "$MCPORT" -U 0 -m 64 "${MC_USER[@]}" 2>"$DIR/memcached.err" &
    MCPID=$!
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$MCPORT") 2>/dev/null && break
        kill -0 "$MCPID" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$MCPID" 2>/dev/null; then PIDS+=("$MCPID"); break; fi
    cat "$DIR/memcached.err" >&2
    [ "$attempt" -lt 5 ] || die "memcached did not start"
    MCPORT="$(free_port)"   # the port was taken: try another
done

sql() { mariadb --no-defaults -uroot --socket="$SOCK" "$@"; }
say "Loading examples/schema.sql into appdb; creating the tailcache user"
sql -e "CREATE DATABASE appdb; CREATE USER 'tailcache'@'%' IDENTIFIED BY 'secret';
        GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'tailcache'@'%'; GRANT SELECT ON appdb.* TO 'tailcache'@'%';"
sql appdb <examples/schema.sql

CFG="$DIR/tailcache.toml"
sed -e "s#mysql://tailcache:secret@127.0.0.1:3306/appdb#mysql://tailcache:secret@127.0.0.1:$MYPORT/appdb#" \
    -e "s#servers = \[\"127.0.0.1:11211\"\]#servers = [\"127.0.0.1:$MCPORT\"]#" \
    -e "s#/var/lib/tailcache/state.db#$DIR/state.db#" config.example.toml >"$CFG"

say "tailcache check --config $CFG"
"$BIN" check --config "$CFG"

say "tailcache run --config $CFG   (log: $DIR/tailcache.log)"
"$BIN" run --config "$CFG" >"$DIR/tailcache.log" 2>&1 &
PIDS+=($!)

get() { "$BIN" get --config "$CFG" "$1" 2>/dev/null || true; }
wait_for() { # KEY PATTERN
    for _ in $(seq 1 200); do
        get "$1" | grep -q -- "$2" && return 0
        sleep 0.05
    done
    echo "--- tailcache log ---"; tail -20 "$DIR/tailcache.log"; die "timed out waiting for $1 to contain $2"
}
wait_for apps test0
echo "myapp:apps          = $(get apps)"
echo "myapp:app:test0     = $(get app:test0)"

say "BEGIN; UPDATE application SET name = 'test1' WHERE id = 1;   -- transaction still open"
FIFO="$DIR/tx"; mkfifo "$FIFO"
sql appdb <"$FIFO" &
TXPID=$!
exec 4>"$FIFO"
echo "BEGIN; UPDATE application SET name = 'test1' WHERE id = 1;" >&4
# Wait until the UPDATE has run inside the still-open transaction.
for _ in $(seq 1 200); do
    [ "$(sql -N -e 'SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_rows_modified > 0')" -gt 0 ] && break
    sleep 0.05
done
echo "in MariaDB, uncommitted:  $(sql -N -e 'SELECT trx_id, trx_state, trx_rows_modified FROM information_schema.INNODB_TRX' | head -1 | awk '{print "transaction " $1 " " $2 ", " $3 " row(s) modified"}')"
# Give tailcache every chance to (wrongly) publish it before looking.
sleep 0.3
echo "cache while uncommitted: myapp:apps = $(get apps)"
say "COMMIT;"
echo "COMMIT;" >&4
exec 4>&-
wait "$TXPID"
wait_for apps test1
echo "cache after COMMIT:      myapp:apps = $(get apps)"
echo "                         myapp:app:test1 = $(get app:test1)"
echo "                         myapp:app:test0 = $(get app:test0)"

say "UPDATE feature SET rollout = 50.00 WHERE code = 'new_checkout';"
sql appdb -e "UPDATE feature SET rollout = 50.00 WHERE code = 'new_checkout'"
wait_for rollout '"new_checkout":"50.00"'
echo "myapp:rollout = $(get rollout)"

say "Publishing latency, from the log:"
grep -E "published" "$DIR/tailcache.log" | tail -3 || true

if [ "${KEEP:-}" = 1 ]; then
    say "Still running (KEEP=1). Try:"
    echo "  mariadb --no-defaults -uroot --socket=$SOCK appdb"
    echo "  $BIN get --config $CFG apps"
    echo "  kill ${PIDS[*]}; rm -rf $DIR     # when done"
fi
say "Done."
