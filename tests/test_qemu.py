"""An unmodified QEMU whose guest RAM is a ufsgmem file (issue 10, item 4; docs/quickstart.md, last section).

QEMU maps ``MNT/NAME/mem`` with ``memory-backend-file,share=on`` and boots Debian's kernel with a busybox
initramfs built here. The guest writes two files of 64 recognisable 4 KiB pages into its tmpfs (so into its
RAM, so into the ufsgmem file), prints a marker and then obeys one-word commands on its serial console
(``ping``, ``sum-pat``, ``sum-keep``, ``off``). The tests find those pages in the file through
``NAME/guest`` (never by mapping ``mem``: every mmap(2) of it drops the file's page cache, QEMU's pages too),
convert them under the running guest, and ask the guest to read them.

What happens, measured here (TCG; KVM on this machine is PVM, which cannot boot Debian's kernel):
* RAM the guest does not touch can be private: the guest runs on; converting back gives it the same bytes.
* The first access to a private page by the guest is an access by QEMU (TCG reads guest RAM through its
  mapping of mem, from which the conversion revoked the page): QEMU dies of SIGBUS at once (exit status
  -SIGBUS, nothing printed on stderr or the console). QEMU's own reads of guest RAM (the monitor's ``xp``
  here; device models, dumps, migration alike) die the same way. The file keeps the content. (Under KVM the
  monitor case should be the same, as QEMU re-raises any SIGBUS that is not a machine check; not measured.)
* On the hugetlb backend the same guest boots on shared 2 MiB folios (each counted split while shared);
  a 4 KiB page converts under the running guest and back; all private again, every folio is whole again.

Everything the tests need is installed here when missing (``apt-get install qemu-system-x86 busybox-static
cpio``); the kernel is taken from ``/boot`` if a Debian ``linux-image`` package put one there, otherwise
``vmlinuz`` is extracted from Debian's ``linux-image-amd64`` package downloaded into a temporary directory
(installing that package would bring initramfs-tools, udev and systemd and build an initramfs nobody uses).
QEMU runs bounded in time and is killed by its pid on any failure; the mount, the files and the huge pages
are always given back.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from ufsgmem.client import GmemFile
from ufsgmem.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

SZ_2M = 2 << 20
PAGE = 4096
RAM = "256M"
RAM_BYTES = 256 << 20
PAGES_PER_FILE = 64              # pages the guest writes to each of /pat and /keep
BOOT_TIMEOUT = 180               # seconds until the guest's READY line (TCG boots in ~8 s here)
COMMAND_TIMEOUT = 60             # seconds for a reply to one console command
APT_TIMEOUT = 600

# The guest's /init. The headers it writes are built at run time ("UFSG" "MEM"), so the only page-aligned
# copies of "UFSGMEM-pat-TAG-" in guest RAM are the pages of the tmpfs files themselves.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
TAG=$(sed -n 's/.*ufsgmem_tag=\([A-Za-z0-9]*\).*/\1/p' /proc/cmdline)
for f in pat keep; do
  awk -v f=$f -v tag=$TAG 'BEGIN { p = "+"; while (length(p) < 4096) p = p p;
    for (i = 0; i < 64; i++) print substr(sprintf("UFSG" "MEM-%s-%s-%05d-", f, tag, i) p, 1, 4095) }' > /$f
done
echo "UFSGMEM-READY $(uname -r) $(grep MemTotal /proc/meminfo)"
while read -r cmd; do
  case "$cmd" in
    ping) echo "UFSGMEM-PONG" ;;
    sum-pat|sum-keep) echo "UFSGMEM-SUM ${cmd#sum-} $(md5sum < /${cmd#sum-})" ;;
    off) echo "UFSGMEM-OFF"; poweroff -f ;;
  esac
done
poweroff -f
"""

# How the initramfs is made (docs/quickstart.md shows the same commands).
BUILD_INITRAMFS = """set -e
mkdir -p initramfs/bin initramfs/dev initramfs/proc
cp /bin/busybox initramfs/bin/busybox
mknod -m 600 initramfs/dev/console c 5 1
cp init initramfs/init && chmod 755 initramfs/init
(cd initramfs && find . | cpio -o -H newc --quiet) > initramfs.cpio
"""


def expected_page(which: str, tag: str, index: int) -> bytes:
    """Page ``index`` of the guest's /pat or /keep, as its awk writes it."""
    head = f"UFSGMEM-{which}-{tag}-{index:05d}-".encode()
    return (head + b"+" * (PAGE - 1 - len(head)) + b"\n")


def expected_md5(which: str, tag: str) -> str:
    return hashlib.md5(b"".join(expected_page(which, tag, i) for i in range(PAGES_PER_FILE))).hexdigest()


# --- installing what the tests need ----------------------------------------------------------------------
def _run(argv, timeout=APT_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def _is_static_elf(path: str) -> bool:
    """True when ``path`` is an ELF executable without a program interpreter (runs without libc)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            phoff = int.from_bytes(head[32:40], "little")
            phentsize = int.from_bytes(head[54:56], "little")
            phnum = int.from_bytes(head[56:58], "little")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(int.from_bytes(table[i:i + 4], "little") != 3  # PT_INTERP
               for i in range(0, len(table), phentsize))


class Apt:
    """apt-get, with ``apt-get update`` run once (only when something must be fetched)."""

    def __init__(self):
        self.updated = False

    def _ready(self):
        if shutil.which("apt-get") is None:
            pytest.skip("qemu-system-x86 / busybox-static / a kernel are missing and this machine has no apt-get")
        if os.geteuid() != 0:
            pytest.skip("qemu-system-x86 / busybox-static / a kernel are missing and installing them needs root")
        if not self.updated:
            r = _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"])
            if r.returncode != 0:
                pytest.skip(f"apt-get update failed ({r.returncode}): {_tail(r.stderr or r.stdout)}")
            self.updated = True

    def install(self, *packages: str) -> None:
        self._ready()
        r = _run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends",
                  *packages])
        if r.returncode != 0:
            pytest.skip(f"apt-get install {' '.join(packages)} failed ({r.returncode}): "
                        f"{_tail(r.stderr or r.stdout)}")

    def extract(self, package: str, member: str, into: str) -> list[str]:
        """Download ``package`` (no install) into ``into`` and unpack the files matching ``member``."""
        self._ready()
        r = _run(["apt-get", "download", package], cwd=into)
        debs = glob.glob(os.path.join(into, f"{package}_*.deb"))
        if r.returncode != 0 or not debs:
            pytest.skip(f"apt-get download {package} failed ({r.returncode}): {_tail(r.stderr or r.stdout)}")
        root = os.path.join(into, "root")
        os.makedirs(root, exist_ok=True)
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", debs[0]], stdout=subprocess.PIPE)
        r = _run(["tar", "-x", "-C", root, "--wildcards", member], stdin=tar.stdout)
        tar.stdout.close()
        tar.wait()
        os.unlink(debs[0])
        found = sorted(glob.glob(os.path.join(root, member)))
        if r.returncode != 0 or not found:
            pytest.skip(f"could not unpack {member} from {package}: {_tail(r.stderr)}")
        return [os.path.normpath(path) for path in found]


def debian_kernel(apt: Apt, work: str) -> str:
    """A Debian distribution kernel: one a linux-image package installed in /boot, else Debian's current one
    (the package linux-image-amd64 depends on) unpacked into ``work``."""
    for path in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        owner = _run(["dpkg", "-S", path], timeout=30)
        if owner.returncode == 0 and owner.stdout.startswith("linux-image-") and os.access(path, os.R_OK):
            return path
    apt._ready()
    depends = _run(["apt-cache", "depends", "--important", "linux-image-amd64"], timeout=60).stdout
    names = re.findall(r"Depends:\s*(linux-image-\S+)", depends)
    if not names:
        pytest.skip(f"apt-cache knows no kernel package behind linux-image-amd64: {_tail(depends)}")
    return apt.extract(names[0], "./boot/vmlinuz-*", work)[0]


# --- QEMU ------------------------------------------------------------------------------------------------
def qemu_argv(accel: str, kernel: str, initrd: str, tag: str, mem_path: str | None,
              monitor: str | None = None) -> list[str]:
    """The command line the tests and docs/quickstart.md use. ``mem_path=None``: ordinary RAM (KVM probe);
    ``monitor``: a unix socket for QEMU's human monitor instead of none."""
    argv = ["qemu-system-x86_64", "-accel", accel, "-smp", "1", "-m", RAM]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if mem_path is not None:
        argv += ["-object", f"memory-backend-file,id=mem0,size={RAM},mem-path={mem_path},share=on",
                 "-machine", "q35,memory-backend=mem0"]
    else:
        argv += ["-machine", "q35"]
    return argv + ["-kernel", kernel, "-initrd", initrd,
                   "-append", f"console=ttyS0 panic=-1 quiet ufsgmem_tag={tag}",
                   "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
                   "-monitor", f"unix:{monitor},server=on,wait=off" if monitor else "none"]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when pytest dies, so not even a killed run leaves a QEMU behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class Qemu:
    """One QEMU process: its serial console (stdio) collected by a thread, commands typed on its stdin.
    Always stopped by its own pid (SIGKILL) when the block ends while it still runs."""

    def __init__(self, argv: list[str], log_dir: str, name: str):
        self.argv = argv
        self.stderr_path = os.path.join(log_dir, f"{name}.stderr")
        self.serial_path = os.path.join(log_dir, f"{name}.serial")
        self._serial = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def __enter__(self):
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         preexec_fn=_die_with_parent)
        self.started = time.monotonic()
        threading.Thread(target=self._reader, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.kill()
        with open(self.serial_path, "wb") as f:
            f.write(bytes(self._serial))

    def _reader(self):
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._serial += chunk
                self._cond.notify_all()

    @property
    def serial(self) -> str:
        with self._cond:
            return self._serial.decode(errors="replace").replace("\r", "")

    @property
    def stderr(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def describe(self) -> str:
        rc = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = self.proc.wait(5 if self._eof else 0)
        return (f"qemu pid {self.proc.pid if self.proc else '-'}, exit status {rc}\n"
                f"--- serial (tail) ---\n{self.serial[-3000:]}\n--- stderr ---\n{self.stderr[-2000:]}")

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """Wait until the serial output (from character ``start`` on) matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._serial.decode(errors="replace").replace("\r", "")
                found = regex.search(text, start)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    break
                self._cond.wait(min(left, 1.0))
        what = "QEMU exited" if self._eof else f"no {pattern!r} within {timeout:.0f} s"
        raise AssertionError(f"{what}\n{self.describe()}")

    def command(self, word: str, reply: str, timeout: float = COMMAND_TIMEOUT) -> re.Match:
        start = len(self.serial)
        self.send(word)
        return self.wait_for(reply, timeout, start)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU still running after {timeout:.0f} s\n{self.describe()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # by its pid, never by name
            self.proc.wait(30)
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()


class Kit:
    def __init__(self, work: str, kernel: str, initrd: str):
        self.work = work
        self.kernel = kernel
        self.initrd = initrd
        self.accel = "tcg"
        self.accel_reason = ""
        self.timings: dict[str, float] = {}

    def qemu(self, name: str, mem_path: str | None, tag: str, accel: str | None = None,
             monitor: str | None = None) -> Qemu:
        return Qemu(qemu_argv(accel or self.accel, self.kernel, self.initrd, tag, mem_path, monitor),
                    self.work, name)


def choose_accel(kit: Kit) -> tuple[str, str]:
    """KVM when it boots this guest, TCG otherwise; returns (accel, why)."""
    forced = os.environ.get("UFSGMEM_QEMU_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced, "UFSGMEM_QEMU_ACCEL"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    if os.path.exists("/sys/module/kvm_pvm"):
        return "tcg", ("KVM here is PVM (module kvm_pvm), which runs only PVM-aware guest kernels: Debian's "
                       "kernel triple-faults (-cpu host/max: QEMU asserts on MSR 0x10a)")
    with kit.qemu("kvm-probe", None, "probe", accel="kvm") as q:
        try:
            q.wait_for(r"UFSGMEM-READY", 30)
            q.command("off", r"Power down|UFSGMEM-OFF")
            q.wait_exit(30)
        except AssertionError as exc:
            return "tcg", f"a KVM boot failed: {str(exc).splitlines()[0]}; {_tail(q.stderr, 2)}"
    return "kvm", "a KVM boot of the same guest worked"


@pytest.fixture(scope="module")
def kit():
    """QEMU, busybox-static, cpio and a Debian kernel (installed when missing), the initramfs, the accel."""
    work = tempfile.mkdtemp(prefix="ufsgmem-qemu-")
    try:
        t0 = time.monotonic()
        apt = Apt()
        missing = [pkg for pkg, ok in (("qemu-system-x86", shutil.which("qemu-system-x86_64")),
                                       ("busybox-static", _is_static_elf("/bin/busybox")),
                                       ("cpio", shutil.which("cpio"))) if not ok]
        if "busybox-static" in missing and os.path.exists("/bin/busybox"):
            missing.remove("busybox-static")  # a dynamic busybox is installed: leave it, unpack the static one
            busybox = apt.extract("busybox-static", "./bin/busybox", work)[0]
        else:
            busybox = "/bin/busybox"
        if missing:
            apt.install(*missing)
        kernel = debian_kernel(apt, work)
        t_install = time.monotonic() - t0

        with open(os.path.join(work, "init"), "w") as f:
            f.write(INIT)
        script = BUILD_INITRAMFS.replace("/bin/busybox ", f"{busybox} ")
        r = subprocess.run(["sh", "-c", script], cwd=work, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"building the initramfs failed: {r.stderr}"
        kit = Kit(work, kernel, os.path.join(work, "initramfs.cpio"))
        kit.timings["install"] = t_install
        t0 = time.monotonic()
        kit.accel, kit.accel_reason = choose_accel(kit)
        kit.timings["accel choice"] = time.monotonic() - t0
        print(f"\nqemu: {kernel}, accel {kit.accel} ({kit.accel_reason}); setup {t_install:.1f} s")
        yield kit
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def vmfile(fuse_mount, request):  # noqa: F811
    """``vmfile(name, create_request)`` -> GmemFile on the module's mount; destroyed after the test (QEMU is
    dead by then: each test stops its own in a with-block)."""
    made = []

    def make(name: str, create: str) -> GmemFile:
        fuse_mount.ctl(create)
        made.append(name)
        return GmemFile(os.path.join(fuse_mount.path, name))

    yield make
    for name in made:
        with contextlib.suppress(OSError):
            fuse_mount.ctl(f"destroy {name}")


class Monitor:
    """QEMU's human monitor (HMP) on a unix socket: one command at a time, its output returned."""

    PROMPT = b"(qemu) "

    def __init__(self, path: str, timeout: float = 30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._read_to_prompt()

    def _read_to_prompt(self) -> bytes | None:
        """Output up to the next prompt; None when QEMU closed the socket first (it died)."""
        data = b""
        while not data.endswith(self.PROMPT):
            try:
                chunk = self.sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            data += chunk
        return data[:-len(self.PROMPT)]

    def command(self, line: str) -> str | None:
        self.sock.sendall(line.encode() + b"\n")
        out = self._read_to_prompt()
        # HMP echoes the line (with terminal escapes) before the output
        return None if out is None else re.sub(rb"\x1b\[[0-9;]*[A-Za-z]", b"", out).decode(errors="replace")

    def close(self):
        self.sock.close()


def new_tag() -> str:
    return os.urandom(6).hex()


def find_pages(gmem: GmemFile, which: str, tag: str) -> dict[int, int]:
    """File offset of each page of the guest's /``which``, found through ``NAME/guest`` (pread; mapping
    ``mem`` here would drop QEMU's page cache). Asserts each page is there once and whole."""
    head = f"UFSGMEM-{which}-{tag}-".encode()
    where: dict[int, list[int]] = {}
    chunk = 8 << 20
    for base in range(0, gmem.size, chunk):
        data = gmem.guest_read(base, chunk)
        at = data.find(head)
        while at >= 0:
            if at % PAGE == 0:
                index = int(data[at + len(head):at + len(head) + 5])
                where.setdefault(index, []).append(base + at)
            at = data.find(head, at + 1)
    assert sorted(where) == list(range(PAGES_PER_FILE)), f"/{which}: pages found {sorted(where)}"
    dup = {i: offs for i, offs in where.items() if len(offs) > 1}
    assert not dup, f"/{which}: pages found more than once: {dup}"
    pages = {i: offs[0] for i, offs in where.items()}
    for i, off in pages.items():
        assert gmem.guest_read(off, PAGE) == expected_page(which, tag, i)
    return pages


def convert_pages(gmem: GmemFile, offsets, private: bool) -> None:
    """One ``ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2)`` per run of adjacent pages."""
    runs: list[list[int]] = []
    for off in sorted(offsets):
        if runs and runs[-1][1] == off:
            runs[-1][1] = off + PAGE
        else:
            runs.append([off, off + PAGE])
    for start, end in runs:
        gmem.set_memory_attributes(start, end - start, KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)


# --- the tests -------------------------------------------------------------------------------------------
def test_qemu_boots_with_its_ram_on_a_ufsgmem_file(kit, fuse_mount, vmfile):  # noqa: F811
    vm = vmfile("vm", f"create vm size={RAM} flags=mmap|init_shared")
    tag = new_tag()
    with kit.qemu("boot", vm.path + "/mem", tag) as q:
        ready = q.wait_for(r"UFSGMEM-READY (\S+) MemTotal: +(\d+) kB", BOOT_TIMEOUT)
        boot_s = time.monotonic() - q.started
        assert 150_000 < int(ready.group(2)) <= RAM_BYTES >> 10  # the guest sees (most of) the 256 MiB
        # what the booting guest touched: handed to QEMU's mapping (committed), allocated once written back
        touched = vm.status()["committed_bytes"]
        assert touched >= 64 << 20
        # what the guest wrote into its tmpfs is in the ufsgmem file, page by page
        pat = find_pages(vm, "pat", tag)
        keep = find_pages(vm, "keep", tag)
        assert set(pat.values()).isdisjoint(keep.values())
        assert q.command("sum-keep", r"UFSGMEM-SUM keep ([0-9a-f]{32})").group(1) == expected_md5("keep", tag)
        q.send("off")
        assert q.wait_exit(COMMAND_TIMEOUT) == 0, q.describe()
        assert "reboot: Power down" in q.serial
    status = vm.status()
    assert status["private_bytes"] == 0 and status["revocations"] == 0, status
    # QEMU is gone; the file keeps the guest's RAM
    assert vm.guest_read(pat[7], PAGE) == expected_page("pat", tag, 7)
    print(f"\nboot to READY {boot_s:.1f} s ({kit.accel}); the boot touched {touched >> 20} MiB")


def test_converting_qemu_ram_to_private_while_it_runs(kit, fuse_mount, vmfile):  # noqa: F811
    vm = vmfile("vmc", f"create vmc size={RAM} flags=mmap|init_shared")
    tag = new_tag()
    with kit.qemu("convert", vm.path + "/mem", tag) as q:
        q.wait_for(r"UFSGMEM-READY", BOOT_TIMEOUT)
        pat = find_pages(vm, "pat", tag)
        keep = find_pages(vm, "keep", tag)
        before = vm.status()

        # 1. RAM the guest does not touch can be private while it runs: the guest goes on.
        convert_pages(vm, keep.values(), private=True)
        after = vm.status()
        assert after["private_bytes"] == PAGES_PER_FILE * PAGE
        assert after["revoked_bytes"] - before["revoked_bytes"] >= PAGES_PER_FILE * PAGE  # unmapped from QEMU
        q.command("ping", r"UFSGMEM-PONG")
        assert q.proc.poll() is None
        assert vm.guest_read(keep[3], PAGE) == expected_page("keep", tag, 3)  # the guest view still has it
        # ...and back to shared: the guest reads the same bytes
        convert_pages(vm, keep.values(), private=False)
        assert q.command("sum-keep", r"UFSGMEM-SUM keep ([0-9a-f]{32})").group(1) == expected_md5("keep", tag)

        # 2. The guest reading a private page: TCG reads guest RAM through QEMU's mapping of mem, where the
        # page was revoked, so QEMU's access faults, ufsgmem refuses the fill, and QEMU dies of SIGBUS.
        convert_pages(vm, pat.values(), private=True)
        assert vm.status()["private_bytes"] == PAGES_PER_FILE * PAGE
        q.send("sum-pat")
        if kit.accel == "tcg":
            rc = q.wait_exit(COMMAND_TIMEOUT)
            assert rc == -signal.SIGBUS, q.describe()
        else:  # not measured: KVM faults the page in through the same mapping; KVM_RUN fails (QEMU reports it
            # and stops the guest) or QEMU gets SIGBUS
            deadline = time.monotonic() + COMMAND_TIMEOUT
            while q.proc.poll() is None and "kvm run failed" not in q.stderr and time.monotonic() < deadline:
                time.sleep(0.2)
            rc = q.proc.poll()
            assert rc not in (None, 0) or "kvm run failed" in q.stderr, q.describe()
        assert "UFSGMEM-SUM pat" not in q.serial, q.describe()
    # The private content is intact in the file (the guest's view), though QEMU could not read it.
    assert vm.guest_read(pat[0], PAGE) == expected_page("pat", tag, 0)
    print(f"\nQEMU ({kit.accel}) after touching private RAM: exit status {rc}; stderr {q.stderr.strip()!r}")


def test_qemu_itself_reading_private_guest_ram_dies_of_sigbus(kit, fuse_mount, vmfile):  # noqa: F811
    """Not the guest: QEMU's own code (here the monitor's ``xp``, as device models, dumps and migration
    do) reads guest RAM through its mapping of mem, whatever the accelerator."""
    vm = vmfile("vmq", f"create vmq size={RAM} flags=mmap|init_shared")
    tag = new_tag()
    sock = os.path.join(kit.work, "monitor.sock")
    with kit.qemu("monitor", vm.path + "/mem", tag, monitor=sock) as q:
        q.wait_for(r"UFSGMEM-READY", BOOT_TIMEOUT)
        keep = find_pages(vm, "keep", tag)
        mon = Monitor(sock)
        try:
            # guest physical address == offset in mem (q35, RAM below 4 GiB): QEMU reads the page's header
            out = mon.command(f"xp /8xb {keep[2]:#x}")
            assert out is not None and re.search(r"0x55 0x46 0x53 0x47 0x4d 0x45 0x4d 0x2d", out), out
            convert_pages(vm, [keep[2]], private=True)
            out = mon.command(f"xp /8xb {keep[2]:#x}")
        finally:
            mon.close()
        assert out is None, f"the monitor answered {out!r}"  # QEMU died before it could answer
        rc = q.wait_exit(COMMAND_TIMEOUT)
        assert rc == -signal.SIGBUS, q.describe()
    print(f"\nQEMU ({kit.accel}) reading private RAM from its monitor: exit status {rc}")


@pytest.mark.hugetlb
def test_qemu_on_a_hugetlb_backed_file(kit, fuse_mount, vmfile, hugepages):  # noqa: F811
    def convert_all(to: str) -> None:
        r = subprocess.run([sys.executable, "-m", "ufsgmem", "convert", vm.path, "--offset", "0",
                            "--size", RAM, "--to", to], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    folios = RAM_BYTES // SZ_2M
    with hugepages(SZ_2M, folios):
        vm = vmfile("vmh", f"create vmh size={RAM} flags=mmap backend=hugetlb page_size=2M")
        try:
            status = vm.status()
            assert status["backend"] == "hugetlb" and status["page_size"] == SZ_2M
            # huge page files start private, every 2 MiB folio whole; shared, each is split for the host
            assert status["private_bytes"] == RAM_BYTES and status["huge_folios"] == {"whole": folios, "split": 0}
            convert_all("shared")
            assert vm.status()["huge_folios"] == {"whole": 0, "split": folios}
            tag = new_tag()
            with kit.qemu("hugetlb", vm.path + "/mem", tag) as q:
                q.wait_for(r"UFSGMEM-READY", BOOT_TIMEOUT)
                keep = find_pages(vm, "keep", tag)
                # a 4 KiB page of the running guest private and back: the guest goes on, the bytes stay
                convert_pages(vm, [keep[5]], private=True)
                assert vm.status()["private_bytes"] == PAGE
                q.command("ping", r"UFSGMEM-PONG")
                convert_pages(vm, [keep[5]], private=False)
                assert q.command("sum-keep", r"UFSGMEM-SUM keep ([0-9a-f]{32})").group(1) == \
                    expected_md5("keep", tag)
                q.send("off")
                assert q.wait_exit(COMMAND_TIMEOUT) == 0, q.describe()
            # with QEMU gone, all private again: every folio whole again, the guest's pages still there
            convert_all("private")
            status = vm.status()
            assert status["huge_folios"] == {"whole": folios, "split": 0}, status
            assert status["backend_bytes"] == RAM_BYTES, status  # exactly the pool pages, nothing more
            assert vm.guest_read(keep[9], PAGE) == expected_page("keep", tag, 9)
        finally:
            with contextlib.suppress(OSError):  # before the pool shrinks: the pages must be free by then
                fuse_mount.ctl("destroy vmh")
