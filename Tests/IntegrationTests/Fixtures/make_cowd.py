#!/usr/bin/env python3
"""Builds a VMDK3 "COWD" sparse file (ESX vmfsSparse delta layout) from a raw file, plus a
vmfsSparse descriptor that QEMU can open it through; no tool here can make COWD files.
usage: make_cowd.py SOURCE.raw OUT-delta.vmdk OUT.vmdk [GRAIN_SECTORS]"""
import struct, sys

SECTOR, GTES = 512, 4096


def main(src, out, desc, grain_sectors=16):
    data = open(src, "rb").read()
    sectors = (len(data) + SECTOR - 1) // SECTOR
    grain = grain_sectors * SECTOR
    grains = (sectors + grain_sectors - 1) // grain_sectors
    gd_entries = (grains + GTES - 1) // GTES
    gd_offset = 4
    gd_sectors = (gd_entries * 4 + SECTOR - 1) // SECTOR
    gt_start = gd_offset + gd_sectors
    gd = [gt_start + i * (GTES * 4 // SECTOR) for i in range(gd_entries)]
    next_sector = gt_start + gd_entries * (GTES * 4 // SECTOR)
    table = [0] * (gd_entries * GTES)
    body = bytearray()
    for g in range(grains):
        chunk = data[g * grain:(g + 1) * grain].ljust(grain, b"\0")
        if chunk.count(0) == grain:
            continue
        table[g] = next_sector + len(body) // SECTOR
        body += chunk
    header = struct.pack("<4sIIIIIII", b"COWD", 1, 3, sectors, grain_sectors, gd_offset, gd_entries,
                         next_sector + len(body) // SECTOR)
    header = header.ljust(2048, b"\0")
    f = bytearray(header)
    f += struct.pack("<%dI" % gd_entries, *gd).ljust(gd_sectors * SECTOR, b"\0")
    f += struct.pack("<%dI" % len(table), *table)
    f += body
    open(out, "wb").write(f)
    name = out.split("/")[-1]
    open(desc, "w").write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                          'createType="vmfsSparse"\nRW %d VMFSSPARSE "%s"\n' % (sectors, name))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))
