"""The allocator-policy workbench: replay guest_memfd traces against backends and compare what they do.

* :mod:`.trace` — the trace format (JSON lines) and its validation;
* :mod:`.generators` — synthetic CC, pKVM and virtio-bounce workloads;
* :mod:`.replay` — one trace against one backend/policy on the in-process core;
* :mod:`.report` — the comparison table, JSON and plots.

The command is ``ufsgmem policy`` (:mod:`ufsgmem.commands.policy`); docs/policy.md explains it.
"""

from .generators import WORKLOADS as WORKLOADS, generate as generate
from .replay import BackendSpec as BackendSpec, RunResult as RunResult, replay as replay
from .trace import Record as Record, Trace as Trace, TraceError as TraceError, load as load

__all__ = ["WORKLOADS", "generate", "BackendSpec", "RunResult", "replay", "Record", "Trace", "TraceError",
           "load"]
