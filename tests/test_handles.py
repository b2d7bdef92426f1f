"""Handles (issue 17, finding 1): a handle number means one object, and every request is answered by the
kind of the object it names, as the kernel answers it.

A directory's handle used to be its inode number, and ``Operations.ioctl`` looked it up as an open *file*
handle: user B's ioctl on B's own directory converted whichever file held that number, even user A's.
Here every request type is tried on every kind of object, as a second user on an ``--allow-other`` mount,
and no request on one object may change another. The second user's system calls run in a forked child
that drops to an unused uid (``os.setresgid``/``os.setresuid``), so no account is created.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import tempfile

import pytest

from fusefix import mounted, requires_fuse
from ufsgmem.uapi import FALLOC_FL_KEEP_SIZE, KVM_MEMORY_ATTRIBUTES2_STRUCT, KVM_SET_MEMORY_ATTRIBUTES2

pytestmark = [requires_fuse, pytest.mark.fuse]
PS = 4096
ALICE, BOB = 65534, 65533
PRIVATE = 8
_libc = ctypes.CDLL(None, use_errno=True)


def as_user(uid: int, fn):
    """``fn()`` in a forked child running as ``uid`` (real, effective and saved ids): its JSON-able
    result, or the errno name of the OSError it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            out = json.dumps(fn())
        except OSError as exc:
            out = json.dumps(errno.errorcode.get(exc.errno, str(exc.errno)))
        except BaseException as exc:  # noqa: BLE001 - report it to the parent
            out = json.dumps(repr(exc))
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as r:
        return json.loads(r.read())


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def to_private(fd: int, offset: int, size: int) -> None:
    arg = bytearray(KVM_MEMORY_ATTRIBUTES2_STRUCT.pack(offset, size, PRIVATE, 0, 0, *(0,) * 11))
    fcntl.ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, arg, True)


#: one of each request type, on an open descriptor; each returns something small or raises
REQUESTS = {
    "ioctl": lambda fd: to_private(fd, 0, PS),
    "fallocate": lambda fd: fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, PS),
    "read": lambda fd: len(os.read(fd, 16)) >= 0,
    "write": lambda fd: os.write(fd, b"x\n"),
    "fsync": lambda fd: os.fsync(fd),
    "readdir": lambda fd: len(os.listdir(fd)) >= 0,
    "getattr": lambda fd: os.fstat(fd).st_size >= 0,
}


def outcome(fn) -> str:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"


def outcomes(path: str, flags: int) -> dict[str, str]:
    """Each request type on its own descriptor of ``path`` (so one request's effect on the file position
    or the result held cannot change the next one's answer)."""
    out = {}
    for name, request in REQUESTS.items():
        fd = os.open(path, flags)
        try:
            out[name] = outcome(lambda: request(fd))
        finally:
            os.close(fd)
    return out


DIRECTORY = {"ioctl": "ENOTTY", "fallocate": "EBADF", "read": "EISDIR", "write": "EBADF", "fsync": "ok",
             "readdir": "ok", "getattr": "ok"}
CONTROL = {"ioctl": "ENOTTY", "fallocate": errno.errorcode[errno.EOPNOTSUPP], "read": "ok", "write": "EINVAL",
           "fsync": "ok", "readdir": "ENOTDIR", "getattr": "ok"}
READ_ONLY = {"ioctl": "ENOTTY", "fallocate": "EBADF", "read": "ok", "write": "EBADF", "fsync": "ok",
             "readdir": "ENOTDIR", "getattr": "ok"}
#: object -> (path under the mount, open flags, expected outcome of each request)
OBJECTS = {
    "dir": ("bob", os.O_RDONLY | os.O_DIRECTORY, DIRECTORY),  # first: the attack
    "root": ("", os.O_RDONLY | os.O_DIRECTORY, DIRECTORY),
    "MOUNT/ctl": ("ctl", os.O_RDWR, CONTROL),
    "NAME/ctl": ("bob/ctl", os.O_RDWR, CONTROL),
    "status": ("bob/status", os.O_RDONLY, READ_ONLY),
    "snapshot": ("bob/snapshot", os.O_RDONLY, READ_ONLY),
    "guest": ("bob/guest", os.O_RDWR, {**CONTROL, "write": "ok"}),
    "mem": ("bob/mem", os.O_RDWR, {"ioctl": "ok", "fallocate": "ok", "read": "EINVAL", "write": "EINVAL",
                                   "fsync": "EINVAL", "readdir": "ENOTDIR", "getattr": "ok"}),
}


def test_a_directory_is_what_the_kernel_says_of_a_directory():
    """The expectation for directories is the kernel's own: a tmpfs directory answers the same."""
    with tempfile.TemporaryDirectory() as d:
        assert outcomes(d, os.O_RDONLY | os.O_DIRECTORY) == DIRECTORY


def _attributes(mount: str, name: str) -> bytes:
    fd = os.open(os.path.join(mount, name, "ctl"), os.O_RDWR)
    try:
        os.write(fd, f"get_attributes offset=0 size={16 * PS}".encode())
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def test_every_request_on_every_object_as_two_users():
    """Alice's file, with every handle number from 3 to 66 open on its ``mem`` for writing (so whatever
    number a directory handle might be taken for, it is one of hers), stays shared and intact while Bob
    sends every request type to every kind of object of his own; each answer is the kernel's for that
    kind. The ioctl on Bob's directory is the attack of the issue: it turned Alice's page private."""
    with mounted(allow_other=True) as mount:
        def ctl(request: str):
            fd = os.open(os.path.join(mount.path, "ctl"), os.O_WRONLY)
            try:
                return os.write(fd, request.encode())
            finally:
                os.close(fd)

        assert isinstance(as_user(ALICE, lambda: ctl(f"create alice size={16 * PS} flags=mmap|init_shared")), int)
        assert isinstance(as_user(BOB, lambda: ctl(f"create bob size={16 * PS} flags=mmap|init_shared")), int)
        hers = [os.open(os.path.join(mount.path, "alice", "mem"), os.O_RDWR) for _ in range(64)]
        guest = os.open(os.path.join(mount.path, "alice", "guest"), os.O_RDWR)
        try:
            os.pwrite(guest, b"alice's", 0)
            before = _attributes(mount.path, "alice")
            assert b"shared" in before and b"private" not in before, before

            for obj, (path, flags, expected) in OBJECTS.items():
                got = as_user(BOB, lambda: outcomes(os.path.join(mount.path, path), flags))
                assert _attributes(mount.path, "alice") == before, f"a request on Bob's {obj} converted Alice's file"
                assert os.pread(guest, 7, 0) == b"alice's", f"a request on Bob's {obj} changed Alice's bytes"
                assert got == expected, f"{obj}: {got}"

            # Alice's objects are closed to Bob; the mount's root and ctl are shared (tried above)
            for path in ("alice", "alice/mem", "alice/ctl", "alice/guest", "alice/status", "alice/snapshot"):
                assert as_user(BOB, lambda: os.close(os.open(os.path.join(mount.path, path), os.O_RDONLY))) \
                    == "EACCES", path
            # and Alice's own directory, like Bob's, never converts her file
            assert as_user(ALICE, lambda: outcome(lambda: to_private(
                os.open(os.path.join(mount.path, "alice"), os.O_RDONLY | os.O_DIRECTORY), 0, PS))) == "ENOTTY"
            assert _attributes(mount.path, "alice") == before
        finally:
            for fd in hers + [guest]:
                os.close(fd)
