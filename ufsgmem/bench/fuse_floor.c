/*
 * fuse_floor: the least a FUSE server must do for P3's round trip, as a yardstick for ufsgmem's.
 *
 * One file, MNT/mem, of the size given, backed by a memfd and served the way ufsgmem serves `mem`
 * (libfuse 3.14's low-level API and multi-threaded loop, direct I/O with FUSE_DIRECT_IO_ALLOW_MMAP
 * patched into the INIT reply, keep_cache, no writeback cache). KVM_SET_MEMORY_ATTRIBUTES2 to private
 * does what ufsgmem's revocation does - write the range's dirty pages back with sync_file_range on a
 * descriptor of its own (the WRITE it causes is served by another loop thread), then
 * fuse_lowlevel_notify_inval_inode - and replies; to shared only replies. Nothing else: no attribute,
 * no checks, no pins, no bookkeeping. So `ufsgmem bench` measured against it (P3.floor) separates what
 * FUSE and this machine cost from what ufsgmem's server adds. It is not a guest_memfd: never use it
 * for anything but that measurement.
 *
 * usage: fuse_floor MOUNTPOINT SIZE     prints "ready" on stdout once mounted; SIGTERM, or the death of
 *                                      the process that started it, unmounts.
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <fuse_lowlevel.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define MEM_INO 2
#define KVM_SET_MEMORY_ATTRIBUTES2 0xC080AED2u
#define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ull << 3)

struct kvm_memory_attributes2 {         /* the 128-byte argument (uapi, in-place conversion series) */
	uint64_t offset, size, attributes, flags, error_offset;
	uint64_t reserved[11];
};

static struct fuse_session *session;
static const char *mountpoint;
static uint64_t file_size;
static int memfd = -1;
static int writeback_fd = -1;          /* our own descriptor of MNT/mem, for sync_file_range */
static pthread_mutex_t writeback_lock = PTHREAD_MUTEX_INITIALIZER;
static volatile int init_replied;

/* ---- INIT: no writeback cache; FUSE_DIRECT_IO_ALLOW_MMAP (libfuse 3.14 does not know it) ---- */
static void floor_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	conn->want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_AUTO_INVAL_DATA);
}

static ssize_t floor_writev(int fd, struct iovec *iov, int count, void *userdata)
{
	(void)userdata;
	if (!init_replied && count == 2 && iov[1].iov_len == 64) {   /* struct fuse_init_out */
		char *out = iov[1].iov_base;
		uint32_t flags, flags2;
		memcpy(&flags, out + 12, 4);
		memcpy(&flags2, out + 32, 4);
		flags |= 1u << 30;                  /* FUSE_INIT_EXT */
		flags2 |= 1u << (36 - 32);          /* FUSE_DIRECT_IO_ALLOW_MMAP */
		memcpy(out + 12, &flags, 4);
		memcpy(out + 32, &flags2, 4);
	}
	init_replied = 1;
	return writev(fd, iov, count);
}

static ssize_t floor_read_dev(int fd, void *buf, size_t len, void *userdata)
{
	(void)userdata;
	return read(fd, buf, len);
}

/* ---- the namespace: / and /mem ---- */
static void fill_attr(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_nlink = ino == FUSE_ROOT_ID ? 2 : 1;
	st->st_mode = ino == FUSE_ROOT_ID ? S_IFDIR | 0755 : S_IFREG | 0600;
	st->st_size = ino == FUSE_ROOT_ID ? 0 : (off_t)file_size;
}

static void floor_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;

	if (parent != FUSE_ROOT_ID || strcmp(name, "mem") != 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = MEM_INO;
	e.generation = 1;
	e.attr_timeout = e.entry_timeout = 3600;
	fill_attr(MEM_INO, &e.attr);
	fuse_reply_entry(req, &e);
}

static void floor_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	(void)fi;
	if (ino != FUSE_ROOT_ID && ino != MEM_INO) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fill_attr(ino, &st);
	fuse_reply_attr(req, &st, 3600);
}

static void floor_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != MEM_INO) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	fi->direct_io = 1;
	fi->keep_cache = 1;
	fi->noflush = 1;        /* as ufsgmem: a close never waits on us (nor our own, when we exit) */
	fuse_reply_open(req, fi);
}

/* ---- data: a fill reads the memfd without allocating; a write-back allocates, as ufsgmem's anon ---- */
static void floor_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	char *buf;
	ssize_t n;

	(void)ino;
	(void)fi;
	buf = malloc(size ? size : 1);
	if (buf == NULL) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	n = pread(memfd, buf, size, off);
	if (n < 0)
		fuse_reply_err(req, errno);
	else
		fuse_reply_buf(req, buf, (size_t)n);
	free(buf);
}

static void floor_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
			struct fuse_file_info *fi)
{
	ssize_t n;

	(void)ino;
	(void)fi;
	if ((uint64_t)off >= file_size || size > file_size - (uint64_t)off) {
		fuse_reply_err(req, ENOSPC);
		return;
	}
	n = pwrite(memfd, buf, size, off);
	if (n < 0)
		fuse_reply_err(req, errno);
	else
		fuse_reply_write(req, (size_t)n);
}

/* ---- the conversion: revoke on the way to private, nothing else ---- */
static int writeback_descriptor(void)
{
	char path[4096];

	pthread_mutex_lock(&writeback_lock);
	if (writeback_fd < 0) {      /* its LOOKUP and OPEN are served by other loop threads */
		snprintf(path, sizeof(path), "%s/mem", mountpoint);
		writeback_fd = open(path, O_RDONLY | O_CLOEXEC);
	}
	pthread_mutex_unlock(&writeback_lock);
	return writeback_fd;
}

static int revoke_range(uint64_t offset, uint64_t size)
{
	int fd = writeback_descriptor();
	int err;

	if (fd < 0)
		return errno;
	if (sync_file_range(fd, (off_t)offset, (off_t)size, SYNC_FILE_RANGE_WAIT_BEFORE |
			    SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) != 0)
		return errno;
	err = fuse_lowlevel_notify_inval_inode(session, MEM_INO, (off_t)offset, (off_t)size);
	return err == -ENOENT ? 0 : -err;   /* ENOENT: no inode cached, nothing mapped */
}

static void floor_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
			struct fuse_file_info *fi, unsigned flags, const void *in_buf, size_t in_bufsz,
			size_t out_bufsz)
{
	struct kvm_memory_attributes2 attrs;
	int err;

	(void)ino;
	(void)arg;
	(void)fi;
	(void)flags;
	if (cmd != KVM_SET_MEMORY_ATTRIBUTES2) {
		fuse_reply_err(req, ENOTTY);
		return;
	}
	if (in_bufsz != sizeof(attrs) || out_bufsz != sizeof(attrs)) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	memcpy(&attrs, in_buf, sizeof(attrs));
	if (attrs.size == 0 || attrs.offset >= file_size || attrs.size > file_size - attrs.offset) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (attrs.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE) {
		err = revoke_range(attrs.offset, attrs.size);
		if (err) {
			fuse_reply_err(req, err);
			return;
		}
	}
	fuse_reply_ioctl(req, 0, &attrs, sizeof(attrs));
}

static const struct fuse_lowlevel_ops floor_ops = {
	.init = floor_init,
	.lookup = floor_lookup,
	.getattr = floor_getattr,
	.open = floor_open,
	.read = floor_read,
	.write = floor_write,
	.ioctl = floor_ioctl,
};

int main(int argc, char **argv)
{
	char *fuse_argv[] = { argv[0], NULL };
	struct fuse_args args = FUSE_ARGS_INIT(1, fuse_argv);
	struct fuse_custom_io io = { .writev = floor_writev, .read = floor_read_dev };
	struct fuse_loop_config *config;
	int res;

	if (argc != 3 || (file_size = strtoull(argv[2], NULL, 0)) == 0 || file_size % 4096) {
		fprintf(stderr, "usage: %s MOUNTPOINT SIZE (bytes, a multiple of 4096)\n", argv[0]);
		return 2;
	}
	mountpoint = argv[1];
	/* The bench that started us may be killed outright: then unmount and go, as on SIGTERM. */
	if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() == 1)
		return 1;
	memfd = memfd_create("fuse_floor", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, (off_t)file_size) != 0) {
		perror("fuse_floor: memfd");
		return 1;
	}
	session = fuse_session_new(&args, &floor_ops, sizeof(floor_ops), NULL);
	if (session == NULL || fuse_set_signal_handlers(session) != 0)
		return 1;
	if (fuse_session_mount(session, mountpoint) != 0) {
		fprintf(stderr, "fuse_floor: cannot mount %s\n", mountpoint);
		return 1;
	}
	if (fuse_session_custom_io(session, &io, fuse_session_fd(session)) != 0) {
		fuse_session_unmount(session);
		return 1;
	}
	printf("ready\n");
	fflush(stdout);

	config = fuse_loop_cfg_create();
	fuse_loop_cfg_set_clone_fd(config, 0);
	fuse_loop_cfg_set_max_threads(config, 32);
	res = fuse_session_loop_mt(session, config);
	fuse_loop_cfg_destroy(config);

	fuse_session_unmount(session);
	fuse_remove_signal_handlers(session);
	fuse_session_destroy(session);       /* the connection is gone: closing our descriptor cannot block */
	if (writeback_fd >= 0)
		close(writeback_fd);
	return res == 0 || res == SIGTERM || res == SIGINT ? 0 : 1;
}
