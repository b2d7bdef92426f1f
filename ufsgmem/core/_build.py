"""Build script for ``ufsgmem.core._core``: the compiled core, through cffi (API mode), without FUSE.

Run at install time (``setup.py``'s ``cffi_modules``). Its cdef is made from the headers themselves
(comments, ``#ifndef``/``#endif``/``#include`` and the header guard dropped, every ``#define NAME value``
turned into ``#define NAME ...`` so cffi takes the value from the compiler), so the headers stay the one
owner of the declarations. ``ufsgmem/fuse/_build.py`` compiles the same :data:`PARTS` into the server's
module, so that a map made here can be handed to it by address: same source, same layout.

``UFSGMEM_SANITIZE=address,undefined`` (any comma list ``-fsanitize`` takes) builds with those sanitizers,
frame pointers and debug info; the process then needs the sanitizer runtime preloaded (e.g.
``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

#: The parts of the core, each a ``<name>.h`` declaring it and a ``<name>.c`` implementing it, in the order
#: their headers go into the cdef (a header after those it includes).
PARTS = ("runmap", "gmem")

HEADERS = tuple(HERE / f"{name}.h" for name in PARTS)
SOURCES = tuple(HERE / f"{name}.c" for name in PARTS)

CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"]


def cdef_of(header: str) -> str:
    """The declarations of a header as cffi's cdef wants them."""
    text = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if re.match(r"#\s*(ifndef|ifdef|endif|include|if|else|pragma)\b", stripped):
            continue
        define = re.match(r"#\s*define\s+(\w+)(\s+\S.*)?$", stripped)
        if define:
            if define.group(2):  # a constant: cffi reads its value from the compiled code
                lines.append(f"#define {define.group(1)} ...")
            continue  # the header guard
        lines.append(line)
    return "\n".join(lines)


def sanitize_flags() -> list[str]:
    """``-fsanitize=<list> -fno-omit-frame-pointer -g`` when ``UFSGMEM_SANITIZE`` asks for any, and with
    ``undefined`` ``-fno-sanitize-recover=undefined``: the first finding stops the process, as in
    ``ufsgmem/fuse/_build.py`` (a finding that only prints would let a test pass with it)."""
    names = [s.strip() for s in os.environ.get("UFSGMEM_SANITIZE", "").split(",") if s.strip()]
    if not names:
        return []
    flags = [f"-fsanitize={','.join(names)}", "-fno-omit-frame-pointer", "-g"]
    return flags + (["-fno-sanitize-recover=undefined"] if "undefined" in names else [])


def _path(path: Path) -> str:
    """Relative to the working directory when inside it: setuptools refuses absolute source paths in a wheel
    build (which runs from the project root). Absolute otherwise, for ffibuilder.compile(tmpdir=...) run
    from outside the project (compile changes into tmpdir, where a relative path would not resolve)."""
    cwd = Path.cwd().resolve()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


ffibuilder = FFI()
ffibuilder.cdef("\n".join(cdef_of(h.read_text()) for h in HEADERS))
ffibuilder.set_source(
    "ufsgmem.core._core",
    "\n".join(f'#include "{h.name}"' for h in HEADERS),
    sources=[_path(s) for s in SOURCES],
    include_dirs=[_path(HERE)],
    extra_compile_args=CFLAGS + sanitize_flags(),
    extra_link_args=sanitize_flags(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
