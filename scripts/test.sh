#!/usr/bin/env bash
# Set everything up, then run the whole test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
# pytest exits 5 when it collected no tests: for this suite that is a failure, not a pass.
if [ "$rc" = 5 ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
