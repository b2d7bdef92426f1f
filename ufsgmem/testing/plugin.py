"""The ufsgmem pytest plugin: fixtures for testing code that uses guest_memfd, on ufsgmem and on the kernel.

Installed with the package as the ``pytest11`` entry point ``ufsgmem``, so any pytest run in an environment
where ufsgmem is installed has it (``-p no:ufsgmem`` turns it off). It is inert until a test asks for one
of its fixtures: nothing is autouse, and nothing mounts, reserves or opens ``/dev/kvm`` unless a test
requests the fixture that does. Every name starts with ``ufsgmem_`` or ``gmem_``.

Fixtures:

``ufsgmem_mount`` (session)
    A ufsgmem mount on a fresh temporary directory (:class:`~ufsgmem.testing.UfsgmemMount`: ``.path``,
    ``.pid``), started the first time a test asks and unmounted at the end of the session, whatever
    happened. Skips with the reason when FUSE is not usable here.
``ufsgmem_file`` (function)
    ``ufsgmem_file(size, flags, *, backend=None, page_size=None, in_place_conversion=None, name=None)`` →
    :class:`~ufsgmem.testing.UfsgmemGmemFd` on that mount; every file (and the mappings it made) is closed
    and destroyed after the test.
``ufsgmem_hugepages`` (function)
    ``ufsgmem_hugepages(page_size="2M", count=1)`` grows the kernel's pool of that size by ``count`` pages
    and returns the number added; exactly those pages go back after the test (after the test's files are
    gone). Skips with the reason where the machine cannot (no such pool, not root, not enough memory).
``gmem_expect_sigbus`` (function)
    :func:`~ufsgmem.testing.expect_sigbus`: ``gmem_expect_sigbus(fn, *args)`` runs the access in a forked
    child and returns its :class:`~ufsgmem.testing.ChildOutcome`, true exactly when it died of SIGBUS.
``gmem_target`` (function, parametrised)
    Runs the test once per target: ``ufsgmem``, ``ufsgmem-no-inplace`` (a ufsgmem file playing a kernel
    with ``kvm.gmem_in_place_conversion=0``) and ``kernel`` (the real guest_memfd of ``/dev/kvm``). The value
    is a :class:`Target`: ``gmem_target.open(size, flags, **options)`` makes a file on it (closed after the
    test), ``.missing(feature)`` / ``.supports(feature)`` / ``.require(*features)`` ask what it can do. The
    kernel target skips when ``/dev/kvm`` cannot make a guest_memfd, the ufsgmem targets when FUSE is not
    usable.

``ufsgmem_run`` (function)
    ``ufsgmem_run(argv, *, kernel="v8", backend=None, mount=None, timeout=600)`` runs a program unmodified
    under ``ufsgmem run`` (its KVM guest_memfd calls served by a private mount that goes with it) and
    returns the ``subprocess.CompletedProcess`` (text output captured). Skips where FUSE is not usable.

Markers:

``@pytest.mark.gmem_requires("conversion", "pin", ...)``
    Skip each target that lacks a feature (:data:`~ufsgmem.testing.FEATURES`), with the target's own
    reason (e.g. the kernel's ENOTTY for ``KVM_SET_MEMORY_ATTRIBUTES2``). Conversion is asked of the
    target once per session, never assumed.
``@pytest.mark.gmem_targets("ufsgmem", "kernel")``
    Run on these targets only. (``@pytest.mark.parametrize("gmem_target", [...], indirect=True)`` works
    too.)

Caveat: SIGBUS from touching private memory kills the process that touches it; use
``gmem_expect_sigbus`` for every access that may fault.
"""

from __future__ import annotations

import contextlib

import pytest

from . import gmemfd as _g

_PROBES = pytest.StashKey[dict]()
_MARKERS = (
    "gmem_requires(*features): skip a gmem_target that lacks one of these features "
    "(conversion, pin, guest_access, hugetlb), with that target's reason",
    "gmem_targets(*targets): run a test that uses gmem_target on these targets only "
    "(ufsgmem, ufsgmem-no-inplace, kernel)",
)


def pytest_configure(config):
    for line in _MARKERS:
        config.addinivalue_line("markers", line)


def _parametrized_by_user(metafunc) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "gmem_target" in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    """Parametrise ``gmem_target`` over the targets (all, or those of ``gmem_targets``); nothing else."""
    if "gmem_target" not in metafunc.fixturenames or _parametrized_by_user(metafunc):
        return
    marker = metafunc.definition.get_closest_marker("gmem_targets")
    targets = tuple(marker.args) if marker and marker.args else _g.TARGETS
    unknown = [t for t in targets if t not in _g.TARGETS]
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: gmem_targets{unknown}: unknown target; "
                                f"use {', '.join(_g.TARGETS)}")
    metafunc.parametrize("gmem_target", targets, indirect=True, ids=list(targets))


# --- ufsgmem run -------------------------------------------------------------------------------------------
@pytest.fixture
def ufsgmem_run():
    """Run a program under ``ufsgmem run`` in a child process (so its signals and exit stay its own)."""
    reason = _g.fuse_unavailable_reason()
    if reason:
        pytest.skip(f"ufsgmem run needs FUSE: {reason}")

    def run(argv, *, kernel: str = "v8", backend: str | None = None, mount: str | None = None,
            timeout: float = 600.0):
        import subprocess
        import sys
        command = [sys.executable, "-m", "ufsgmem", "run", "--kernel", kernel] \
            + (["--backend", backend] if backend else []) + (["--mount", str(mount)] if mount else []) \
            + ["--", *map(str, argv)]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    return run


# --- the mount, files, huge pages -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def ufsgmem_mount():
    """A ufsgmem mount for the whole session (started on first use, always unmounted)."""
    reason = _g.fuse_unavailable_reason()
    if reason:
        pytest.skip(f"ufsgmem needs FUSE: {reason}")
    with _g.mounted() as mount:
        yield mount


def _close_all(files: list) -> None:
    while files:
        gmem = files.pop()
        gmem.close_mappings()  # a mapping a view still holds (e.g. a failed test's traceback) stays to the GC
        with contextlib.suppress(OSError):
            gmem.close()


@pytest.fixture
def ufsgmem_hugepages():
    """``reserve(page_size="2M", count=1) -> int``: huge pages added to the pool, given back after the test."""
    from .. import hugepages
    from ..address import format_size, parse_size

    with contextlib.ExitStack() as stack:
        def reserve(page_size: int | str = "2M", count: int = 1) -> int:
            size = parse_size(page_size)
            reason = hugepages.unavailable_reason(size)
            if reason:
                pytest.skip(reason)
            one = contextlib.ExitStack()
            got = one.enter_context(hugepages.reserved(size, count))
            if got < count:
                one.close()
                pytest.skip(f"the kernel gave {got} of {count} {format_size(size)} huge pages "
                            f"(not enough free contiguous memory)")
            stack.push(one)
            return got

        yield reserve


@pytest.fixture
def ufsgmem_file(ufsgmem_mount, ufsgmem_hugepages):
    """``make(size, flags, *, backend=None, page_size=None, in_place_conversion=None, name=None)`` → a new
    :class:`~ufsgmem.testing.UfsgmemGmemFd` on the session mount; closed and destroyed after the test.

    (It depends on ``ufsgmem_hugepages`` only so that files go before any huge pages the test reserved.)"""
    files: list = []

    def make(size, flags, **options):
        gmem = _g.UfsgmemGmemFd(ufsgmem_mount, size, flags, **options)
        files.append(gmem)
        return gmem

    try:
        yield make
    finally:
        _close_all(files)


@pytest.fixture
def gmem_expect_sigbus():
    """``expect_sigbus(fn, *args, timeout=30, **kwargs) -> ChildOutcome`` (true when the child died of SIGBUS)."""
    return _g.expect_sigbus


# --- targets --------------------------------------------------------------------------------------------
class Target:
    """One guest_memfd implementation a test runs on. Compares equal to its name (``gmem_target == "kernel"``)."""

    def __init__(self, name: str, mount: _g.UfsgmemMount | None, probes: dict):
        self.name = name
        self.mount = mount
        self._probes = probes
        self._files: list = []

    def open(self, size, flags, **options) -> _g.GmemFd:
        """``open_gmem(this target, size, flags, **options)``; closed (and destroyed) after the test."""
        gmem = _g.open_gmem(self.name, size, flags, mount=self.mount, **options)
        self._files.append(gmem)
        return gmem

    def missing(self, feature: str) -> str | None:
        """Why this target lacks ``feature`` (asked once per session), or None."""
        key = (self.name, feature)
        if key not in self._probes:
            self._probes[key] = _g.missing_feature(self.name, feature, mount=self.mount)
        return self._probes[key]

    def supports(self, feature: str) -> bool:
        return self.missing(feature) is None

    def require(self, *features: str) -> None:
        """Skip the test unless the target has every feature; the reason names each one it lacks, and why."""
        missing = [(feature, self.missing(feature)) for feature in features]
        reasons = [f"no {feature}: {reason}" for feature, reason in missing if reason]
        if reasons:
            pytest.skip(f"{self.name}: " + "; ".join(reasons))

    def close(self) -> None:
        _close_all(self._files)

    def __eq__(self, other) -> bool:
        return self.name == (other.name if isinstance(other, Target) else other)

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<gmem target {self.name}>"


@pytest.fixture
def gmem_target(request, ufsgmem_hugepages):
    """The target this run of the test is on (see :class:`Target`); parametrised by the plugin."""
    name = getattr(request, "param", None)
    if name is None:
        raise pytest.UsageError("gmem_target is parametrised by the ufsgmem plugin; do not request it "
                                "outside a test (or parametrise it with indirect=True)")
    if name not in _g.TARGETS:
        raise pytest.UsageError(f"unknown gmem_target {name!r}; use {', '.join(_g.TARGETS)}")
    probes = request.config.stash.setdefault(_PROBES, {})
    if name == "kernel":
        if ("kernel", None) not in probes:
            probes[("kernel", None)] = _g.kernel_unavailable_reason()
        if probes[("kernel", None)]:
            pytest.skip(f"kernel: {probes[('kernel', None)]}")
        mount = None
    else:
        mount = request.getfixturevalue("ufsgmem_mount")
    target = Target(name, mount, probes)
    try:
        for marker in request.node.iter_markers("gmem_requires"):
            target.require(*marker.args)
        yield target
    finally:
        target.close()

