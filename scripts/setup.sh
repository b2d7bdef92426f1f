#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine (run as root): the Debian packages FUSE needs, a virtual
# environment in .venv, ufsgmem installed editable so the entry points of its built-in backends and exporters
# resolve (installing ufsgmem compiles its cffi binding of libfuse3's low-level API, hence libfuse3-dev and
# pkg-config).
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
# Reinstall when the packaging or a cffi module's C source changed, or a compiled module is missing (the
# editable install compiles ufsgmem/core/_core*.so and ufsgmem/fuse/_lowlevel*.so, against libfuse3, in
# place).
core_changed=0
for f in ufsgmem/core/*.c ufsgmem/core/*.h ufsgmem/core/_build.py; do
    if [ -e "$f" ] && [ "$f" -nt "$stamp" ]; then core_changed=1; fi
done
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$core_changed" = 1 ] \
        || [ setup.py -nt "$stamp" ] || [ ufsgmem/fuse/_build.py -nt "$stamp" ] \
        || ! ls ufsgmem/fuse/_lowlevel*.so >/dev/null 2>&1 || ! ls ufsgmem/core/_core*.so >/dev/null 2>&1; then
    echo "setup: installing ufsgmem (compiling its core and its libfuse3 binding) into .venv" >&2
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    # The built-in plugins used to be a second distribution, ufsgmem-plugins; a .venv made before still has
    # it, declaring the same names from modules that are gone (ufsgmem refuses such an ambiguous name).
    if .venv/bin/python -c 'import importlib.metadata as m; m.distribution("ufsgmem-plugins")' 2>/dev/null; then
        echo "setup: removing ufsgmem-plugins (its backends and exporters are part of ufsgmem now)" >&2
        .venv/bin/pip uninstall -q -y --disable-pip-version-check ufsgmem-plugins
    fi
    touch "$stamp"
fi
