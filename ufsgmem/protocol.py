"""The control protocol's wire format, both ends of it: the one definition the server, the Python client,
the testing kit, the conformance suite and the bench use. Pure: no FUSE, no I/O.

What lives here: the binary form's magic, header, lengths and command numbers; the kernel structs packed
and unpacked for it (and for the ioctl, which carries the same ``kvm_memory_attributes2``); ``page_order``;
the flag and attribute names; the text grammar of requests (parsed by the server, written by clients) and
of results (formatted by the server, parsed by clients). The kernel's own constants and struct layouts stay
in :mod:`ufsgmem.uapi`; examples/ufsgmem.h is the same format for C, and tests/test_c_example.py checks
that its constants equal these.

Two flag grammars, on purpose: a text request's ``flags=`` is strict (``mmap|init_shared`` or one number,
nothing else: the server refuses what it would have to guess at), while :func:`parse_flags` takes what
people type on the command line or pass to the client (commas too, names and numbers mixed, None), and
the client sends the resulting number.

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
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_ATTRIBUTES2_STRUCT, KVM_SET_MEMORY_ATTRIBUTES2, PAGE_SHIFT, PAGE_SIZE,
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
#: guest_memfd flag names, as text requests, the CLI and the client spell them
FLAG_NAMES = {"mmap": GUEST_MEMFD_FLAG_MMAP, "init_shared": GUEST_MEMFD_FLAG_INIT_SHARED}
#: attribute names: private is KVM_MEMORY_ATTRIBUTE_PRIVATE, shared is no attribute
ATTRIBUTE_NAMES = {"private": KVM_MEMORY_ATTRIBUTE_PRIVATE, "shared": 0}
_ERRNOS = {name: number for number, name in errno.errorcode.items()}
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


def _flags_field(text: str) -> int:
    """A text request's ``flags=``: ``mmap|init_shared``, or a number in decimal or 0x hex (nothing else: no
    ``1_0``, ``0b1``, octal)."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+|[0-9]+", text):
        return int(text, 16) if text[:2] in ("0x", "0X") else int(text, 10)
    flags = 0
    for part in text.split("|") if text else [""]:
        part = part.strip().lower()
        if part not in FLAG_NAMES:
            raise fail(errno.EINVAL, f"unknown flag {part!r} (mmap, init_shared, or a number)")
        flags |= FLAG_NAMES[part]
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
        return CreateRequest(check_name(bare[0]), _number(options, "size"), _flags_field(options.get("flags", "0")),
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


def error_offset_of(struct_bytes) -> int:
    """The ``error_offset`` field of a ``kvm_memory_attributes2`` (what the kernel copied back)."""
    return struct.unpack_from("<Q", struct_bytes, ERROR_OFFSET_AT)[0]


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
        if text.lower() in ATTRIBUTE_NAMES:
            attributes = ATTRIBUTE_NAMES[text.lower()]
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



# --- numbers and names as people write them (the CLI, the client, the testing kit) ---------------------------
def parse_flags(flags: int | str | None) -> int:
    """A flag word as people write it: ``"mmap,init_shared"``, ``"mmap|init_shared"``, ``"0x3"``, ``3`` or
    None (0); ValueError otherwise. Looser than a text request's ``flags=`` (:func:`_flags_field`), which
    takes ``|`` only and one number, no mixing: the client turns what people write into a number first."""
    if flags is None:
        return 0
    if isinstance(flags, int):
        return flags
    value = 0
    for word in flags.replace("|", ",").split(","):
        word = word.strip().lower()
        if not word or word == "0":
            continue
        if word in FLAG_NAMES:
            value |= FLAG_NAMES[word]
            continue
        try:
            value |= int(word, 0)
        except ValueError:
            raise ValueError(f"unknown flag {word!r} (use mmap, init_shared or a number)") from None
    return value


def flag_names(flags: int) -> list[str]:
    """The names of the known bits set in ``flags``."""
    return [name for name, bit in FLAG_NAMES.items() if flags & bit]


def parse_attributes(to: int | str) -> int:
    """``"private"``/``"shared"`` (or the number, 8/0) to a KVM_MEMORY_ATTRIBUTE_* word; ValueError otherwise."""
    if isinstance(to, int):
        return to
    word = to.strip().lower()
    if word in ATTRIBUTE_NAMES:
        return ATTRIBUTE_NAMES[word]
    try:
        return int(word, 0)
    except ValueError:
        raise ValueError(f"attributes {to!r}: use private or shared") from None


def page_order(page_size: int | str | None) -> int:
    """The HugeTLB ``page_order`` (reserved[0] of the binary create) for a page size: None or 0 → 0 (the
    backend's default), 2M → 9, 1G → 18; the inverse of :data:`PAGE_ORDERS`. ValueError for a size that is
    not a power of two of at least 4K."""
    if page_size is None or page_size == 0:
        return 0
    size = parse_size(page_size)
    if size < PAGE_SIZE or size & (size - 1):
        raise ValueError(f"page size {page_size!r} is not a power of two of at least 4K")
    return (size >> PAGE_SHIFT).bit_length() - 1


# --- what clients write: binary requests and the kernel structs ------------------------------------------
def check_u64(**values: int) -> None:
    """EINVAL for a value the kernel's u64 fields cannot carry (before anything is sent)."""
    for key, value in values.items():
        if not 0 <= value < 1 << 64:
            raise GuestMemfdError(errno.EINVAL, f"{key} {value:#x} does not fit the kernel's u64")


def attributes2(offset: int, size: int, attributes: int, flags: int = 0, error_offset: int = 0,
                reserved: tuple[int, ...] = (0,) * 11) -> bytearray:
    """``struct kvm_memory_attributes2``, as the ioctl takes it (mutable: the kernel copies ``error_offset``
    back into it) and as the binary request carries it."""
    return bytearray(KVM_MEMORY_ATTRIBUTES2_STRUCT.pack(offset, size, attributes, flags, error_offset, *reserved))


def cstr_field(text: str, length: int, what: str) -> bytes:
    """``text`` NUL-padded to a fixed C field of ``length`` bytes; EINVAL if longer or holding a NUL."""
    raw = text.encode()
    if len(raw) > length or b"\0" in raw:
        raise GuestMemfdError(errno.EINVAL, f"{what} {text!r} must be at most {length} bytes, without NUL")
    return raw.ljust(length, b"\0")


def create_request(name: str, size: int, flags: int = 0, backend: str = "", order: int = 0, *,
                   reserved: tuple[int, ...] | None = None) -> bytes:
    """The binary KVM_CREATE_GUEST_MEMFD request for ``MOUNT/ctl`` (``struct ufsgmem_create_request`` of
    examples/ufsgmem.h). ``reserved`` sets all six reserved words as given (the conformance suite sends
    nonzero ones to see them refused); by default they are ``order`` and five zeros."""
    words = (order, 0, 0, 0, 0, 0) if reserved is None else tuple(reserved)
    body = KVM_CREATE_GUEST_MEMFD_STRUCT.pack(size, flags, *words)
    name_field = cstr_field(name, NAME_MAX, "name").ljust(NAME_LEN, b"\0")  # at most 63 bytes + NUL
    backend_field = cstr_field(backend, BACKEND_LEN, "backend name")
    return HEADER.pack(MAGIC, KVM_CREATE_GUEST_MEMFD) + body + name_field + backend_field


def attributes2_request(offset: int, size: int, attributes: int, flags: int = 0) -> bytes:
    """The binary KVM_SET_MEMORY_ATTRIBUTES2 request for ``NAME/ctl`` (``struct ufsgmem_attributes2_request``)."""
    return HEADER.pack(MAGIC, KVM_SET_MEMORY_ATTRIBUTES2) + attributes2(offset, size, attributes, flags)


# --- what clients write: text requests --------------------------------------------------------------------
def create_text(name: str, size: int, flags: int = 0, *, backend: str | None = None, page_size: int | None = None,
                in_place_conversion: bool | None = None) -> str:
    """``create NAME size=... flags=...`` with the options given (for ``MOUNT/ctl``)."""
    request = f"create {name} size={size:#x} flags={flags:#x}"
    if backend:
        request += f" backend={backend}"
    if page_size is not None:
        request += f" page_size={format_size(page_size)}"
    if in_place_conversion is not None:
        request += f" in_place_conversion={int(in_place_conversion)}"
    return request


def ranged_text(verb: str, offset: int, size: int, **options: int) -> str:
    """``VERB offset=O size=S [KEY=VALUE...]`` (for ``NAME/ctl``: set_memory_attributes, allocate,
    punch_hole, pin, unpin, get_attributes), numbers in hex."""
    return " ".join([f"{verb} offset={offset:#x} size={size:#x}"] + [f"{k}={v:#x}" for k, v in options.items()])


# --- what clients read: text results ----------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """A parsed text result: ``ok [words]`` or ``error ERRNAME [error_offset=0x...] -- message``.

    Everything after `` -- `` is a message for people; ``key=value`` words before it are fields.
    """

    ok: bool
    fields: dict[str, str]
    words: list[str]
    message: str
    text: str

    @classmethod
    def parse(cls, text: str) -> "Result":
        head, _, message = text.strip().partition(" -- ")
        words = head.split()
        ok = bool(words) and words[0] == "ok"
        rest = words[1:]
        fields: dict[str, str] = {}
        if not ok and rest and rest[0] in _ERRNOS:
            fields["errno"] = rest.pop(0)
        plain = []
        for word in rest:
            key, sep, value = word.partition("=")
            if sep and key.isidentifier():
                fields[key] = value
            else:
                plain.append(word)
        return cls(ok, fields, plain, message.strip(), text.strip())

    def int(self, key: str) -> int | None:
        value = self.fields.get(key)
        return None if value is None else int(value, 0)


def parse_runs(text: str) -> list[tuple[int, int, int]]:
    """Runs of a get_attributes result (:func:`format_runs`): ``ok 0x0+0x1000=shared 0x1000+0x3000=private``."""
    runs = []
    for word in Result.parse(text).text.partition(" -- ")[0].split()[1:]:
        span, sep, attribute = word.partition("=")
        offset, plus, size = span.partition("+")
        if not (sep and plus):
            raise GuestMemfdError(errno.EPROTO, f"get_attributes: cannot read run {word!r} in {text!r}")
        runs.append((int(offset, 0), int(size, 0), parse_attributes(attribute)))
    return runs
