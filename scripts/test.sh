#!/usr/bin/env bash
# Set everything up, then run the whole test suite, then the sanitizer run (scripts/sanitize.sh). Extra
# arguments go to pytest, and then there is no sanitizer run.
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
if [ "$rc" = 5 ]; then echo "test.sh: pytest collected no tests" >&2; rc=1; fi
# The whole run (no arguments, as CI calls it) then runs the FUSE and integrity tests again against the C
# extensions built with AddressSanitizer and UndefinedBehaviorSanitizer (about a minute and a half here),
# even if the suite failed: both verdicts are printed, and either fails the run.
if [ "$#" = 0 ]; then
    ./scripts/sanitize.sh
    san=$?
    if [ "$san" != 0 ]; then echo "test.sh: the sanitizer run failed (scripts/sanitize.sh, exit $san)" >&2; fi
    if [ "$rc" = 0 ] && [ "$san" != 0 ]; then rc=$san; fi
fi
exit "$rc"
