"""Exporter ``json``: the layout as one JSON object (schema ``ufsgmem-layout/1``, see docs/plugins-exporters.md).

``mappings`` lists rows in guest-address order; a row is ``count`` adjacent leaves of ``block`` bytes, so
``size = block * count`` and the row maps guest ``[guest, guest + size)`` to physical ``[phys, phys + size)``.
Rows instead of single leaves keep a 1 TiB layout with fifty million 4 KiB leaves at a few megabytes.
The rows are formatted from numpy columns with one template, because ``json.dumps`` of 10^5–10^6 dicts
alone would eat the 2 s budget (design §5 in docs/design.md, P5); the header goes through ``json.dumps``.
"""

from __future__ import annotations

import json

from ufsgmem.exporter import LayoutExporter
from ufsgmem.layout import ATTRIBUTE_NAMES, perms_name

_ROW = '{"guest":%d,"phys":%d,"size":%d,"block":%d,"count":%d,"level":%d,"attribute":"%s","perms":"%s"}'


def header(layout) -> dict:
    summary = layout.summary()
    for key in ("counts_by_size", "counts_by_level"):
        summary[key] = {str(k): v for k, v in summary[key].items()}
    return {"format": "ufsgmem-layout/1", **summary}


class JsonExporter(LayoutExporter):
    name = "json"
    suffix = ".json"

    def render(self, layout, snapshot) -> bytes:
        head = json.dumps(header(layout))
        attrs = [ATTRIBUTE_NAMES[a] for a in range(3)]
        perms = {int(p): perms_name(int(p)) for p in set(layout.perms.tolist())}
        rows = zip(layout.guest.tolist(), layout.phys.tolist(), layout.bytes.tolist(), layout.size.tolist(),
                   layout.count.tolist(), layout.level.tolist(),
                   [attrs[a] for a in layout.attribute.tolist()], [perms[p] for p in layout.perms.tolist()])
        body = ",\n".join(map(_ROW.__mod__, rows))
        return (head[:-1] + ',"mappings":[\n' + body + "\n]}\n").encode()


#: The plugin object the entry point names (an instance, so `load_exporter(...).export(...)` just works).
EXPORTER = JsonExporter()
