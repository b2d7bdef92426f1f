/*
 * ufsgmem run's interposer: an LD_PRELOAD library that makes an unmodified program see a kernel with
 * guest_memfd and in-place conversion (series v8), served by a ufsgmem mount (docs/architecture.md,
 * "ufsgmem run").
 *
 * It wraps ioctl(), mmap() and open*(); everything it does not recognise goes to the kernel unchanged
 * (through syscall(2), so the real call is always the kernel's):
 *
 *   KVM_CHECK_EXTENSION on /dev/kvm and VM fds  answers the guest_memfd caps (v8 or 6.18)
 *   KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM)      the host's default VM (v8 only)
 *   KVM_CREATE_GUEST_MEMFD on a VM fd           kernel checks, then a fresh ufsgmem file: created through
 *                                               MOUNT/ctl (binary form), opened, then destroyed at once, so
 *                                               it lives exactly as long as its descriptors and mappings
 *   KVM_SET_USER_MEMORY_REGION2 + GUEST_MEMFD   kernel checks, then a plain memslot over a hidden range this
 *                                               library owns: shared runs map MOUNT/NAME/mem, private runs
 *                                               the private view, so the vCPU reaches both
 *   KVM_SET_MEMORY_ATTRIBUTES on a VM fd       where the host lacks it: the kernel's checks for a VM that
 *                                               supports no attribute (EINVAL for PRIVATE)
 *   KVM_SET_MEMORY_ATTRIBUTES2 on our file      the server converts; then the hidden ranges are remapped
 *                                               (MAP_FIXED); KVM's MMU notifier drops stale stage-2 entries
 *   KVM_RUN -> EFAULT, or an MMIO exit inside   someone else converted (ctl, another process), so KVM met
 *   one of our slots                            a stale hidden page: re-read the attributes, remap what
 *                                               differs; an MMIO access (KVM emulated it) is completed
 *                                               through the fresh mapping; then run again (bounded)
 *   mmap of our file                            MAP_PRIVATE: EINVAL; a file created without MMAP: ENODEV
 *   open of /proc/.../fd/N naming our file      ENXIO, as the kernel's anonymous inode (measured on 6.18)
 *   fstatfs of our file                         f_type ANON_INODE_FS_MAGIC, as the kernel's (6.18)
 *   execve/execv/execvp/execvpe of a program    EPERM with a message if the loader would not load this
 *   it cannot follow (static, setuid)           library into it: it would run without guest_memfd
 *
 *   close()/munmap() of the program's last reference  the file goes, as the kernel's: its memslots lose
 *                                               their backing (a guest access is EFAULT), its memory is freed
 *
 * Caveats: memslots are tracked per VM descriptor number: closing a VM fd forgets (and unmaps) its slots,
 * even if a dup of it lives on. A program that issues the system calls itself (syscall(SYS_ioctl, ...), inline assembly) or
 * is statically linked is not reached (`ufsgmem run` refuses the latter).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* --- uAPI absent from older headers (values from include/uapi/linux/kvm.h and the v8 series) ------ */
#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231
#endif
#ifndef KVM_CAP_MEMORY_ATTRIBUTES
#define KVM_CAP_MEMORY_ATTRIBUTES 233
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_CAP_VM_TYPES
#define KVM_CAP_VM_TYPES 235
#endif
#ifndef KVM_CAP_GUEST_MEMFD_FLAGS
#define KVM_CAP_GUEST_MEMFD_FLAGS 244
#endif
#ifndef KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES
#define KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES 250
#endif
#ifndef KVM_X86_SW_PROTECTED_VM
#define KVM_X86_SW_PROTECTED_VM 1
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
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1U << 2)
#endif
#define SHIM_CREATE_GUEST_MEMFD 0xC040AED4UL
#define SHIM_SET_MEMORY_ATTRIBUTES2 0xC080AED2UL
#define SHIM_SET_USER_MEMORY_REGION2 0x40A0AE49UL

struct shim_create_guest_memfd { uint64_t size, flags, reserved[6]; };
struct shim_memory_attributes2 { uint64_t offset, size, attributes, flags, error_offset, reserved[11]; };
struct shim_region2 {
	uint32_t slot, flags;
	uint64_t guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset;
	uint32_t guest_memfd, pad1;
	uint64_t pad2[14];
};
_Static_assert(sizeof(struct shim_region2) == 160, "kvm_userspace_memory_region2");

#define PAGE 4096ULL
#define SUPPORTED_FLAGS (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
#define MAX_GMEM 256
#define MAX_SLOTS 512
#define HIGH_FD 700 /* our own descriptors go from here up, out of the way of the program's */

enum { K_NONE, K_SHARED, K_PRIVATE };

struct gmem {
	int used;
	dev_t dev;
	ino_t ino;
	uint64_t size, flags; /* the flags the program asked for */
	int mem_fd, ctl_fd, priv_fd; /* ours, close-on-exec */
	int vm_fd; /* the VM it was created on: only that VM may bind it */
	int private_ok; /* that VM has private memory (KVM_X86_SW_PROTECTED_VM): conversions are allowed */
	int user_fd; /* a descriptor of the program's: its close() asks whether the file is still referenced */
	int orphan; /* the program has no descriptor left but still maps it: munmap() asks again */
};

struct slot {
	int used;
	int vm_fd;
	uint32_t slot;
	uint64_t size, gofs, gpa;
	struct gmem *g;
	int private_ok; /* its VM has private memory: private pages map the private view, else nothing */
	char *hidden;
	uint8_t *kind; /* per page: what the hidden range maps now */
};

static const char *g_mount;
static int g_v8 = 1;
static char g_backend[32];
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static struct gmem g_gmem[MAX_GMEM];
static struct slot g_slots[MAX_SLOTS];
#define MAX_VCPU_FD 4096
/* per vCPU descriptor: its VM and our own mapping of its kvm_run (made on first need) */
static struct vcpu { int vm_fd; struct kvm_run *run; } g_vcpus[MAX_VCPU_FD];
/* per VM descriptor: created as KVM_X86_SW_PROTECTED_VM (playing v8), so it has private memory */
static uint8_t g_vm_private[MAX_VCPU_FD];
static int vm_private(int vm_fd) { return vm_fd >= 0 && vm_fd < MAX_VCPU_FD && g_vm_private[vm_fd]; }
static int g_ngmem; /* files ever created (a fast "nothing to do" test) */
static unsigned long g_gen; /* bumped by every remap: KVM_RUN retries when it moved */
static unsigned long g_counter;

/* --- the kernel's calls ------------------------------------------------------------------------ */
static long sys_ioctl(int fd, unsigned long req, void *arg) { return syscall(SYS_ioctl, fd, req, arg); }
static void *sys_mmap(void *a, size_t l, int p, int f, int fd, off_t o)
{
	return (void *)syscall(SYS_mmap, a, l, p, f, fd, o);
}
static int sys_openat(int dir, const char *path, int flags, mode_t mode)
{
	return (int)syscall(SYS_openat, dir, path, flags, mode);
}

static int fail(int err) { errno = err; return -1; }

/* "/dev/kvm", "anon_inode:kvm-vm", ... (empty if unreadable) */
static void fd_target(int fd, char *buf, size_t n)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ssize_t len = readlink(path, buf, n - 1);
	buf[len < 0 ? 0 : len] = 0;
}
static int is_kvm_dev(int fd) { char t[64]; fd_target(fd, t, sizeof(t)); return !strcmp(t, "/dev/kvm"); }
static int is_vm(int fd) { char t[64]; fd_target(fd, t, sizeof(t)); return !strcmp(t, "anon_inode:kvm-vm"); }

static struct gmem *gmem_by_stat(const struct stat *st)
{
	for (int i = 0; i < MAX_GMEM; i++)
		if (g_gmem[i].used && g_gmem[i].dev == st->st_dev && g_gmem[i].ino == st->st_ino)
			return &g_gmem[i];
	return NULL;
}
/* our guest_memfd behind fd, or NULL (errno EBADF if fd is not open) */
static struct gmem *gmem_of(int fd)
{
	struct stat st;
	if (!g_ngmem || fd < 0 || fstat(fd, &st) != 0)
		return NULL;
	return gmem_by_stat(&st);
}

static int high_fd(int fd)
{
	if (fd < 0)
		return fd;
	int moved = fcntl(fd, F_DUPFD_CLOEXEC, HIGH_FD);
	syscall(SYS_close, fd);
	return moved;
}

/* --- talking to the mount ------------------------------------------------------------------------ */
static int write_all(int fd, const void *buf, size_t n) { return write(fd, buf, n) == (ssize_t)n ? 0 : -1; }

static int mount_request(const void *req, size_t n)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/ctl", g_mount);
	int fd = sys_openat(AT_FDCWD, path, O_RDWR | O_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	int r = write_all(fd, req, n), err = errno;
	syscall(SYS_close, fd);
	errno = err;
	return r;
}

/* The attribute runs of [off, off+len): calls fn(run_off, run_len, private) for each. */
static int get_attributes(struct gmem *g, uint64_t off, uint64_t len,
			  void (*fn)(void *, uint64_t, uint64_t, int), void *ctx)
{
	char req[128];
	int n = snprintf(req, sizeof(req), "get_attributes offset=%#llx size=%#llx",
			 (unsigned long long)off, (unsigned long long)len);
	if (write_all(g->ctl_fd, req, n) != 0)
		return -1;
	size_t cap = 1 << 16, have = 0;
	char *buf = malloc(cap);
	if (!buf)
		return fail(ENOMEM);
	for (;;) {
		if (have + 1 >= cap) {
			char *bigger = realloc(buf, cap *= 2);
			if (!bigger) { free(buf); return fail(ENOMEM); }
			buf = bigger;
		}
		ssize_t got = read(g->ctl_fd, buf + have, cap - 1 - have);
		if (got < 0) { free(buf); return -1; }
		if (got == 0)
			break;
		have += got;
	}
	buf[have] = 0;
	if (strncmp(buf, "ok", 2) != 0) { free(buf); return fail(EIO); }
	for (char *p = buf + 2; *p;) {
		while (*p == ' ' || *p == '\n') p++;
		if (!*p)
			break;
		char *end;
		uint64_t o = strtoull(p, &end, 0);
		if (*end != '+') break;
		uint64_t s = strtoull(end + 1, &end, 0);
		if (*end != '=') break;
		p = end + 1;
		fn(ctx, o, s, !strncmp(p, "private", 7));
		while (*p && *p != ' ' && *p != '\n') p++;
	}
	free(buf);
	return 0;
}

/* --- the hidden ranges ---------------------------------------------------------------------------- */
struct sync_ctx { struct slot *s; long changed; int err; };

/* Map [o, o+len) of the file (inside the slot) from the view that serves it now. */
static void sync_run(void *p, uint64_t o, uint64_t len, int private)
{
	struct sync_ctx *c = p;
	struct slot *s = c->s;
	/* A VM without private memory never reaches a private page: KVM emulates the access as MMIO, as the
	 * kernel's does (measured on 6.18 for a file without INIT_SHARED). */
	uint8_t want = !private ? K_SHARED : s->private_ok ? K_PRIVATE : K_NONE;
	uint64_t first = (o - s->gofs) / PAGE, last = first + len / PAGE;
	for (uint64_t i = first; i < last;) {
		if (s->kind[i] == want) { i++; continue; }
		uint64_t j = i;
		while (j < last && s->kind[j] != want) j++;
		int fd = want == K_PRIVATE ? s->g->priv_fd : s->g->mem_fd;
		void *at = want == K_NONE
			? sys_mmap(s->hidden + i * PAGE, (j - i) * PAGE, PROT_NONE,
				   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
			: sys_mmap(s->hidden + i * PAGE, (j - i) * PAGE, PROT_READ | PROT_WRITE,
				   MAP_SHARED | MAP_FIXED, fd, s->gofs + i * PAGE);
		if (at == MAP_FAILED) {
			c->err = errno;
			return;
		}
		memset(s->kind + i, want, j - i);
		c->changed += j - i;
		i = j;
	}
}

/* Remap the part of the slot that overlaps file range [off, off+len); pages changed, -1 on error. */
static long sync_slot(struct slot *s, uint64_t off, uint64_t len)
{
	uint64_t start = off > s->gofs ? off : s->gofs;
	uint64_t end = off + len < s->gofs + s->size ? off + len : s->gofs + s->size;
	if (!s->g || start >= end)
		return 0;
	struct sync_ctx c = { s, 0, 0 };
	if (get_attributes(s->g, start, end - start, sync_run, &c) != 0)
		return -1;
	if (c.err)
		return fail(c.err);
	if (c.changed)
		__atomic_add_fetch(&g_gen, 1, __ATOMIC_RELEASE);
	return c.changed;
}

static long sync_gmem(struct gmem *g, uint64_t off, uint64_t len)
{
	long changed = 0;
	for (int i = 0; i < MAX_SLOTS; i++)
		if (g_slots[i].used && g_slots[i].g == g) {
			long c = sync_slot(&g_slots[i], off, len);
			if (c > 0)
				changed += c;
		}
	return changed;
}

static struct slot *find_slot(int vm_fd, uint32_t id)
{
	for (int i = 0; i < MAX_SLOTS; i++)
		if (g_slots[i].used && g_slots[i].vm_fd == vm_fd && g_slots[i].slot == id)
			return &g_slots[i];
	return NULL;
}

static void drop_slot(struct slot *s)
{
	syscall(SYS_munmap, s->hidden, s->size);
	free(s->kind);
	memset(s, 0, sizeof(*s));
}

/* --- the ioctls ----------------------------------------------------------------------------------- */
static long check_extension(int fd, long cap)
{
	long real = sys_ioctl(fd, KVM_CHECK_EXTENSION, (void *)cap);
	if (!g_mount || !(is_kvm_dev(fd) || is_vm(fd)))
		return real;
	switch (cap) {
	case KVM_CAP_GUEST_MEMFD:
		return 1;
	case KVM_CAP_GUEST_MEMFD_FLAGS:
		return SUPPORTED_FLAGS;
	case KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: /* a VM without private memory: none */
		return !g_v8 ? real : is_kvm_dev(fd) || vm_private(fd) ? (long)KVM_MEMORY_ATTRIBUTE_PRIVATE : 0;
	case KVM_CAP_MEMORY_ATTRIBUTES: /* v8 with in-place conversion: the VM-level PRIVATE is gone */
		return g_v8 ? 0 : real;
	case KVM_CAP_VM_TYPES:
		return g_v8 && real >= 0 ? real | (1L << KVM_X86_SW_PROTECTED_VM) : real;
	case KVM_CAP_USER_MEMORY2:
		return real;
	}
	return real;
}

static long create_vm(int fd, unsigned long type)
{
	int sw_protected = g_mount && g_v8 && type == KVM_X86_SW_PROTECTED_VM && is_kvm_dev(fd);
	if (sw_protected
	    && !(sys_ioctl(fd, KVM_CHECK_EXTENSION, (void *)(long)KVM_CAP_VM_TYPES) & (1L << KVM_X86_SW_PROTECTED_VM)))
		type = 0; /* served on the host's default VM: the emulation provides the private memory */
	long vm = sys_ioctl(fd, KVM_CREATE_VM, (void *)type);
	if (vm >= 0 && vm < MAX_VCPU_FD)
		g_vm_private[vm] = (uint8_t)sw_protected;
	return vm;
}

static struct gmem *free_gmem(void)
{
	for (int i = 0; i < MAX_GMEM; i++)
		if (!g_gmem[i].used)
			return &g_gmem[i];
	return NULL;
}

static long create_guest_memfd(int vm_fd, struct shim_create_guest_memfd *arg)
{
	if (!g_mount || !is_vm(vm_fd))
		return sys_ioctl(vm_fd, SHIM_CREATE_GUEST_MEMFD, arg);
	struct shim_create_guest_memfd c = *arg;
	if (c.flags & ~SUPPORTED_FLAGS)
		return fail(EINVAL);
	if ((int64_t)c.size <= 0 || c.size % PAGE)
		return fail(EINVAL);
	pthread_mutex_lock(&g_lock);
	long ret = -1;
	int err = 0, user = -1;
	struct gmem *g = free_gmem();
	if (!g) { err = ENFILE; goto out; }
	struct {
		char magic[4];
		uint32_t cmd;
		struct shim_create_guest_memfd gmem;
		char name[64];
		char backend[32];
	} req;
	memset(&req, 0, sizeof(req));
	memcpy(req.magic, "UGM1", 4);
	req.cmd = (uint32_t)SHIM_CREATE_GUEST_MEMFD;
	req.gmem.size = c.size;
	req.gmem.flags = c.flags | GUEST_MEMFD_FLAG_MMAP; /* the hidden ranges map it whatever the program asked */
	snprintf(req.name, sizeof(req.name), "run-%d-%lu", (int)getpid(), ++g_counter);
	memcpy(req.backend, g_backend, sizeof(req.backend));
	if (mount_request(&req, sizeof(req)) != 0) { err = errno; goto out; }
	char path[4096];
	/* The program's descriptor first: it gets the lowest free number, as from the kernel (no CLOEXEC). */
	snprintf(path, sizeof(path), "%s/%s/mem", g_mount, req.name);
	user = sys_openat(AT_FDCWD, path, O_RDWR | O_LARGEFILE, 0);
	g->mem_fd = high_fd(sys_openat(AT_FDCWD, path, O_RDWR | O_CLOEXEC, 0));
	snprintf(path, sizeof(path), "%s/%s/ctl", g_mount, req.name);
	g->ctl_fd = high_fd(sys_openat(AT_FDCWD, path, O_RDWR | O_CLOEXEC, 0));
	snprintf(path, sizeof(path), "%s/%s/private", g_mount, req.name);
	g->priv_fd = high_fd(sys_openat(AT_FDCWD, path, O_RDWR | O_CLOEXEC, 0));
	struct stat st;
	if (user < 0 || g->mem_fd < 0 || g->ctl_fd < 0 || g->priv_fd < 0 || fstat(user, &st) != 0)
		err = errno ? errno : EIO;
	/* No name from now on: the file lives as long as its descriptors and mappings, as the kernel's. */
	char destroy[96];
	int n = snprintf(destroy, sizeof(destroy), "destroy %s", req.name);
	mount_request(destroy, n);
	if (err) {
		if (user >= 0) syscall(SYS_close, user);
		if (g->mem_fd >= 0) syscall(SYS_close, g->mem_fd);
		if (g->ctl_fd >= 0) syscall(SYS_close, g->ctl_fd);
		if (g->priv_fd >= 0) syscall(SYS_close, g->priv_fd);
		goto out;
	}
	g->used = 1;
	g->vm_fd = vm_fd;
	g->private_ok = vm_private(vm_fd);
	g->user_fd = user;
	g->orphan = 0;
	g->dev = st.st_dev;
	g->ino = st.st_ino;
	g->size = c.size;
	g->flags = c.flags;
	g_ngmem++;
	ret = user;
out:
	pthread_mutex_unlock(&g_lock);
	if (ret < 0)
		errno = err;
	return ret;
}

static struct slot *free_slot(void)
{
	for (int i = 0; i < MAX_SLOTS; i++)
		if (!g_slots[i].used)
			return &g_slots[i];
	return NULL;
}

static long set_region2(int vm_fd, struct shim_region2 *arg)
{
	if (!g_mount || !g_ngmem)
		return sys_ioctl(vm_fd, SHIM_SET_USER_MEMORY_REGION2, arg);
	struct shim_region2 r = *arg;
	pthread_mutex_lock(&g_lock);
	long ret;
	int err = 0;
	struct slot *s = find_slot(vm_fd, r.slot);
	if (s && (r.memory_size == 0 || !(r.flags & KVM_MEM_GUEST_MEMFD))) {
		/* delete (or a change the kernel refuses for a guest_memfd slot: it answers for itself) */
		r.flags &= ~KVM_MEM_GUEST_MEMFD;
		r.userspace_addr = (uintptr_t)s->hidden;
		ret = sys_ioctl(vm_fd, SHIM_SET_USER_MEMORY_REGION2, &r);
		if (ret == 0 && r.memory_size == 0)
			drop_slot(s);
		goto out_errno;
	}
	if (!(r.flags & KVM_MEM_GUEST_MEMFD)) {
		ret = sys_ioctl(vm_fd, SHIM_SET_USER_MEMORY_REGION2, &r);
		goto out_errno;
	}
	if (s) { /* the kernel's rule: a guest_memfd memslot is immutable, it can only be deleted */
		err = EINVAL;
		goto fail;
	}
	/* the kernel's checks: the memslot's own first, then the binding's */
	if (r.memory_size % PAGE || r.guest_phys_addr % PAGE || r.userspace_addr % PAGE) { err = EINVAL; goto fail; }
	if (r.memory_size == 0) {
		ret = sys_ioctl(vm_fd, SHIM_SET_USER_MEMORY_REGION2, &r);
		goto out_errno;
	}
	struct stat st;
	if (fstat((int)r.guest_memfd, &st) != 0) { err = EBADF; goto fail; }
	struct gmem *g = gmem_by_stat(&st);
	if (!g) { err = EINVAL; goto fail; } /* not a guest_memfd */
	if (g->vm_fd != vm_fd) { err = EINVAL; goto fail; } /* another VM's guest_memfd */
	if (r.guest_memfd_offset % PAGE || r.guest_memfd_offset + r.memory_size < r.guest_memfd_offset
	    || r.guest_memfd_offset + r.memory_size > g->size) { err = EINVAL; goto fail; }
	for (int i = 0; i < MAX_SLOTS; i++) /* a range of the file is bound to one memslot at most */
		if (g_slots[i].used && g_slots[i].g == g && r.guest_memfd_offset < g_slots[i].gofs + g_slots[i].size
		    && g_slots[i].gofs < r.guest_memfd_offset + r.memory_size) { err = EINVAL; goto fail; }
	s = free_slot();
	if (!s) { err = ENOSPC; goto fail; }
	char *hidden = sys_mmap(NULL, r.memory_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	uint8_t *kind = calloc(r.memory_size / PAGE, 1);
	if (hidden == MAP_FAILED || !kind) {
		if (hidden != MAP_FAILED) syscall(SYS_munmap, hidden, r.memory_size);
		free(kind);
		err = ENOMEM;
		goto fail;
	}
	*s = (struct slot){ 1, vm_fd, r.slot, r.memory_size, r.guest_memfd_offset, r.guest_phys_addr, g,
			    g->private_ok, hidden, kind };
	if (sync_slot(s, s->gofs, s->size) < 0) { err = errno; drop_slot(s); goto fail; }
	r.flags &= ~KVM_MEM_GUEST_MEMFD;
	r.userspace_addr = (uintptr_t)hidden;
	r.guest_memfd = 0;
	r.guest_memfd_offset = 0;
	ret = sys_ioctl(vm_fd, SHIM_SET_USER_MEMORY_REGION2, &r);
	if (ret != 0) { err = errno; drop_slot(s); goto fail; }
	goto out;
out_errno:
	err = ret < 0 ? errno : 0;
	goto out;
fail:
	ret = -1;
out:
	pthread_mutex_unlock(&g_lock);
	if (ret < 0)
		errno = err;
	return ret;
}

static long set_user_memory_region(int vm_fd, struct kvm_userspace_memory_region *arg)
{
	long ret = sys_ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, arg);
	if (ret == 0 && g_ngmem && arg->memory_size == 0) { /* our slot deleted through the old ioctl */
		pthread_mutex_lock(&g_lock);
		struct slot *s = find_slot(vm_fd, arg->slot);
		if (s)
			drop_slot(s);
		pthread_mutex_unlock(&g_lock);
	}
	return ret;
}

/* The VM-level KVM_SET_MEMORY_ATTRIBUTES (6.8) where the host's KVM lacks it: the kernel's checks for a
 * VM whose supported attributes are none (a default VM; a v8 VM with in-place conversion). */
struct shim_memory_attributes { uint64_t address, size, attributes, flags; };
#define SHIM_SET_MEMORY_ATTRIBUTES 0x4020AED2UL

static long set_memory_attributes(int fd, struct shim_memory_attributes *arg)
{
	long ret = sys_ioctl(fd, SHIM_SET_MEMORY_ATTRIBUTES, arg);
	if (ret == 0 || errno != ENOTTY || !g_mount || !is_vm(fd))
		return ret;
	struct shim_memory_attributes a = *arg;
	if (a.flags || a.attributes)
		return fail(EINVAL);
	if (a.size == 0 || a.address + a.size < a.address || a.address % PAGE || a.size % PAGE)
		return fail(EINVAL);
	return 0; /* all shared already */
}

static long set_memory_attributes2(int fd, void *arg)
{
	struct gmem *g = g_mount ? gmem_of(fd) : NULL;
	if (!g)
		return sys_ioctl(fd, SHIM_SET_MEMORY_ATTRIBUTES2, arg);
	if (!g_v8) /* 6.18 has no guest_memfd ioctl at all */
		return fail(ENOTTY);
	if (!g->private_ok) /* v8's check 4: the VM has no private memory (every failure here is EINVAL) */
		return fail(EINVAL);
	pthread_mutex_lock(&g_lock);
	long ret = sys_ioctl(fd, SHIM_SET_MEMORY_ATTRIBUTES2, arg);
	int err = errno;
	if (ret == 0) {
		struct shim_memory_attributes2 *a = arg;
		sync_gmem(g, a->offset, a->size);
	}
	pthread_mutex_unlock(&g_lock);
	errno = err;
	return ret;
}

static long create_vcpu(int vm_fd, unsigned long id)
{
	long ret = sys_ioctl(vm_fd, KVM_CREATE_VCPU, (void *)id);
	if (ret >= 0 && ret < MAX_VCPU_FD && g_mount) {
		struct vcpu *v = &g_vcpus[ret];
		if (v->run)
			syscall(SYS_munmap, v->run, PAGE);
		v->vm_fd = vm_fd;
		v->run = NULL;
	}
	return ret;
}

/* Bring every hidden range up to date; pages changed. g_lock held. */
static long sync_all(void)
{
	long changed = 0;
	for (int i = 0; i < MAX_SLOTS; i++)
		if (g_slots[i].used) {
			long c = sync_slot(&g_slots[i], g_slots[i].gofs, g_slots[i].size);
			if (c > 0)
				changed += c;
		}
	return changed;
}

/* A KVM_EXIT_MMIO inside one of our slots: KVM could not reach the page through a stale hidden mapping
 * (someone else converted it) and emulated the access as MMIO. Remap, then complete the access through
 * the fresh mapping (process_vm_readv/writev: EFAULT instead of SIGBUS if it still cannot be reached).
 * 1 if completed (run again), 0 if the exit is not ours or cannot be completed, 2 if the slot's file was
 * released (the exit is now a memory fault, as the kernel reports it). */
static int complete_mmio(int vcpu_fd)
{
	if (vcpu_fd < 0 || vcpu_fd >= MAX_VCPU_FD || !g_vcpus[vcpu_fd].vm_fd)
		return 0;
	struct vcpu *v = &g_vcpus[vcpu_fd];
	if (!v->run) {
		void *run = sys_mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
		if (run == MAP_FAILED)
			return 0;
		v->run = run;
	}
	struct kvm_run *run = v->run;
	if (run->exit_reason != KVM_EXIT_MMIO || run->mmio.len > 8)
		return 0;
	uint64_t gpa = run->mmio.phys_addr;
	/* A conversion by another process may still be revoking the page (its fills are refused until it
	 * commits): wait for it, bounded, as a kernel vCPU fault waits on the invalidate lock. */
	for (int attempt = 0; attempt < 2000; attempt++) {
		int done = 0;
		pthread_mutex_lock(&g_lock);
		for (int i = 0; i < MAX_SLOTS && !done; i++) {
			struct slot *s = &g_slots[i];
			if (!s->used || s->vm_fd != v->vm_fd || gpa < s->gpa || gpa + run->mmio.len > s->gpa + s->size)
				continue;
			if (!s->g) { /* its file was released: the access stays what KVM made of it */
				done = -2;
				break;
			}
			sync_slot(s, s->gofs, s->size);
			if (s->kind[(gpa - s->gpa) / PAGE] == K_NONE) /* a private page of a VM without private */
				break;				   /* memory: the MMIO exit is the kernel's */
			struct iovec local = { run->mmio.data, run->mmio.len };
			struct iovec remote = { s->hidden + (gpa - s->gpa), run->mmio.len };
			ssize_t n = run->mmio.is_write ? process_vm_writev(getpid(), &local, 1, &remote, 1, 0)
						      : process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
			done = n == (ssize_t)run->mmio.len ? 1 : -1;
		}
		pthread_mutex_unlock(&g_lock);
		if (done == -2) { /* the kernel's answer: a memory fault exit, KVM_RUN fails with EFAULT */
			uint64_t *fault = (uint64_t *)((char *)run + 32); /* kvm_run.memory_fault: flags, gpa, size */
			fault[0] = 0;
			fault[1] = gpa & ~(PAGE - 1);
			fault[2] = PAGE;
			run->exit_reason = KVM_EXIT_MEMORY_FAULT;
			return 2;
		}
		if (done >= 0)
			return done;
		struct timespec pause = { 0, 500000 };
		nanosleep(&pause, NULL);
	}
	return 0;
}

static int internal_error(int vcpu_fd)
{
	return vcpu_fd >= 0 && vcpu_fd < MAX_VCPU_FD && g_vcpus[vcpu_fd].run
	       && g_vcpus[vcpu_fd].run->exit_reason == KVM_EXIT_INTERNAL_ERROR;
}

static long run_vcpu(int fd, void *arg)
{
	for (int tries = 0;; tries++) {
		unsigned long gen = __atomic_load_n(&g_gen, __ATOMIC_ACQUIRE);
		long ret = sys_ioctl(fd, KVM_RUN, arg);
		if (ret == 0) {
			int completed = g_ngmem && tries < 64 ? complete_mmio(fd) : 0;
			if (completed == 2)
				return fail(EFAULT);
			if (completed)
				continue;
			if (g_ngmem && tries < 8 && internal_error(fd)) { /* e.g. a fetch from a stale page */
				pthread_mutex_lock(&g_lock);
				long changed = sync_all();
				int moved = gen != __atomic_load_n(&g_gen, __ATOMIC_ACQUIRE);
				pthread_mutex_unlock(&g_lock);
				if (changed || moved)
					continue;
			}
			return ret;
		}
		if (errno != EFAULT || !g_ngmem || tries >= 8)
			return ret;
		/* A conversion this library did not see (ctl, another process) or one racing this run: bring
		 * every hidden range up to date; run again if that (or a conversion meanwhile) changed any. */
		pthread_mutex_lock(&g_lock);
		long changed = sync_all();
		int moved = gen != __atomic_load_n(&g_gen, __ATOMIC_ACQUIRE);
		pthread_mutex_unlock(&g_lock);
		if (!changed && !moved) {
			errno = EFAULT;
			return ret;
		}
	}
}

int ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	va_start(ap, req);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	switch (req) {
	case KVM_CHECK_EXTENSION:
		return (int)check_extension(fd, (long)arg);
	case KVM_CREATE_VM:
		return (int)create_vm(fd, (unsigned long)arg);
	case SHIM_CREATE_GUEST_MEMFD:
		return (int)create_guest_memfd(fd, arg);
	case SHIM_SET_USER_MEMORY_REGION2:
		return (int)set_region2(fd, arg);
	case KVM_SET_USER_MEMORY_REGION:
		return (int)set_user_memory_region(fd, arg);
	case SHIM_SET_MEMORY_ATTRIBUTES2:
		return (int)set_memory_attributes2(fd, arg);
	case SHIM_SET_MEMORY_ATTRIBUTES:
		return (int)set_memory_attributes(fd, arg);
	case KVM_RUN:
		return (int)run_vcpu(fd, arg);
	case KVM_CREATE_VCPU:
		return (int)create_vcpu(fd, (unsigned long)arg);
	}
	return (int)sys_ioctl(fd, req, arg);
}

/* --- the file's lifetime: the last descriptor and mapping of the program ----------------------------- */
/* Another descriptor of the program on g, or -1. */
static int other_fd(struct gmem *g)
{
	DIR *dir = opendir("/proc/self/fd");
	if (!dir)
		return -1;
	int found = -1, self = dirfd(dir);
	struct dirent *d;
	while (found < 0 && (d = readdir(dir))) {
		int fd = atoi(d->d_name);
		struct stat st;
		if (d->d_name[0] == '.' || fd == self || fd == g->mem_fd || fd == g->ctl_fd || fd == g->priv_fd)
			continue;
		if (fstat(fd, &st) == 0 && st.st_dev == g->dev && st.st_ino == g->ino)
			found = fd;
	}
	closedir(dir);
	return found;
}

/* Whether the program maps g anywhere outside our hidden ranges (/proc/self/maps: "dev inode"). */
static int program_maps(struct gmem *g)
{
	FILE *f = fopen("/proc/self/maps", "re");
	if (!f)
		return 1; /* cannot tell: keep it */
	char line[512];
	int found = 0;
	while (!found && fgets(line, sizeof(line), f)) {
		unsigned long start, end, ino;
		unsigned int major, minor;
		if (sscanf(line, "%lx-%lx %*s %*s %x:%x %lu", &start, &end, &major, &minor, &ino) != 5)
			continue;
		if (ino != g->ino || makedev(major, minor) != g->dev)
			continue;
		int hidden = 0;
		for (int i = 0; i < MAX_SLOTS && !hidden; i++)
			if (g_slots[i].used && (char *)start >= g_slots[i].hidden
			    && (char *)end <= g_slots[i].hidden + g_slots[i].size)
				hidden = 1;
		found = !hidden;
	}
	fclose(f);
	return found;
}

/* The kernel releases a guest_memfd file on its last reference: its memslots lose their backing (a guest
 * access then fails with EFAULT) and the memory goes. g_lock held. */
static void release_if_unreferenced(struct gmem *g)
{
	int fd = other_fd(g);
	if (fd >= 0) {
		g->user_fd = fd;
		return;
	}
	g->user_fd = -1;
	if (program_maps(g)) {
		g->orphan = 1;
		return;
	}
	for (int i = 0; i < MAX_SLOTS; i++) {
		struct slot *s = &g_slots[i];
		if (s->used && s->g == g) {
			sys_mmap(s->hidden, s->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
			memset(s->kind, K_NONE, s->size / PAGE);
			s->g = NULL;
		}
	}
	syscall(SYS_close, g->mem_fd);
	syscall(SYS_close, g->ctl_fd);
	syscall(SYS_close, g->priv_fd);
	memset(g, 0, sizeof(*g));
}

int close(int fd)
{
	int ret = (int)syscall(SYS_close, fd);
	if (ret != 0)
		return ret;
	int err = errno;
	if (fd >= 0 && fd < MAX_VCPU_FD && (g_vcpus[fd].vm_fd || g_vcpus[fd].run)) {
		/* a vCPU goes: our mapping of its kvm_run would keep it (and its VM) alive */
		pthread_mutex_lock(&g_lock);
		if (g_vcpus[fd].run)
			syscall(SYS_munmap, g_vcpus[fd].run, PAGE);
		g_vcpus[fd].run = NULL;
		g_vcpus[fd].vm_fd = 0;
		pthread_mutex_unlock(&g_lock);
	}
	if (fd >= 0 && fd < MAX_VCPU_FD)
		g_vm_private[fd] = 0;
	if (!g_ngmem)
		return ret;
	pthread_mutex_lock(&g_lock);
	/* A VM fd goes: its memslots go with the VM (the number may name another VM next), and its files can
	 * no longer be bound by a VM that gets the same number. */
	for (int i = 0; i < MAX_SLOTS; i++)
		if (g_slots[i].used && g_slots[i].vm_fd == fd)
			drop_slot(&g_slots[i]);
	for (int i = 0; i < MAX_GMEM; i++)
		if (g_gmem[i].used && g_gmem[i].vm_fd == fd)
			g_gmem[i].vm_fd = -1;
	for (int i = 0; i < MAX_GMEM; i++)
		if (g_gmem[i].used && g_gmem[i].user_fd == fd)
			release_if_unreferenced(&g_gmem[i]);
	pthread_mutex_unlock(&g_lock);
	errno = err;
	return ret;
}

int munmap(void *addr, size_t len)
{
	int ret = (int)syscall(SYS_munmap, addr, len);
	if (ret != 0 || !g_ngmem)
		return ret;
	int err = errno;
	pthread_mutex_lock(&g_lock);
	for (int i = 0; i < MAX_GMEM; i++)
		if (g_gmem[i].used && g_gmem[i].orphan)
			release_if_unreferenced(&g_gmem[i]);
	pthread_mutex_unlock(&g_lock);
	errno = err;
	return ret;
}

/* --- mmap and open: guest_memfd's answers where a FUSE file cannot give them ------------------------ */
void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	if (g_ngmem && !(flags & MAP_ANONYMOUS)) {
		struct gmem *g = gmem_of(fd);
		if (g && !(g->flags & GUEST_MEMFD_FLAG_MMAP)) {
			errno = ENODEV;
			return MAP_FAILED;
		}
		if (g && (flags & MAP_TYPE) == MAP_PRIVATE) {
			errno = EINVAL;
			return MAP_FAILED;
		}
	}
	return sys_mmap(addr, len, prot, flags, fd, off);
}
void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
	__attribute__((alias("mmap")));

/* fstatfs: guest_memfd's inode lives on the anon_inode filesystem (measured on 6.18: 0x09041934) */
#define ANON_INODE_FS_MAGIC 0x09041934
int fstatfs(int fd, struct statfs *buf)
{
	int ret = (int)syscall(SYS_fstatfs, fd, buf);
	if (ret == 0 && gmem_of(fd))
		buf->f_type = ANON_INODE_FS_MAGIC;
	return ret;
}
int fstatfs64(int fd, struct statfs64 *buf)
{
	int ret = (int)syscall(SYS_fstatfs, fd, buf);
	if (ret == 0 && gmem_of(fd))
		buf->f_type = ANON_INODE_FS_MAGIC;
	return ret;
}

/* Reopening our file through /proc/PID/fd/N: the kernel's guest_memfd inode has no open method. */
static int proc_reopen(const char *path)
{
	if (!g_ngmem || !path || strncmp(path, "/proc/", 6) != 0 || !strstr(path, "/fd/"))
		return 0;
	struct stat st;
	return stat(path, &st) == 0 && gmem_by_stat(&st) != NULL;
}

static int do_open(int dir, const char *path, int flags, va_list ap)
{
	mode_t mode = (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? va_arg(ap, mode_t) : 0;
	if (proc_reopen(path))
		return fail(ENXIO);
	return sys_openat(dir, path, flags, mode);
}
int open(const char *path, int flags, ...)
{ va_list ap; va_start(ap, flags); int r = do_open(AT_FDCWD, path, flags, ap); va_end(ap); return r; }
int open64(const char *path, int flags, ...)
{ va_list ap; va_start(ap, flags); int r = do_open(AT_FDCWD, path, flags | O_LARGEFILE, ap); va_end(ap); return r; }
int openat(int dir, const char *path, int flags, ...)
{ va_list ap; va_start(ap, flags); int r = do_open(dir, path, flags, ap); va_end(ap); return r; }
int openat64(int dir, const char *path, int flags, ...)
{ va_list ap; va_start(ap, flags); int r = do_open(dir, path, flags | O_LARGEFILE, ap); va_end(ap); return r; }

/* --- exec: a program this library cannot follow is refused, never run natively ------------------------ */
/* Whether the loader will load this library into `path`: a dynamically linked ELF (PT_INTERP), not
 * setuid/setgid to someone else; a #! script by its interpreter. 1 yes, 0 no, -1 cannot tell (let the
 * kernel answer the exec). */
static int reachable(const char *path, int depth)
{
	struct stat st;
	if (stat(path, &st) != 0)
		return -1;
	if ((st.st_mode & S_ISUID && st.st_uid != geteuid()) || (st.st_mode & S_ISGID && st.st_gid != getegid()))
		return 0;
	int fd = sys_openat(AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	unsigned char head[4096];
	ssize_t n = pread(fd, head, sizeof(head) - 1, 0);
	int result = -1;
	if (n >= 2 && head[0] == '#' && head[1] == '!' && depth < 4) {
		head[n] = 0;
		char *p = (char *)head + 2, interp[256];
		while (*p == ' ' || *p == '\t') p++;
		size_t len = strcspn(p, " \t\n");
		if (len && len < sizeof(interp)) {
			memcpy(interp, p, len);
			interp[len] = 0;
			result = reachable(interp, depth + 1);
		}
	} else if (n >= 64 && !memcmp(head, "\x7f" "ELF", 4)) {
		int is64 = head[4] == 2;
		uint64_t phoff;
		uint16_t phentsize, phnum;
		if (is64) {
			memcpy(&phoff, head + 32, 8);
			memcpy(&phentsize, head + 54, 2);
			memcpy(&phnum, head + 56, 2);
		} else {
			uint32_t off32;
			memcpy(&off32, head + 28, 4);
			phoff = off32;
			memcpy(&phentsize, head + 42, 2);
			memcpy(&phnum, head + 44, 2);
		}
		result = 0;
		for (unsigned i = 0; i < phnum && phentsize >= 4; i++) {
			uint32_t type;
			if (pread(fd, &type, 4, (off_t)(phoff + (uint64_t)i * phentsize)) != 4)
				break;
			if (type == 3 /* PT_INTERP */) {
				result = 1;
				break;
			}
		}
	}
	syscall(SYS_close, fd);
	return result;
}

static int refuse_exec(const char *path)
{
	if (!g_mount || reachable(path, 0) != 0)
		return 0;
	char msg[512];
	int n = snprintf(msg, sizeof(msg), "ufsgmem run: refusing to execute %s: it is statically linked or "
			 "setuid, so the interposer cannot follow it and it would run without guest_memfd\n", path);
	if (write(2, msg, n) < 0) { /* nothing more to say */ }
	errno = EPERM;
	return 1;
}

extern char **environ;

int execve(const char *path, char *const argv[], char *const envp[])
{
	if (refuse_exec(path))
		return -1;
	return (int)syscall(SYS_execve, path, argv, envp);
}

int execv(const char *path, char *const argv[]) { return execve(path, argv, environ); }

int execvpe(const char *file, char *const argv[], char *const envp[])
{
	if (!*file)
		return fail(ENOENT);
	if (strchr(file, '/'))
		return execve(file, argv, envp);
	const char *dirs = getenv("PATH");
	if (!dirs)
		dirs = "/bin:/usr/bin";
	int err = ENOENT;
	for (const char *p = dirs;; p++) {
		const char *end = strchrnul(p, ':');
		char path[4096];
		int n = snprintf(path, sizeof(path), "%.*s%s%s", (int)(end - p), p, end == p ? "" : "/", file);
		if (n > 0 && (size_t)n < sizeof(path)) {
			execve(path, argv, envp);
			if (errno == EACCES || errno == EPERM)
				err = errno;
			else if (errno != ENOENT && errno != ENOTDIR)
				return -1;
		}
		if (!*end)
			break;
		p = end;
	}
	return fail(err);
}

int execvp(const char *file, char *const argv[]) { return execvpe(file, argv, environ); }

/* --- start-up ------------------------------------------------------------------------------------ */
/* fork() while another thread holds g_lock would leave the child's copy locked forever */
static void fork_prepare(void) { pthread_mutex_lock(&g_lock); }
static void fork_done(void) { pthread_mutex_unlock(&g_lock); }

__attribute__((constructor)) static void shim_init(void)
{
	pthread_atfork(fork_prepare, fork_done, fork_done);
	g_mount = getenv("UFSGMEM_RUN_MOUNT");
	const char *kernel = getenv("UFSGMEM_RUN_KERNEL");
	g_v8 = !(kernel && !strcmp(kernel, "6.18"));
	const char *backend = getenv("UFSGMEM_RUN_BACKEND");
	if (backend)
		strncpy(g_backend, backend, sizeof(g_backend) - 1);
	/* Tell `ufsgmem run` we are loaded (once: the variable goes, so programs this one runs stay quiet). */
	const char *hs = getenv("UFSGMEM_RUN_HANDSHAKE_FD");
	if (hs) {
		int fd = atoi(hs);
		char msg[64];
		int n = snprintf(msg, sizeof(msg), "ufsgmem-shim %d\n", (int)getpid());
		if (write(fd, msg, n) < 0) { /* run then reports that the interposer did not load */ }
		syscall(SYS_close, fd);
		unsetenv("UFSGMEM_RUN_HANDSHAKE_FD");
	}
}
