/*
 * gmem_vcpu.c - a VMM written only against the kernel's uAPI (<linux/kvm.h>), whose vCPU reads and
 * writes shared and private guest_memfd pages across in-place conversions (series v8).
 *
 * It runs unchanged on a kernel with guest_memfd and, on a kernel without, under `ufsgmem run`:
 *
 *     cc -O2 -Wall -pthread -o gmem_vcpu examples/gmem_vcpu.c
 *     ./gmem_vcpu                              # the machine's kernel
 *     ufsgmem run -- ./gmem_vcpu               # ufsgmem playing a v8 kernel
 *     ufsgmem run --kernel 6.18 -- ./gmem_vcpu # ufsgmem playing 6.18 (no gmem ioctl: ENOTTY)
 *
 * What it does: creates a guest_memfd with KVM_CREATE_GUEST_MEMFD on the VM fd (MMAP|INIT_SHARED),
 * binds it to a gmem-only memslot whose userspace_addr is NULL, converts pages through the guest_memfd
 * ioctl KVM_SET_MEMORY_ATTRIBUTES2, and runs a real vCPU (16-bit real mode, kernel-selftest style) that
 * reads a 32-bit word at a guest address, reports it on port 0x10, writes another word and halts. It
 * checks: content kept across conversions both ways, for the guest and the host; SIGBUS for host
 * mappings (its own, and a forked child's older one) of a private page; punch-hole gives zeros to both
 * sides and keeps the attribute; the errnos of creation, binding, mmap and the ioctl.
 *
 * Output: one line per check, then "N passed, M failed, K skipped". Exit 0 if none failed, 1 if any
 * did, 77 if KVM or guest_memfd is missing (a skip). Where the kernel lacks in-place conversion
 * (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES without PRIVATE, e.g. 6.18), the conversion checks are skipped
 * and the gmem ioctl must be ENOTTY.
 *
 * x86-64 only. The defines below are the kernel's values for what older headers lack.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

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
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1U << 2)
#endif
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_CAP_MEMORY_ATTRIBUTES
#define KVM_CAP_MEMORY_ATTRIBUTES 233
#endif
#ifndef KVM_SET_MEMORY_ATTRIBUTES
struct kvm_memory_attributes {
	__u64 address;
	__u64 size;
	__u64 attributes;
	__u64 flags;
};
#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
#endif
#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
	__u64 size;
	__u64 flags;
	__u64 reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif
#ifndef KVM_SET_USER_MEMORY_REGION2
struct kvm_userspace_memory_region2 {
	__u32 slot;
	__u32 flags;
	__u64 guest_phys_addr;
	__u64 memory_size;
	__u64 userspace_addr;
	__u64 guest_memfd_offset;
	__u32 guest_memfd;
	__u32 pad1;
	__u64 pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif
#ifndef KVM_SET_MEMORY_ATTRIBUTES2
struct kvm_memory_attributes2 {
	union {
		__u64 address;
		__u64 offset;
	};
	__u64 size;
	__u64 attributes;
	__u64 flags;
	__u64 error_offset;
	__u64 reserved[11];
};
#define KVM_SET_MEMORY_ATTRIBUTES2 _IOWR(KVMIO, 0xd2, struct kvm_memory_attributes2)
#endif

#define PAGE 4096UL
#define NPAGES 16UL
#define GMEM_SIZE (NPAGES * PAGE)
#define CODE_GPA 0x0UL /* slot 0: anonymous memory with the guest's code at 0x1000 */
#define CODE_SIZE 0x10000UL
#define GMEM_GPA 0x20000UL /* slot 1: the guest_memfd, gmem-only, userspace_addr NULL */
#define PORT 0x10

static int kvm, vm, vcpu, gmem;
static struct kvm_run *run;
static int passed, failed, skipped;

static void check(int ok, const char *what, const char *detail)
{
	if (ok)
		passed++;
	else
		failed++;
	printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail && *detail ? ": " : "", detail ? detail : "");
	fflush(stdout);
}

static void skip(const char *what, const char *why)
{
	skipped++;
	printf("skip %s: %s\n", what, why);
}

static void die(const char *what)
{
	printf("FAIL %s: %s\n", what, strerror(errno));
	printf("%d passed, %d failed, %d skipped\n", passed, failed + 1, skipped);
	exit(1);
}

/* --- host accesses that may raise SIGBUS ---------------------------------------------------------- */
static sigjmp_buf bus_jmp;
static volatile sig_atomic_t bus_armed;

static void on_sigbus(int sig)
{
	(void)sig;
	if (bus_armed)
		siglongjmp(bus_jmp, 1);
	_exit(99);
}

/* 0 and *out on success, -1 if the access raised SIGBUS */
static int host_read(volatile uint32_t *p, uint32_t *out)
{
	if (sigsetjmp(bus_jmp, 1)) {
		bus_armed = 0;
		return -1;
	}
	bus_armed = 1;
	*out = *p;
	bus_armed = 0;
	return 0;
}

static int host_write(volatile uint32_t *p, uint32_t v)
{
	if (sigsetjmp(bus_jmp, 1)) {
		bus_armed = 0;
		return -1;
	}
	bus_armed = 1;
	*p = v;
	bus_armed = 0;
	return 0;
}

/* --- the vCPU: mov eax,[bx]; out 0x10,eax; mov [bx],ecx; hlt (ds = the guest_memfd slot) ---------- */
static const uint8_t guest_code[] = {
	0x66, 0x8b, 0x07,       /* mov eax, [bx] */
	0x66, 0xe7, PORT,       /* out 0x10, eax */
	0x66, 0x89, 0x0f,       /* mov [bx], ecx */
	0xf4,                   /* hlt */
};

/* The guest reads the word at gmem offset off (returned in *read) and writes value there. 0 on
 * success; -1 with errno from KVM_RUN (e.g. EFAULT, a memory fault exit) or EIO for another exit. */
static int guest_access(unsigned long off, uint32_t value, uint32_t *read)
{
	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = 0x1000;
	regs.rbx = off;
	regs.rcx = value;
	regs.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) != 0)
		die("KVM_SET_REGS");
	for (int step = 0; step < 2; step++) {
		if (ioctl(vcpu, KVM_RUN, 0) != 0) {
			int err = errno;
			if (run->exit_reason == KVM_EXIT_MEMORY_FAULT) {
				uint64_t *mf = (uint64_t *)((char *)run + 32); /* kvm_run.memory_fault: flags, gpa, size */
				printf("     (KVM_RUN: %s, memory fault at gpa %#llx flags %#llx)\n", strerror(err),
				       (unsigned long long)mf[1], (unsigned long long)mf[0]);
			} else {
				printf("     (KVM_RUN: %s, exit reason %u)\n", strerror(err), run->exit_reason);
			}
			errno = err;
			return -1;
		}
		if (step == 0) {
			if (run->exit_reason != KVM_EXIT_IO || run->io.port != PORT || run->io.size != 4) {
				printf("     (unexpected exit %u)\n", run->exit_reason);
				errno = EIO;
				return -1;
			}
			memcpy(read, (char *)run + run->io.data_offset, 4);
		} else if (run->exit_reason != KVM_EXIT_HLT) {
			printf("     (unexpected exit %u, expected HLT)\n", run->exit_reason);
			errno = EIO;
			return -1;
		}
	}
	return 0;
}

/* The guest reads off, expecting want, and writes value. */
static void guest_check(const char *what, unsigned long off, uint32_t want, uint32_t value)
{
	uint32_t got = 0;
	char detail[128] = "";
	int r = guest_access(off, value, &got);
	if (r != 0)
		snprintf(detail, sizeof(detail), "vCPU access failed: %s", strerror(errno));
	else if (got != want)
		snprintf(detail, sizeof(detail), "the guest read %#x, expected %#x", got, want);
	check(r == 0 && got == want, what, detail);
}

/* --- guest_memfd calls ---------------------------------------------------------------------------- */
static int convert(unsigned long off, unsigned long size, uint64_t attributes)
{
	struct kvm_memory_attributes2 a;
	memset(&a, 0, sizeof(a));
	a.offset = off;
	a.size = size;
	a.attributes = attributes;
	return ioctl(gmem, KVM_SET_MEMORY_ATTRIBUTES2, &a);
}

static void expect_errno(const char *what, int ret, int want)
{
	char detail[128] = "";
	int ok = ret == -1 && errno == want;
	if (!ok)
		snprintf(detail, sizeof(detail), "got %d (%s), expected -1 (%s)", ret, ret ? strerror(errno) : "success",
			 strerror(want));
	check(ok, what, detail);
}

static int create_gmem(uint64_t size, uint64_t flags)
{
	struct kvm_create_guest_memfd c;
	memset(&c, 0, sizeof(c));
	c.size = size;
	c.flags = flags;
	return ioctl(vm, KVM_CREATE_GUEST_MEMFD, &c);
}

static int bind(uint32_t slot, uint64_t gpa, uint64_t size, uint64_t uaddr, int fd, uint64_t offset)
{
	struct kvm_userspace_memory_region2 r;
	memset(&r, 0, sizeof(r));
	r.slot = slot;
	r.flags = KVM_MEM_GUEST_MEMFD;
	r.guest_phys_addr = gpa;
	r.memory_size = size;
	r.userspace_addr = uaddr;
	r.guest_memfd = fd;
	r.guest_memfd_offset = offset;
	return ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &r);
}

/* --- setup ---------------------------------------------------------------------------------------- */
static void setup_vcpu(void)
{
	char *code = mmap(NULL, CODE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (code == MAP_FAILED)
		die("mmap code");
	memcpy(code + 0x1000, guest_code, sizeof(guest_code));
	struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = CODE_GPA,
		.memory_size = CODE_SIZE, .userspace_addr = (uintptr_t)code };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) != 0)
		die("KVM_SET_USER_MEMORY_REGION (code)");
	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	struct kvm_sregs s;
	if (ioctl(vcpu, KVM_GET_SREGS, &s) != 0)
		die("KVM_GET_SREGS");
	s.cs.base = 0;
	s.cs.selector = 0;
	s.ds.base = GMEM_GPA;
	s.ds.selector = GMEM_GPA >> 4;
	s.ds.limit = 0xffff;
	if (ioctl(vcpu, KVM_SET_SREGS, &s) != 0)
		die("KVM_SET_SREGS");
}

static void errno_checks(void)
{
	expect_errno("create: an unknown flag bit is EINVAL", create_gmem(GMEM_SIZE, 1ULL << 2), EINVAL);
	expect_errno("create: size 0 is EINVAL", create_gmem(0, GUEST_MEMFD_FLAG_MMAP), EINVAL);
	expect_errno("create: size 4095 is EINVAL", create_gmem(PAGE - 1, GUEST_MEMFD_FLAG_MMAP), EINVAL);
	expect_errno("create: a negative size is EINVAL", create_gmem(-PAGE, GUEST_MEMFD_FLAG_MMAP), EINVAL);

	expect_errno("bind: unaligned guest_memfd_offset is EINVAL",
		     bind(2, 0x40000, PAGE, 0, gmem, 0x800), EINVAL);
	expect_errno("bind: a range past the file's end is EINVAL",
		     bind(2, 0x40000, 2 * PAGE, 0, gmem, GMEM_SIZE - PAGE), EINVAL);
	expect_errno("bind: a guest_memfd memslot is immutable (moving it is EINVAL)",
		     bind(1, GMEM_GPA + GMEM_SIZE, GMEM_SIZE, 0, gmem, 0), EINVAL);
	expect_errno("bind: a range already bound to another memslot is EINVAL",
		     bind(2, 0x40000, PAGE, 0, gmem, PAGE), EINVAL);
	int other_vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (other_vm < 0)
		die("KVM_CREATE_VM (a second VM)");
	int saved_vm = vm;
	vm = other_vm;
	expect_errno("bind: another VM's guest_memfd is EINVAL", bind(0, 0x40000, PAGE, 0, gmem, 0), EINVAL);
	vm = saved_vm;
	close(other_vm);
	int notgmem = memfd_create("not-gmem", MFD_CLOEXEC);
	if (notgmem < 0 || ftruncate(notgmem, GMEM_SIZE) != 0)
		die("memfd_create");
	expect_errno("bind: an fd that is not a guest_memfd is EINVAL", bind(2, 0x40000, PAGE, 0, notgmem, 0), EINVAL);
	close(notgmem);

	expect_errno("mmap: MAP_PRIVATE of a guest_memfd is EINVAL",
		     mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, gmem, 0) == MAP_FAILED ? -1 : 0, EINVAL);
	int nommap = create_gmem(GMEM_SIZE, 0);
	if (nommap < 0)
		die("KVM_CREATE_GUEST_MEMFD (flags 0)");
	expect_errno("mmap: a guest_memfd created without MMAP is ENODEV",
		     mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, nommap, 0) == MAP_FAILED ? -1 : 0, ENODEV);
	close(nommap);
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", gmem);
	int reopened = open(path, O_RDWR);
	check(reopened < 0, "reopening the guest_memfd through /proc is refused", reopened < 0 ? strerror(errno) : "it opened");
	if (reopened >= 0)
		close(reopened);
}

/* The VM-level attribute ioctl (6.8): PRIVATE is refused unless KVM_CAP_MEMORY_ATTRIBUTES offers it
 * (v8 with in-place conversion drops it; a default VM never had it). */
static void vm_attributes_check(void)
{
	long cap = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_MEMORY_ATTRIBUTES);
	if (cap > 0 && (cap & KVM_MEMORY_ATTRIBUTE_PRIVATE)) {
		skip("VM-level KVM_SET_MEMORY_ATTRIBUTES", "this VM tracks PRIVATE per VM (not in-place)");
		return;
	}
	struct kvm_memory_attributes a = { .address = GMEM_GPA, .size = PAGE,
					   .attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE };
	expect_errno("VM-level KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) is EINVAL without the VM-level cap",
		     ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &a), EINVAL);
}

static void ioctl_errno_checks(void)
{
	struct kvm_memory_attributes2 a;
	expect_errno("ioctl: unaligned offset is EINVAL", convert(0x800, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE), EINVAL);
	expect_errno("ioctl: unaligned size is EINVAL", convert(0, 0x800, KVM_MEMORY_ATTRIBUTE_PRIVATE), EINVAL);
	expect_errno("ioctl: size 0 is EINVAL", convert(0, 0, KVM_MEMORY_ATTRIBUTE_PRIVATE), EINVAL);
	expect_errno("ioctl: a range past the end is EINVAL",
		     convert(GMEM_SIZE - PAGE, 2 * PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE), EINVAL);
	expect_errno("ioctl: an unknown attribute is EINVAL", convert(0, PAGE, 1), EINVAL);
	memset(&a, 0, sizeof(a));
	a.size = PAGE;
	a.flags = 1;
	expect_errno("ioctl: flags != 0 is EINVAL", ioctl(gmem, KVM_SET_MEMORY_ATTRIBUTES2, &a), EINVAL);
	memset(&a, 0, sizeof(a));
	a.size = PAGE;
	a.reserved[3] = 1;
	expect_errno("ioctl: a reserved field set is EINVAL", ioctl(gmem, KVM_SET_MEMORY_ATTRIBUTES2, &a), EINVAL);
	expect_errno("ioctl: another command on the guest_memfd is ENOTTY", ioctl(gmem, KVM_RUN, 0), ENOTTY);

	/* a default VM has no private memory: its guest_memfd cannot convert (v8's check 4) */
	int saved_vm = vm, plain_vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (plain_vm < 0)
		die("KVM_CREATE_VM (default type)");
	vm = plain_vm;
	long cap = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES);
	int plain_gmem = create_gmem(PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	vm = saved_vm;
	if (plain_gmem < 0)
		die("KVM_CREATE_GUEST_MEMFD (default VM)");
	check(cap == 0, "a default VM reports no guest_memfd attributes", NULL);
	a = (struct kvm_memory_attributes2){ .size = PAGE, .attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE };
	expect_errno("ioctl: a guest_memfd of a VM without private memory cannot convert (EINVAL)",
		     ioctl(plain_gmem, KVM_SET_MEMORY_ATTRIBUTES2, &a), EINVAL);
	close(plain_gmem);
	close(plain_vm);
}

/* A forked child maps page 2 while shared and reads it; the parent makes it private; the child's older
 * mapping (and the inherited one) must now raise SIGBUS. */
static void fork_check(volatile uint32_t *hva)
{
	int to_child[2], to_parent[2];
	if (pipe(to_child) || pipe(to_parent))
		die("pipe");
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		volatile uint32_t *own = mmap(NULL, GMEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);
		uint32_t v = 0;
		char c = own != MAP_FAILED && host_read(own + 2 * PAGE / 4, &v) == 0 && host_read(hva + 2 * PAGE / 4, &v) == 0;
		if (write(to_parent[1], &c, 1) != 1 || read(to_child[0], &c, 1) != 1)
			_exit(3);
		int own_bus = host_read(own + 2 * PAGE / 4, &v) != 0;
		int inherited_bus = host_read(hva + 2 * PAGE / 4, &v) != 0;
		_exit(own_bus && inherited_bus ? 0 : own_bus ? 4 : 5);
	}
	char c = 0;
	if (read(to_parent[0], &c, 1) != 1 || !c) {
		check(0, "fork: the child mapped and read the shared page", NULL);
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		return;
	}
	check(convert(2 * PAGE, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0, "fork: page 2 converted to private", NULL);
	if (write(to_child[1], &c, 1) != 1)
		die("pipe write");
	int status = 0;
	waitpid(pid, &status, 0);
	char detail[64];
	snprintf(detail, sizeof(detail), "child status %#x", status);
	check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "fork: the child's older mappings get SIGBUS once the page is private", detail);
	guest_check("fork: the guest still reads the page (private now)", 2 * PAGE, 0x0202, 0x0203);
	uint32_t v = 0;
	check(convert(2 * PAGE, PAGE, 0) == 0 && host_read(hva + 2 * PAGE / 4, &v) == 0 && v == 0x0203,
	      "fork: back to shared, the host reads the guest's write", NULL);
	close(to_child[0]); close(to_child[1]); close(to_parent[0]); close(to_parent[1]);
}

/* Another process converts (the child, through its inherited fd): the parent's vCPU must follow. */
static void child_converts_check(volatile uint32_t *hva)
{
	host_write(hva + 4 * PAGE / 4, 0x0404);
	pid_t pid = fork();
	if (pid == 0)
		_exit(convert(4 * PAGE, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0 ? 0 : 1);
	int status = 0;
	waitpid(pid, &status, 0);
	check(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a forked child converts page 4 to private", NULL);
	uint32_t v;
	check(host_read(hva + 4 * PAGE / 4, &v) != 0, "  the parent's mapping of page 4 gets SIGBUS", NULL);
	guest_check("  the parent's vCPU reads page 4 (private, content kept)", 4 * PAGE, 0x0404, 0x0405);
	check(convert(4 * PAGE, PAGE, 0) == 0, "  page 4 back to shared", NULL);
	check(host_read(hva + 4 * PAGE / 4, &v) == 0 && v == 0x0405, "  the host reads what the guest wrote", NULL);
}

/* A vCPU thread keeps reading and incrementing a word of page 5 while the main thread converts that page
 * back and forth: every access sees the previous value, whatever the attribute is at that moment. */
#define RACE_ACCESSES 300
static int race_bad;
static volatile int race_done;
static void *race_vcpu(void *unused)
{
	(void)unused;
	for (uint32_t i = 0; i < RACE_ACCESSES; i++) {
		uint32_t got = 0;
		if (guest_access(5 * PAGE, i + 1, &got) != 0 || got != i)
			race_bad++;
	}
	race_done = 1;
	return NULL;
}

static void thread_check(volatile uint32_t *hva)
{
	pthread_t t;
	host_write(hva + 5 * PAGE / 4, 0);
	if (pthread_create(&t, NULL, race_vcpu, NULL) != 0)
		die("pthread_create");
	int conversions = 0, bad_conversions = 0;
	for (int i = 0; i < 300 && (!race_done || i < 40); i++) {
		if (convert(5 * PAGE, PAGE, i % 2 ? 0 : KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0)
			conversions++;
		else
			bad_conversions++;
	}
	pthread_join(t, NULL);
	if (conversions % 2) /* end shared */
		conversions += convert(5 * PAGE, PAGE, 0) == 0;
	char detail[128];
	snprintf(detail, sizeof(detail), "%d conversions; %d of %d accesses wrong, %d conversions failed", conversions,
		 race_bad, RACE_ACCESSES, bad_conversions);
	check(!race_bad && !bad_conversions, "threads: a vCPU thread's accesses race conversions, content kept", detail);
	uint32_t v = 0;
	check(host_read(hva + 5 * PAGE / 4, &v) == 0 && v == RACE_ACCESSES, "threads: the host reads the last write",
	      NULL);
}

static void conversion_checks(volatile uint32_t *hva)
{
	uint32_t v = 0;
	char detail[128];
	/* shared page 0: host -> guest -> host */
	host_write(hva, 0x1111);
	guest_check("shared: the guest reads what the host wrote", 0, 0x1111, 0x2222);
	check(host_read(hva, &v) == 0 && v == 0x2222, "shared: the host reads what the guest wrote", NULL);

	/* page 1: shared -> private -> shared, content kept both ways */
	host_write(hva + PAGE / 4, 0xaaaa0001);
	check(convert(PAGE, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0, "page 1 to private", NULL);
	check(host_read(hva + PAGE / 4, &v) != 0, "private: a host read gets SIGBUS", NULL);
	check(host_write(hva + PAGE / 4, 1) != 0, "private: a host write gets SIGBUS", NULL);
	guest_check("private: the guest reads what the host wrote while shared", PAGE, 0xaaaa0001, 0xbbbb0001);
	guest_check("private: the guest reads back its own write", PAGE, 0xbbbb0001, 0xcccc0001);
	check(convert(PAGE, PAGE, 0) == 0, "page 1 back to shared", NULL);
	v = 0;
	int r = host_read(hva + PAGE / 4, &v);
	snprintf(detail, sizeof(detail), "read %s %#x", r ? "SIGBUS" : "", v);
	check(r == 0 && v == 0xcccc0001, "shared again: the host reads what the guest wrote while private", detail);
	guest_check("shared again: the guest reads it too", PAGE, 0xcccc0001, 0xdddd0001);
	check(host_read(hva + PAGE / 4, &v) == 0 && v == 0xdddd0001, "shared again: the host sees the guest's write", NULL);

	/* page 2 for the fork check */
	host_write(hva + 2 * PAGE / 4, 0x0202);
	fork_check(hva);
	child_converts_check(hva);
	thread_check(hva);

	/* punch: a shared page, then a private one; the attribute stays */
	check(fallocate(gmem, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE) == 0, "punch shared page 0", NULL);
	check(host_read(hva, &v) == 0 && v == 0, "punch: the host reads zeros", NULL);
	guest_check("punch: the guest reads zeros", 0, 0, 0x3333);
	host_write(hva + 3 * PAGE / 4, 0x0303);
	check(convert(3 * PAGE, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0, "page 3 to private", NULL);
	guest_check("page 3: the guest reads the host's value", 3 * PAGE, 0x0303, 0x0304);
	check(fallocate(gmem, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 3 * PAGE, PAGE) == 0, "punch private page 3", NULL);
	guest_check("punch: the guest reads zeros from the private page", 3 * PAGE, 0, 0x0305);
	check(host_read(hva + 3 * PAGE / 4, &v) != 0, "punch: the page stays private (host SIGBUS)", NULL);
	check(convert(3 * PAGE, PAGE, 0) == 0, "page 3 back to shared", NULL);
	check(host_read(hva + 3 * PAGE / 4, &v) == 0 && v == 0x0305, "page 3: the host reads the guest's post-punch write", NULL);

	/* every page of the slot: half private in one call, the guest writes each, all back to shared */
	for (unsigned long i = 0; i < NPAGES; i++)
		host_write(hva + i * PAGE / 4 + 1, 0x1000 + i);
	check(convert(8 * PAGE, 8 * PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0, "pages 8-15 to private in one call", NULL);
	int all = 1;
	for (unsigned long i = 0; i < NPAGES; i++) {
		uint32_t got = 0;
		if (guest_access(i * PAGE + 4, 0x2000 + i, &got) != 0 || got != 0x1000 + i) {
			if (all)
				snprintf(detail, sizeof(detail), "page %lu: read %#x, expected %#lx", i, got, 0x1000 + i);
			all = 0;
		}
	}
	check(all, "the guest reads and writes every page, shared and private", all ? NULL : detail);
	check(convert(8 * PAGE, 8 * PAGE, 0) == 0, "pages 8-15 back to shared", NULL);
	all = 1;
	for (unsigned long i = 0; i < NPAGES; i++)
		if (host_read(hva + i * PAGE / 4 + 1, &v) != 0 || v != 0x2000 + i) {
			if (all)
				snprintf(detail, sizeof(detail), "page %lu: read %#x, expected %#lx", i, v, 0x2000 + i);
			all = 0;
		}
	check(all, "the host reads every page the guest wrote", all ? NULL : detail);
}

/* The kernel releases a guest_memfd file on its last reference: a memslot bound to it loses its backing,
 * and a guest access is a memory fault (KVM_RUN -1/EFAULT, exit KVM_EXIT_MEMORY_FAULT). Last check: the
 * vCPU is left mid-access. */
static void released_check(void)
{
	int g = create_gmem(PAGE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
	if (g < 0)
		die("KVM_CREATE_GUEST_MEMFD (released check)");
	if (bind(3, 0x60000, PAGE, 0, g, 0) != 0)
		die("bind (released check)");
	close(g);
	struct kvm_sregs s;
	if (ioctl(vcpu, KVM_GET_SREGS, &s) != 0)
		die("KVM_GET_SREGS");
	s.ds.base = 0x60000;
	s.ds.selector = 0x6000;
	if (ioctl(vcpu, KVM_SET_SREGS, &s) != 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = 0x1000;
	regs.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) != 0)
		die("KVM_SET_REGS");
	int r = ioctl(vcpu, KVM_RUN, 0);
	int err = errno;
	uint64_t *mf = (uint64_t *)((char *)run + 32); /* kvm_run.memory_fault: flags, gpa, size */
	char detail[128];
	snprintf(detail, sizeof(detail), "KVM_RUN %d (%s), exit %u, gpa %#llx", r, r ? strerror(err) : "ok",
		 run->exit_reason, (unsigned long long)mf[1]);
	check(r == -1 && err == EFAULT && run->exit_reason == KVM_EXIT_MEMORY_FAULT && mf[1] == 0x60000,
	      "a memslot whose guest_memfd was closed: the guest's access is a memory fault", detail);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	struct sigaction sa = { .sa_handler = on_sigbus };
	sigaction(SIGBUS, &sa, NULL);

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		printf("skip: /dev/kvm: %s\n0 passed, 0 failed, 1 skipped\n", strerror(errno));
		return 77;
	}
	if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD) <= 0) {
		printf("skip: this kernel has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0)\n0 passed, 0 failed, 1 skipped\n");
		return 77;
	}
	long flags_cap = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_FLAGS);
	long attrs_cap = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES);
	long types = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES);
	int in_place = attrs_cap > 0 && (attrs_cap & KVM_MEMORY_ATTRIBUTE_PRIVATE);
	unsigned long type = in_place && types > 0 && (types & (1UL << KVM_X86_SW_PROTECTED_VM)) ? KVM_X86_SW_PROTECTED_VM : 0;
	printf("caps: GUEST_MEMFD_FLAGS %#lx, GUEST_MEMFD_MEMORY_ATTRIBUTES %#lx, VM_TYPES %#lx -> VM type %lu\n",
	       flags_cap, attrs_cap, types, type);
	uint64_t want = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
	if (flags_cap < 0 || ((uint64_t)flags_cap & want) != want) {
		printf("skip: KVM_CAP_GUEST_MEMFD_FLAGS lacks MMAP|INIT_SHARED\n0 passed, 0 failed, 1 skipped\n");
		return 77;
	}
	vm = ioctl(kvm, KVM_CREATE_VM, type);
	if (vm < 0)
		die("KVM_CREATE_VM");
	gmem = create_gmem(GMEM_SIZE, want);
	check(gmem >= 0, "KVM_CREATE_GUEST_MEMFD on the VM fd", gmem < 0 ? strerror(errno) : NULL);
	if (gmem < 0)
		die("KVM_CREATE_GUEST_MEMFD");
	check(bind(1, GMEM_GPA, GMEM_SIZE, 0, gmem, 0) == 0,
	      "KVM_SET_USER_MEMORY_REGION2 binds it with a NULL userspace_addr", NULL);
	setup_vcpu();
	volatile uint32_t *hva = mmap(NULL, GMEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);
	if ((void *)hva == MAP_FAILED)
		die("mmap guest_memfd");
	errno_checks();
	vm_attributes_check();
	if (in_place) {
		ioctl_errno_checks();
		conversion_checks(hva);
	} else {
		expect_errno("no in-place conversion: the guest_memfd ioctl is ENOTTY", convert(0, PAGE, 0), ENOTTY);
		host_write(hva, 0x1111);
		guest_check("shared: the guest reads what the host wrote", 0, 0x1111, 0x2222);
		uint32_t v = 0;
		check(host_read(hva, &v) == 0 && v == 0x2222, "shared: the host reads what the guest wrote", NULL);
		skip("conversion checks", "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES lacks PRIVATE (no in-place conversion)");
	}
	released_check();
	printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
	return failed ? 1 : 0;
}
