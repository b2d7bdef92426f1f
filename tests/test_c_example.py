"""examples/convert_demo.c, built with gcc and run against a real mount: the binary protocol from C with
only open/mmap/write/read (create, convert, SIGBUS via sigsetjmp, content kept, EAGAIN + error_offset)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from clientfix import mounted

pytestmark = pytest.mark.fuse

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def convert_demo(tmp_path_factory):
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    exe = tmp_path_factory.mktemp("cbuild") / "convert_demo"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(EXAMPLES / "convert_demo.c")],
                   check=True, capture_output=True, text=True)
    return exe


def test_header_compiles_alongside_linux_kvm_h(tmp_path):
    """ufsgmem.h may be included after <linux/kvm.h> without clashing definitions."""
    src = tmp_path / "both.c"
    src.write_text('#include <linux/kvm.h>\n#include "ufsgmem.h"\n'
                   "int main(void) { struct ufsgmem_create_request r; return sizeof(r) != 168; }\n")
    subprocess.run(["gcc", "-Wall", "-Werror", f"-I{EXAMPLES}", "-o", str(tmp_path / "both"), str(src)],
                   check=True, capture_output=True, text=True)
    assert subprocess.run([str(tmp_path / "both")]).returncode == 0


def test_convert_demo_runs_against_a_mount(convert_demo, tmp_path):
    with mounted(str(tmp_path / "mnt")) as mnt:
        done = subprocess.run([str(convert_demo), mnt, "cdemo"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "raised SIGBUS" in done.stdout and "error_offset 0x3000" in done.stdout
        assert "all checks passed" in done.stdout
        assert not os.path.exists(os.path.join(mnt, "cdemo")), "the demo destroys its file"


def test_header_layout_matches_the_python_client(tmp_path):
    """The same requests built in C with ufsgmem.h and in Python with ufsgmem.client are byte-identical."""
    from ufsgmem.protocol import attributes2_request, create_request
    src = tmp_path / "layout.c"
    src.write_text(r'''
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "ufsgmem.h"
int main(void)
{
	struct ufsgmem_create_request c;
	struct ufsgmem_attributes2_request a;
	memset(&c, 0, sizeof(c));
	memset(&a, 0, sizeof(a));
	memcpy(c.magic, UFSGMEM_MAGIC, UFSGMEM_MAGIC_LEN);
	c.cmd = KVM_CREATE_GUEST_MEMFD;
	c.gmem.size = 0x40000000;
	c.gmem.flags = GUEST_MEMFD_FLAG_MMAP;
	c.gmem.reserved[0] = UFSGMEM_PAGE_ORDER_2M;
	strcpy(c.name, "vm0");
	strcpy(c.backend, "hugetlb");
	memcpy(a.magic, UFSGMEM_MAGIC, UFSGMEM_MAGIC_LEN);
	a.cmd = KVM_SET_MEMORY_ATTRIBUTES2;
	a.attr.offset = 0x200000;
	a.attr.size = 0x1000;
	a.attr.attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE;
	return write(1, &c, sizeof(c)) != sizeof(c) || write(1, &a, sizeof(a)) != sizeof(a);
}
''')
    subprocess.run(["gcc", "-Wall", "-Werror", f"-I{EXAMPLES}", "-o", str(tmp_path / "layout"), str(src)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True).stdout
    assert out == create_request("vm0", 1 << 30, 1, "hugetlb", 9) + attributes2_request(0x200000, 0x1000, 8)


def test_header_constants_equal_the_python_protocol(tmp_path):
    """Every number examples/ufsgmem.h defines for the wire format equals ufsgmem.protocol's (and the
    kernel numbers it repeats equal ufsgmem.uapi's): the C header is the same format, not a second one."""
    from ufsgmem import protocol, uapi
    names = ["UFSGMEM_MAGIC_LEN", "UFSGMEM_NAME_LEN", "UFSGMEM_BACKEND_LEN", "UFSGMEM_PAGE_ORDER_DEFAULT",
             "UFSGMEM_PAGE_ORDER_2M", "UFSGMEM_PAGE_ORDER_1G", "GUEST_MEMFD_FLAG_MMAP", "GUEST_MEMFD_FLAG_INIT_SHARED",
             "KVM_MEMORY_ATTRIBUTE_PRIVATE", "KVM_CREATE_GUEST_MEMFD", "KVM_SET_MEMORY_ATTRIBUTES2",
             "sizeof(struct ufsgmem_create_request)", "sizeof(struct ufsgmem_attributes2_request)",
             "offsetof(struct kvm_memory_attributes2, error_offset)"]
    src = tmp_path / "constants.c"
    src.write_text('#include <stddef.h>\n#include <stdio.h>\n#include "ufsgmem.h"\nint main(void)\n{\n'
                   '\tprintf("%s\\n", UFSGMEM_MAGIC);\n'
                   + "".join(f'\tprintf("%llu\\n", (unsigned long long)({n}));\n' for n in names) + "\treturn 0;\n}\n")
    subprocess.run(["gcc", "-Wall", "-Werror", f"-I{EXAMPLES}", "-o", str(tmp_path / "constants"), str(src)],
                   check=True, capture_output=True, text=True)
    magic, *values = subprocess.run([str(tmp_path / "constants")], check=True, capture_output=True,
                                    text=True).stdout.split("\n")[:-1]
    in_c = dict(zip(names, map(int, values)))
    orders = {size: order for order, size in protocol.PAGE_ORDERS.items()}
    assert magic.encode() == protocol.MAGIC
    assert in_c == {
        "UFSGMEM_MAGIC_LEN": len(protocol.MAGIC), "UFSGMEM_NAME_LEN": protocol.NAME_LEN,
        "UFSGMEM_BACKEND_LEN": protocol.BACKEND_LEN, "UFSGMEM_PAGE_ORDER_DEFAULT": orders[None],
        "UFSGMEM_PAGE_ORDER_2M": orders[uapi.SZ_2M], "UFSGMEM_PAGE_ORDER_1G": orders[uapi.SZ_1G],
        "GUEST_MEMFD_FLAG_MMAP": protocol.FLAG_NAMES["mmap"],
        "GUEST_MEMFD_FLAG_INIT_SHARED": protocol.FLAG_NAMES["init_shared"],
        "KVM_MEMORY_ATTRIBUTE_PRIVATE": protocol.ATTRIBUTE_NAMES["private"],
        "KVM_CREATE_GUEST_MEMFD": uapi.KVM_CREATE_GUEST_MEMFD,
        "KVM_SET_MEMORY_ATTRIBUTES2": uapi.KVM_SET_MEMORY_ATTRIBUTES2,
        "sizeof(struct ufsgmem_create_request)": protocol.CREATE_LEN,
        "sizeof(struct ufsgmem_attributes2_request)": protocol.ATTRIBUTES_LEN,
        "offsetof(struct kvm_memory_attributes2, error_offset)": protocol.ERROR_OFFSET_AT,
    }
    assert [protocol.page_order(size) for size in (None, uapi.SZ_2M, uapi.SZ_1G)] == [
        in_c["UFSGMEM_PAGE_ORDER_DEFAULT"], in_c["UFSGMEM_PAGE_ORDER_2M"], in_c["UFSGMEM_PAGE_ORDER_1G"]]
