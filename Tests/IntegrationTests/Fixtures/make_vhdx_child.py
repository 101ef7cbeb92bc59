#!/usr/bin/env python3
"""Writes a differencing VHDX over PARENT (a VHDX) as the VHDX specification lays it out
(qemu-img cannot make one): file identifier, two headers, two region tables, an empty log,
the block table with its sector-bitmap entries, the metadata region (file parameters with
has-parent set, size, identifier, sector sizes, and a parent locator naming the parent by
its data-write GUID and paths), a sector-bitmap block and payload blocks. Blocks take every
state a reader meets: partly present (some sectors here, 0xEE bytes in the others, which a
reader must not show), fully present, zero, unmapped, undefined and not present. Also
writes EXPECTED, the disk a reader of the child must show: PARENT_RAW with the child's
sectors laid over it, zeros for zero/unmapped blocks.

  make_vhdx_child.py PARENT PARENT_RAW CHILD EXPECTED MODE [LINKAGE]
MODE: relative (relative_path and absolute_win32_path), absolute (absolute_win32_path only),
volume (volume_path only), missing (paths to a file that does not exist).
LINKAGE: "wrong" to name another data-write GUID."""
import os, struct, sys, uuid

parent, parent_raw, child, expected, mode = sys.argv[1:6]
wrong = len(sys.argv) > 6 and sys.argv[6] == "wrong"
MIB = 1 << 20
BS, LSS = MIB, 512
SECTORS = BS // LSS
RATIO = (1 << 23) * LSS // BS


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def with_crc(b):
    b = bytearray(b)
    b[4:8] = b"\0\0\0\0"
    b[4:8] = struct.pack("<I", crc32c(bytes(b)))
    return bytes(b)


def guid(text):
    return uuid.UUID(text).bytes_le


with open(parent, "rb") as f:
    pdata = f.read()
# The parent's current header: valid checksum, highest sequence number.
heads = []
for at in (64 << 10, 128 << 10):
    h = pdata[at:at + 4096]
    if h[:4] == b"head" and with_crc(h) == h:
        heads.append((struct.unpack_from("<Q", h, 8)[0], h))
data_write = max(heads)[1][32:48]
linkage = "{" + str(uuid.UUID(bytes_le=(uuid.uuid4().bytes if wrong else data_write))) + "}"
with open(parent_raw, "rb") as f:
    disk = bytearray(f.read())
size = len(disk)
blocks = (size + BS - 1) // BS
groups = (blocks + RATIO - 1) // RATIO
entries = groups * (RATIO + 1)

name = os.path.basename(parent)
if mode == "missing":
    name = "gone-" + name
keys = {"parent_linkage": linkage}
if mode in ("relative", "missing"):
    keys["relative_path"] = ".\\" + name
    keys["absolute_win32_path"] = "C:\\Hyper-V\\Disks\\" + name
elif mode == "absolute":
    keys["absolute_win32_path"] = "E:\\Old\\VMs\\" + name
elif mode == "volume":
    keys["volume_path"] = "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\VMs\\" + name
locator = bytearray(guid("B04AEFB7-D19E-4A81-B789-25B8E9445913") + b"\0\0" + struct.pack("<H", len(keys)))
strings = bytearray()
table = bytearray()
base = 20 + 12 * len(keys)
for k, v in keys.items():
    kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
    table += struct.pack("<IIHH", base + len(strings), base + len(strings) + len(kb), len(kb), len(vb))
    strings += kb + vb
locator += table + strings

LOG, BAT, META, SB, DATA = MIB, 2 * MIB, 3 * MIB, 4 * MIB, 5 * MIB
bat = bytearray(8 * entries)
sb = bytearray(MIB)
payload = bytearray()
# State per block: 7 partly, 6 fully, 2 zero, 3 unmapped, 1 undefined; others not present.
states = {0: 7, 1: 2, 2: 6, 4: 3, 5: 7, 7: 1}
for b in sorted(states):
    if b >= blocks:
        continue
    st = states[b]
    idx = b + b // RATIO
    if st in (6, 7):
        at = DATA + len(payload)
        block = bytearray(b"\xEE" * BS)
        here = set(range(SECTORS)) if st == 6 else (set(range(0, 8)) | set(range(100, 164)) | {SECTORS - 1} if b == 0 else {s for s in range(SECTORS) if (s // 16) % 3 == 1})
        bits = bytearray(SECTORS // 8)
        for s in here:
            sector = bytes(((b * 29 + s * 5 + k) & 0xFF) for k in range(16)) * (LSS // 16)
            block[s * LSS:(s + 1) * LSS] = sector
            bits[s // 8] |= 1 << (s % 8)
            g = b * BS + s * LSS
            if g < size:
                disk[g:g + LSS] = sector[:max(0, min(LSS, size - g))]
        if st == 7:
            sb[(b % RATIO) * len(bits):(b % RATIO + 1) * len(bits)] = bits
        payload += block
        struct.pack_into("<Q", bat, idx * 8, at | st)
    else:
        struct.pack_into("<Q", bat, idx * 8, st)
        if st in (1, 2, 3):  # undefined, zero and unmapped read as zeros (the specification allows it; QEMU does it)
            disk[b * BS:min(size, (b + 1) * BS)] = bytes(min(size, (b + 1) * BS) - b * BS)
for g in range(groups):
    struct.pack_into("<Q", bat, (g * (RATIO + 1) + RATIO) * 8, SB | 6)

meta = bytearray(64 << 10)
meta[0:8] = b"metadata"
items = [
    ("CAA16737-FA36-4D43-B3B6-33F0AA44E76B", struct.pack("<II", BS, 2), 4),       # has parent
    ("2FA54224-CD1B-4876-B211-5DBED83BF4B8", struct.pack("<Q", size), 6),
    ("BECA12AB-B2E6-4523-93EF-C309E000C746", uuid.uuid4().bytes_le, 6),
    ("8141BF1D-A96F-4709-BA47-F233A8FAAB5F", struct.pack("<I", LSS), 6),
    ("CDA348C7-445D-4471-9CC9-E9885251C556", struct.pack("<I", LSS), 6),
    ("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C", bytes(locator), 6),
]
struct.pack_into("<H", meta, 10, len(items))
blob = bytearray()
for i, (g, body, flags) in enumerate(items):
    struct.pack_into("<16sIII", meta, 32 + 32 * i, guid(g), (64 << 10) + len(blob), len(body), flags)
    blob += body

out = bytearray(DATA + len(payload))
out[0:8] = b"vhdxfile"
for i, at in enumerate((64 << 10, 128 << 10)):
    h = bytearray(4096)
    h[0:4] = b"head"
    struct.pack_into("<Q", h, 8, 10 + i)
    h[16:32] = uuid.uuid4().bytes_le
    h[32:48] = uuid.uuid4().bytes_le
    struct.pack_into("<HHIQ", h, 64, 0, 1, MIB, LOG)
    out[at:at + 4096] = with_crc(h)
rt = bytearray(64 << 10)
rt[0:4] = b"regi"
struct.pack_into("<I", rt, 8, 2)
struct.pack_into("<16sQII", rt, 16, guid("2DC27766-F623-4200-9D64-115E9BFD4A08"), BAT, MIB, 1)
struct.pack_into("<16sQII", rt, 48, guid("8B7CA206-4790-4B9A-B8FE-575F050F886E"), META, MIB, 1)
rt = with_crc(rt)
out[192 << 10:(192 << 10) + len(rt)] = rt
out[256 << 10:(256 << 10) + len(rt)] = rt
out[BAT:BAT + len(bat)] = bat
out[META:META + len(meta)] = meta
out[META + (64 << 10):META + (64 << 10) + len(blob)] = blob
out[SB:SB + MIB] = sb
out[DATA:] = payload
with open(child, "wb") as f:
    f.write(out)
with open(expected, "wb") as f:
    f.write(disk)
