/*
 * convert_demo.c - guest_memfd conversion on a ufsgmem mount, from C, with nothing but
 * open/mmap/write/read: create a file, map it, convert a page to private and back, and see
 * the kernel enforce it.
 *
 *   gcc -O2 -Wall -o convert_demo examples/convert_demo.c
 *   ./convert_demo MOUNTPOINT [NAME]
 *
 * Steps (each checked; the program exits non-zero at the first surprise):
 *   1. create MOUNTPOINT/NAME (16 pages, MMAP|INIT_SHARED) with one binary write to MOUNTPOINT/ctl;
 *   2. map NAME/mem MAP_SHARED and write a pattern to every page;
 *   3. convert page 1 to private with one write() of struct kvm_memory_attributes2: reading it now
 *      raises SIGBUS (caught with sigsetjmp), while pages 0 and 2 stay readable;
 *   4. convert it back to shared: the pattern is still there (content is preserved);
 *   5. pin page 3 ("pin offset=... size=..." in text), convert pages 0..7 to private: write() fails with
 *      EAGAIN and a read() of the result gives error_offset = page 3; unpin, and now it succeeds;
 *   6. destroy the file.
 *
 * Caveat: ufsgmem's create returns no fd (it is a write, not an ioctl); the file is opened by path.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ufsgmem.h"

#define PAGE 4096UL
#define NPAGES 16UL

static sigjmp_buf probe_env;
static volatile sig_atomic_t sigbus_seen;

static void on_sigbus(int sig)
{
	(void)sig;
	sigbus_seen = 1;
	siglongjmp(probe_env, 1);
}

/* Read one byte; returns -1 if the access raised SIGBUS. */
static int probe(volatile const unsigned char *p)
{
	if (sigsetjmp(probe_env, 1))
		return -1;
	return *p;
}

#define CHECK(cond, ...)                                                     \
	do {                                                                 \
		if (!(cond)) {                                               \
			fprintf(stderr, "convert_demo: FAILED: " __VA_ARGS__); \
			fprintf(stderr, " (errno %d: %s)\n", errno, strerror(errno)); \
			exit(1);                                             \
		}                                                            \
	} while (0)

static int open_in(const char *dir, const char *name, const char *file)
{
	char path[4096];

	snprintf(path, sizeof(path), "%s/%s%s%s", dir, name, *name ? "/" : "", file);
	return open(path, O_RDWR | O_CLOEXEC);
}

/* One request = one write(); its result is the write's result, errno included. */
static int convert(int ctl, unsigned long offset, unsigned long size, __u64 attributes,
		   struct kvm_memory_attributes2 *out)
{
	struct ufsgmem_attributes2_request req;
	int saved;

	memset(&req, 0, sizeof(req));
	memcpy(req.magic, UFSGMEM_MAGIC, UFSGMEM_MAGIC_LEN);
	req.cmd = KVM_SET_MEMORY_ATTRIBUTES2;
	req.attr.offset = offset;
	req.attr.size = size;
	req.attr.attributes = attributes;
	if (write(ctl, &req, sizeof(req)) == (ssize_t)sizeof(req))
		return 0;
	saved = errno;
	/* A read() after the write returns the struct with its output fields (error_offset) set. */
	if (out && read(ctl, &req, sizeof(req)) == (ssize_t)sizeof(req))
		*out = req.attr;
	errno = saved;
	return -1;
}

static int text_request(int ctl, const char *text)
{
	return write(ctl, text, strlen(text)) == (ssize_t)strlen(text) ? 0 : -1;
}

int main(int argc, char **argv)
{
	struct ufsgmem_create_request create;
	struct kvm_memory_attributes2 result;
	struct sigaction sa;
	char name[UFSGMEM_NAME_LEN], request[256];
	unsigned char *mem;
	unsigned long i;
	int mctl, ctl, memfd;

	if (argc < 2) {
		fprintf(stderr, "usage: %s MOUNTPOINT [NAME]\n", argv[0]);
		return 2;
	}
	snprintf(name, sizeof(name), "%s", argc > 2 ? argv[2] : "convert_demo");

	/* 1. create */
	mctl = open_in(argv[1], "", "ctl");
	CHECK(mctl >= 0, "open %s/ctl", argv[1]);
	memset(&create, 0, sizeof(create));
	memcpy(create.magic, UFSGMEM_MAGIC, UFSGMEM_MAGIC_LEN);
	create.cmd = KVM_CREATE_GUEST_MEMFD;
	create.gmem.size = NPAGES * PAGE;
	create.gmem.flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
	create.gmem.reserved[0] = UFSGMEM_PAGE_ORDER_DEFAULT;
	memcpy(create.name, name, strlen(name));
	memcpy(create.backend, "anon", 4);
	CHECK(write(mctl, &create, sizeof(create)) == (ssize_t)sizeof(create), "create %s", name);
	printf("created %s/%s: %lu KiB, MMAP|INIT_SHARED\n", argv[1], name, NPAGES * PAGE >> 10);

	/* 2. map and fill */
	memfd = open_in(argv[1], name, "mem");
	ctl = open_in(argv[1], name, "ctl");
	CHECK(memfd >= 0 && ctl >= 0, "open %s/mem and ctl", name);
	mem = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	CHECK(mem != MAP_FAILED, "mmap MAP_SHARED");
	for (i = 0; i < NPAGES; i++)
		memset(mem + i * PAGE, (int)(0xa0 + i), PAGE);

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigbus;
	sigemptyset(&sa.sa_mask);
	CHECK(sigaction(SIGBUS, &sa, NULL) == 0, "sigaction");

	/* 3. page 1 to private: the host loses it, its neighbours do not */
	CHECK(convert(ctl, PAGE, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE, NULL) == 0, "convert page 1 to private");
	CHECK(probe(mem + PAGE) == -1, "reading private page 1 should raise SIGBUS");
	CHECK(probe(mem) == 0xa0 && probe(mem + 2 * PAGE) == 0xa2, "shared neighbours must stay readable");
	printf("page 1 private: host read raised SIGBUS, pages 0 and 2 still readable\n");

	/* 4. back to shared: content preserved */
	CHECK(convert(ctl, PAGE, PAGE, 0, NULL) == 0, "convert page 1 back to shared");
	for (i = 0; i < PAGE; i++)
		CHECK(mem[PAGE + i] == 0xa1, "page 1 byte %lu lost its content", i);
	printf("page 1 shared again: all %lu bytes preserved\n", PAGE);

	/* 5. a pin makes shared->private fail with EAGAIN at the pinned page */
	snprintf(request, sizeof(request), "pin offset=%#lx size=%#lx\n", 3 * PAGE, PAGE);
	CHECK(text_request(ctl, request) == 0, "pin page 3");
	memset(&result, 0, sizeof(result));
	errno = 0;
	CHECK(convert(ctl, 0, 8 * PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE, &result) == -1 && errno == EAGAIN,
	      "converting over a pinned page should fail with EAGAIN");
	CHECK(result.error_offset == 3 * PAGE, "error_offset is %#llx, expected %#lx",
	      (unsigned long long)result.error_offset, 3 * PAGE);
	printf("pinned page 3: conversion refused with EAGAIN, error_offset %#llx\n",
	       (unsigned long long)result.error_offset);
	snprintf(request, sizeof(request), "unpin offset=%#lx size=%#lx\n", 3 * PAGE, PAGE);
	CHECK(text_request(ctl, request) == 0, "unpin page 3");
	CHECK(convert(ctl, 0, 8 * PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE, NULL) == 0, "convert after unpin");
	CHECK(probe(mem + 3 * PAGE) == -1 && probe(mem + 8 * PAGE) == 0xa8, "pages 0..7 private, 8 shared");
	CHECK(convert(ctl, 0, 8 * PAGE, 0, NULL) == 0 && probe(mem + 3 * PAGE) == 0xa3,
	      "pages 0..7 shared again with content");
	printf("unpinned: conversion of pages 0..7 succeeded, and back; SIGBUS seen: %s\n",
	       sigbus_seen ? "yes" : "no");

	/* 6. clean up */
	munmap(mem, NPAGES * PAGE);
	close(memfd);
	close(ctl);
	snprintf(request, sizeof(request), "destroy %s\n", name);
	CHECK(text_request(mctl, request) == 0, "destroy %s", name);
	close(mctl);
	printf("convert_demo: all checks passed\n");
	return 0;
}
