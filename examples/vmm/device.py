"""The example's device model: a separate process that maps guest RAM and "DMA-reads" the buffers it is given.

Run by ``vmm.py`` as ``python device.py MNT/NAME/mem``. Like a vhost-user backend or a device model in its
own process, it maps the guest_memfd ``mem`` file itself (``MAP_SHARED``, read-only) and reads guest
buffers through that mapping with ordinary CPU loads. It speaks one JSON object per line:

* it starts with ``{"ready": true, "pid": PID}``;
* ``{"op": "dma_read", "offset": O, "size": S}`` (file offsets) is answered with
  ``{"ok": true, "size": S, "values": {"0x5a": 65536, ...}}``: how often each byte value occurred.

A buffer that is *private* cannot be read: the first load from it raises SIGBUS in this process, which
then dies (``faulthandler`` first writes "Fatal Python error: Bus error" and the Python stack to stderr).
That is the point of guest_memfd: a device handed private memory is refused by the hardware (here: by the
mapping), not trusted to behave. The VMM sees the death, reports it and starts a fresh device.

On end of input (the VMM closed the pipe or died) the device exits.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import mmap
import os
import sys


def main(mem_path: str) -> int:
    faulthandler.enable()  # on SIGBUS: the stack to stderr, then die of the signal as usual
    fd = os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC)
    size = os.fstat(fd).st_size
    # Map once, early: every mmap(2) of mem costs a drop of that file's page cache (docs/architecture.md).
    ram = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    os.close(fd)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") != "dma_read":
            print(json.dumps({"ok": False, "error": f"unknown request {request!r}"}), flush=True)
            continue
        offset, length = int(request["offset"]), int(request["size"])
        if not (0 <= offset and length > 0 and offset + length <= size):
            print(json.dumps({"ok": False, "error": f"[{offset:#x}, +{length:#x}) is outside guest RAM"}),
                  flush=True)
            continue
        data = ram[offset:offset + length]  # the DMA: CPU loads through our mapping (SIGBUS if private)
        counts = collections.Counter(data)
        print(json.dumps({"ok": True, "size": len(data),
                          "values": {f"{value:#04x}": n for value, n in sorted(counts.items())}}), flush=True)
    ram.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: device.py MOUNTPOINT/NAME/mem", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
