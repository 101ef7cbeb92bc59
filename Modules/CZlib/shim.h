// The system zlib, for VMDK streamOptimized grains (and qcow2 deflate clusters later).
#ifndef RAWMOUNT_CZLIB_SHIM_H
#define RAWMOUNT_CZLIB_SHIM_H
#include <zlib.h>
#endif
