#!/usr/bin/env python3
"""Writes a differencing VHD over PARENT as the VHD specification lays it out (qemu-img cannot
make one): footer copy, dynamic header naming the parent (UUID, time stamp, UTF-16BE name,
parent locators), block table, locator sectors, blocks of sector bitmap + data, footer.
Some blocks hold only some sectors (partial bitmaps); sectors whose bit is clear carry 0xEE
bytes that a reader must not show. Also writes EXPECTED: PARENT_RAW with the child's
sectors laid over it, the disk a reader of the child must show.

  make_vhd_child.py PARENT PARENT_RAW CHILD EXPECTED MODE
MODE: w2ru (relative and absolute Windows locators and the name), w2ku (an absolute Windows
path only), macx (a file URL only), name (no locators, the name only), missing (locators
to a file that does not exist)."""
import os, struct, sys, uuid

parent, parent_raw, child, expected, mode = sys.argv[1:6]
BS = 2 << 20
SECTORS = BS // 512


def checksum(b, at):
    b = bytearray(b)
    b[at:at + 4] = b"\0\0\0\0"
    return (~sum(b)) & 0xFFFFFFFF


with open(parent, "rb") as f:
    data = f.read()
footer = data[:512] if data[:8] == b"conectix" else data[-512:]
current = struct.unpack(">Q", footer[48:56])[0]
cyl, heads, spt = struct.unpack(">HBB", footer[56:60])
size = max(current, cyl * heads * spt * 512)
entries = (size + BS - 1) // BS

name = os.path.basename(parent)
if mode == "missing":
    name = "gone-" + name
locators = []
if mode in ("w2ru", "missing"):
    locators = [(b"W2ru", (".\\" + name).encode("utf-16-le")), (b"W2ku", ("C:\\Images\\" + name).encode("utf-16-le"))]
elif mode == "w2ku":
    locators = [(b"W2ku", ("D:\\VMs\\Old\\" + name).encode("utf-16-le"))]
elif mode == "macx":
    locators = [(b"MacX", ("file://localhost/Users/someone/VMs/" + name).encode("utf-8"))]
unicode_name = name if mode in ("w2ru", "name", "missing") else ""

table_at = 1536
table_bytes = (entries * 4 + 511) // 512 * 512
loc_at = table_at + table_bytes
blocks_at = loc_at + 512 * len(locators)

# Which sectors of which blocks the child holds.
plan = {}
for b in range(entries):
    if b == 0:
        plan[b] = set(range(0, 8)) | set(range(100, 164)) | {SECTORS - 1}
    elif b == 2:
        plan[b] = set(range(SECTORS))
    elif b % 5 == 3:
        plan[b] = {s for s in range(SECTORS) if (s // 8) % 2 == 0}
table = [0xFFFFFFFF] * entries
body = bytearray()
with open(parent_raw, "rb") as f:
    disk = bytearray(f.read())
disk.extend(b"\0" * max(0, size - len(disk)))
for i, b in enumerate(sorted(plan)):
    start = blocks_at + i * (512 + BS)
    table[b] = start // 512
    bitmap = bytearray(512)
    block = bytearray(b"\xEE" * BS)
    for s in plan[b]:
        bitmap[s // 8] |= 0x80 >> (s % 8)
        sector = bytes(((b * 31 + s * 7 + k) & 0xFF) for k in range(16)) * 32
        block[s * 512:(s + 1) * 512] = sector
        at = b * BS + s * 512
        if at < size:
            disk[at:at + 512] = sector
    body += bitmap + block

f2 = bytearray(footer)
f2[16:24] = struct.pack(">Q", 512)
f2[60:64] = struct.pack(">I", 4)
f2[68:84] = uuid.uuid4().bytes
f2[64:68] = struct.pack(">I", checksum(f2, 64))

h = bytearray(1024)
h[0:8] = b"cxsparse"
h[8:16] = b"\xff" * 8
struct.pack_into(">QIII", h, 16, table_at, 0x00010000, entries, BS)
h[40:56] = footer[68:84]                      # parent UUID
h[56:60] = footer[24:28]                      # parent time stamp
n = unicode_name.encode("utf-16-be")[:512]
h[64:64 + len(n)] = n
for i, (code, payload) in enumerate(locators):
    struct.pack_into(">4sIIIQ", h, 576 + 24 * i, code, 512, len(payload), 0, loc_at + 512 * i)
h[36:40] = struct.pack(">I", checksum(h, 36))

out = bytearray(f2) + h
out += b"\0" * (table_at - len(out))
out += b"".join(struct.pack(">I", e) for e in table)
out += b"\xff" * (loc_at - len(out))
for _, payload in locators:
    out += payload + b"\0" * (512 - len(payload))
out += body + f2
with open(child, "wb") as f:
    f.write(out)
with open(expected, "wb") as f:
    f.write(disk[:size])
