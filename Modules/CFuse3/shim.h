// Wrappers Swift needs around libfuse3 3.14: macros and bitfields do not import cleanly.
#ifndef RAWMOUNT_CFUSE3_SHIM_H
#define RAWMOUNT_CFUSE3_SHIM_H

#define FUSE_USE_VERSION 314
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <fcntl.h>
#include <errno.h>
#include <linux/falloc.h>
#include <fuse3/fuse_lowlevel.h>

// Glibc's Swift module hides these.
static const int rm_SEEK_DATA = 3;
static const int rm_SEEK_HOLE = 4;
static const int rm_O_DIRECT = 040000;
static const int rm_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
static const int rm_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
static const int rm_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;

static inline struct fuse_args rm_fuse_args_init(int argc, char **argv) {
    struct fuse_args a = FUSE_ARGS_INIT(argc, argv);
    return a;
}

static inline int rm_session_loop_mt(struct fuse_session *se, unsigned max_threads, int clone_fd) {
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (!cfg) return -ENOMEM;
    fuse_loop_cfg_set_clone_fd(cfg, clone_fd);
    fuse_loop_cfg_set_max_threads(cfg, max_threads);
    fuse_loop_cfg_set_idle_threads(cfg, max_threads);
    int r = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    return r;
}

static inline int rm_fi_flags(const struct fuse_file_info *fi) { return fi ? fi->flags : 0; }
static inline void rm_fi_set_direct_io(struct fuse_file_info *fi, int on) { fi->direct_io = on ? 1 : 0; }
static inline void rm_fi_set_keep_cache(struct fuse_file_info *fi, int on) { fi->keep_cache = on ? 1 : 0; }

#endif
