// libdeflate: whole-buffer inflate, several times faster than zlib's streaming inflate.
// Used as the fast path for compressed clusters and grains whose size is known; anything it
// does not accept exactly falls back to zlib, which stays the reference behaviour.
#ifndef RAWMOUNT_CDEFLATE_SHIM_H
#define RAWMOUNT_CDEFLATE_SHIM_H
#include <stddef.h>
#include <libdeflate.h>

// Inflates a raw deflate (zlib_wrapper 0) or zlib (1) stream from `src` into exactly
// `dst_len` bytes; bytes after the stream are ignored. Returns 0 only when the stream ends
// with the buffer exactly full (and, for zlib, its Adler-32 matches).
static inline int rm_libdeflate_exact(const void *src, size_t src_len, void *dst, size_t dst_len, int zlib_wrapper) {
    struct libdeflate_decompressor *d = libdeflate_alloc_decompressor();
    if (!d) return -1;
    size_t used = 0;
    enum libdeflate_result r = zlib_wrapper
        ? libdeflate_zlib_decompress_ex(d, src, src_len, dst, dst_len, &used, NULL)
        : libdeflate_deflate_decompress_ex(d, src, src_len, dst, dst_len, &used, NULL);
    libdeflate_free_decompressor(d);
    return r == LIBDEFLATE_SUCCESS ? 0 : -1;
}
#endif
