"""The ``ufsgmem`` command: one subcommand per module in :mod:`ufsgmem.commands`.

Each command module defines ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``. Commands are
listed here in the order ``--help`` shows them; a module not listed is still found, after these.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import __version__, commands
from .errors import GuestMemfdError, PluginError

ORDER = ["demo", "mount", "umount", "create", "destroy", "convert", "status", "run", "layout", "policy", "bench"]


def _command_names() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ufsgmem",
        description="guest_memfd semantics in userspace: a FUSE filesystem of guest_memfd files, "
                    "shared/private conversion, huge-page backends and stage-2 layouts. "
                    "Sizes and offsets accept decimal, 0x hex and K/M/G/T suffixes.",
    )
    parser.add_argument("--version", action="version", version=f"ufsgmem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_names():
        module = importlib.import_module(f"{commands.__name__}.{name}")
        doc = (module.__doc__ or module.HELP).strip()
        p = sub.add_parser(name, help=module.HELP, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (GuestMemfdError, PluginError) as exc:
        print(f"ufsgmem {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ufsgmem {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
