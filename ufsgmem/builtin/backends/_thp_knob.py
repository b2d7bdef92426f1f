"""The shmem THP switch (``/sys/kernel/mm/transparent_hugepage/shmem_enabled``), borrowed and given back.

A memfd only gets transparent huge pages if this global knob allows it: with ``never`` (the default here)
MADV_HUGEPAGE on the mapping does nothing. ``advise`` is the least intrusive setting that works: only
mappings that ask with MADV_HUGEPAGE get huge pages, everybody else is unaffected.

Changing a global knob is a side effect on the whole machine, so the policy is narrow:

* only ``never`` is changed (to ``advise``); ``deny``/``force`` were set on purpose by an administrator, and
  ``always``/``within_size``/``advise`` already let MADV_HUGEPAGE work;
* the value found is remembered, and put back when the last THP backend on the machine closes, and only
  if the knob still says ``advise`` (if someone changed it meanwhile, theirs wins);
* "last on the machine", not "last in this process": several servers may run at once, so holders are
  recorded by pid in a state file under ``/run`` guarded by ``flock``; dead pids are pruned, so a crashed
  server does not pin the knob forever (the next close restores it).

Where the knob cannot be written (not root, read-only sysfs) nothing fails: :func:`acquire` returns a note
that ``info()`` passes on, and the backend honestly reports 4 KiB pages.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager

from ufsgmem.syscalls import pid_alive

KNOB = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
#: The PMD-size knob; ``inherit`` means "as the global knob says".
PMD_KNOB = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled"
STATE_DIR = "/run/ufsgmem"
STATE = os.path.join(STATE_DIR, "thp-shmem.json")

_held_here = 0  # THP backends open in this process


def current(path: str = KNOB) -> str | None:
    """The selected value (the one in brackets), or None if there is no such knob."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return text.strip() or None


def _write(value: str) -> None:
    with open(KNOB, "w") as f:
        f.write(value)


@contextmanager
def _locked_state():
    os.makedirs(STATE_DIR, exist_ok=True)
    with open(STATE + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = _load()
        state["holders"] = [p for p in state["holders"] if pid_alive(p)]
        yield state
        if state["holders"] or state["saved"] is not None:
            with open(STATE + ".tmp", "w") as f:
                json.dump(state, f)
            os.replace(STATE + ".tmp", STATE)
        elif os.path.exists(STATE):
            os.unlink(STATE)


def _load() -> dict:
    try:
        with open(STATE) as f:
            state = json.load(f)
        if isinstance(state, dict) and isinstance(state.get("holders"), list):
            return state
    except (OSError, ValueError):
        pass
    return {"saved": None, "holders": []}




def acquire() -> str:
    """Make MADV_HUGEPAGE effective for shmem if allowed; return a note saying what was done or why not."""
    global _held_here
    value = current()
    if value is None:
        return "this kernel has no shmem THP knob: 4K pages only"
    if value in ("deny",):
        return f"shmem_enabled is {value!r} (set by the administrator, left alone): 4K pages only"
    try:
        with _locked_state() as state:
            value = current()
            if value == "never":
                _write("advise")
                state["saved"] = "never"
            if os.getpid() not in state["holders"]:
                state["holders"].append(os.getpid())
    except OSError as exc:
        if value == "never":
            return f"shmem_enabled is 'never' and could not be set to 'advise' ({exc.strerror}): 4K pages only"
        return f"shmem_enabled is {value!r} (left as found)"
    _held_here += 1
    if value == "never":
        return "shmem_enabled was 'never': set to 'advise' while THP backends are open, restored after"
    return f"shmem_enabled is {value!r} (left as found)"


def release() -> None:
    """Drop this backend's hold; the last holder on the machine restores the value found."""
    global _held_here
    if _held_here == 0:
        return
    _held_here -= 1
    if _held_here:
        return
    try:
        with _locked_state() as state:
            if os.getpid() in state["holders"]:
                state["holders"].remove(os.getpid())
            if not state["holders"] and state["saved"] is not None:
                if current() == "advise":
                    _write(state["saved"])
                state["saved"] = None
    except OSError:
        pass  # nothing we could change before, nothing to restore now
