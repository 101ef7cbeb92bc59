#!/usr/bin/python3
"""make bench: an incremental backup of 1% changed data of a 4 GiB qcow2 image.

rawmount backup (full, then incremental from the persistent dirty bitmap) against what a
QEMU user scripts: qemu-nbd exporting the image with the bitmap (-B), the dirty extents
from the qemu:dirty-bitmap: context, and each dirty extent copied over NBD into a new qcow2
(qemu-img create -b previous) exported by a second qemu-nbd. Both on copies of the same
image state; prints times and ratios, and the incremental's share of the full backup's time.
Runs under Debian's python3 (python3-libnbd)."""
import os, random, shutil, statistics, subprocess, sys, tempfile, time
import nbd

RAWMOUNT = os.path.abspath(os.environ.get("RAWMOUNT", ".build/release/rawmount"))
SIZE_MB = int(os.environ.get("BENCH_BACKUP_MB", "4096"))
CHANGED = float(os.environ.get("BENCH_BACKUP_CHANGED", "0.01"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
BITMAP = "rawmount-backup"


def sh(*args, **kw):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw)


def qemu_nbd(image, sock, *extra):
    p = subprocess.Popen(["qemu-nbd", "-k", sock, "-f", "qcow2", "--cache=writeback", *extra, image],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(500):
        if os.path.exists(sock):
            return p
        time.sleep(0.01)
    raise RuntimeError("qemu-nbd did not start: " + p.stderr.read().decode())


def peer_incremental(image, previous, out, work):
    """Dirty extents over NBD, each copied into a new qcow2 backed by the previous backup."""
    start = time.monotonic()
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(previous), "-F", "qcow2", out)
    src_sock, dst_sock = os.path.join(work, "src.sock"), os.path.join(work, "dst.sock")
    src = qemu_nbd(image, src_sock, "-r", "-B", BITMAP)
    dst = qemu_nbd(out, dst_sock)
    try:
        a, b = nbd.NBD(), nbd.NBD()
        a.add_meta_context("qemu:dirty-bitmap:" + BITMAP)
        a.connect_unix(src_sock)
        b.connect_unix(dst_sock)
        size = a.get_size()
        dirty = []

        def extents(metacontext, offset, entries, err):
            if metacontext != "qemu:dirty-bitmap:" + BITMAP:
                return
            at = offset
            for i in range(0, len(entries), 2):
                if entries[i + 1] & 1:
                    dirty.append((at, entries[i]))
                at += entries[i]

        pos = 0
        while pos < size:
            before = sum(n for _, n in dirty)
            count = min(size - pos, 1 << 30)
            got = []
            a.block_status(count, pos, lambda m, o, e, err: got.append((m, o, e)) or 0)
            step = 0
            for m, o, e in got:
                if m == "qemu:dirty-bitmap:" + BITMAP:
                    extents(m, o, e, None)
                    step = sum(e[i] for i in range(0, len(e), 2))
            pos += max(step, 512)
        for off, n in dirty:
            at = off
            while at < off + n:
                k = min(off + n - at, 4 << 20)
                b.pwrite(a.pread(k, at), at)
                at += k
        b.flush()
        a.shutdown(); b.shutdown()
    finally:
        for p in (src, dst):
            p.terminate(); p.wait()
    sh("sync")
    return time.monotonic() - start, sum(n for _, n in dirty)


def main():
    work = tempfile.mkdtemp(prefix="rawmount-backupbench-")
    try:
        base = os.path.join(work, "base.qcow2")
        raw = os.path.join(work, "src.raw")
        sh("dd", "if=/dev/urandom", f"of={raw}", "bs=1M", f"count={SIZE_MB}", "status=none")
        sh("qemu-img", "convert", "-O", "qcow2", raw, base)
        os.unlink(raw)
        rows = {"rawmount full": [], "rawmount incremental": [], "qemu-nbd + libnbd incremental": []}
        changed_bytes = 0
        for r in range(ROUNDS):
            ours_dir = os.path.join(work, f"ours{r}")
            os.makedirs(ours_dir)
            image = os.path.join(work, f"img{r}.qcow2")
            shutil.copy(base, image)
            sh("sync")
            t = time.monotonic(); sh(RAWMOUNT, "backup", image, ours_dir); rows["rawmount full"].append(time.monotonic() - t)
            # 1% of the disk changed, in 64 KiB pieces at random places (qemu-io records the bitmap).
            rng = random.Random(r)
            pieces = int(SIZE_MB * CHANGED * 16)
            cmds = []
            for k in range(pieces):
                cmds += ["-c", f"write -P {k % 250 + 1} {rng.randrange(SIZE_MB * 16) * 65536} 64k"]
            for i in range(0, len(cmds), 2000):
                sh("qemu-io", "-f", "qcow2", *cmds[i:i + 2000], image)
            peer_image = os.path.join(work, f"peer{r}.qcow2")
            shutil.copy(image, peer_image)
            previous = os.path.join(ours_dir, [n for n in os.listdir(ours_dir) if ".full." in n][0])
            shutil.copy(previous, os.path.join(work, os.path.basename(previous)))
            sh("sync")
            order = [0, 1] if r % 2 == 0 else [1, 0]
            for who in order:
                if who == 0:
                    t = time.monotonic(); sh(RAWMOUNT, "backup", image, ours_dir); sh("sync")
                    rows["rawmount incremental"].append(time.monotonic() - t)
                else:
                    seconds, changed_bytes = peer_incremental(peer_image, previous, os.path.join(work, f"peer-inc{r}.qcow2"), work)
                    rows["qemu-nbd + libnbd incremental"].append(seconds)
            for f in (image, peer_image):
                os.unlink(f)
            shutil.rmtree(ours_dir)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"| backup of a {SIZE_MB} MiB qcow2, {CHANGED * 100:.0f}% changed ({changed_bytes} dirty bytes) | seconds (median of {ROUNDS}) | ratio |")
        print("|---|---|---|")
        print(f"| rawmount backup, full | {med['rawmount full']:.2f} | |")
        print(f"| rawmount backup, incremental | {med['rawmount incremental']:.2f} | {med['rawmount incremental'] / med['rawmount full'] * 100:.1f}% of the full backup's time |")
        print(f"| qemu-nbd -B + libnbd copy of the dirty extents | {med['qemu-nbd + libnbd incremental']:.2f} | rawmount {med['qemu-nbd + libnbd incremental'] / med['rawmount incremental']:.2f}x faster |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
