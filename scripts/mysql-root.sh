#!/usr/bin/env bash
# Build a Debian sid root holding MySQL 9.x server + client, for tests.
#
#   scripts/mysql-root.sh [ROOT]
#
# ROOT defaults to ${TAILCACHE_MYSQL_ROOT:-/var/cache/tailcache/mysql-root}.
# Needs root (debootstrap, chroot). Debian 12 ships no MySQL and sid's
# mysql-server-core needs glibc >= 2.38, so it runs chrooted in this root;
# scripts/mysql-start.sh starts a private server from it.
#
# Idempotent: a ROOT whose usr/sbin/mysqld runs is left alone (its version is
# printed). Otherwise the root is built in a temp dir next to ROOT and renamed
# into place only once mysqld runs, so a half-built root never looks done.
# Concurrent runs serialize on ROOT.lock.
#
# Environment:
#   TAILCACHE_MYSQL_ROOT    where the root goes (if no ROOT argument)
#   TAILCACHE_DEBIAN_MIRROR Debian mirror (default http://deb.debian.org/debian)
#   TAILCACHE_DEBIAN_SUITE  suite (default sid)
set -euo pipefail

ROOT="${1:-${TAILCACHE_MYSQL_ROOT:-/var/cache/tailcache/mysql-root}}"
MIRROR="${TAILCACHE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${TAILCACHE_DEBIAN_SUITE:-sid}"
PKGS=(mysql-server-core mysql-client-core)

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'mysql-root.sh: ERROR: %s\n' "$*" >&2; exit 1; }

case "$ROOT" in /*) ;; *) ROOT="$PWD/$ROOT" ;; esac
ROOT="${ROOT%/}"
if [ -z "$ROOT" ] || [ "$ROOT" = / ]; then die "refusing to use / as the root"; fi

# Prints the version of ROOT's mysqld and succeeds if it runs.
root_ok() {
    [ -x "$1/usr/sbin/mysqld" ] || return 1
    chroot "$1" /usr/sbin/mysqld --no-defaults --version 2>/dev/null
}

if [ "$(id -u)" -eq 0 ] && root_ok "$ROOT"; then
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and chroot need it)"

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock 9
# Another run may have finished while we waited for the lock.
if root_ok "$ROOT"; then
    exit 0
fi

if ! command -v debootstrap >/dev/null; then
    say "Installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 ||
        die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        debootstrap </dev/null >&2 || die "apt-get install debootstrap failed"
fi

START=$(date +%s)
TMP=$(mktemp -d "$(dirname "$ROOT")/.$(basename "$ROOT").build.XXXXXX")
chmod 755 "$TMP" # mktemp makes it 0700; apt's _apt user must get in

# Unmount anything left mounted below $1 (deepest first), then delete it
# without crossing into other filesystems: a stale bind mount of /dev or /proc
# must never be deleted through.
remove_tree() {
    local dir="$1" m
    [ -d "$dir" ] || return 0
    awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    if awk -v d="$dir/" 'index($2, d) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        die "still mounted below $dir; not deleting it"
    fi
    rm -rf --one-file-system "$dir"
}
cleanup() {
    local rc=$?
    if [ -n "${TMP:-}" ] && [ -d "$TMP" ]; then
        [ "$rc" -eq 0 ] || say "build failed; removing $TMP"
        remove_tree "$TMP"
    fi
}
trap cleanup EXIT

say "debootstrap --variant=minbase $SUITE into $TMP (from $MIRROR)"
if ! debootstrap --variant=minbase "$SUITE" "$TMP" "$MIRROR" >"$TMP.debootstrap.log" 2>&1; then
    tail -n 30 "$TMP.debootstrap.log" >&2
    [ -f "$TMP/debootstrap/debootstrap.log" ] && tail -n 30 "$TMP/debootstrap/debootstrap.log" >&2
    rm -f "$TMP.debootstrap.log"
    die "debootstrap failed (is $MIRROR reachable? does this debootstrap know '$SUITE'?)"
fi
rm -f "$TMP.debootstrap.log"

# Nothing installed in the root may start a service.
printf '#!/bin/sh\nexit 101\n' >"$TMP/usr/sbin/policy-rc.d"
chmod 755 "$TMP/usr/sbin/policy-rc.d"
# No docs, man pages or translations (~45 MB); keep MySQL's error messages,
# which live in /usr/share/mysql.
cat >"$TMP/etc/dpkg/dpkg.cfg.d/01-tailcache-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
EOF
rm -rf "$TMP"/usr/share/doc/* "$TMP"/usr/share/man/* "$TMP"/usr/share/info/* "$TMP"/usr/share/locale/*
# debootstrap writes no /etc/hosts; give the root a minimal one.
[ -e "$TMP/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$TMP/etc/hosts"

# Runs a command in the root with /proc and /dev bind-mounted, in a private
# mount namespace: the mounts disappear by themselves when the command ends.
in_root() {
    # shellcheck disable=SC2016
    unshare --mount --propagation private -- sh -c '
        r=$1; shift
        mount --bind /proc "$r/proc" && mount --rbind /dev "$r/dev" &&
        exec chroot "$r" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 HOME=/root "$@"
    ' in_root "$TMP" "$@"
}

APT_OPTS=(-q -o Dpkg::Use-Pty=0)
say "apt-get update in the root"
if ! in_root apt-get "${APT_OPTS[@]}" update >&2; then
    say "apt-get update failed; retrying with Acquire::Check-Valid-Until=false"
    APT_OPTS+=(-o Acquire::Check-Valid-Until=false)
    in_root apt-get "${APT_OPTS[@]}" update >&2 || die "apt-get update in the root failed"
fi
say "apt-get install ${PKGS[*]}"
in_root apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${PKGS[@]}" </dev/null >&2 ||
    die "apt-get install ${PKGS[*]} in the root failed (does $SUITE still have them?)"
in_root apt-get "${APT_OPTS[@]}" clean >&2 || true
rm -rf "$TMP"/var/lib/apt/lists/* "$TMP"/var/cache/apt/*.bin

# Directories mysqld's compiled-in defaults point at; mysql-start.sh overrides
# them, but a bare `mysqld` should not fail on their absence.
mkdir -p "$TMP/var/lib/mysql-files" "$TMP/var/lib/mysql" "$TMP/run/mysqld"
chmod 1777 "$TMP/tmp"

root_ok "$TMP" >/dev/null || die "mysqld in the new root does not run: $(chroot "$TMP" /usr/sbin/mysqld --no-defaults --version 2>&1 | tail -n 3)"

# Swap into place. A broken old root (no working mysqld) is moved aside first.
if [ -e "$ROOT" ] || [ -L "$ROOT" ]; then
    OLD=$(mktemp -d "$(dirname "$ROOT")/.$(basename "$ROOT").old.XXXXXX")
    say "replacing broken $ROOT"
    mv -T "$ROOT" "$OLD/root"
    remove_tree "$OLD"
fi
mv -T "$TMP" "$ROOT"
TMP=
say "built $ROOT in $(($(date +%s) - START))s ($(du -sh --one-file-system "$ROOT" | cut -f1))"
root_ok "$ROOT"
