// The system libzstd, for qcow2 clusters compressed with compression_type=zstd.
#ifndef RAWMOUNT_CZSTD_SHIM_H
#define RAWMOUNT_CZSTD_SHIM_H
#include <zstd.h>

// The fast path: the first frame in `src` decompressed straight into `dst`, succeeding (0)
// only when it fills exactly `dst_len` bytes. The caller keeps `ctx` for reuse (a context
// is ~100 KiB; making one per cluster costs more than the decompression).
static inline int rm_zstd_exact(ZSTD_DCtx *ctx, const void *src, size_t src_len, void *dst, size_t dst_len) {
    size_t frame = ZSTD_findFrameCompressedSize(src, src_len);
    if (ZSTD_isError(frame)) return -1;
    size_t r = ZSTD_decompressDCtx(ctx, dst, dst_len, src, frame);
    return !ZSTD_isError(r) && r == dst_len ? 0 : -1;
}

// Decompresses zstd frames from `src` until `dst` is full. The compressed size qcow2
// records is rounded up to sectors, so bytes after the cluster's frames are ignored.
// Returns 0 with *produced set, or -1 on a zstd error.
static inline int rm_zstd_decompress_cluster(ZSTD_DCtx *ctx, const void *src, size_t src_len, void *dst, size_t dst_len, size_t *produced) {
    ZSTD_DCtx_reset(ctx, ZSTD_reset_session_only);
    ZSTD_inBuffer in = { src, src_len, 0 };
    ZSTD_outBuffer out = { dst, dst_len, 0 };
    int rc = 0;
    while (out.pos < out.size) {
        size_t in_before = in.pos, out_before = out.pos;
        size_t r = ZSTD_decompressStream(ctx, &out, &in);
        if (ZSTD_isError(r)) { rc = -1; break; }
        if (in.pos == in_before && out.pos == out_before) break;  // input used up
    }
    *produced = out.pos;
    return rc;
}
#endif
