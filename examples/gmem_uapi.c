/*
 * gmem_uapi.c - exercise a guest_memfd through the kernel's own system calls, the way a VMM would.
 *
 *   cc -Wall -Wextra -O2 -o gmem_uapi examples/gmem_uapi.c
 *   ./gmem_uapi --kvm  [--size BYTES] [--vm-type N]       a guest_memfd from the running kernel
 *   ./gmem_uapi --path MOUNT/NAME/mem [--size BYTES] [--pinned OFFSET]
 *                                                          any file that claims to be one (ufsgmem)
 *
 * Everything below the point where the fd is obtained is plain uAPI: mmap(MAP_SHARED), read/write,
 * pread/pwrite, fallocate(FALLOC_FL_KEEP_SIZE[|FALLOC_FL_PUNCH_HOLE]) and
 * ioctl(KVM_SET_MEMORY_ATTRIBUTES2) on the guest_memfd fd (in-place conversion, v8: 0xC080AED2,
 * struct kvm_memory_attributes2, 128 bytes). Only how the fd is obtained differs:
 *
 *   --kvm         open /dev/kvm, KVM_CREATE_VM(type, default 0), KVM_CREATE_GUEST_MEMFD with
 *                 GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED and --size
 *   --path FILE   open(FILE, O_RDWR); FILE must be --size bytes (default 4 MiB), MMAP|INIT_SHARED
 *
 * (mmap MAP_PRIVATE is only reported as a "#" line: the kernel refuses it with EINVAL, a FUSE file
 * cannot refuse it, and a VMM never asks for it.)
 *
 * --pinned OFFSET says that whoever created the file holds a long-term pin on the page at OFFSET (e.g.
 * `pin offset=OFFSET size=0x1000` on a ufsgmem NAME/ctl), so converting the whole file to private must
 * fail with EAGAIN and error_offset == OFFSET. The program then does what a VMM does with EAGAIN:
 * converts everything around the page it names, and reports the page it had to leave shared.
 *
 * Output is TAP-like: one line per numbered check, "ok N - what" or "not ok N - what: what was seen",
 * "# ..." lines for information, then the plan "1..N" and a summary "P passed, F failed[, S skipped]".
 * A kernel whose guest_memfd has no KVM_SET_MEMORY_ATTRIBUTES2 answers it with ENOTTY (mainline up to
 * at least 6.18/7.0, or kvm.gmem_in_place_conversion=0): the conversion checks are then printed as
 * "ok N - ... # SKIP KVM_SET_MEMORY_ATTRIBUTES2 is ENOTTY here" and counted as skipped.
 * Exit status: 0 when nothing failed, 1 when a check failed, 2 for a usage error, and 77 (with
 * "1..0 # SKIP reason") when --kvm cannot get a guest_memfd of this kind on this machine at all.
 *
 * The parent never touches the guest_memfd mapping itself: every access runs in a forked child, which
 * reports what it read, or that it died of SIGBUS (and where). A private page or a bug in the file
 * under test therefore cannot crash the program.
 *
 * Notes on a real in-place-conversion kernel (v8): the ioctl checks that the VM has private memory
 * (kvm_arch_has_private_mem) before anything else, so with a default (type 0) VM every conversion is
 * EINVAL; use --vm-type 1 (KVM_X86_SW_PROTECTED_VM) there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <linux/falloc.h>
#include <linux/kvm.h>

/* ---- the uAPI this program relies on; older <linux/kvm.h> (Debian 12 has 6.1) lacks all of it ---- */

#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_CAP_GUEST_MEMFD_FLAGS
#define KVM_CAP_GUEST_MEMFD_FLAGS 244 /* was KVM_CAP_GUEST_MEMFD_MMAP during 6.18-rc */
#endif
#ifndef GUEST_MEMFD_FLAG_MMAP
#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#endif
#ifndef GUEST_MEMFD_FLAG_INIT_SHARED
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#endif
#ifndef KVM_MEMORY_ATTRIBUTE_PRIVATE
#define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ULL << 3)
#endif

/* 6.8: a VM ioctl returning the new fd */
#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
	__u64 size;
	__u64 flags;
	__u64 reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif

/* in-place conversion (v8): an ioctl on the guest_memfd fd itself */
#ifndef KVM_SET_MEMORY_ATTRIBUTES2
struct kvm_memory_attributes2 {
	union {
		__u64 address;
		__u64 offset;
	};
	__u64 size;
	__u64 attributes;
	__u64 flags;
	__u64 error_offset; /* out, on failure */
	__u64 reserved[11];
};
#define KVM_SET_MEMORY_ATTRIBUTES2 _IOWR(KVMIO, 0xd2, struct kvm_memory_attributes2)
#endif

/* the VM-level ioctl (6.8); issued on a guest_memfd fd it is just an unknown command */
#ifndef KVM_SET_MEMORY_ATTRIBUTES
struct kvm_memory_attributes {
	__u64 address;
	__u64 size;
	__u64 attributes;
	__u64 flags;
};
#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
#endif

_Static_assert(sizeof(struct kvm_create_guest_memfd) == 64, "kvm_create_guest_memfd is 64 bytes");
_Static_assert(sizeof(struct kvm_memory_attributes2) == 128, "kvm_memory_attributes2 is 128 bytes");
_Static_assert(KVM_CREATE_GUEST_MEMFD == 0xC040AED4u, "KVM_CREATE_GUEST_MEMFD");
_Static_assert(KVM_SET_MEMORY_ATTRIBUTES2 == 0xC080AED2u, "KVM_SET_MEMORY_ATTRIBUTES2");
_Static_assert(KVM_SET_MEMORY_ATTRIBUTES == 0x4020AED2u, "KVM_SET_MEMORY_ATTRIBUTES");

#define SHARED 0ULL
#define PRIVATE KVM_MEMORY_ATTRIBUTE_PRIVATE
#define SENTINEL 0x5eed5eed5eed5000ULL /* error_offset passed in where the kernel must leave it alone */
#define CHILD_TIMEOUT 20               /* seconds for any one forked probe */

/* ---- reporting ----------------------------------------------------------------------------------- */

static unsigned n_checks, n_passed, n_failed, n_skipped;
static const char *skip_reason; /* set once the conversion ioctl turns out to be ENOTTY */

static void report(int ok, const char *what, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* One numbered check. fmt describes what was seen; it is printed only when the check failed. */
static void report(int ok, const char *what, const char *fmt, ...)
{
	n_checks++;
	if (ok) {
		n_passed++;
		printf("ok %u - %s\n", n_checks, what);
		return;
	}
	n_failed++;
	printf("not ok %u - %s: ", n_checks, what);
	va_list ap;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

/* For the conversion checks: prints the check as skipped (and returns 1) when conversion is ENOTTY. */
static int skipped(const char *what)
{
	if (!skip_reason)
		return 0;
	n_checks++;
	n_skipped++;
	printf("ok %u - %s # SKIP %s\n", n_checks, what, skip_reason);
	return 1;
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	printf("# ");
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

static int finish(void)
{
	printf("1..%u\n", n_checks);
	if (n_skipped)
		printf("%u passed, %u failed, %u skipped\n", n_passed, n_failed, n_skipped);
	else
		printf("%u passed, %u failed\n", n_passed, n_failed);
	fflush(stdout);
	return n_failed ? 1 : 0;
}

static const char *errname(int e)
{
	switch (e) {
	case 0: return "success";
	case EINVAL: return "EINVAL";
	case EAGAIN: return "EAGAIN";
	case ENOTTY: return "ENOTTY";
	case ESPIPE: return "ESPIPE";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case ENOMEM: return "ENOMEM";
	case EFAULT: return "EFAULT";
	case EBADF: return "EBADF";
	case ENODEV: return "ENODEV";
	case EACCES: return "EACCES";
	case EPERM: return "EPERM";
	case EIO: return "EIO";
	case ENOSYS: return "ENOSYS";
	case EINTR: return "EINTR";
	case EFBIG: return "EFBIG";
	default: return strerror(e);
	}
}

/* ---- the file under test and the expected content -------------------------------------------------- */

static int gmem = -1;
static uint64_t size = 4ULL << 20;
static uint64_t ps;      /* page size */
static uint64_t npages;
static unsigned char *map; /* MAP_SHARED over the whole file; touched only by children */
static uint8_t *seed;    /* per page: 0 = zeros, else the pattern generation written there */

static uint8_t pattern(uint8_t s, uint64_t off)
{
	if (!s)
		return 0;
	return (uint8_t)((s * 131u) ^ (uint32_t)(off * 7 + (off / 4096) * 13) ^ 0x5a);
}

/* ---- accesses in a forked child ------------------------------------------------------------------- */

enum op { OP_READ, OP_WRITE, OP_FILL, OP_VERIFY };

struct result {
	int done;        /* the operation ran to the end */
	int mismatch;    /* OP_VERIFY: a byte differed */
	uint64_t off;    /* mismatch: where */
	uint8_t got, want, pad[6];
	int bus;         /* the SIGBUS handler ran */
	uint64_t bus_off;
};

enum outcome { DONE, BUS, DIED };

struct child {
	enum outcome outcome;
	int sig;         /* DIED: the signal, or 0 with status in code */
	int code;
	struct result r;
};

static int report_fd = -1;
static unsigned char *bus_base;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	struct result r;
	memset(&r, 0, sizeof(r));
	r.bus = 1;
	r.bus_off = (uint64_t)((unsigned char *)si->si_addr - bus_base);
	if (write(report_fd, &r, sizeof(r)) < 0) {
		/* nothing to do: the parent sees the SIGBUS anyway */
	}
	/* SA_RESETHAND: returning re-runs the access, which now kills the child with SIGBUS */
}

static void child_setup(int fd, unsigned char *base)
{
	struct rlimit no_core = { 0, 0 };
	struct sigaction sa;

	setrlimit(RLIMIT_CORE, &no_core);
	report_fd = fd;
	bus_base = base;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_RESETHAND;
	sigaction(SIGBUS, &sa, NULL);
	alarm(CHILD_TIMEOUT);
}

static void child_send(const struct result *r)
{
	if (write(report_fd, r, sizeof(*r)) != (ssize_t)sizeof(*r))
		_exit(3);
}

/* Read results from a child until EOF; keep the last one. Returns 1 if one arrived. */
static int collect(int fd, struct result *r)
{
	struct result tmp;
	int got = 0;
	ssize_t n;

	while ((n = read(fd, &tmp, sizeof(tmp))) == (ssize_t)sizeof(tmp)) {
		*r = tmp;
		got = 1;
	}
	return got;
}

static void reap(pid_t pid, struct child *c)
{
	int status;

	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS) {
		c->outcome = BUS;
		c->sig = SIGBUS;
	} else if (WIFSIGNALED(status)) {
		c->outcome = DIED;
		c->sig = WTERMSIG(status);
	} else if (WEXITSTATUS(status) != 0 || !c->r.done) {
		c->outcome = DIED;
		c->code = WEXITSTATUS(status);
	} else {
		c->outcome = DONE;
	}
}

/* Run one access in a child over the parent's mapping (inherited by fork, MAP_SHARED). */
static void in_child(enum op op, uint64_t off, uint64_t len, uint8_t val, struct child *c)
{
	int p[2];
	pid_t pid;

	memset(c, 0, sizeof(*c));
	if (pipe(p) < 0) {
		c->outcome = DIED;
		c->code = -errno;
		return;
	}
	fflush(stdout);
	pid = fork();
	if (pid < 0) {
		c->outcome = DIED;
		c->code = -errno;
		close(p[0]);
		close(p[1]);
		return;
	}
	if (pid == 0) {
		struct result r;
		volatile unsigned char *m = map;

		close(p[0]);
		child_setup(p[1], map);
		memset(&r, 0, sizeof(r));
		switch (op) {
		case OP_READ:
			r.got = m[off];
			break;
		case OP_WRITE:
			m[off] = val;
			break;
		case OP_FILL:
			for (uint64_t o = off; o < off + len; o++)
				m[o] = pattern(seed[o / ps], o);
			break;
		case OP_VERIFY:
			for (uint64_t o = off; o < off + len; o++) {
				uint8_t want = pattern(seed[o / ps], o), got = m[o];
				if (got != want) {
					r.mismatch = 1;
					r.off = o;
					r.got = got;
					r.want = want;
					break;
				}
			}
			break;
		}
		r.done = 1;
		child_send(&r);
		_exit(0);
	}
	close(p[1]);
	collect(p[0], &c->r);
	close(p[0]);
	reap(pid, c);
}

/* Describe a child's outcome for a "not ok" line. */
static const char *seen(const struct child *c)
{
	static char bufs[4][160]; /* several may appear in one message */
	static unsigned next;
	char *buf = bufs[next++ % 4];

	switch (c->outcome) {
	case DONE:
		if (c->r.mismatch)
			snprintf(buf, sizeof(bufs[0]), "byte at 0x%" PRIx64 " is 0x%02x, expected 0x%02x",
				 c->r.off, c->r.got, c->r.want);
		else
			snprintf(buf, sizeof(bufs[0]), "the access succeeded (read 0x%02x)", c->r.got);
		break;
	case BUS:
		if (c->r.bus)
			snprintf(buf, sizeof(bufs[0]), "SIGBUS at offset 0x%" PRIx64, c->r.bus_off);
		else
			snprintf(buf, sizeof(bufs[0]), "SIGBUS");
		break;
	case DIED:
		if (c->sig == SIGALRM)
			snprintf(buf, sizeof(bufs[0]), "the access hung for %d s", CHILD_TIMEOUT);
		else if (c->sig)
			snprintf(buf, sizeof(bufs[0]), "the probe died of signal %d (%s)", c->sig, strsignal(c->sig));
		else
			snprintf(buf, sizeof(bufs[0]), "the probe failed (status %d)", c->code);
		break;
	}
	return buf;
}

/* The bytes of [first, first+count) pages match the model. */
static int verify_pages(uint64_t first, uint64_t count, struct child *c)
{
	in_child(OP_VERIFY, first * ps, count * ps, 0, c);
	return c->outcome == DONE && !c->r.mismatch;
}

/* Write what the model says into [first, first+count) pages (after a write that should not have been). */
static int rewrite_pages(uint64_t first, uint64_t count, struct child *c)
{
	in_child(OP_FILL, first * ps, count * ps, 0, c);
	return c->outcome == DONE;
}

/* Fill pages with pattern generation s. */
static int fill_pages(uint64_t first, uint64_t count, uint8_t s, struct child *c)
{
	for (uint64_t i = first; i < first + count; i++)
		seed[i] = s;
	return rewrite_pages(first, count, c);
}

/* A read of the byte at off raises SIGBUS (in this process's mapping, through a child). */
static int read_sigbus(uint64_t off, struct child *c)
{
	in_child(OP_READ, off, 1, 0, c);
	return c->outcome == BUS;
}

static int write_sigbus(uint64_t off, struct child *c)
{
	in_child(OP_WRITE, off, 1, 0xa5, c);
	return c->outcome == BUS;
}

/* ---- the system calls ------------------------------------------------------------------------------ */

/* KVM_SET_MEMORY_ATTRIBUTES2; returns 0 or the errno; *a holds what the kernel copied back. */
static int set_attrs(struct kvm_memory_attributes2 *a)
{
	int r;

	do
		r = ioctl(gmem, KVM_SET_MEMORY_ATTRIBUTES2, a);
	while (r < 0 && errno == EINTR);
	return r < 0 ? errno : 0;
}

static int convert(uint64_t off, uint64_t len, uint64_t attributes, uint64_t *error_offset)
{
	struct kvm_memory_attributes2 a;
	int e;

	memset(&a, 0, sizeof(a));
	a.offset = off;
	a.size = len;
	a.attributes = attributes;
	e = set_attrs(&a);
	if (error_offset)
		*error_offset = a.error_offset;
	return e;
}

static int falloc(int mode, uint64_t off, uint64_t len)
{
	int r;

	do
		r = fallocate(gmem, mode, (off_t)off, (off_t)len);
	while (r < 0 && errno == EINTR);
	return r < 0 ? errno : 0;
}

/* ---- getting the fd -------------------------------------------------------------------------------- */

static int skip_all(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int skip_all(const char *fmt, ...)
{
	va_list ap;
	printf("1..0 # SKIP ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	exit(77);
}

static void open_kvm(int vm_type)
{
	struct kvm_create_guest_memfd args;
	const uint64_t want = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
	int kvm, vm, caps;

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		skip_all("cannot open /dev/kvm: %s", strerror(errno));
	vm = ioctl(kvm, KVM_CREATE_VM, vm_type);
	if (vm < 0)
		skip_all("KVM_CREATE_VM(type %d): %s", vm_type, strerror(errno));
	if (ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) <= 0)
		skip_all("no KVM_CAP_GUEST_MEMFD: this kernel has no guest_memfd");
	caps = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_FLAGS);
	if (caps < 0 || ((uint64_t)caps & want) != want)
		skip_all("KVM_CAP_GUEST_MEMFD_FLAGS is %d on a type %d VM: no MMAP|INIT_SHARED guest_memfd "
			 "(mainline has it from 6.18)", caps, vm_type);
	memset(&args, 0, sizeof(args));
	args.size = size;
	args.flags = want;
	gmem = ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args);
	report(gmem >= 0, "KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED) gives a guest_memfd", "%s",
	       strerror(errno));
	/* the gmem file holds its own reference on the VM: the VM and /dev/kvm fds may go */
	close(vm);
	close(kvm);
}

static void open_path(const char *path)
{
	gmem = open(path, O_RDWR | O_CLOEXEC);
	char what[300];
	snprintf(what, sizeof(what), "open(%s, O_RDWR)", path);
	report(gmem >= 0, what, "%s", strerror(errno));
}

/* ---- the checks ------------------------------------------------------------------------------------ */

static void check_file_ops(void)
{
	unsigned char buf[4096 * 2];
	char what[200];
	struct child c;
	ssize_t n;

	memset(buf, 0xee, sizeof(buf));
	n = read(gmem, buf, ps < sizeof(buf) ? ps : sizeof(buf));
	report(n < 0 && errno == EINVAL, "read(2) fails with EINVAL",
	       "%s", n < 0 ? errname(errno) : "it returned data");

	/* write(2) (at the file position, 0 unless read(2) moved it): refused, the mapping sees no change */
	memset(buf, 0xee, sizeof(buf)); /* in case read(2) filled it */
	n = write(gmem, buf, ps < sizeof(buf) ? ps : sizeof(buf));
	int werr = n < 0 ? errno : 0;
	int same = verify_pages(0, npages, &c);
	report(n < 0 && werr == EINVAL && same,
	       "write(2) fails with EINVAL and the mapped bytes are unchanged",
	       "write gave %s; the mapping after it: %s", n < 0 ? errname(werr) : "success",
	       same ? "unchanged" : seen(&c));
	if (!same)
		rewrite_pages(0, npages, &c); /* put the pattern back for the checks that follow */

	n = pread(gmem, buf, 64, (off_t)ps);
	report(n < 0 && errno == ESPIPE, "pread(2) fails with ESPIPE",
	       "%s", n < 0 ? errname(errno) : "it returned data");

	memset(buf, 0xee, sizeof(buf));
	n = pwrite(gmem, buf, 64, (off_t)ps);
	werr = n < 0 ? errno : 0;
	same = verify_pages(0, npages, &c);
	snprintf(what, sizeof(what), "pwrite(2) fails with ESPIPE and the mapped bytes are unchanged");
	report(n < 0 && werr == ESPIPE && same, what, "pwrite gave %s; the mapping after it: %s",
	       n < 0 ? errname(werr) : "success", same ? "unchanged" : seen(&c));
	if (!same)
		rewrite_pages(0, npages, &c);
}

struct range {
	uint64_t off, len;
};

/* Every range in the table gives errno want with mode; returns 1, or 0 with the first offender in msg. */
static int falloc_table(int mode, const struct range *t, size_t n, int want, char *msg, size_t msglen)
{
	for (size_t i = 0; i < n; i++) {
		int e = falloc(mode, t[i].off, t[i].len);
		if (e != want) {
			snprintf(msg, msglen, "fallocate(0x%x, 0x%" PRIx64 ", 0x%" PRIx64 ") gave %s", mode,
				 t[i].off, t[i].len, errname(e));
			return 0;
		}
	}
	return 1;
}

static void check_fallocate(uint64_t punch_page)
{
	char msg[200], what[200];
	struct child c;
	int e;

	e = falloc(FALLOC_FL_KEEP_SIZE, 0, size);
	int same = e == 0 && verify_pages(0, npages, &c);
	report(e == 0 && same, "fallocate(KEEP_SIZE) of the whole file succeeds and keeps the content",
	       "fallocate gave %s%s%s", errname(e), e ? "" : "; content after it: ", e ? "" : seen(&c));

	const struct range past[] = { { size, ps }, { size - ps, 2 * ps }, { size + ps, ps } };
	report(falloc_table(FALLOC_FL_KEEP_SIZE, past, 3, EINVAL, msg, sizeof(msg)),
	       "fallocate(KEEP_SIZE) at or past EOF fails with EINVAL", "%s", msg);

	const struct range unaligned_alloc[] = { { 0, 1 }, { 0, ps - 1 }, { 1, ps }, { ps, ps + 1 } };
	report(falloc_table(FALLOC_FL_KEEP_SIZE, unaligned_alloc, 4, EINVAL, msg, sizeof(msg)),
	       "unaligned fallocate(KEEP_SIZE) fails with EINVAL", "%s", msg);

	/* the kernel selftest's invalid_punch_hole table */
	const struct range unaligned_punch[] = {
		{ 0, 1 }, { 0, ps - 1 }, { 0, ps + 1 }, { 1, 1 }, { 1, ps - 1 },
		{ 1, ps }, { 1, ps + 1 }, { ps, 1 }, { ps, ps - 1 }, { ps, ps + 1 },
	};
	report(falloc_table(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, unaligned_punch, 10, EINVAL, msg,
			    sizeof(msg)),
	       "unaligned fallocate(KEEP_SIZE|PUNCH_HOLE) fails with EINVAL", "%s", msg);

	const struct range page0[] = { { 0, ps } };
	report(falloc_table(0, page0, 1, EOPNOTSUPP, msg, sizeof(msg)),
	       "fallocate mode 0 (allocate and extend) fails with EOPNOTSUPP", "%s", msg);

	report(falloc_table(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, page0, 1, EOPNOTSUPP, msg, sizeof(msg)) &&
	       falloc_table(FALLOC_FL_ZERO_RANGE, page0, 1, EOPNOTSUPP, msg, sizeof(msg)),
	       "fallocate(ZERO_RANGE[|KEEP_SIZE]) fails with EOPNOTSUPP", "%s", msg);

	report(falloc_table(FALLOC_FL_PUNCH_HOLE, page0, 1, EOPNOTSUPP, msg, sizeof(msg)),
	       "fallocate(PUNCH_HOLE) without KEEP_SIZE fails with EOPNOTSUPP", "%s", msg);

	same = verify_pages(0, npages, &c);
	report(same, "the refused fallocate calls left the content alone", "%s", seen(&c));

	/* punch one page: it reads zeros through the existing mapping, its neighbours keep their bytes */
	e = falloc(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, punch_page * ps, ps);
	seed[punch_page] = 0;
	snprintf(what, sizeof(what),
		 "punching page 0x%" PRIx64 " zeroes it in the mapping and leaves its neighbours",
		 punch_page * ps);
	same = e == 0 && verify_pages(punch_page - 1, 3, &c);
	report(same, what, "punch gave %s%s%s", errname(e), e ? "" : "; then: ", e ? "" : seen(&c));

	snprintf(what, sizeof(what), "the punched page 0x%" PRIx64 " can be written again", punch_page * ps);
	int punched = e == 0;
	same = fill_pages(punch_page, 1, 3, &c) && verify_pages(punch_page, 1, &c);
	report(punched && same, what, "%s", punched ? seen(&c) : "the punch itself failed");

	const struct range beyond[] = { { size, ps }, { size + ps, ps }, { size, 16 * ps } };
	int ok = falloc_table(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, beyond, 3, 0, msg, sizeof(msg));
	same = verify_pages(npages - 1, 1, &c);
	report(ok && same, "fallocate(KEEP_SIZE|PUNCH_HOLE) at or past EOF succeeds and changes nothing",
	       "%s", ok ? seen(&c) : msg);
}

static void check_mapping_past_eof(void)
{
	struct child c;
	unsigned char *longer;

	/* the selftest's fault_overflow: a mapping longer than the file faults only past EOF */
	longer = mmap(NULL, 2 * size, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);
	if (longer == MAP_FAILED) {
		report(0, "a mapping twice the file's size works, and access past EOF raises SIGBUS",
		       "mmap of 2x the size: %s", errname(errno));
		return;
	}
	unsigned char *saved = map;
	map = longer;
	int in_file = verify_pages(npages - 1, 1, &c);
	struct child past;
	int bus = read_sigbus(size, &past);
	map = saved;
	munmap(longer, 2 * size);
	report(in_file && bus, "a mapping twice the file's size works, and access past EOF raises SIGBUS",
	       "last page in the file: %s; byte at EOF: %s", in_file ? "as expected" : seen(&c),
	       bus ? "SIGBUS" : seen(&past));
}

static void check_unknown_ioctls(void)
{
	struct kvm_memory_attributes vm_attrs;
	int r1, e1 = 0, r2, e2 = 0;

	r1 = ioctl(gmem, _IO(KVMIO, 0xff));
	if (r1 < 0)
		e1 = errno;
	/* the VM-level ioctl (same number 0xd2, other size and direction) is not a guest_memfd ioctl */
	memset(&vm_attrs, 0, sizeof(vm_attrs));
	vm_attrs.size = ps;
	r2 = ioctl(gmem, KVM_SET_MEMORY_ATTRIBUTES, &vm_attrs);
	if (r2 < 0)
		e2 = errno;
	report(r1 < 0 && e1 == ENOTTY && r2 < 0 && e2 == ENOTTY,
	       "ioctl with an unknown cmd (0xAEFF, and the VM's KVM_SET_MEMORY_ATTRIBUTES) fails with ENOTTY",
	       "_IO(KVMIO, 0xff) gave %s, KVM_SET_MEMORY_ATTRIBUTES gave %s",
	       r1 < 0 ? errname(e1) : "success", r2 < 0 ? errname(e2) : "success");
}

/* One row of the EINVAL table: the request fails with EINVAL and error_offset stays as passed. */
static void einval_row(const char *what, struct kvm_memory_attributes2 a)
{
	char full[200];

	snprintf(full, sizeof(full), "KVM_SET_MEMORY_ATTRIBUTES2 with %s: EINVAL, error_offset untouched", what);
	if (skipped(full))
		return;
	a.error_offset = SENTINEL;
	int e = set_attrs(&a);
	report(e == EINVAL && a.error_offset == SENTINEL, full, "%s, error_offset 0x%llx", errname(e),
	       (unsigned long long)a.error_offset);
}

static void check_attribute_errors(void)
{
	struct kvm_memory_attributes2 base, a;

	memset(&base, 0, sizeof(base));
	base.offset = 0;
	base.size = ps;
	base.attributes = PRIVATE;

	a = base; a.flags = 1;                              einval_row("flags 1", a);
	a = base; a.reserved[0] = 1;                        einval_row("reserved[0] 1", a);
	a = base; a.reserved[10] = 1;                       einval_row("reserved[10] 1", a);
	a = base; a.attributes = 1;                         einval_row("attributes 1", a);
	a = base; a.attributes = PRIVATE | 1;               einval_row("attributes 9 (PRIVATE|1)", a);
	a = base; a.size = 0;                               einval_row("size 0", a);
	a = base; a.offset = ps / 2;                        einval_row("an unaligned offset", a);
	a = base; a.size = ps + ps / 2;                     einval_row("an unaligned size", a);
	a = base; a.offset = size - ps; a.size = 2 * ps;    einval_row("a range running past EOF", a);
	a = base; a.offset = size;                          einval_row("a range starting at EOF", a);
	a = base; a.offset = ~(ps - 1); a.size = 2 * ps;    einval_row("a wrapping range", a);
}

/* Shared->private of page `page` while a forked child has it mapped: the child's next access SIGBUSes. */
static void check_revocation(uint64_t page)
{
	char w_conv[200], w_child[200], w_neigh[200], w_here[200], w_noop[200], w_back[200];
	uint64_t off = page * ps, noff = (page + 1) * ps;
	int ready[2], go[2], res[2];
	struct child c;
	pid_t pid;

	snprintf(w_conv, sizeof(w_conv), "convert page 0x%" PRIx64 " to private while another process maps it",
		 off);
	snprintf(w_child, sizeof(w_child),
		 "the other process (mapped before the conversion) gets SIGBUS reading page 0x%" PRIx64, off);
	snprintf(w_neigh, sizeof(w_neigh),
		 "the neighbouring shared page 0x%" PRIx64 " stays readable in the other process", noff);
	snprintf(w_here, sizeof(w_here), "reads and writes of private page 0x%" PRIx64 " raise SIGBUS here too",
		 off);
	snprintf(w_noop, sizeof(w_noop), "converting private page 0x%" PRIx64 " to private again is a no-op",
		 off);
	snprintf(w_back, sizeof(w_back),
		 "converting page 0x%" PRIx64 " back to shared preserves the content written before", off);
	if (skip_reason) {
		skipped(w_conv);
		skipped(w_neigh);
		skipped(w_child);
		skipped(w_here);
		skipped(w_noop);
		skipped(w_back);
		return;
	}

	if (pipe(ready) < 0 || pipe(go) < 0 || pipe(res) < 0) {
		report(0, w_conv, "pipe: %s", strerror(errno));
		return;
	}
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		/* the other process: its own mapping, pages faulted in before the conversion */
		struct result r;
		char token;
		volatile unsigned char *m;

		close(ready[0]);
		close(go[1]);
		close(res[0]);
		m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);
		if (m == MAP_FAILED)
			_exit(4);
		child_setup(res[1], (unsigned char *)m);
		alarm(2 * CHILD_TIMEOUT);
		token = (m[off] == pattern(seed[page], off) && m[noff] == pattern(seed[page + 1], noff))
			? 'R' : 'X';
		if (write(ready[1], &token, 1) != 1 || read(go[0], &token, 1) != 1)
			_exit(5);
		memset(&r, 0, sizeof(r));
		r.off = noff;
		r.got = m[noff + 5];
		r.want = pattern(seed[page + 1], noff + 5);
		r.mismatch = r.got != r.want;
		child_send(&r);       /* the neighbour, then the converted page */
		r.off = off;
		r.got = m[off];
		r.done = 1;
		child_send(&r);
		_exit(0);
	}
	close(ready[1]);
	close(go[0]);
	close(res[1]);
	if (pid < 0) {
		report(0, w_conv, "fork: %s", strerror(errno));
		close(ready[0]);
		close(go[1]);
		close(res[0]);
		return;
	}

	char token = 0;
	if (read(ready[0], &token, 1) != 1 || token != 'R')
		note("the other process did not map and read both pages first (%c)", token ? token : '-');
	uint64_t eo;
	int e = convert(off, ps, PRIVATE, &eo);
	report(e == 0, w_conv, "%s (error_offset 0x%" PRIx64 ")", errname(e), eo);
	if (write(go[1], "g", 1) != 1) {
		/* the child is gone: reaped below */
	}
	close(go[1]);

	/* two reports: the neighbour (always), the converted page (only if it was readable) */
	struct result neighbour, last;
	int have_neighbour = read(res[0], &neighbour, sizeof(neighbour)) == (ssize_t)sizeof(neighbour);
	memset(&c, 0, sizeof(c));
	collect(res[0], &c.r);
	last = c.r;
	close(res[0]);
	close(ready[0]);
	reap(pid, &c);
	c.r = last;

	report(have_neighbour && !neighbour.bus && !neighbour.mismatch, w_neigh,
	       "%s", !have_neighbour ? "the other process reported nothing"
	       : neighbour.bus ? "SIGBUS" : "its content changed");
	report(token == 'R' && c.outcome == BUS && c.r.bus && c.r.bus_off == off, w_child, "%s%s",
	       token == 'R' ? "" : "(it could not read the pages before the conversion) ", seen(&c));

	struct child cw;
	int rb = read_sigbus(off, &c), wb = write_sigbus(off + 1, &cw);
	report(rb && wb, w_here, "read: %s; write: %s", rb ? "SIGBUS" : seen(&c), wb ? "SIGBUS" : seen(&cw));

	e = convert(off, ps, PRIVATE, &eo);
	report(e == 0, w_noop, "%s", errname(e));

	e = convert(off, ps, SHARED, &eo);
	int same = e == 0 && verify_pages(page, 1, &c);
	report(same, w_back, "conversion gave %s%s%s", errname(e), e ? "" : "; content: ", e ? "" : seen(&c));
}

/* v8 "truncate": punching a private page frees it but leaves it private. */
static void check_punch_private(uint64_t page)
{
	char what[200];
	struct child c;
	uint64_t off = page * ps;

	snprintf(what, sizeof(what),
		 "punching private page 0x%" PRIx64 " keeps it private, and it reads zeros once shared again", off);
	if (skipped(what))
		return;
	int e1 = convert(off, ps, PRIVATE, NULL);
	int e2 = e1 ? e1 : falloc(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, off, ps);
	int still = !e2 && read_sigbus(off, &c);
	int e3 = convert(off, ps, SHARED, NULL);
	seed[page] = 0;
	int zero = !e3 && verify_pages(page, 1, &c);
	report(!e1 && !e2 && still && !e3 && zero, what,
	       "to private: %s, punch: %s, private after punch: %s, to shared: %s, content: %s", errname(e1),
	       errname(e2), still ? "yes" : "no", errname(e3), zero ? "zeros" : seen(&c));
	fill_pages(page, 1, 5, &c);
}

/*
 * What a VMM does with EAGAIN: convert what it can, leave the pages the kernel names shared (they are
 * pinned by a device), and report them. Returns 0 when [start, end) is private except the pages listed.
 */
static int convert_around_pins(uint64_t start, uint64_t end, uint64_t *left, int max_left, int *n_left,
			       char *msg, size_t msglen)
{
	uint64_t cur = start, eo;
	int e;

	*n_left = 0;
	while (cur < end) {
		e = convert(cur, end - cur, PRIVATE, &eo);
		if (e == 0) {
			note("converted [0x%" PRIx64 ", 0x%" PRIx64 ") to private", cur, end);
			return 0;
		}
		if (e != EAGAIN || eo < cur || eo >= end || eo % ps) {
			snprintf(msg, msglen, "[0x%" PRIx64 ", 0x%" PRIx64 ") gave %s, error_offset 0x%" PRIx64,
				 cur, end, errname(e), eo);
			return -1;
		}
		if (eo > cur) {
			e = convert(cur, eo - cur, PRIVATE, NULL);
			if (e) {
				snprintf(msg, msglen, "[0x%" PRIx64 ", 0x%" PRIx64 ") before the pinned page gave %s",
					 cur, eo, errname(e));
				return -1;
			}
			note("converted [0x%" PRIx64 ", 0x%" PRIx64 ") to private", cur, eo);
		}
		note("page 0x%" PRIx64 " is pinned (EAGAIN): left shared", eo);
		if (*n_left < max_left)
			left[*n_left] = eo;
		(*n_left)++;
		cur = eo + ps;
	}
	return 0;
}

static void check_bulk(int have_pin, uint64_t pinned)
{
	char what[200], msg[200];
	struct child c;
	uint64_t eo;
	int e;

	if (!have_pin) {
		const char *w1 = "converting the whole file to private succeeds (nothing is pinned)";
		const char *w2 = "every page of a private file raises SIGBUS (first, middle, last)";
		const char *w3 = "converting the whole file back to shared preserves all of its content";
		if (skip_reason) {
			skipped(w1);
			skipped(w2);
			skipped(w3);
			return;
		}
		e = convert(0, size, PRIVATE, &eo);
		report(e == 0, w1, "%s, error_offset 0x%" PRIx64, errname(e), eo);
		struct child c2, c3;
		int b1 = read_sigbus(0, &c), b2 = read_sigbus(size / 2 + 3, &c2), b3 = read_sigbus(size - 1, &c3);
		report(b1 && b2 && b3, w2, "first: %s; middle: %s; last: %s", b1 ? "SIGBUS" : seen(&c),
		       b2 ? "SIGBUS" : seen(&c2), b3 ? "SIGBUS" : seen(&c3));
		e = convert(0, size, SHARED, NULL);
		int same = e == 0 && verify_pages(0, npages, &c);
		report(same, w3, "conversion gave %s%s%s", errname(e), e ? "" : "; content: ", e ? "" : seen(&c));
		return;
	}

	snprintf(what, sizeof(what),
		 "converting the whole file to private fails with EAGAIN, error_offset 0x%" PRIx64 " (the pinned page)",
		 pinned);
	if (!skipped(what)) {
		e = convert(0, size, PRIVATE, &eo);
		report(e == EAGAIN && eo == pinned, what, "%s, error_offset 0x%" PRIx64, errname(e), eo);
	}

	const char *w_nothing = "after EAGAIN nothing was converted: every page still reads its content";
	if (!skipped(w_nothing)) {
		int same = verify_pages(0, npages, &c);
		report(same, w_nothing, "%s", seen(&c));
	}

	snprintf(what, sizeof(what),
		 "converting only the pinned page 0x%" PRIx64 " to private: EAGAIN, same error_offset", pinned);
	if (!skipped(what)) {
		e = convert(pinned, ps, PRIVATE, &eo);
		report(e == EAGAIN && eo == pinned, what, "%s, error_offset 0x%" PRIx64, errname(e), eo);
	}

	snprintf(what, sizeof(what), "a no-op conversion (to shared) of the pinned page 0x%" PRIx64 " succeeds",
		 pinned);
	if (!skipped(what)) {
		e = convert(pinned, ps, SHARED, NULL);
		report(e == 0, what, "%s", errname(e));
	}

	const char *w_vmm =
		"handling EAGAIN: everything but the pinned page converts to private, page by page around it";
	if (!skipped(w_vmm)) {
		uint64_t left[8];
		int n_left;
		int r = convert_around_pins(0, size, left, 8, &n_left, msg, sizeof(msg));
		if (r == 0 && n_left)
			note("%d page(s) left shared because pinned, the first at 0x%" PRIx64, n_left, left[0]);
		report(r == 0 && n_left == 1 && left[0] == pinned, w_vmm, "%s",
		       r ? msg : "the pages left shared are not exactly the pinned page");
	}

	const char *w_state =
		"around the pinned page everything is private (SIGBUS); the pinned page is shared, content kept";
	if (!skipped(w_state)) {
		struct child before, after;
		int b1 = pinned == 0 || read_sigbus(pinned - ps, &before);
		int b2 = pinned + ps >= size || read_sigbus(pinned + ps, &after);
		int kept = verify_pages(pinned / ps, 1, &c);
		report(b1 && b2 && kept, w_state, "page before: %s; page after: %s; pinned page: %s",
		       b1 ? "SIGBUS" : seen(&before), b2 ? "SIGBUS" : seen(&after), kept ? "as expected" : seen(&c));
	}

	const char *w_back = "converting the whole (mixed) file back to shared succeeds and preserves all content";
	if (!skipped(w_back)) {
		e = convert(0, size, SHARED, NULL);
		int same = e == 0 && verify_pages(0, npages, &c);
		report(same, w_back, "conversion gave %s%s%s", errname(e), e ? "" : "; content: ", e ? "" : seen(&c));
	}
}

static void check_conversions(int have_pin, uint64_t pinned, uint64_t conv_page, uint64_t punch_private_page)
{
	const char *w = "a no-op KVM_SET_MEMORY_ATTRIBUTES2 (whole file to shared, all shared) succeeds";
	uint64_t eo;
	int e = convert(0, size, SHARED, &eo);

	if (e == ENOTTY) {
		skip_reason = "KVM_SET_MEMORY_ATTRIBUTES2 is ENOTTY here";
		note("KVM_SET_MEMORY_ATTRIBUTES2 answered ENOTTY: no in-place conversion on this guest_memfd");
		skipped(w);
	} else {
		report(e == 0, w, "%s, error_offset 0x%" PRIx64 "%s", errname(e), eo,
		       e == EINVAL ? " (on a v8 kernel a type 0 VM has no private memory: try --vm-type 1)" : "");
	}
	check_attribute_errors();
	check_revocation(conv_page);
	check_punch_private(punch_private_page);
	check_bulk(have_pin, pinned);
}

/* ---- main ------------------------------------------------------------------------------------------ */

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s (--kvm [--vm-type N] | --path FILE) [--size BYTES] [--pinned OFFSET]\n"
		"  --kvm           get the guest_memfd from /dev/kvm (KVM_CREATE_VM, KVM_CREATE_GUEST_MEMFD)\n"
		"  --path FILE     open FILE (e.g. a ufsgmem MOUNT/NAME/mem), created MMAP|INIT_SHARED\n"
		"  --size BYTES    the file's size (default 4 MiB; at least 16 pages)\n"
		"  --pinned OFF    the page at OFF is pinned by the caller: expect EAGAIN there\n"
		"  --vm-type N     KVM_CREATE_VM type for --kvm (default 0)\n",
		argv0);
	exit(2);
}

static uint64_t number(const char *s, const char *argv0)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *end)
		usage(argv0);
	return v;
}

/* The k-th page index (k >= 1) that is not the pinned page and not page npages-1. */
static uint64_t free_page(int have_pin, uint64_t pinned, unsigned k)
{
	for (uint64_t p = 1; p < npages - 1; p++)
		if (!(have_pin && p == pinned / ps) && --k == 0)
			return p;
	return 1;
}

int main(int argc, char **argv)
{
	const char *path = NULL;
	int use_kvm = 0, have_pin = 0, vm_type = 0;
	uint64_t pinned = 0;
	struct child c;
	struct stat st;

	memset(&st, 0, sizeof(st));
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--kvm"))
			use_kvm = 1;
		else if (!strcmp(argv[i], "--path") && i + 1 < argc)
			path = argv[++i];
		else if (!strcmp(argv[i], "--size") && i + 1 < argc)
			size = number(argv[++i], argv[0]);
		else if (!strcmp(argv[i], "--pinned") && i + 1 < argc)
			pinned = number(argv[++i], argv[0]), have_pin = 1;
		else if (!strcmp(argv[i], "--vm-type") && i + 1 < argc)
			vm_type = (int)number(argv[++i], argv[0]);
		else
			usage(argv[0]);
	}
	ps = (uint64_t)sysconf(_SC_PAGESIZE);
	if (use_kvm == !!path || size % ps || size < 16 * ps || (have_pin && (pinned % ps || pinned >= size)))
		usage(argv[0]);
	npages = size / ps;
	seed = calloc(npages, 1);
	if (!seed)
		return 1;

	if (use_kvm)
		open_kvm(vm_type);
	else
		open_path(path);
	if (gmem < 0)
		return finish();

	int r = fstat(gmem, &st);
	report(r == 0 && (uint64_t)st.st_size == size && S_ISREG(st.st_mode),
	       "fstat: a regular file of --size bytes", "%s size %lld mode 0%o", r ? strerror(errno) : "",
	       (long long)st.st_size, (unsigned)st.st_mode);

	/*
	 * A kernel guest_memfd refuses MAP_PRIVATE (EINVAL). No VMM depends on that, and a FUSE file cannot
	 * refuse it (FUSE never sees mmap(2)), so this is information, not a check.
	 */
	void *cow = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, gmem, 0);
	if (cow == MAP_FAILED)
		note("mmap MAP_PRIVATE: %s (a kernel guest_memfd gives EINVAL)", errname(errno));
	else
		note("mmap MAP_PRIVATE: succeeded (a kernel guest_memfd gives EINVAL)");
	if (cow != MAP_FAILED)
		munmap(cow, size);

	map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);
	report(map != MAP_FAILED, "mmap MAP_SHARED of the whole file", "%s", errname(errno));
	if (map == MAP_FAILED)
		return finish();

	int zeros = verify_pages(0, npages, &c);
	report(zeros, "a fresh file reads as zeros", "%s", seen(&c));
	int filled = fill_pages(0, npages, 1, &c) && verify_pages(0, npages, &c);
	report(filled, "fill every page with a pattern through the mapping and read it back", "%s", seen(&c));

	check_file_ops();
	uint64_t punch_page = free_page(have_pin, pinned, 2);   /* 2, or 3 when 2 is pinned */
	check_fallocate(punch_page);
	check_mapping_past_eof();
	check_unknown_ioctls();

	uint64_t conv_page = free_page(have_pin, pinned, 4);
	fill_pages(conv_page, 1, 2, &c); /* "the content written before" the conversion */
	check_conversions(have_pin, pinned, conv_page, free_page(have_pin, pinned, 7));

	int last = verify_pages(0, npages, &c);
	report(last, "at the end every page holds what was last written to it", "%s", seen(&c));
	munmap(map, size);
	close(gmem);
	return finish();
}
