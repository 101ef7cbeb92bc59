// The system zlib, for VMDK streamOptimized grains and qcow2 deflate clusters.
#ifndef RAWMOUNT_CZLIB_SHIM_H
#define RAWMOUNT_CZLIB_SHIM_H
#include <string.h>
#include <zlib.h>

// Inflates a deflate stream until `dst` is full or the stream ends; bytes after that are
// ignored. window_bits: -15 for raw deflate (qcow2 clusters), 15 for a zlib stream (VMDK
// grains). Returns Z_OK with *produced set, or a zlib error code. (inflateInit2 is a macro,
// which Swift cannot call.)
static inline int rm_inflate(const void *src, size_t src_len, void *dst, size_t dst_len, size_t *produced, int window_bits) {
    z_stream s;
    memset(&s, 0, sizeof s);
    int rc = inflateInit2(&s, window_bits);
    if (rc != Z_OK) return rc;
    s.next_in = (Bytef *)src; s.avail_in = (uInt)src_len;
    s.next_out = (Bytef *)dst; s.avail_out = (uInt)dst_len;
    rc = inflate(&s, Z_FINISH);
    *produced = dst_len - s.avail_out;
    inflateEnd(&s);
    // A full output buffer is success even if the stream goes on (Z_BUF_ERROR/Z_OK).
    if (rc == Z_STREAM_END || s.avail_out == 0) return Z_OK;
    return rc == Z_OK ? Z_DATA_ERROR : rc;
}
// Inflates a zlib stream whole: Z_STREAM_END (its Adler-32 checked) when it ends within
// `dst_len` bytes, with *produced set; anything else (damaged, longer, cut short) is an error.
static inline int rm_inflate_to_end(const void *src, size_t src_len, void *dst, size_t dst_len, size_t *produced) {
    z_stream s;
    memset(&s, 0, sizeof s);
    int rc = inflateInit(&s);
    if (rc != Z_OK) return rc;
    s.next_in = (Bytef *)src; s.avail_in = (uInt)src_len;
    s.next_out = (Bytef *)dst; s.avail_out = (uInt)dst_len;
    rc = inflate(&s, Z_FINISH);
    *produced = dst_len - s.avail_out;
    inflateEnd(&s);
    return rc == Z_STREAM_END ? Z_STREAM_END : (rc == Z_OK || rc == Z_BUF_ERROR ? Z_DATA_ERROR : rc);
}
#endif
