#!/bin/sh
# Install echod from the checkout this script lives in:
#
#   ${PREFIX:-/opt/echod}/venv          virtual environment with echod pip-installed (not editable)
#   ${PREFIX:-/opt/echod}/README.md     the documentation the unit's Documentation= points at
#   ${CONFDIR:-/etc/echod}/echod.toml   copied from config/echod.toml only if absent (never overwritten)
#   ${UNITDIR:-/etc/systemd/system}/echod.service, echod.socket (paths rewritten for PREFIX/CONFDIR)
#   ${LOGROTATEDIR:-/etc/logrotate.d}/echod
#
# Then, only when systemd is PID 1 and the units went to /etc/systemd/system (a unit directory that
# systemd does not search would make `enable` fail): systemctl daemon-reload && systemctl enable --now
# echod. echod.socket is installed but not enabled (see the trade-off in the unit itself).
#
#   deploy/install.sh                     install or update; a second run changes nothing
#   deploy/install.sh --uninstall         remove what was installed, keep the configuration
#   deploy/install.sh --uninstall --purge remove the configuration too
#
# Environment: PREFIX, CONFDIR, UNITDIR, LOGROTATEDIR as above; PYTHON (default python3, 3.11+) creates
# the venv, and must not live under /root or /home (ProtectHome=yes hides them from the unit; an unset
# PYTHON then falls back to /usr/bin/python3); ordinary PIP_* variables (PIP_INDEX_URL, PIP_NO_INDEX,
# PIP_FIND_LINKS ...) reach pip; ECHOD_COMPILE (auto, 1 or 0; setup.py) chooses the mypyc-compiled data
# path: by default compiled where a C compiler and Python's headers are, interpreted otherwise
# (`echod --version` says which).
set -eu

PREFIX=${PREFIX:-/opt/echod}
CONFDIR=${CONFDIR:-/etc/echod}
UNITDIR=${UNITDIR:-/etc/systemd/system}
LOGROTATEDIR=${LOGROTATEDIR:-/etc/logrotate.d}
PYTHON_SET=${PYTHON:+yes}
PYTHON=${PYTHON:-python3}
SYSTEM_UNITDIR=/etc/systemd/system

SRC=$(cd "$(dirname "$0")/.." && pwd)
VENV=$PREFIX/venv
STAMP=$VENV/.echod-source

say() { printf 'echod-install: %s\n' "$*"; }
die() { printf 'echod-install: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
    exit "$1"
}

uninstall=no
purge=no
for arg in "$@"; do
    case $arg in
        --uninstall) uninstall=yes ;;
        --purge) purge=yes ;;
        -h | --help) usage 0 ;;
        *) printf 'echod-install: unknown argument: %s\n' "$arg" >&2; usage 2 >&2 ;;
    esac
done
[ "$purge" = no ] || [ "$uninstall" = yes ] || die "--purge only goes with --uninstall"

# sd_booted(3): systemd is PID 1 exactly when /run/systemd/system exists.
systemd_running() {
    [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]
}

manage_units() {
    if ! systemd_running; then
        say "systemd is not PID 1 here: not running systemctl ($*)"
        return 1
    fi
    if [ "$UNITDIR" != "$SYSTEM_UNITDIR" ]; then
        say "units are in $UNITDIR, which systemd does not search: not running systemctl ($*)"
        return 1
    fi
    return 0
}

# install_file SOURCE DEST MODE: copy only when the content differs, so a second run touches nothing.
changed=no
install_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        say "unchanged: $2"
        return 0
    fi
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.tmp.$$"
    chmod "$3" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
    changed=yes
    say "installed: $2"
}

# A digest of everything that goes into the package: pip runs only when it changed.
source_digest() {
    (
        cd "$SRC"
        find pyproject.toml setup.py README.md service -type f ! -path '*/__pycache__/*' ! -path '*.egg-info/*' \
            ! -name '*.pyc' | LC_ALL=C sort | xargs sha256sum
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
        printf 'ECHOD_COMPILE=%s\n' "${ECHOD_COMPILE:-auto}"
    ) | sha256sum | cut -d' ' -f1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/echod-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

if [ "$uninstall" = yes ]; then
    if manage_units "disable --now echod.socket echod.service"; then
        systemctl disable --now echod.socket echod.service || true
    fi
    for file in "$UNITDIR/echod.service" "$UNITDIR/echod.socket" "$LOGROTATEDIR/echod" "$PREFIX/README.md"; do
        if [ -e "$file" ]; then
            rm -f "$file"
            say "removed: $file"
        fi
    done
    if [ -d "$VENV" ]; then
        rm -rf "$VENV"
        say "removed: $VENV"
    fi
    rmdir "$PREFIX" 2>/dev/null || true
    if manage_units "daemon-reload"; then
        systemctl daemon-reload
    fi
    if [ "$purge" = yes ]; then
        if [ -e "$CONFDIR/echod.toml" ]; then
            rm -f "$CONFDIR/echod.toml"
            say "removed: $CONFDIR/echod.toml"
        fi
        rmdir "$CONFDIR" 2>/dev/null || true
    elif [ -e "$CONFDIR/echod.toml" ]; then
        say "kept: $CONFDIR/echod.toml (remove it with --uninstall --purge)"
    fi
    exit 0
fi

[ -f "$SRC/pyproject.toml" ] && [ -d "$SRC/service/echod" ] || die "$SRC is not an echod checkout"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3.11+)"
# The venv links to its base interpreter, which echod.service must be able to execute: with
# ProtectHome=yes (and DynamicUser=yes) nothing under /root or /home exists for it, so a venv made from
# a pyenv Python, say, fails every start with status=203/EXEC (so would an `echod start` that drops to
# daemon.user). An unset PYTHON falls back to the system's /usr/bin/python3; an explicit one is refused.
hidden_home() {
    for path in $("$1" -c 'import os, sys; print(sys.base_prefix, os.path.realpath(sys.executable))'); do
        case $path in /root | /root/* | /home | /home/*) echo "$path"; return ;; esac
    done
}
usable() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
hidden=$(hidden_home "$PYTHON")
if [ -n "$hidden" ]; then
    why="$PYTHON is $hidden, under /root or /home, which echod.service cannot see (ProtectHome=yes): the unit would fail with status=203/EXEC"
    if [ -z "${PYTHON_SET:-}" ] && [ -x /usr/bin/python3 ] && usable /usr/bin/python3 &&
        [ -z "$(hidden_home /usr/bin/python3)" ]; then
        say "$why; using /usr/bin/python3 instead"
        PYTHON=/usr/bin/python3
    else
        die "$why; use a system interpreter (3.11+ with venv), e.g. PYTHON=/usr/bin/python3 $0"
    fi
fi
usable "$PYTHON" || die "$PYTHON is not Python 3.11+ with the venv module (Debian: apt install python3-venv)"
# A venv left by an older install from such an interpreter is rebuilt.
if [ -x "$VENV/bin/python" ] && [ -n "$(hidden_home "$VENV/bin/python")" ]; then
    rm -rf "$VENV"
    say "removed: $VENV (its interpreter is under /root or /home)"
fi

# 1. The virtual environment and the package.
if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$PREFIX"
    "$PYTHON" -m venv "$VENV"
    say "created: $VENV"
fi
digest=$(source_digest)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$digest" ] && [ -x "$VENV/bin/echod" ]; then
    say "unchanged: $VENV (echod $("$VENV/bin/echod" --version | cut -d' ' -f2))"
else
    # Build from a clean copy, so that the build leaves nothing (build/, *.egg-info) in the checkout.
    mkdir "$WORK/src"
    cp -R "$SRC/pyproject.toml" "$SRC/setup.py" "$SRC/README.md" "$SRC/service" "$WORK/src/"
    find "$WORK/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        "$WORK/src"
    printf '%s\n' "$digest" >"$STAMP"
    changed=yes
    say "installed: echod $("$VENV/bin/echod" --version | cut -d' ' -f2-) into $VENV"
fi
install_file "$SRC/README.md" "$PREFIX/README.md" 0644

# 2. The configuration: an operator's file is never replaced, only checked.
if [ -e "$CONFDIR/echod.toml" ]; then
    say "kept: $CONFDIR/echod.toml (not overwritten)"
else
    mkdir -p "$CONFDIR"
    chmod 0755 "$CONFDIR"
    install_file "$SRC/config/echod.toml" "$CONFDIR/echod.toml" 0644
fi
"$VENV/bin/echod" check-config --config "$CONFDIR/echod.toml" >/dev/null \
    || die "$CONFDIR/echod.toml is invalid (see above); fix it, then run this again"

# 3. Units, with the paths of this installation, and the logrotate file.
for unit in echod.service echod.socket; do
    sed -e "s#/opt/echod/venv/#$VENV/#g" -e "s#/opt/echod/README.md#$PREFIX/README.md#g" \
        -e "s#/etc/echod/echod.toml#$CONFDIR/echod.toml#g" "$SRC/systemd/$unit" >"$WORK/$unit"
    install_file "$WORK/$unit" "$UNITDIR/$unit" 0644
done
install_file "$SRC/deploy/logrotate/echod" "$LOGROTATEDIR/echod" 0644

# 4. Start it, where systemd can.
if manage_units "daemon-reload && enable --now echod"; then
    was_active=no
    systemctl --quiet is-active echod.service && was_active=yes
    if [ "$changed" = yes ]; then
        systemctl daemon-reload
    fi
    systemctl enable --now echod.service
    if [ "$changed" = yes ] && [ "$was_active" = yes ]; then
        # enable --now leaves a running old version alone; an update must take effect.
        systemctl restart echod.service
    fi
    say "echod.service enabled and running"
else
    say "start it yourself: $VENV/bin/echod start --config $CONFDIR/echod.toml"
fi
