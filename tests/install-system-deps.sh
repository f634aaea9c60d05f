#!/bin/sh
# Installs the Debian packages that the integration tests drive for real. Idempotent and quiet when
# everything is already there; needs root (or sudo) only when something is missing.
set -eu
need=""
command -v promtool >/dev/null 2>&1 || need="$need prometheus"
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
command -v haproxy >/dev/null 2>&1 || need="$need haproxy"
command -v systemd-socket-activate >/dev/null 2>&1 || need="$need systemd"
command -v logrotate >/dev/null 2>&1 || need="$need logrotate"
# tests/test_systemd.py boots a real systemd in a container and installs echod there with Debian's
# own /usr/bin/python3 (which needs its venv module).
command -v systemd-nspawn >/dev/null 2>&1 || need="$need systemd-container"
command -v nsenter >/dev/null 2>&1 || need="$need util-linux"
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need="$need python3-venv"
# The compiled build (README "Building"): a C compiler, and the headers of Debian's Python, which
# deploy/install.sh builds with (the pyenv Python the venvs use carries its own).
command -v cc >/dev/null 2>&1 || need="$need gcc"
[ -f /usr/include/python3.11/Python.h ] || need="$need python3-dev"
[ -z "$need" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages:$need"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# policy-rc.d keeps the packages' own services from starting; the tests start what they need.
$sudo apt-get install -y -qq --no-install-recommends $need >/dev/null
