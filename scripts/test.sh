#!/usr/bin/env bash
# Set everything up, then run the whole test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit 1
# CI allows 90 minutes and the suite takes about five. pytest-timeout fails any single test that hangs; this
# bounds the whole run as well: SIGINT makes pytest stop, run its fixtures' teardown (unmount, give huge
# pages back) and print what it saw, and SIGKILL follows if even that hangs.
timeout --signal=INT --kill-after=120 75m .venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" = 124 ]; then echo "test.sh: the test run took over 75 minutes and was stopped" >&2; fi
# pytest exits 5 when it collected no tests: for this suite that is a failure, not a pass.
if [ "$rc" = 5 ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
