#!/usr/bin/env bash
# The FUSE and integrity tests against a build of the C extensions instrumented with AddressSanitizer and
# UndefinedBehaviorSanitizer. Arguments go to pytest (default: the FUSE, integrity and handle tests, the
# compiled hot path's and the memory cap's, and the core's model tests once the core is compiled).
#
# Why a copy of the tree: the normal install compiles the extensions in place (ufsgmem/**/_*.so); building
# them instrumented there would leave every later run, and `ufsgmem mount`, on the slow build. So the files
# git knows (tracked, and new ones it does not ignore) are copied to a directory under /tmp, every module
# of setup.py's cffi_modules is built there with UFSGMEM_SANITIZE=address,undefined (each _build.py reads
# it), and the tests run there with .venv's Python and PYTHONPATH pointing at the copy (the editable
# install's finder comes after PYTHONPATH, so `import ufsgmem` is the copy's, in the servers too).
#
# Python is not built with ASan, so the runtime is preloaded (LD_PRELOAD) and inherited by every process
# the tests start, the mount servers above all. Leaks are not checked: Python frees nothing at exit by
# design. A report in any process (the test run's or a server's, which only writes its log) goes to a file
# in a directory of this run, so any report fails the run and is printed, even if no test noticed.
#
# Arguments that name no test file (-x, -k EXPR, ...) keep the default selection. It takes about three
# minutes here. UFSGMEM_SANITIZERS=thread tries ThreadSanitizer instead (not part of CI: docs/reliability.md
# says what it gives here). UFSGMEM_PYTHONMALLOC=malloc also puts Python's small objects (below 512 bytes,
# pymalloc's otherwise) under ASan, so C writing past a small buffer Python allocated is caught too; the
# run is about half as fast again and the integrity test may miss its deadlines on a loaded machine.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
./scripts/setup.sh || exit 1
py=$repo/.venv/bin/python
sanitizers=${UFSGMEM_SANITIZERS:-address,undefined}

# The runtimes come with gcc (Debian's libasan8/libubsan1/libtsan2, dependencies of gcc-12).
preload=()
case ",$sanitizers," in *,address,*) preload+=(asan) ;; esac
case ",$sanitizers," in *,undefined,*) preload+=(ubsan) ;; esac
case ",$sanitizers," in *,thread,*) preload+=(tsan) ;; esac
libs=""
for lib in "${preload[@]}"; do
    path=$(gcc -print-file-name="lib$lib.so")
    if [ ! -e "$path" ]; then
        echo "sanitize.sh: gcc has no lib$lib.so (Debian: apt-get install gcc)" >&2
        exit 1
    fi
    libs="$libs${libs:+ }$(readlink -f "$path")"
done

tmp=$(mktemp -d /tmp/ufsgmem-sanitize.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
tree=$tmp/tree
reports=$tmp/reports
mkdir -p "$tree" "$reports"
chmod 0777 "$reports"  # tests that act as a second user start processes that must be able to report too

# The working tree as git sees it: tracked files (as they are now, edits included) and new files not ignored
# (outside a git checkout: everything but the virtual environments and what a build leaves).
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -
else
    tar --exclude='./.venv*' --exclude=./build --exclude='*.so' --exclude=__pycache__ -cf - .
fi | tar -xf - -C "$tree" || { echo "sanitize.sh: copying the tree failed" >&2; exit 1; }

start=$(date +%s)
echo "sanitize.sh: building the extensions with -fsanitize=$sanitizers in $tree" >&2
if ! (cd "$tree" && UFSGMEM_SANITIZE=$sanitizers "$py" setup.py -q build_ext --inplace >"$tmp/build.log" 2>&1); then
    cat "$tmp/build.log" >&2
    echo "sanitize.sh: the instrumented build failed" >&2
    exit 1
fi
# Every compiled module must be instrumented: a build that ignored the variable would pass everything.
modules=$(cd "$tree" && find ufsgmem -name '_*.so' | sort)
if [ -z "$modules" ]; then echo "sanitize.sh: the build produced no extension" >&2; exit 1; fi
for so in $modules; do
    needed=$(ldd "$tree/$so")  # not piped into grep -q: with pipefail, ldd's SIGPIPE would fail the check
    for lib in "${preload[@]}"; do
        if ! grep -q "lib$lib\.so" <<<"$needed"; then
            echo "sanitize.sh: $so is not linked with lib$lib: UFSGMEM_SANITIZE was not applied" >&2
            exit 1
        fi
    done
done
echo "sanitize.sh: built $(echo $modules) in $(( $(date +%s) - start )) s" >&2

# Arguments that name no test (options only, such as -x or -k EXPR) keep the default selection.
named=0
for arg in "$@"; do
    case $arg in -*) ;; *) if [ -e "$tree/${arg%%::*}" ]; then named=1; fi ;; esac
done
if [ "$named" = 0 ]; then
    set -- "$@" tests/test_fuse_*.py tests/test_integrity.py tests/test_handles.py
    # the compiled hot path's own cases (fastpath.c), where its fallbacks and charges are exercised
    if [ -e "$tree/tests/test_fastpath.py" ]; then
        set -- "$@" tests/test_fastpath.py tests/test_memory_cap.py
    fi
    # the core's model tests exercise the compiled rules directly, once there are compiled rules
    if grep -q "ufsgmem/core/_build.py" "$tree/setup.py"; then
        set -- "$@" tests/test_core_model.py tests/test_runmap.py
    fi
fi

# One report file per reporting process (report.PID), whatever process it is:
# - ASan: abort_on_error ends the process with SIGABRT (a server's death fails the test that used it);
#   verify_asan_link_order=0: the runtime is preloaded, not linked into python; detect_leaks=0: see above;
#   handle_sigbus=0: the tests expect SIGBUS (a private page) to kill the mapper, not a report.
# - UBSan (a runtime of its own with gcc): next to ASan it cannot write to log_path (its call to set the
#   path binds to ASan's copy), so its message goes to stderr (a server's: its log). It ends the process
#   with abort(), which ASan then reports (handle_abort=1) with the stack, in the report directory.
report="log_path=$reports/report:handle_sigbus=0"
asan_options="detect_leaks=0:abort_on_error=1:handle_abort=1:verify_asan_link_order=0:$report"
ubsan_options="halt_on_error=1:abort_on_error=1:print_stacktrace=1:$report"
tsan_options="halt_on_error=0:second_deadlock_stack=1:$report"
# The huge page pools before the run: a test run killed by a report cannot give back what it reserved.
pools() { "$py" -c 'from ufsgmem import hugepages as h
print(" ".join(str(h.read(s) if h.unavailable_reason(s) is None else -1) for s in (2 << 20, 1 << 30)))'; }
pools_before=$(pools)
start=$(date +%s)
(cd "$tree" && timeout --signal=INT --kill-after=60 12m env \
    PYTHONPATH="$tree" LD_PRELOAD="$libs" \
    ASAN_OPTIONS="$asan_options" UBSAN_OPTIONS="$ubsan_options" TSAN_OPTIONS="$tsan_options" \
    ${UFSGMEM_PYTHONMALLOC:+PYTHONMALLOC=$UFSGMEM_PYTHONMALLOC} \
    "$py" -m pytest -p no:cacheprovider "$@")
rc=$?
echo "sanitize.sh: the tests took $(( $(date +%s) - start )) s (pytest exit $rc)" >&2
if [ "$rc" -gt 128 ]; then
    # The test run itself was killed (a report in it aborts it): its fixtures did not unmount what it
    # mounted, nor give back huge pages. Its servers are the live ones running from the copy.
    "$py" - "$tree" $pools_before <<'PY' >&2
import sys
from ufsgmem import hugepages
from ufsgmem.fuse.server import read_pid
from ufsgmem.mounts import ufsgmem_mounts, unmount
tree, before = sys.argv[1], [int(n) for n in sys.argv[2:]]
for mountpoint in sorted(ufsgmem_mounts()):
    try:
        with open(f"/proc/{read_pid(mountpoint)}/environ", "rb") as f:
            ours = f"PYTHONPATH={tree}".encode() in f.read().split(b"\0")
    except (OSError, TypeError):
        continue
    if ours:
        print(f"sanitize.sh: unmounting {mountpoint}, left by the killed test run")
        unmount(mountpoint)
for size, count in zip((2 << 20, 1 << 30), before):
    if count >= 0 and hugepages.read(size) > count:
        print(f"sanitize.sh: giving back {hugepages.read(size) - count} huge pages of {size >> 20} MiB")
        hugepages.shrink(size, hugepages.read(size) - count)
PY
fi

status=0
if [ "$rc" = 5 ]; then echo "sanitize.sh: pytest collected no tests" >&2; status=1
elif [ "$rc" = 124 ]; then echo "sanitize.sh: the run took over 12 minutes and was stopped" >&2; status=1
elif [ "$rc" != 0 ]; then status=$rc
fi
if [ -n "$(ls -A "$reports")" ]; then
    for file in "$reports"/*; do
        echo "=== sanitize.sh: $(basename "$file") ===" >&2
        cat "$file" >&2
    done
    if grep -q "__ubsan_handle" "$reports"/*; then
        echo "sanitize.sh: a stack through __ubsan_handle_* is UBSan's finding (the handler names the check; its" \
             "message, 'runtime error: ...', went to that process's stderr)" >&2
    fi
    echo "sanitize.sh: the sanitizers reported $(ls "$reports" | wc -l) finding(s) (above)" >&2
    [ "$status" = 0 ] && status=1
fi
[ "$status" = 0 ] && echo "sanitize.sh: no sanitizer report" >&2
exit "$status"
