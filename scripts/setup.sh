#!/usr/bin/env bash
# Installs what forwarder's demo and tests need on a fresh machine, idempotently: Debian's
# Docker engine and static busybox, Node and npm, openssl, a Python venv at .venv with the
# project and its test tools, and the Node Forward receiver used by the tests (tests/peers).
# Sourced by ./test and ./demo.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false

step() { printf '\n==> %s\n' "$*"; }

# ---- system packages: a Docker engine and a static busybox for the test image -------------
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v docker >/dev/null 2>&1 || need+=(docker.io)
# The test image is imported from /bin/busybox, which must be statically linked.
if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" != "install ok installed" ]; then
    need+=(busybox-static)
fi
# podman + conmon write the CRI log format for the Kubernetes source's tests (runc: crun
# refuses hybrid cgroup hosts).
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v conmon >/dev/null 2>&1 || need+=(conmon)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    step "apt-get install ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
else
    step "system packages present (dockerd, docker, busybox-static, node, npm, openssl)"
fi

# ---- Python: a venv with the project and its test tools -----------------------------------
if [ ! -x .venv/bin/python ]; then
    step "python3 -m venv .venv"
    python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    step "pip install -e '.[test]'"
    .venv/bin/python -m pip install -q -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
else
    step "venv up to date with pyproject.toml"
fi

# ---- Node: the third-party Forward receiver (tests/peers) ---------------------------------
step "npm ci (tests/peers)"
(cd tests/peers && npm ci --no-audit --no-fund --loglevel=error)
