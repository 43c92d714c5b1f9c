#!/usr/bin/env bash
# Checks the systemd files in deploy/ without a running systemd:
#   * `systemd-analyze verify deploy/tailcache.service` prints nothing
#     (it exits 0 even on unknown keys, so any output is a failure);
#   * `systemd-analyze security --offline=yes` exposure is at most 2.0;
#   * every Exec*= command line is accepted by the built binary's CLI;
#   * `systemd-sysusers --dry-run deploy/sysusers.d/tailcache.conf` parses.
# Needs systemd-analyze (Debian: apt-get install systemd; PID 1 may be anything).
# TAILCACHE_BIN: the binary to check the command lines against (default:
# target/release or target/debug, built with `cargo build` if neither exists).
# Called by `cargo test --test it systemd` (tests/it/systemd.rs); CI can call it alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UNIT=deploy/tailcache.service
SYSUSERS=deploy/sysusers.d/tailcache.conf
MAX_EXPOSURE=20   # systemd's 0-100 scale: 20 = "2.0"
INSTALLED=/usr/local/bin/tailcache

fail() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

command -v systemd-analyze >/dev/null || fail "systemd-analyze not found: apt-get install systemd"

bin="${TAILCACHE_BIN:-}"
if [ -z "$bin" ]; then
    for b in target/release/tailcache target/debug/tailcache; do
        if [ -x "$b" ]; then bin="$PWD/$b"; break; fi
    done
fi
if [ -z "$bin" ]; then
    cargo build --quiet --locked
    bin="$PWD/target/debug/tailcache"
fi
[ -x "$bin" ] || fail "$bin is not an executable"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# verify also checks that ExecStart= exists: point the copy at the built binary.
sed "s#$INSTALLED#$bin#g" "$UNIT" > "$tmp/tailcache.service"
out="$(systemd-analyze verify "$tmp/tailcache.service" 2>&1)" || fail "systemd-analyze verify $UNIT: $out"
[ -z "$out" ] || fail "systemd-analyze verify $UNIT is not clean:
$out"
echo "ok   systemd-analyze verify $UNIT"

report="$(systemd-analyze security --offline=yes "$UNIT" 2>&1)" || true
score="$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
[ -n "$score" ] || fail "no exposure level from systemd-analyze security --offline=yes $UNIT:
$report"
if ! systemd-analyze security --offline=yes --threshold="$MAX_EXPOSURE" "$UNIT" >/dev/null 2>&1; then
    printf '%s\n' "$report" | grep -v '^✓' >&2
    fail "exposure $score is above $((MAX_EXPOSURE / 10)).$((MAX_EXPOSURE % 10))"
fi
echo "ok   systemd-analyze security --offline=yes $UNIT: exposure $score"

# The command lines must still parse (flags are checked by clap; --help
# last, so a renamed or removed flag is an error, and nothing runs).
while IFS= read -r line; do
    key="${line%%=*}"
    cmd="${line#*=}"
    read -r -a argv <<< "$cmd"
    [ "${argv[0]}" = "$INSTALLED" ] || fail "$key= runs ${argv[0]}, expected $INSTALLED"
    if ! err="$("$bin" "${argv[@]:1}" --help 2>&1 >/dev/null)"; then
        fail "$key=$cmd is not accepted by $bin: $err"
    fi
    echo "ok   $key=$cmd"
done < <(grep -E '^Exec[A-Za-z]*=' "$UNIT")

out="$(systemd-sysusers --dry-run "$PWD/$SYSUSERS" 2>&1)" || fail "systemd-sysusers --dry-run $SYSUSERS: $out"
if printf '%s\n' "$out" | grep -qiE 'fail|ignoring|invalid|error'; then
    fail "systemd-sysusers --dry-run $SYSUSERS: $out"
fi
echo "ok   systemd-sysusers --dry-run $SYSUSERS"
