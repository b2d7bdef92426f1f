#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine (run as root): the Debian packages FUSE needs, a virtual
# environment in .venv, ufsgmem and its built-in plugins installed editable so their entry points resolve.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for pkg in fuse3 libfuse3-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt=1
done
if [ "$need_apt" = 1 ]; then
    echo "setup: installing Debian packages fuse3 libfuse3-dev pkg-config" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq fuse3 libfuse3-dev pkg-config >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv
fi
stamp=.venv/.ufsgmem-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ plugins/pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing ufsgmem and its plugins into .venv" >&2
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' -e ./plugins
    touch "$stamp"
fi
