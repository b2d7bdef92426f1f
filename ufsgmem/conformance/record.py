"""The kernel's observations, kept: a versioned record per kernel, so every case runs on every machine.

ufsgmem exists for machines whose kernel has no guest_memfd, and those are exactly the machines where the
differential suite has nothing live to compare with. So the kernel's side of every case is written down
once, on a machine whose kernel has guest_memfd (``python -m ufsgmem.conformance --record``), into
``ufsgmem/conformance/records/linux-<release>.json``, and read back wherever the live kernel is absent.
Where it is present, the live kernel is the reference and the record is checked against it: a case where
the two differ is a *kernel change* (:mod:`.runner` marks it; the CLI, the tests and ``docs/compat.md``
show it), never silently absorbed.

A record holds the kernel release, the date, the machine, the KVM capabilities the suite saw on its
default VM, where the record came from (``provenance``: ``recorded`` by the suite, or ``transcribed``
from an earlier generated report, with its source), and one entry per case name:

* ``{"observation": ...}`` — the observation exactly as :func:`.runner.observe` returns it (a dict of
  short strings, or an ``n/a (...)`` string), so a recorded entry compares with a live one by equality;
* ``{"observation": {...}, "known_keys": [...]}`` — only these keys of the observation are known (the
  source lost the rest); the comparison then looks at exactly these keys on both sides;
* ``{"observation": null, "unrecovered": "why"}`` — nothing is known; the case still runs on ufsgmem (a
  crash still fails) but its verdict says it had no reference.

Caveat: a record is only as current as its cases. An entry whose case changed what it observes is stale;
record again (the tests check that every case has an entry and every entry a case, not what a changed
case would now observe).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass, field
from typing import Callable

from .. import kvm
from .cases import CASES, Case

FORMAT = 1
RECORDS_DIR = os.path.join(os.path.dirname(__file__), "records")

#: The capabilities worth keeping with a record: what decides which cases a kernel can run
#: (KVM_CHECK_EXTENSION on the suite's default VM).
CAPABILITIES = {"KVM_CAP_MEMORY_ATTRIBUTES": 233, "KVM_CAP_GUEST_MEMFD": 234, "KVM_CAP_GUEST_MEMFD_FLAGS": 244,
                "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES": 250}


class RecordError(ValueError):
    """A record file that is not a record of this format (what is wrong, and which file)."""


@dataclass
class Entry:
    observation: dict | str | None
    known_keys: tuple[str, ...] | None = None  # None: the whole observation is known
    unrecovered: str | None = None  # why nothing is known (observation is None)

    def to_json(self) -> dict:
        out: dict = {"observation": self.observation}
        if self.known_keys is not None:
            out["known_keys"] = list(self.known_keys)
        if self.unrecovered is not None:
            out["unrecovered"] = self.unrecovered
        return out

    @classmethod
    def from_json(cls, name: str, data: dict) -> "Entry":
        observation = data.get("observation")
        if not (observation is None or isinstance(observation, (dict, str))):
            raise RecordError(f"{name}: an observation is a dict or a string, not {type(observation).__name__}")
        if observation is None and not data.get("unrecovered"):
            raise RecordError(f"{name}: an entry without an observation must say why (unrecovered)")
        keys = data.get("known_keys")
        if keys is not None and not (isinstance(observation, dict) and set(keys) == set(observation)):
            raise RecordError(f"{name}: known_keys must be exactly the keys of a dict observation")
        return cls(observation, None if keys is None else tuple(keys), data.get("unrecovered"))


@dataclass
class Record:
    release: str  # os.uname().release of the kernel observed
    date: str  # ISO date (UTC) of the observation
    machine: str
    capabilities: dict[str, int | None]  # None: not known
    provenance: dict  # {"method": "recorded" | "transcribed", "source": str, "notes": [str, ...]}
    entries: dict[str, Entry] = field(default_factory=dict)
    path: str | None = None

    kind = "record"

    @property
    def label(self) -> str:
        return f"record {self.release} ({self.date})"


    def entry(self, case: Case) -> Entry:
        return self.entries.get(case.name) or Entry(None, unrecovered="no entry for this case in the record")

    def to_json(self) -> dict:
        return {"format": FORMAT, "kernel": {"release": self.release, "machine": self.machine},
                "date": self.date, "capabilities": self.capabilities, "provenance": self.provenance,
                "cases": {name: e.to_json() for name, e in self.entries.items()}}

    @classmethod
    def from_json(cls, data: dict, path: str | None = None) -> "Record":
        where = path or "record"
        if data.get("format") != FORMAT:
            raise RecordError(f"{where}: format {data.get('format')!r}, this suite reads format {FORMAT}")
        try:
            kernel, cases = data["kernel"], data["cases"]
            return cls(kernel["release"], data["date"], kernel["machine"], dict(data["capabilities"]),
                       dict(data["provenance"]),
                       {name: Entry.from_json(f"{where}: {name}", e) for name, e in cases.items()}, path)
        except KeyError as exc:
            raise RecordError(f"{where}: missing {exc}") from None

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1, ensure_ascii=False)
            f.write("\n")
        self.path = path


def load(path: str) -> Record:
    with open(path) as f:
        return Record.from_json(json.load(f), path)


def available(directory: str = RECORDS_DIR) -> list[Record]:
    """Every record kept in ``directory``, oldest first."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".json")) if os.path.isdir(directory) else []
    return sorted((load(os.path.join(directory, n)) for n in names), key=lambda r: (r.date, r.release))


def select(release: str | None = None, directory: str = RECORDS_DIR) -> Record:
    """The record of ``release`` if one is kept, else the newest one (the kernel changes are then shown)."""
    records = available(directory)
    if not records:
        raise RecordError(f"no kernel record in {directory}: record one with "
                          "`python -m ufsgmem.conformance --record` on a kernel that has guest_memfd")
    same = [r for r in records if r.release == release]
    return (same or records)[-1]


def default_path(release: str, directory: str = RECORDS_DIR) -> str:
    return os.path.join(directory, f"linux-{release}.json")


# --- recording ---------------------------------------------------------------------------------------
def live_capabilities() -> dict[str, int]:
    """KVM_CHECK_EXTENSION of :data:`CAPABILITIES` on a fresh default VM (the VM the kernel subject uses)."""
    with kvm.Kvm() as k, k.create_vm(0) as vm:
        return {name: vm.check_extension(number) for name, number in CAPABILITIES.items()}


def capture(factory: Callable, cases: list[Case] = CASES, *, release: str, date: str | None = None,
            capabilities: dict | None = None, provenance: dict | None = None) -> Record:
    """Observe every case on fresh subjects from ``factory`` and keep the observations as a record.

    The kernel is recorded with ``factory=KernelSubject``; any subject can be (the tests record the core
    and load it back). A case that raised is no observation of the kernel: refused, with its error.
    """
    from .runner import observe  # the runner judges against records; it imports this module

    entries = {}
    for case in cases:
        observation = observe(case, factory)
        if isinstance(observation, dict) and "raised" in observation:
            raise RecordError(f"{case.name} raised while recording ({observation['raised']}); "
                              "a record holds observations only")
        entries[case.name] = Entry(observation)
    return Record(release, date or datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                  platform.machine(), capabilities or {}, provenance or {}, entries)


def record_live_kernel(path: str | None = None) -> Record:
    """Record the live kernel's guest_memfd (``--record``) and save it; raises RecordError without one."""
    from .subjects import KernelSubject

    reason = kvm.skip_reason()
    if reason:
        raise RecordError(f"the live kernel guest_memfd is unavailable: {reason}")
    release = os.uname().release
    record = capture(KernelSubject, release=release, capabilities=live_capabilities(),
                     provenance={"method": "recorded", "source": "python -m ufsgmem.conformance --record",
                                 "notes": []})
    record.save(path or default_path(release))
    return record
