/*
 * run_vcpu.c - what a vCPU's accesses and a VMM's conversions cost under `ufsgmem run` (bench/run_vcpu.py).
 *
 *   run_vcpu uapi REPS NPAGES            under `ufsgmem run`: a guest_memfd from KVM_CREATE_GUEST_MEMFD,
 *                                        bound gmem-only; shared and private pages
 *   run_vcpu plain MEM REPS NPAGES       a plain mount: MEM (MNT/NAME/mem, MMAP|INIT_SHARED, at least
 *                                        REPS * 2 * NPAGES pages) mapped and given to KVM as an ordinary
 *                                        memslot, as examples/vmm does; shared pages only
 *
 * Per repetition it prints one line of microseconds:
 *   first_shared repeated_shared first_private repeated_private convert_round_trip
 * each an average per guest access over NPAGES fresh pages (first) and the same pages again (repeated),
 * and the 4 KiB shared->private->shared round trip of the ioctl on a page the guest has touched; "nan"
 * where the mode has no such thing. A guest access is one KVM_RUN to an I/O exit and one to HLT, so
 * "repeated" is mostly those exits; "first" minus "repeated" is the fault.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1U << 2)
#endif
struct create_gmem { __u64 size, flags, reserved[6]; };
struct region2 {
	__u32 slot, flags;
	__u64 guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset;
	__u32 guest_memfd, pad1;
	__u64 pad2[14];
};
struct attributes2 { __u64 offset, size, attributes, flags, error_offset, reserved[11]; };
#define CREATE_GUEST_MEMFD 0xC040AED4UL
#define SET_USER_MEMORY_REGION2 0x40A0AE49UL
#define SET_MEMORY_ATTRIBUTES2 0xC080AED2UL
#define PRIVATE 8ULL
#define PAGE 4096UL
#define GMEM_GPA 0x20000UL /* real mode: ds = the page's 64 KiB window, below 1 MiB */

static int vm, vcpu, gmem;
static struct kvm_run *run;

static void die(const char *what)
{
	fprintf(stderr, "run_vcpu: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

/* mov eax,[bx]; out 0x10,eax; hlt, with ds set per access to the page's 64 KiB window */
static const uint8_t code[] = { 0x66, 0x8b, 0x07, 0x66, 0xe7, 0x10, 0xf4 };

static void access_page(unsigned long gpa)
{
	struct kvm_sregs s;
	struct kvm_regs r;
	if (ioctl(vcpu, KVM_GET_SREGS, &s))
		die("KVM_GET_SREGS");
	s.ds.base = gpa & ~0xffffUL;
	s.ds.selector = (gpa & ~0xffffUL) >> 4;
	if (ioctl(vcpu, KVM_SET_SREGS, &s))
		die("KVM_SET_SREGS");
	memset(&r, 0, sizeof(r));
	r.rip = 0x1000;
	r.rbx = gpa & 0xffff;
	r.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &r))
		die("KVM_SET_REGS");
	if (ioctl(vcpu, KVM_RUN, 0) || run->exit_reason != KVM_EXIT_IO)
		die("KVM_RUN (expected an I/O exit)");
	if (ioctl(vcpu, KVM_RUN, 0) || run->exit_reason != KVM_EXIT_HLT)
		die("KVM_RUN (expected HLT)");
}

/* average µs per access over n pages from first */
static double touch(unsigned long first, unsigned long n)
{
	double t0 = now_us();
	for (unsigned long i = 0; i < n; i++)
		access_page(GMEM_GPA + (first + i) * PAGE);
	return (now_us() - t0) / n;
}

static int convert(unsigned long off, unsigned long size, __u64 attributes)
{
	struct attributes2 a = { .offset = off, .size = size, .attributes = attributes };
	return ioctl(gmem, SET_MEMORY_ATTRIBUTES2, &a);
}

int main(int argc, char **argv)
{
	int plain = argc == 5 && !strcmp(argv[1], "plain");
	if (!(plain || (argc == 4 && !strcmp(argv[1], "uapi")))) {
		fprintf(stderr, "usage: run_vcpu uapi REPS NPAGES | run_vcpu plain MEM REPS NPAGES\n");
		return 2;
	}
	int reps = atoi(argv[plain ? 3 : 2]);
	unsigned long npages = strtoul(argv[plain ? 4 : 3], NULL, 0);
	unsigned long size = (unsigned long)reps * 2 * npages * PAGE + PAGE;
	if (size > 0x80000UL) { /* real mode reaches 1 MiB + 64 KiB: keep the slot below that */
		fprintf(stderr, "run_vcpu: REPS * 2 * NPAGES must stay under 127\n");
		return 2;
	}
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	vm = ioctl(kvm, KVM_CREATE_VM, plain ? 0 : 1 /* KVM_X86_SW_PROTECTED_VM */);
	if (vm < 0)
		die("KVM_CREATE_VM");
	char *low = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	memcpy(low + 0x1000, code, sizeof(code));
	struct kvm_userspace_memory_region lr = { .slot = 0, .memory_size = 0x10000, .userspace_addr = (uintptr_t)low };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &lr))
		die("KVM_SET_USER_MEMORY_REGION (code)");
	struct region2 r = { .slot = 1, .guest_phys_addr = GMEM_GPA, .memory_size = size };
	if (plain) {
		gmem = open(argv[2], O_RDWR);
		if (gmem < 0)
			die(argv[2]);
		void *hva = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0);
		if (hva == MAP_FAILED)
			die("mmap mem");
		r.userspace_addr = (uintptr_t)hva;
	} else {
		struct create_gmem c = { .size = size, .flags = 3 /* MMAP | INIT_SHARED */ };
		gmem = ioctl(vm, CREATE_GUEST_MEMFD, &c);
		if (gmem < 0)
			die("KVM_CREATE_GUEST_MEMFD");
		r.flags = KVM_MEM_GUEST_MEMFD;
		r.guest_memfd = gmem;
	}
	if (ioctl(vm, SET_USER_MEMORY_REGION2, &r))
		die("KVM_SET_USER_MEMORY_REGION2");
	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	run = mmap(NULL, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	struct kvm_sregs s;
	if (ioctl(vcpu, KVM_GET_SREGS, &s))
		die("KVM_GET_SREGS");
	s.cs.base = 0;
	s.cs.selector = 0;
	s.ds.limit = 0xffff;
	if (ioctl(vcpu, KVM_SET_SREGS, &s))
		die("KVM_SET_SREGS");
	unsigned long probe = size / PAGE - 1; /* the conversion page */
	for (int rep = 0; rep < reps; rep++) {
		unsigned long shared = rep * 2 * npages, private = shared + npages;
		double fs = touch(shared, npages), rs = touch(shared, npages);
		double fp = 0, rp = 0;
		if (!plain) {
			if (convert(private * PAGE, npages * PAGE, PRIVATE))
				die("KVM_SET_MEMORY_ATTRIBUTES2 (private)");
			fp = touch(private, npages);
			rp = touch(private, npages);
		}
		touch(probe, 1);
		double t0 = now_us();
		if (convert(probe * PAGE, PAGE, PRIVATE) || convert(probe * PAGE, PAGE, 0))
			die("KVM_SET_MEMORY_ATTRIBUTES2 (round trip)");
		double rt = now_us() - t0;
		if (plain)
			printf("%.2f %.2f nan nan %.2f\n", fs, rs, rt);
		else
			printf("%.2f %.2f %.2f %.2f %.2f\n", fs, rs, fp, rp, rt);
		fflush(stdout);
	}
	return 0;
}
