/*
 * ufsgmem.h - the binary form of the ufsgmem control protocol (docs/design.md section 2.3).
 *
 * A ufsgmem mount has no ioctl(), so each request the kernel would take as an ioctl is instead one
 * write() to a control file:
 *
 *     "UGM1"  u32 command (little endian)  the kernel's ioctl struct, byte for byte  [tail]
 *
 * The command number is the kernel's ioctl number, and the struct is the kernel's struct with the
 * kernel's field names, so code written for the real guest_memfd needs only its ioctl() call replaced:
 *
 *     KVM_SET_MEMORY_ATTRIBUTES2 (0xC080AED2) to MOUNT/NAME/ctl: struct kvm_memory_attributes2 (128 bytes)
 *     KVM_CREATE_GUEST_MEMFD     (0xC040AED4) to MOUNT/ctl:      struct kvm_create_guest_memfd (64 bytes)
 *                                 followed by a 64-byte file name field (at most 63 bytes, NUL-padded)
 *                                 and a 32-byte backend name
 *                                 ("" = the default backend)
 *
 * The request's outcome is the write()'s result: the full length on success, -1 with exactly the errno
 * the kernel's ioctl would give on failure (EINVAL, EAGAIN, ENOMEM, ...). A following read() on the same
 * open file returns the same layout with the output fields set; for KVM_SET_MEMORY_ATTRIBUTES2 that is
 * error_offset (page aligned, filled in on failure, e.g. the first pinned page for EAGAIN).
 * An unknown command gives ENOTTY; a wrong magic or length gives EINVAL.
 *
 * Unlike the kernel, KVM_CREATE_GUEST_MEMFD returns no fd: open MOUNT/NAME/mem (and MOUNT/NAME/ctl)
 * by path afterwards. reserved[0] carries the huge page order, as in the HugeTLB guest_memfd work:
 * 0 = the backend's default, 9 = 2 MiB, 18 = 1 GiB (x86 with 4 KiB base pages).
 *
 * Only uses <linux/types.h>; may be included before or after <linux/kvm.h>.
 */
#ifndef UFSGMEM_H
#define UFSGMEM_H

#include <linux/types.h>

#define UFSGMEM_MAGIC "UGM1"
#define UFSGMEM_MAGIC_LEN 4
#define UFSGMEM_NAME_LEN 64
#define UFSGMEM_BACKEND_LEN 32

/* reserved[0] of struct kvm_create_guest_memfd: log2(huge page size / 4 KiB) */
#define UFSGMEM_PAGE_ORDER_DEFAULT 0
#define UFSGMEM_PAGE_ORDER_2M 9
#define UFSGMEM_PAGE_ORDER_1G 18

/* include/uapi/linux/kvm.h (mainline 6.18) */
#ifndef GUEST_MEMFD_FLAG_MMAP
#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#endif
#ifndef GUEST_MEMFD_FLAG_INIT_SHARED
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#endif
#ifndef KVM_MEMORY_ATTRIBUTE_PRIVATE
#define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ULL << 3)
#endif

/* _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd): a VM ioctl in the kernel */
#ifndef KVM_CREATE_GUEST_MEMFD
#define KVM_CREATE_GUEST_MEMFD 0xC040AED4u
struct kvm_create_guest_memfd {
	__u64 size;
	__u64 flags;
	__u64 reserved[6];
};
#endif

/* _IOWR(KVMIO, 0xd2, struct kvm_memory_attributes2): a guest_memfd ioctl (in-place conversion, v8) */
#ifndef KVM_SET_MEMORY_ATTRIBUTES2
#define KVM_SET_MEMORY_ATTRIBUTES2 0xC080AED2u
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
#endif

/* One write() to MOUNT/ctl. */
struct ufsgmem_create_request {
	char magic[UFSGMEM_MAGIC_LEN];		/* "UGM1", no NUL */
	__u32 cmd;				/* KVM_CREATE_GUEST_MEMFD */
	struct kvm_create_guest_memfd gmem;
	char name[UFSGMEM_NAME_LEN];		/* at most 63 bytes, NUL-padded */
	char backend[UFSGMEM_BACKEND_LEN];	/* NUL-padded; empty = default */
};

/* One write() to MOUNT/NAME/ctl. */
struct ufsgmem_attributes2_request {
	char magic[UFSGMEM_MAGIC_LEN];		/* "UGM1", no NUL */
	__u32 cmd;				/* KVM_SET_MEMORY_ATTRIBUTES2 */
	struct kvm_memory_attributes2 attr;
};

#ifdef __cplusplus
#define UFSGMEM_STATIC_ASSERT static_assert
#else
#define UFSGMEM_STATIC_ASSERT _Static_assert
#endif
UFSGMEM_STATIC_ASSERT(sizeof(struct kvm_create_guest_memfd) == 64, "kvm_create_guest_memfd is 64 bytes");
UFSGMEM_STATIC_ASSERT(sizeof(struct kvm_memory_attributes2) == 128, "kvm_memory_attributes2 is 128 bytes");
UFSGMEM_STATIC_ASSERT(sizeof(struct ufsgmem_create_request) == 8 + 64 + 64 + 32, "create request layout");
UFSGMEM_STATIC_ASSERT(sizeof(struct ufsgmem_attributes2_request) == 8 + 128, "attributes2 request layout");

#endif /* UFSGMEM_H */
