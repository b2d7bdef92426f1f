"""The control protocol: parse requests and format results, text and binary. Pure: no FUSE, no I/O.

Each ``write()`` to a control file is one request; its outcome is the write's result (the kernel's errno
on failure), and a following ``read()`` on the same open file returns the result of the last request.

Text form (one request per write; a trailing newline is accepted, anything else malformed is EINVAL)::

    MOUNTPOINT/ctl:  create NAME size=SIZE [flags=mmap|init_shared|0x3] [backend=NAME] [page_size=2M]
                            [in_place_conversion=0|1]
                     destroy NAME
    NAME/ctl:        set_memory_attributes offset=O size=S attributes=private|shared|8|0 [flags=0]
                     allocate offset=O size=S        (fallocate KEEP_SIZE)
                     punch_hole offset=O size=S      (fallocate KEEP_SIZE|PUNCH_HOLE)
                     pin offset=O size=S / unpin offset=O size=S
                     get_attributes [offset=O size=S]

Text results::

    ok                                   (most requests)
    ok 0x0+0x1000=shared 0x1000+0x3000=private      (get_attributes: OFFSET+SIZE=ATTR runs, hex)
    error EAGAIN error_offset=0x3000 -- page 0x3000 is pinned; unpin it and retry
    error EINVAL -- size 0x1 must be page aligned

``error_offset`` appears only where the kernel defines one (EAGAIN/ENOMEM of set_memory_attributes, and
the emulated pin). Everything after `` -- `` is a message for people; parsers stop there.

Binary form (for C): ``b"UGM1"``, a little-endian u32 equal to the kernel ioctl number, then the kernel
struct byte for byte:

* ``KVM_SET_MEMORY_ATTRIBUTES2`` (0xC080AED2) + the 128-byte ``kvm_memory_attributes2`` (NAME/ctl);
  the read-back is the same 136 bytes with ``error_offset`` filled in on failure.
* ``KVM_CREATE_GUEST_MEMFD`` (0xC040AED4) + the 64-byte ``kvm_create_guest_memfd`` + a NUL-padded 64-byte
  name (at most 63 bytes: the field keeps its NUL) + a NUL-padded 32-byte backend name (MOUNTPOINT/ctl). ``reserved[0]`` carries the HugeTLB
  ``page_order`` the way the HugeTLB series does: 0 = the backend's default, 9 = 2 MiB, 18 = 1 GiB; the
  other reserved words must be 0. The read-back is the same 168 bytes.

An unknown command number is ENOTTY (what the kernel says to an unknown ioctl); a known command with the
wrong length is EINVAL. Anything that does not start with the magic is parsed as text.

Numbers accept decimal, ``0x`` hex and K/M/G/T suffixes (``ufsgmem.address.parse_size``).
"""

from __future__ import annotations

import errno
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from .address import format_size, parse_size
from .errors import GuestMemfdError, errname, fail
from .pagedtext import Column, PagedText, hex_lengths
from .uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CREATE_GUEST_MEMFD, KVM_CREATE_GUEST_MEMFD_STRUCT,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_ATTRIBUTES2_STRUCT, KVM_SET_MEMORY_ATTRIBUTES2, PAGE_SHIFT,
)

MAGIC = b"UGM1"
HEADER = struct.Struct("<4sI")
NAME_LEN = 64
NAME_MAX = NAME_LEN - 1  # the binary form's name field always keeps its terminating NUL
BACKEND_LEN = 32
CREATE_LEN = HEADER.size + KVM_CREATE_GUEST_MEMFD_STRUCT.size + NAME_LEN + BACKEND_LEN  # 168
ATTRIBUTES_LEN = HEADER.size + KVM_MEMORY_ATTRIBUTES2_STRUCT.size  # 136
MAX_REQUEST = 4096
ERROR_OFFSET_AT = 32  # offsetof(struct kvm_memory_attributes2, error_offset)
U64_MAX = (1 << 64) - 1

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_BACKEND_MAX = 64
_FLAG_NAMES = {"mmap": GUEST_MEMFD_FLAG_MMAP, "init_shared": GUEST_MEMFD_FLAG_INIT_SHARED}
_ATTRIBUTE_NAMES = {"private": KVM_MEMORY_ATTRIBUTE_PRIVATE, "shared": 0}
#: page_order (reserved[0] of kvm_create_guest_memfd) -> page size; 0 means the backend's default.
PAGE_ORDERS = {0: None, 9: 2 << 20, 18: 1 << 30}
#: names reserved inside MOUNTPOINT (a guest_memfd cannot be called "ctl")
RESERVED_NAMES = frozenset({"ctl"})


@dataclass(frozen=True)
class CreateRequest:
    name: str
    size: int
    flags: int = 0
    backend: str | None = None
    page_size: int | None = None
    binary: bytes | None = None  # the raw request when it came in binary form
    in_place_conversion: bool | None = None  # None: the mount's default


@dataclass(frozen=True)
class DestroyRequest:
    name: str


@dataclass(frozen=True)
class FileRequest:
    """A request on NAME/ctl. ``op`` is the text verb; binary requests are ``set_memory_attributes``."""

    op: str
    offset: int = 0
    size: int | None = None
    attributes: int = 0
    flags: int = 0
    reserved: tuple[int, ...] = field(default=())
    binary: bytes | None = None


# --- parsing ------------------------------------------------------------------------------------------
def _text(data: bytes) -> tuple[str, dict[str, str], list[str]]:
    """Split one text request into verb, ``key=value`` options and bare words. EINVAL when malformed."""
    if len(data) > MAX_REQUEST:
        raise fail(errno.EINVAL, f"request of {len(data)} bytes is longer than {MAX_REQUEST}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise fail(errno.EINVAL, "a text request must be ASCII (binary requests start with UGM1)") from None
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise fail(errno.EINVAL, "empty request")
    if not text.isprintable():
        raise fail(errno.EINVAL, "one request per write: no newlines or control characters inside it")
    words = text.split()
    verb, options, bare = words[0], {}, []
    for word in words[1:]:
        if "=" in word:
            key, _, value = word.partition("=")
            if not key or not value or key in options:
                raise fail(errno.EINVAL, f"bad or repeated option {word!r}")
            options[key] = value
        else:
            bare.append(word)
    return verb, options, bare


def _number(options: dict[str, str], key: str, default: int | None = None) -> int:
    if key not in options:
        if default is None:
            raise fail(errno.EINVAL, f"missing {key}=")
        return default
    try:
        value = parse_size(options[key])
    except ValueError as exc:
        raise fail(errno.EINVAL, str(exc)) from None
    if value > U64_MAX:
        raise fail(errno.EINVAL, f"{key}={options[key]} does not fit in 64 bits")
    return value


def _boolean(options: dict[str, str], key: str) -> bool | None:
    if key not in options:
        return None
    if options[key] not in ("0", "1"):
        raise fail(errno.EINVAL, f"{key}={options[key]}: use 0 or 1")
    return options[key] == "1"


def _only(options: dict[str, str], bare: list[str], allowed: set[str], nbare: int, verb: str) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise fail(errno.EINVAL, f"{verb}: unknown option(s) {', '.join(sorted(unknown))}")
    if len(bare) != nbare:
        raise fail(errno.EINVAL, f"{verb}: expected {nbare} plain argument(s), got {len(bare)}")


def check_name(name: str) -> str:
    """A file name: 1 to NAME_MAX (63) bytes, so the binary form's 64-byte field keeps its NUL. Longer is
    EINVAL, like every other malformed request (not ENAMETOOLONG: no path lookup is involved)."""
    if len(name) > NAME_MAX:
        raise fail(errno.EINVAL, f"name of {len(name)} bytes is longer than {NAME_MAX}: {name[:16]!r}...")
    if not _NAME_RE.match(name) or name in RESERVED_NAMES:
        raise fail(errno.EINVAL, f"bad name {name!r}: 1-{NAME_MAX} of [A-Za-z0-9_.+-], not starting with . - +, "
                                 f"not {', '.join(sorted(RESERVED_NAMES))}")
    return name


def _check_backend(backend: str | None) -> str | None:
    if backend is not None and (len(backend) > _BACKEND_MAX or not _NAME_RE.match(backend)):
        raise fail(errno.EINVAL, f"bad backend name {backend[:40]!r}")
    return backend


def parse_flags(text: str) -> int:
    """``mmap|init_shared``, or a number in decimal or 0x hex (nothing else: no ``1_0``, ``0b1``, octal)."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+|[0-9]+", text):
        return int(text, 16) if text[:2] in ("0x", "0X") else int(text, 10)
    flags = 0
    for part in text.split("|") if text else [""]:
        part = part.strip().lower()
        if part not in _FLAG_NAMES:
            raise fail(errno.EINVAL, f"unknown flag {part!r} (mmap, init_shared, or a number)")
        flags |= _FLAG_NAMES[part]
    return flags


def parse_mount_request(data: bytes) -> CreateRequest | DestroyRequest:
    """A request written to MOUNTPOINT/ctl."""
    if data[:4] == MAGIC:
        return _binary_create(data)
    verb, options, bare = _text(data)
    if verb == "create":
        _only(options, bare, {"size", "flags", "backend", "page_size", "in_place_conversion"}, 1, verb)
        page_size = _number(options, "page_size") if "page_size" in options else None
        backend = _check_backend(options.get("backend"))
        in_place = _boolean(options, "in_place_conversion")
        return CreateRequest(check_name(bare[0]), _number(options, "size"), parse_flags(options.get("flags", "0")),
                             backend, page_size, in_place_conversion=in_place)
    if verb == "destroy":
        _only(options, bare, set(), 1, verb)
        return DestroyRequest(check_name(bare[0]))
    raise fail(errno.EINVAL, f"unknown request {verb!r} (create, destroy)")


def _header(data: bytes, known: dict[int, int]) -> int:
    if len(data) < HEADER.size:
        raise fail(errno.EINVAL, f"binary request of {len(data)} bytes is shorter than its 8-byte header")
    _, cmd = HEADER.unpack_from(data)
    if cmd not in known:
        raise fail(errno.ENOTTY, f"unknown command {cmd:#x}")
    if len(data) != known[cmd]:
        raise fail(errno.EINVAL, f"command {cmd:#x} takes {known[cmd]} bytes, got {len(data)}")
    return cmd


def _cstring(raw: bytes, what: str) -> str:
    text, nul, rest = raw.partition(b"\0")
    if rest.strip(b"\0"):
        raise fail(errno.EINVAL, f"{what}: bytes after the terminating NUL")
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise fail(errno.EINVAL, f"{what} must be ASCII") from None


def _binary_create(data: bytes) -> CreateRequest:
    _header(data, {KVM_CREATE_GUEST_MEMFD: CREATE_LEN})
    size, flags, *reserved = KVM_CREATE_GUEST_MEMFD_STRUCT.unpack_from(data, HEADER.size)
    if any(reserved[1:]):
        raise fail(errno.EINVAL, "reserved[1..5] of kvm_create_guest_memfd must be 0")
    if reserved[0] not in PAGE_ORDERS:
        raise fail(errno.EINVAL, f"page_order {reserved[0]} (reserved[0]): use 0, 9 (2M) or 18 (1G)")
    at = HEADER.size + KVM_CREATE_GUEST_MEMFD_STRUCT.size
    name = check_name(_cstring(data[at:at + NAME_LEN], "name"))
    backend = _check_backend(_cstring(data[at + NAME_LEN:at + NAME_LEN + BACKEND_LEN], "backend") or None)
    return CreateRequest(name, size, flags, backend, PAGE_ORDERS[reserved[0]], binary=bytes(data))


def parse_attributes2(struct_bytes: bytes, binary: bytes | None = None) -> FileRequest:
    """The 128-byte ``kvm_memory_attributes2`` as a request: the ioctl on ``mem`` and the binary request on
    ``NAME/ctl`` both come through here. Its fields are checked by the core, in the kernel's order."""
    offset, size, attributes, flags, _error_offset, *reserved = KVM_MEMORY_ATTRIBUTES2_STRUCT.unpack(struct_bytes)
    return FileRequest("set_memory_attributes", offset, size, attributes, flags, tuple(reserved), binary=binary)


def with_error_offset(struct_bytes: bytes, error_offset: int) -> bytes:
    """``kvm_memory_attributes2`` as the kernel copies it back on EAGAIN/ENOMEM."""
    out = bytearray(struct_bytes)
    struct.pack_into("<Q", out, ERROR_OFFSET_AT, error_offset)
    return bytes(out)


def parse_file_request(data: bytes) -> FileRequest:
    """A request written to NAME/ctl."""
    if data[:4] == MAGIC:
        _header(data, {KVM_SET_MEMORY_ATTRIBUTES2: ATTRIBUTES_LEN})
        return parse_attributes2(data[HEADER.size:], binary=bytes(data))
    verb, options, bare = _text(data)
    _only(options, bare, {"offset", "size", "attributes", "flags"} if verb == "set_memory_attributes"
          else {"offset", "size"}, 0, verb)
    if verb == "set_memory_attributes":
        text = options.get("attributes")
        if text is None:
            raise fail(errno.EINVAL, "missing attributes=")
        if text.lower() in _ATTRIBUTE_NAMES:
            attributes = _ATTRIBUTE_NAMES[text.lower()]
        elif re.fullmatch(r"0[xX][0-9a-fA-F]+|[0-9]+", text):
            attributes = _number(options, "attributes")
        else:
            raise fail(errno.EINVAL, f"attributes={text}: use private, shared, or a number (8 = private, 0 = shared)")
        return FileRequest(verb, _number(options, "offset"), _number(options, "size"), attributes,
                           _number(options, "flags", 0))
    if verb in ("allocate", "punch_hole", "pin", "unpin"):
        return FileRequest(verb, _number(options, "offset"), _number(options, "size"))
    if verb == "get_attributes":
        if ("offset" in options) != ("size" in options):
            raise fail(errno.EINVAL, "get_attributes takes both offset= and size=, or neither")
        return FileRequest(verb, _number(options, "offset", 0), _number(options, "size") if options else None)
    raise fail(errno.EINVAL, f"unknown request {verb!r} (set_memory_attributes, allocate, punch_hole, "
                             "pin, unpin, get_attributes)")


# --- results ------------------------------------------------------------------------------------------
def format_runs(runs) -> str:
    return " ".join(f"{o:#x}+{s:#x}={'private' if a & KVM_MEMORY_ATTRIBUTE_PRIVATE else 'shared'}"
                    for o, s, a in runs)


def attributes_result(bounds: np.ndarray, private: np.ndarray) -> PagedText:
    """The text read-back of ``get_attributes``, ``ok_result(request, format_runs(runs))`` byte for byte,
    rendered as it is read from the runs' boundaries (``len(private) + 1`` byte offsets) and flags
    (``GuestMemfd.attribute_arrays``): a long result costs the server ~9 bytes a run, not its text."""
    n = len(private)
    if n == 0:
        return PagedText([b"ok\n"])
    lengths = hex_lengths(bounds[:-1]) + hex_lengths(np.diff(bounds)) + 1 + np.where(private, 8, 7)

    def render(i: int, j: int) -> str:  # sizes from the boundaries: only bounds and flags are kept
        edges = bounds[i:j + 1].tolist()
        return " ".join(f"{o:#x}+{e - o:#x}={'private' if p else 'shared'}"
                        for o, e, p in zip(edges, edges[1:], private[i:j].tolist()))

    column = Column(n, lengths, b" ", render, (bounds, private))
    return PagedText([b"ok ", column, b"\n"])


def ok_result(request, detail: str = "") -> bytes:
    """The read-back of a successful request: text ``ok ...`` or the binary struct unchanged."""
    binary = getattr(request, "binary", None)
    if binary is not None:
        return binary
    return (f"ok {detail}".rstrip() + "\n").encode()


def error_result(request, exc: OSError) -> bytes:
    """The read-back of a failed request (``request`` may be None when it did not even parse)."""
    err = exc.errno or errno.EIO
    error_offset = getattr(exc, "error_offset", None)
    binary = getattr(request, "binary", None)
    if binary is not None and isinstance(request, FileRequest):
        if error_offset is None:
            return binary
        return binary[:HEADER.size] + with_error_offset(binary[HEADER.size:], error_offset)
    if binary is not None:
        return binary
    detail = exc.detail if isinstance(exc, GuestMemfdError) else (exc.strerror or "")
    text = f"error {errname(err)}"
    if error_offset is not None:
        text += f" error_offset={error_offset:#x}"
    return f"{text} -- {detail}\n".encode()


def describe_create(req: CreateRequest, page_size: int) -> str:
    return f"{req.name} size={format_size(req.size)} flags={req.flags:#x} page_size={format_size(page_size)}"


def page_order(page_size: int | None) -> int:
    """The inverse of PAGE_ORDERS (for clients building binary requests)."""
    return 0 if not page_size else page_size.bit_length() - 1 - PAGE_SHIFT
