// Intel ISA-L (Debian's libisal), for CRC-32C: VHDX checksums its headers, region tables
// and log entries with it. ISA-L picks the SSE4.2 instruction at run time.
#ifndef RAWMOUNT_CISAL_SHIM_H
#define RAWMOUNT_CISAL_SHIM_H
#include <isa-l/crc.h>

// The standard CRC-32C (initial value and final XOR all ones), as VHDX stores it.
static inline unsigned int rm_crc32c(const void *buffer, int length) {
    return crc32_iscsi((unsigned char *)buffer, length, 0xFFFFFFFFu) ^ 0xFFFFFFFFu;
}
#endif
