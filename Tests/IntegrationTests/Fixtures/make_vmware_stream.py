#!/usr/bin/env python3
"""Builds a VMware-layout streamOptimized VMDK (grain directory at the end, GT/GD/footer/EOS
markers) from a raw file, the way VMware writes them; qemu-img cannot make this layout.
usage: make_vmware_stream.py SOURCE.raw OUT.vmdk"""
import struct, sys, zlib

SECTOR, GRAIN_SECTORS, GTES = 512, 128, 512
GRAIN = GRAIN_SECTORS * SECTOR


def pad(b):
    return b + b"\0" * (-len(b) % SECTOR)


def header(capacity, gd_offset):
    h = struct.pack("<4sIIQQQQIQQQ", b"KDMV", 3, 0x30001, capacity, GRAIN_SECTORS, 1, 1, GTES, 0, gd_offset, 128)
    h += b"\0" + b"\n \r\n" + struct.pack("<H", 1)
    return pad(h)


def marker(val, mtype):
    return pad(struct.pack("<QII", val, 0, mtype))


def main(src, out):
    data = open(src, "rb").read()
    capacity = (len(data) + SECTOR - 1) // SECTOR
    grains = (capacity + GRAIN_SECTORS - 1) // GRAIN_SECTORS
    gts = (grains + GTES - 1) // GTES
    desc = ('# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\n'
            'createType="streamOptimized"\nRW %d SPARSE "%s"\n' % (capacity, out.split("/")[-1])).encode()
    f = bytearray(header(capacity, 0xFFFFFFFFFFFFFFFF) + pad(desc))
    f += b"\0" * (128 * SECTOR - len(f))
    table = [0] * (gts * GTES)
    for g in range(grains):
        chunk = data[g * GRAIN:(g + 1) * GRAIN].ljust(GRAIN, b"\0")
        if chunk.count(0) == GRAIN:
            continue
        comp = zlib.compress(chunk)
        table[g] = len(f) // SECTOR
        f += pad(struct.pack("<QI", g * GRAIN_SECTORS, len(comp)) + comp)
    gd = []
    for t in range(gts):
        f += marker(GTES * 4 // SECTOR, 1)
        gd.append(len(f) // SECTOR)
        f += pad(struct.pack("<%dI" % GTES, *table[t * GTES:(t + 1) * GTES]))
    f += marker((gts * 4 + SECTOR - 1) // SECTOR, 2)
    gd_sector = len(f) // SECTOR
    f += pad(struct.pack("<%dI" % gts, *gd))
    f += marker(1, 3) + header(capacity, gd_sector) + b"\0" * SECTOR
    open(out, "wb").write(f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
