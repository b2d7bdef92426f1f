"""Which package may import which: the dependency directions docs/README.md's code map promises.

Read from the source with ``ast`` (every import, including those inside functions), so a lazy import that
points the wrong way fails here as surely as a top-level one:

* only ``cli.py`` and ``commands/`` import ``ufsgmem.commands``: the library never needs the command line
  (starting and stopping a mount is ``ufsgmem.mounts``, which the commands call);
* the client and the testing kit do not import the FUSE server (they talk to a mount through its files,
  and ask ``ufsgmem.mounts`` whether a path is one);
* the control protocol's magic is spelled in exactly one module, ``ufsgmem/protocol.py``: the server, the
  client, the testing kit, the conformance suite and the bench all take the wire format from there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ufsgmem"
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute names (``from X import y`` counts as X and X.y, since y
    may be a submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return found


def importers_of(target: str, allowed=lambda name: False) -> list[str]:
    return [f"{module_name(p)} imports {m}" for p in MODULES if not allowed(module_name(p))
            for m in sorted(imported(p)) if m == target or m.startswith(target + ".")]


def test_the_walk_sees_relative_and_lazy_imports():
    """The checker itself: it resolves ``from .. import x`` and sees imports inside functions."""
    assert "ufsgmem.commands" in imported(PACKAGE / "cli.py")  # from . import __version__, commands
    assert "ufsgmem.mounts.mounted" in imported(PACKAGE / "testing" / "gmemfd.py")  # lazy, in mounted()


def test_only_the_command_line_imports_commands():
    def command_line(name: str) -> bool:
        return name == "ufsgmem.cli" or name == "ufsgmem.commands" or name.startswith("ufsgmem.commands.")
    assert importers_of("ufsgmem.commands", command_line) == []


@pytest.mark.parametrize("client", ["ufsgmem.client", "ufsgmem.testing"])
def test_clients_do_not_import_the_server(client):
    def other(name: str) -> bool:
        return not (name == client or name.startswith(client + "."))
    assert importers_of("ufsgmem.fuse.server", other) == []



def test_the_wire_magic_has_one_owner():
    spelled = [module_name(p) for p in MODULES if b'"UGM1"' in p.read_bytes() or b"'UGM1'" in p.read_bytes()]
    assert spelled == ["ufsgmem.protocol"]
