#!/usr/bin/env python3
"""Cost that should follow the data, not the disk (issue 14): huge sparse images, mounted
read-only by rawmount and by qemu-storage-daemon in the same run.

For each format, an image of the format's size (8 TiB unless the format's tools cannot make
one that large; the table says) holding either 1 MiB in the middle (at 4 TiB) or many 4 KiB pieces 2 MiB
apart. Rows: mount time, the first stat (st_blocks), a SEEK_DATA/SEEK_HOLE walk over every
extent, the server's RSS after the walk, and `rawmount info` next to `qemu-img info`.

  python3 scripts/scale.py          (make bench runs it after bench.py)
  SCALE_FORMATS=qcow2,vdi SCALE_CASES=one   select what runs
  SCALE_REPEAT=3                             rawmount runs per row (the median is shown)
"""
import os
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import sh  # noqa: E402

RAWMOUNT = os.environ.get("RAWMOUNT", os.path.join(os.path.dirname(__file__), "..", ".build", "release", "rawmount"))
TIB = 1 << 40
# name -> (qemu-img driver, create options, size, what the size is)
FORMATS = {
    "raw": ("raw", [], 8 * TIB),
    "qed": ("qed", [], 8 * TIB),
    "qcow2": ("qcow2", [], 8 * TIB),
    "vdi": ("vdi", [], 8 * TIB),
    "vmdk": ("vmdk", [], 8 * TIB),
    "vmdk-split": ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"], 8 * TIB),  # 4096 extent files
    "vmdk-stream": ("vmdk", ["-o", "subformat=streamOptimized"], 8 * TIB),
    # Bochs growing redolog at its maximum (1 Mi catalog entries of 8 MiB extents = 8 TiB);
    # written here (bximage would read all 8 TiB of the source). QEMU reads it too.
    "bochs": ("bochs", [], 8 * TIB),
    # Bochs sparse (bximage -imgmode=sparse) of 8 TiB in 1 MiB pages: an 8 Mi-entry page
    # table. QEMU cannot read it (it probes as raw), so its columns show qsd on the file as raw.
    "bochs-sparse": ("raw", [], 8 * TIB),
    # VMware COWD (ESX vmfsSparse delta) at its maximum: a 32-bit sector count, 2 TiB less
    # 1 MiB, 8 KiB grains; qsd opens it through a vmfsSparse descriptor, as QEMU needs.
    "cowd": ("vmdk", [], 2 * TIB - (1 << 20)),
}
# Images qemu-storage-daemon opens instead of the one rawmount mounts (a COWD's descriptor).
QSD_IMAGE = {}
SELECTED = os.environ.get("SCALE_FORMATS", ",".join(FORMATS)).split(",")
CASES = os.environ.get("SCALE_CASES", "one,scattered,read").split(",")
# "read": the server's RSS before and after one sequential read of a whole 4 GiB image of
# random data (it must not grow with the data read), and how long unmounting then takes.
READ_FORMATS = os.environ.get("SCALE_READ_FORMATS", "qcow2,vdi,vmdk,vmdk-stream").split(",")
READ_GIB = int(os.environ.get("SCALE_READ_GIB", "4"))
# Scattered: 4 KiB pieces 2 MiB apart (every piece its own cluster, grain and VDI block, with
# an unallocated one between), 16384 of them (4096 for VDI, whose 1 MiB blocks would
# otherwise need 16 GiB of host disk).
PIECES = {"vdi": 4096}
STRIDE = 2 << 20
# rawmount's figures are the median of this many runs of each row.
REPEAT = max(1, int(os.environ.get("SCALE_REPEAT", "3")))


def human(n):
    """8 TiB, or 2047.999 GiB for a size that is not whole TiB (COWD's maximum)."""
    return f"{n // TIB} TiB" if n % TIB == 0 else f"{n / (1 << 30):.3f} GiB"


def make_source(work, size, case, pieces):
    src = os.path.join(work, f"src-{case}-{pieces}-{size}.raw")
    if not os.path.exists(src):
        with open(src, "wb") as f:
            f.truncate(size)
            if case == "one":
                f.seek(size // 2)
                f.write(os.urandom(1 << 20))
            else:
                for k in range(pieces):
                    f.seek(k * STRIDE)
                    f.write(os.urandom(4096))
    return src


def bochs_growing(path, size, pieces):
    """A Bochs growing redolog (version 2) holding `pieces`: (offset, bytes) pairs, each inside
    one extent; extents get slots in the order first written, as Bochs allocates them."""
    extent, bitmap = 8 << 20, 2048          # 16384 sectors per extent: 2048 bitmap bytes
    catalog = size // extent
    slot_bytes = bitmap + extent            # bitmap is 4 whole sectors, then the data
    slots_at = 512 + catalog * 4
    header = bytearray(512)
    header[0:22] = b"Bochs Virtual HD Image"
    header[32:39] = b"Redolog"
    header[48:55] = b"Growing"
    struct.pack_into("<IIIII", header, 64, 0x00020000, 512, catalog, bitmap, extent)
    struct.pack_into("<Q", header, 88, size)
    table = bytearray(b"\xff" * (catalog * 4))
    slots = {}
    with open(path, "w+b") as f:
        for offset, data in pieces:
            e = offset // extent
            if e not in slots:
                slots[e] = len(slots)
                struct.pack_into("<I", table, e * 4, slots[e])
            base = slots_at + slots[e] * slot_bytes
            first = (offset % extent) // 512
            bits = bytearray(bitmap)
            f.seek(base)
            bits[:] = f.read(bitmap).ljust(bitmap, b"\0")
            for sector in range(first, first + len(data) // 512):
                bits[sector // 8] |= 1 << (sector % 8)
            f.seek(base)
            f.write(bits)
            f.seek(base + bitmap + offset % extent)
            f.write(data)
        # Bochs writes an extent's last sector when it allocates one, so every slot is whole.
        f.truncate(slots_at + len(slots) * slot_bytes)
        f.seek(0)
        f.write(header)
        f.write(table)


def bochs_sparse(path, size, pieces, page=1 << 20):
    """A Bochs sparse image (version 2) holding `pieces`: (offset, bytes) pairs inside one page
    each; pages get physical numbers in the order first written, as bximage gives them."""
    pages = size // page
    header = bytearray(256)
    struct.pack_into("<IIIIQ", header, 0, 0x02468ACE, 2, page, pages, size)
    table = bytearray(b"\xff" * (pages * 4))
    data_start = (256 + pages * 4 + page - 1) // page * page
    physical = {}
    with open(path, "w+b") as f:
        for offset, data in pieces:
            p = offset // page
            if p not in physical:
                physical[p] = len(physical)
                struct.pack_into("<I", table, p * 4, physical[p])
            f.seek(data_start + physical[p] * page + offset % page)
            f.write(data)
        f.truncate(data_start + len(physical) * page)
        f.seek(0)
        f.write(header)
        f.write(table)


def cowd(path, size, pieces, grain_sectors=16):
    """A bare COWD file holding `pieces` ((offset, bytes) inside one grain each), with its grain
    tables preallocated as ESX does (left as holes where nothing points) and grains appended in
    the order first written; plus a vmfsSparse descriptor for QEMU, returned."""
    sectors, grain = size // 512, grain_sectors * 512
    gd_entries = (sectors // grain_sectors + 4095) // 4096
    gd_sectors = (gd_entries * 4 + 511) // 512
    gt_start = 4 + gd_sectors
    next_sector = gt_start + gd_entries * 32
    with open(path, "w+b") as f:
        written = {}
        for offset, data in pieces:
            g = offset // grain
            if g not in written:
                written[g] = next_sector
                next_sector += grain_sectors
                f.seek((gt_start + (g // 4096) * 32) * 512 + (g % 4096) * 4)
                f.write(struct.pack("<I", written[g]))
            f.seek(written[g] * 512 + offset % grain)
            f.write(data)
        f.truncate(next_sector * 512)
        f.seek(0)
        f.write(struct.pack("<4sIIIIIII", b"COWD", 1, 3, sectors, grain_sectors, 4, gd_entries, next_sector).ljust(2048, b"\0"))
        f.write(struct.pack("<%dI" % gd_entries, *(gt_start + i * 32 for i in range(gd_entries))))
    desc = path + ".desc.vmdk"
    with open(desc, "w") as d:
        d.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfsSparse"\n'
                f'RW {sectors} VMFSSPARSE "{os.path.basename(path)}"\n')
    return desc


def make_image(work, name, case):
    driver, opts, size = FORMATS[name]
    pieces = PIECES.get(name, 16384)
    img = os.path.join(work, f"{name}-{case}.{driver}")
    if name == "cowd":
        where = [(size // 2, os.urandom(1 << 20))] if case == "one" else [(k * STRIDE, os.urandom(4096)) for k in range(pieces)]
        # 1 MiB is 128 grains: split it so each piece lies inside one grain.
        split = [(o + i, d[i:i + 8192]) for o, d in where for i in range(0, len(d), 8192)]
        QSD_IMAGE[img] = cowd(img, size, split)
        return img, "vmdk", size
    if name in ("bochs", "bochs-sparse"):
        write = bochs_growing if name == "bochs" else bochs_sparse
        if case == "one":
            write(img, size, [(size // 2, os.urandom(1 << 20))])
        else:
            write(img, size, [(k * STRIDE, os.urandom(4096)) for k in range(pieces)])
        return img, "bochs", size
    src = make_source(work, size, case, pieces)
    if name == "raw":
        sh("cp", "--sparse=always", src, img)
    else:
        sh("qemu-img", "convert", "-O", driver, *opts, src, img)
    return img, driver, size


def walk(path):
    """Every extent through SEEK_DATA/SEEK_HOLE: (seconds, extents, data bytes)."""
    fd = os.open(path, os.O_RDONLY)
    size = os.lseek(fd, 0, os.SEEK_END)
    start = time.monotonic()
    pos = extents = data = 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        extents += 1
        data += h - d
        pos = h
    took = time.monotonic() - start
    os.close(fd)
    return took, extents, data


def median_run(runs):
    """Each measured figure's median over the runs (the walk's extent count and data bytes
    must not differ between runs)."""
    def med(values):
        v = sorted(values)
        return v[len(v) // 2]
    walks = [r["walk"] for r in runs]
    assert len({w[1:] for w in walks}) == 1, f"walks differ between runs: {walks}"
    out = {k: med([r[k] for r in runs]) for k in ("mount", "stat", "rss", "info")}
    out["blocks"] = runs[0]["blocks"]
    out["walk"] = (med([w[0] for w in walks]),) + walks[0][1:]
    return out


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure_rawmount(img, driver, work):
    mnt = os.path.join(work, "rm")
    os.makedirs(mnt, exist_ok=True)
    t = time.monotonic()
    sh(RAWMOUNT, "mount", "--read-only", "--format", driver, img, mnt)
    mount = time.monotonic() - t
    path = os.path.join(mnt, sorted(n for n in os.listdir(mnt) if ".dirty-" not in n)[0])
    try:
        t = time.monotonic()
        st = os.stat(path)
        stat = time.monotonic() - t
        w = walk(path)
        rss = rss_mib(server_pid(mnt))
    finally:
        sh(RAWMOUNT, "unmount", mnt)
    t = time.monotonic()
    sh(RAWMOUNT, "info", "--format", driver, img)
    info = time.monotonic() - t
    return dict(mount=mount, stat=stat, blocks=st.st_blocks * 512, walk=w, rss=rss, info=info)


def start_qsd(img, driver, work):
    """qemu-storage-daemon exporting `img` read-only over FUSE at work/qsd, once mounted."""
    target = os.path.join(work, "qsd")
    open(target, "w").close()
    proc = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file,filename={img},read-only=on",
        "--blockdev", f"driver={driver},node-name=fmt,file=file,read-only=on",
        "--export", f"type=fuse,id=exp,node-name=fmt,mountpoint={target},writable=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while sh("mountpoint", "-q", target, check=False).returncode != 0:
        if proc.poll() is not None:
            raise RuntimeError("qemu-storage-daemon: " + proc.stderr.read().decode())
        time.sleep(0.002)
    return proc, target


def server_pid(mnt):
    """The pid of the rawmount server at `mnt`, from its pid file."""
    pidfile = "/run/rawmount/" + os.path.realpath(mnt).replace("%", "%25").replace("/", "%2F") + ".pid"
    return int(open(pidfile).read().strip())


def measure_qsd(img, driver, work):
    t = time.monotonic()
    proc, target = start_qsd(img, driver, work)
    try:
        mount = time.monotonic() - t
        t = time.monotonic()
        st = os.stat(target)
        stat = time.monotonic() - t
        w = walk(target)
        rss = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    t = time.monotonic()
    sh("qemu-img", "info", "-f", driver, img)
    info = time.monotonic() - t
    return dict(mount=mount, stat=stat, blocks=st.st_blocks * 512, walk=w, rss=rss, info=info)


def read_rss(work):
    """(format, rawmount before/after MiB, unmount s, qsd before/after MiB, stop s) rows."""
    src = os.path.join(work, "read-src.raw")
    sh("dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={READ_GIB * 1024}", "status=none")
    rows = []
    for name in READ_FORMATS:
        driver, opts, _ = FORMATS[name]
        img = os.path.join(work, f"read.{name}")
        sh("qemu-img", "convert", "-O", driver, *opts, src, img)
        mnt = os.path.join(work, "rm")
        os.makedirs(mnt, exist_ok=True)
        sh(RAWMOUNT, "mount", "--read-only", "--format", driver, img, mnt)
        pid = server_pid(mnt)
        before = rss_mib(pid)
        sh("dd", f"if={os.path.join(mnt, 'read.raw')}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none")
        after = rss_mib(pid)
        t = time.monotonic()
        sh(RAWMOUNT, "unmount", mnt)
        closing = time.monotonic() - t
        proc, target = start_qsd(img, driver, work)
        qbefore = rss_mib(proc.pid)
        sh("dd", f"if={target}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none")
        qafter = rss_mib(proc.pid)
        t = time.monotonic()
        proc.terminate()
        proc.wait()
        qclosing = time.monotonic() - t
        os.unlink(img)
        rows.append((name, before, after, closing, qbefore, qafter, qclosing))
        print(f"{name:12} read {READ_GIB} GiB: rawmount rss {before:.1f} -> {after:.1f} MiB, unmount {closing*1000:.0f} ms | "
              f"qsd rss {qbefore:.1f} -> {qafter:.1f} MiB, stop {qclosing*1000:.0f} ms", flush=True)
    os.unlink(src)
    return rows


def main():
    work = tempfile.mkdtemp(prefix="rawmount-scale-", dir=os.environ.get("BENCH_DIR") or None)
    rows = []
    reads = []
    try:
        if "read" in CASES:
            reads = read_rss(work)
        for case in [c for c in CASES if c != "read"]:
            for name in SELECTED:
                img, driver, size = make_image(work, name, case)
                # rawmount before and after qsd, then the median of its runs (one run swings
                # 2-5x on this machine); qsd runs once: its walks take minutes on some rows.
                runs = [measure_rawmount(img, driver, work)]
                # QEMU reads a Bochs sparse image only as raw (FORMATS names its driver).
                theirs = measure_qsd(QSD_IMAGE.get(img, img), FORMATS[name][0] if name == "bochs-sparse" else driver, work)
                runs += [measure_rawmount(img, driver, work) for _ in range(REPEAT - 1)]
                ours = median_run(runs)
                rows.append((name, case, size, ours, theirs))
                print(f"{name:12} {case:9} rawmount mount {ours['mount']*1000:6.0f} ms stat {ours['stat']*1000:7.1f} ms "
                      f"walk {ours['walk'][0]*1000:8.1f} ms ({ours['walk'][1]} extents) rss {ours['rss']:5.1f} MiB info {ours['info']*1000:6.0f} ms | "
                      f"qsd mount {theirs['mount']*1000:6.0f} ms stat {theirs['stat']*1000:7.1f} ms walk {theirs['walk'][0]*1000:8.1f} ms "
                      f"({theirs['walk'][1]} extents) rss {theirs['rss']:5.1f} MiB qemu-img info {theirs['info']*1000:6.0f} ms", flush=True)
                for f in os.listdir(work):
                    if f.startswith(f"{name}-{case}"):
                        os.unlink(os.path.join(work, f))
    finally:
        subprocess.run(["rm", "-rf", work])
    if reads:
        print()
        print(f"| format | RSS MiB before / after reading {READ_GIB} GiB (qsd) | unmount ms (qsd stop) |")
        print("|---|---|---|")
        for name, b, a, c, qb, qa, qc in reads:
            print(f"| {name} | {b:.1f} / {a:.1f} ({qb:.1f} / {qa:.1f}) | {c*1000:.0f} ({qc*1000:.0f}) |")
    print()
    print(f"rawmount: the median of {REPEAT} runs per row; qsd: one run")
    print("| format | size | data | mount ms (qsd) | stat ms (qsd) | SEEK walk ms (qsd) | extents (qsd) | st_blocks bytes (qsd) | RSS MiB (qsd) | info ms (qemu-img info) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, case, size, o, q in rows:
        data = f"1 MiB at {human(size // 2)}" if case == "one" else f"{PIECES.get(name, 16384)} x 4 KiB, 2 MiB apart"
        print(f"| {name} | {human(size)} | {data} | {o['mount']*1000:.0f} ({q['mount']*1000:.0f}) | {o['stat']*1000:.1f} ({q['stat']*1000:.1f}) | "
              f"{o['walk'][0]*1000:.1f} ({q['walk'][0]*1000:.1f}) | {o['walk'][1]} ({q['walk'][1]}) | {o['blocks']} ({q['blocks']}) | "
              f"{o['rss']:.1f} ({q['rss']:.1f}) | {o['info']*1000:.0f} ({q['info']*1000:.0f}) |")


if __name__ == "__main__":
    main()
