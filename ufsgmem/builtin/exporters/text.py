"""Exporter ``text``: a summary (counts by leaf size, level and attribute) and a table of the rows.

Each table row is ``count`` adjacent leaves of one size (see docs/layout.md); addresses are hex, sizes in
K/M/G/T. Meant for people and for ``grep``; machines should read the ``json`` exporter.
"""

from __future__ import annotations

from ufsgmem.address import format_size
from ufsgmem.exporter import LayoutExporter
from ufsgmem.layout import ATTRIBUTE_NAMES, perms_name

_ROW = "%#018x  %#018x  %6s  %9d  %5d  %-7s  %s"


def _bytes(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}".replace(".00 ", " ")
    return f"{n} B"


def summary_lines(layout) -> list[str]:
    meta, arch = layout.meta, layout.arch
    slot = meta["memslot"]
    lines = [
        f"view {layout.view}   arch {arch}",
        f"file {meta.get('name') or '-'}: {_bytes(meta['size'])}, backend {meta['backend']}, "
        f"folio {format_size(meta['folio_size'])}; memslot guest {slot['guest_base']:#x} <- offset "
        f"{slot['offset']:#x}, {_bytes(slot['size'])}",
        f"mapped {_bytes(layout.mapped_bytes)} in {layout.leaf_count} leaves ({len(layout)} rows); "
        f"unmappable here {_bytes(meta['unmapped_bytes'])}",
        "",
        "  leaf size  level  contiguous  leaves",
    ]
    by_size = layout.counts_by_size()
    for leaf in reversed(arch.leaves):
        n = by_size.get(leaf.size, 0)
        hint = f"{leaf.span} x {format_size(leaf.descriptor_size)}" if leaf.contiguous else "-"
        lines.append(f"  {format_size(leaf.size):>9}  {leaf.level:>5}  {hint:>10}  {n:>6}")
    by_attr = layout.counts_by_attribute()
    lines.append("  leaves by attribute: " + ", ".join(f"{a} {by_attr.get(a, 0)}" for a in ATTRIBUTE_NAMES))
    return lines


class TextExporter(LayoutExporter):
    name = "text"
    suffix = ".txt"

    def render(self, layout, snapshot) -> bytes:
        lines = summary_lines(layout)
        lines += ["", f"{'guest':>18}  {'phys':>18}  {'leaf':>6}  {'count':>9}  level  {'attr':<7}  perms"]
        sizes = {s: format_size(s) for s in layout.arch.sizes}
        perms = {int(p): perms_name(int(p)) for p in set(layout.perms.tolist())}
        rows = zip(layout.guest.tolist(), layout.phys.tolist(), [sizes[s] for s in layout.size.tolist()],
                   layout.count.tolist(), layout.level.tolist(),
                   [ATTRIBUTE_NAMES[a] for a in layout.attribute.tolist()],
                   [perms[p] for p in layout.perms.tolist()])
        return ("\n".join(lines) + "\n" + "\n".join(map(_ROW.__mod__, rows)) + "\n").encode()


#: The plugin object the entry point names (an instance, so `load_exporter(...).export(...)` just works).
EXPORTER = TextExporter()
