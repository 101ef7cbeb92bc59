#!/usr/bin/env python3
"""make bench: rawmount against qemu-storage-daemon's FUSE export (and libyal's vmdkmount /
qcowmount on VMDK / qcow2 reads) on the same image, in the same run, alternating them; prints
medians and ratios (rawmount / peer; > 1 is better)."""
import json, os, random, statistics, subprocess, sys, tempfile, time

RAWMOUNT = os.path.abspath(os.environ.get("RAWMOUNT", ".build/release/rawmount"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SIZE_MB = int(os.environ.get("BENCH_SIZE_MB", "1024"))
# Allocating writes fill a fresh empty image of this size. Here, runs much longer than 1 GiB
# are noisier, not calmer: the VM's fresh-memory cost varies 2x for a 4 GiB tmpfs file.
WRITE_MB = int(os.environ.get("BENCH_WRITE_MB", str(SIZE_MB)))
WRITE_ROUNDS = int(os.environ.get("BENCH_WRITE_ROUNDS", "5"))
RUNTIME = os.environ.get("BENCH_RUNTIME", "5")
FORMATS = os.environ.get("BENCH_FORMATS", "raw,qed,vdi,vmdk,vmdk-stream,vpc,vhdx,qcow2,qcow2-compressed,qcow2-zstd,qcow2-bitmaps,ewf,ewf-text,ewf-stored").split(",")
ONLY = os.environ.get("BENCH_ONLY", "")  # run only tests whose title contains this
# "vmdk-stream" is a streamOptimized VMDK: read-only, compressed grains; "qcow2-compressed"
# holds deflate clusters (from a half-compressible source, so qemu-img keeps them compressed),
# "qcow2-zstd" the same data as zstd clusters.
SUBFORMAT = {"vmdk-stream": ("vmdk", ["-o", "subformat=streamOptimized"]),
             "qcow2-compressed": ("qcow2", ["-c"]), "qcow2-zstd": ("qcow2", ["-c", "-o", "compression_type=zstd"]),
             "qcow2-bitmaps": ("qcow2", []), "ewf-stored": ("ewf", []), "ewf-text": ("ewf", [])}
# "qcow2-bitmaps" (BENCH_FORMATS=qcow2-bitmaps) carries two enabled persistent dirty bitmaps
# (64 KiB and 4 KiB granularity) that both servers keep up to date on every write.
BITMAPS = {"qcow2-bitmaps"}
# Only random reads are measured on compressed images; rawmount mounts these read-only.
COMPRESSED = {"vmdk-stream", "qcow2-compressed", "qcow2-zstd"}
# EWF evidence (ewfacquire, EnCase 6, 256 MiB segments): "ewf" from a source of random and
# zero halves (the random chunks are stored, the zero chunks compressed: free space), "ewf-text"
# from text-like data (every chunk compressed, none of them zeros), "ewf-stored" uncompressed
# chunks (each with its Adler-32). QEMU has no EWF driver: the peers are libewf's ewfmount and
# xmount.
EWF = {"ewf": ["-c", "fast"], "ewf-text": ["-c", "fast"], "ewf-stored": ["-c", "none"]}
READ_ONLY = COMPRESSED | set(EWF)
# Rows only some formats run: qcow2 (the format #12 made writable) gets the overwrite, job
# scaling and buffered dd rows.
QCOW2_ONLY = {"rand write 64k x1 job (allocating)", "rand overwrite 4k x4 jobs", "dd 1M conv=fdatasync (buffered)"}


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, text=True, capture_output=True, **kw)


def fio(path, name, rw, bs, jobs, extra=(), split=False):
    size = WRITE_MB if "write" in rw else SIZE_MB
    if split:  # each job its own slice, so writers allocate instead of rewriting each other
        size //= jobs
        extra = (*extra, f"--offset_increment={size}M")
    args = ["fio", f"--name={name}", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--numjobs={jobs}",
            "--direct=1", "--ioengine=psync", "--group_reporting", "--output-format=json",
            # Only bandwidth is reported: fio's per-I/O latency clocks would otherwise be a
            # fixed client cost inside every row.
            "--gtod_reduce=1",
            f"--size={size}M", *extra]
    if rw.startswith("rand") or rw == "read":
        args += [f"--runtime={RUNTIME}", "--time_based"]
    out = json.loads(sh(*args).stdout)
    job = out["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return side["bw_bytes"], side["iops"]


class RawmountServer:
    name = "rawmount"

    def __init__(self, image, fmt, work):
        self.image, self.fmt, self.mnt = image, fmt, os.path.join(work, "rm-mnt")
        os.makedirs(self.mnt, exist_ok=True)

    def __enter__(self):
        sh(RAWMOUNT, "mount", "--format", self.fmt, self.image, self.mnt)
        return os.path.join(self.mnt, os.listdir(self.mnt)[0])

    def __exit__(self, *exc):
        sh(RAWMOUNT, "unmount", self.mnt)


class RawmountNoWriteBack(RawmountServer):
    """rawmount with its 1 s periodic write-back off (BENCH_WRITEBACK=1 adds it to write
    rows), to show what the bound on unflushed writes costs."""
    name = "rawmount-no-writeback"

    def __enter__(self):
        sh(RAWMOUNT, "mount", "--format", self.fmt, self.image, self.mnt,
           env=dict(os.environ, RAWMOUNT_WRITEBACK_SECONDS="0"))
        return os.path.join(self.mnt, os.listdir(self.mnt)[0])


class QsdServer:
    name = "qemu-storage-daemon"

    def __init__(self, image, fmt, work):
        self.image, self.fmt, self.target = image, fmt, os.path.join(work, "qsd-target")
        open(self.target, "w").close()

    def __enter__(self):
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file,filename={self.image},cache.direct=off",
            "--blockdev", f"driver={self.fmt},node-name=fmt,file=file",
            "--export", f"type=fuse,id=exp,node-name=fmt,mountpoint={self.target},writable=on"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(500):
            if sh("mountpoint", "-q", self.target, check=False).returncode == 0:
                return self.target
            if self.proc.poll() is not None:
                raise RuntimeError("qemu-storage-daemon: " + self.proc.stderr.read().decode())
            time.sleep(0.01)
        raise RuntimeError("qemu-storage-daemon did not mount")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


class LibyalServer:
    """libyal's read-only FUSE tools (vmdkmount, qcowmount): they daemonize and show one file,
    MOUNTPOINT/<shown>."""
    name = shown = ""

    def __init__(self, image, fmt, work):
        self.image, self.mnt = image, os.path.join(work, "libyal-mnt")
        os.makedirs(self.mnt, exist_ok=True)

    def __enter__(self):
        sh(self.name, self.image, self.mnt)
        for _ in range(500):
            if sh("mountpoint", "-q", self.mnt, check=False).returncode == 0:
                return os.path.join(self.mnt, self.shown)
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} did not mount")

    def __exit__(self, *exc):
        sh("fusermount3", "-u", self.mnt)


class VmdkmountServer(LibyalServer):
    name, shown = "vmdkmount", "vmdk1"


class QcowmountServer(LibyalServer):
    name, shown = "qcowmount", "qcow1"


class EwfmountServer(LibyalServer):
    name, shown = "ewfmount", "ewf1"


class XmountServer(LibyalServer):
    """xmount 0.7: --in ewf, shows MOUNTPOINT/<image stem>.dd."""
    name = "xmount"

    def __enter__(self):
        sh("xmount", "--in", "ewf", self.image, "--out", "raw", self.mnt)
        for _ in range(500):
            if sh("mountpoint", "-q", self.mnt, check=False).returncode == 0:
                return os.path.join(self.mnt, os.path.basename(self.image).rsplit(".", 1)[0] + ".dd")
            time.sleep(0.01)
        raise RuntimeError("xmount did not mount")


def peers(fmt, writes):
    """The servers each row compares rawmount with: qsd always; libyal's read-only
    vmdkmount / qcowmount on VMDK / qcow2 read rows when installed."""
    if fmt in EWF:
        return [p for p in (EwfmountServer, XmountServer) if sh("sh", "-c", f"command -v {p.name}", check=False).returncode == 0]
    out = [QsdServer]
    if writes and os.environ.get("BENCH_WRITEBACK") == "1":
        out.append(RawmountNoWriteBack)
    # qcowmount (libqcow 20221124) cannot read zstd clusters.
    libyal = VmdkmountServer if fmt.startswith("vmdk") else QcowmountServer if fmt.startswith("qcow2") and fmt != "qcow2-zstd" else None
    if libyal and not writes and sh("sh", "-c", f"command -v {libyal.name}", check=False).returncode == 0:
        out.append(libyal)
    return out


def dd(path):
    """Buffered sequential write of WRITE_MB through the page cache, then fdatasync (as a
    user copies a disk in), in bytes per second."""
    start = time.monotonic()
    sh("dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={WRITE_MB}", "conv=notrunc,fdatasync", "status=none")
    return WRITE_MB * (1 << 20) / (time.monotonic() - start), 0


class PlainFileServer:
    """A plain file on the same file system as the images, written the same way: the
    ceiling of a row bounded by the host disk."""
    name = "plain file"

    def __init__(self, image, fmt, work):
        self.path = os.path.join(work, "plain.raw")

    def __enter__(self):
        if os.path.exists(self.path):
            os.unlink(self.path)
        sh("truncate", "-s", f"{WRITE_MB}M", self.path)
        return self.path

    def __exit__(self, *exc):
        os.unlink(self.path)


def make_image(work, fmt):
    raw = os.path.join(work, "src.raw")
    if not os.path.exists(raw):
        sh("dd", "if=/dev/urandom", f"of={raw}", "bs=1M", f"count={SIZE_MB}", "status=none")
    if fmt in ("qcow2-compressed", "qcow2-zstd"):  # every 64 KiB: half random, half zeros
        raw = os.path.join(work, "half.raw")
        with open(raw, "wb") as f:
            for _ in range(SIZE_MB * 16):
                f.write(os.urandom(32768) + bytes(32768))
    if fmt in EWF:
        src = raw
        if fmt == "ewf-text":  # words: every chunk deflates (about 3:1), none is zeros
            src = os.path.join(work, "text.raw")
            if not os.path.exists(src):
                rng = random.Random(7)
                words = [bytes("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3 + k % 9)), "ascii") for k in range(4000)]
                with open(src, "wb") as f:
                    for _ in range(SIZE_MB):
                        f.write(b" ".join(rng.choice(words) for _ in range(200_000))[: 1 << 20])
        if fmt == "ewf":  # half random, half zeros per 64 KiB: chunks that compress
            src = os.path.join(work, "half.raw")
            if not os.path.exists(src):
                with open(src, "wb") as f:
                    for _ in range(SIZE_MB * 16):
                        f.write(os.urandom(32768) + bytes(32768))
        target = os.path.join(work, f"bench-{fmt}")
        sh("ewfacquire", "-u", "-q", "-f", "encase6", "-S", "256MiB", *EWF[fmt], "-t", target, src)
        return target + ".E01"
    img = os.path.join(work, f"bench.{fmt}")
    if fmt == "raw":
        sh("cp", "--reflink=auto", raw, img)
    else:
        driver, opts = SUBFORMAT.get(fmt, (fmt, []))
        sh("qemu-img", "convert", "-O", driver, *opts, raw, img)
    add_bitmaps(img, fmt)
    return img


def add_bitmaps(img, fmt):
    if fmt in BITMAPS:
        sh("qemu-img", "bitmap", "--add", "-g", "64k", img, "b0")
        sh("qemu-img", "bitmap", "--add", "-g", "4k", img, "b1")


def empty_image(work, fmt, allocated=False):
    """A fresh image to write; `allocated`: every cluster already allocated (qcow2 metadata
    preallocation), so writes overwrite in place."""
    img = os.path.join(work, f"empty.{fmt}")
    if os.path.exists(img):
        os.unlink(img)
    sh("qemu-img", "create", "-q", "-f", SUBFORMAT.get(fmt, (fmt, []))[0], *(["-o", "preallocation=metadata"] if allocated else []), img, f"{WRITE_MB}M")
    add_bitmaps(img, fmt)
    return img


TESTS = [
    ("seq read 1M", lambda p: fio(p, "seqread", "read", "1M", 1), False),
    ("seq read 128k", lambda p: fio(p, "seqread128", "read", "128k", 1), False),
    # Through the kernel's page cache and read-ahead, as dd, cp and sleuthkit read; every
    # round is a fresh mount, so the cache starts cold.
    ("seq read 1M buffered", lambda p: fio(p, "seqreadbuf", "read", "1M", 1, extra=("--direct=0",)), False),
    ("rand read 4k x4 jobs", lambda p: fio(p, "randread", "randread", "4k", 4), False),
    ("seq write 1M (allocating)", lambda p: fio(p, "seqwrite", "write", "1M", 1), True),
    ("seq write 128k (allocating)", lambda p: fio(p, "seqwrite128", "write", "128k", 1), True),
    ("rand write 64k x4 jobs (allocating)", lambda p: fio(p, "randwrite64", "randwrite", "64k", 4, split=True), True),
    ("rand write 64k x1 job (allocating)", lambda p: fio(p, "randwrite64one", "randwrite", "64k", 1), True),
    ("rand overwrite 4k x4 jobs", lambda p: fio(p, "randover4", "randwrite", "4k", 4), True),
    ("dd 1M conv=fdatasync (buffered)", dd, True),
]


# Some VMs hand every freed guest page back to the hypervisor at once (free page reporting
# with no delay); each new page of a growing image then costs a host fault, and write rows
# swing 5x from run to run. While the bench runs, freed pages wait 60 s before being reported.
PAGE_REPORTING_DELAY = "/sys/module/page_reporting/parameters/min_free_ms"


def hold_freed_pages():
    try:
        with open(PAGE_REPORTING_DELAY) as f:
            old = f.read().strip()
        if old != "0":
            return None
        with open(PAGE_REPORTING_DELAY, "w") as f:
            f.write("60000")
        print(f"note: {PAGE_REPORTING_DELAY} 0 -> 60000 for the run (restored after)")
        return old
    except OSError:
        return None


def restore_freed_pages(old):
    if old is not None:
        with open(PAGE_REPORTING_DELAY, "w") as f:
            f.write(old)


def main():
    # Images live in the temp dir, on disk as users' images do (page cache warm, `sync` before
    # each run). BENCH_DIR=/dev/shm measures on tmpfs instead: there every new image page is a
    # fresh shmem allocation and write rows swing far more from run to run.
    where = os.environ.get("BENCH_DIR") or None
    work = tempfile.mkdtemp(prefix="rawmount-bench-", dir=where)
    print(f"images in {work}")
    rows = []
    cpu_rows = []
    old_delay = hold_freed_pages()
    try:
        for fmt in FORMATS:
            img = make_image(work, fmt)
            for title, run, writes in TESTS:
                if ONLY and ONLY not in title:
                    continue
                if fmt in READ_ONLY and writes or fmt in COMPRESSED and "rand" not in title and title != "seq read 1M":
                    continue  # compressed images: random reads and one sequential row
                if fmt in BITMAPS and not writes:
                    continue  # bitmaps change only what a write costs
                if title in QCOW2_ONLY and fmt not in ("qcow2", "qcow2-bitmaps"):
                    continue
                others = peers(fmt, writes) + ([PlainFileServer] if title.startswith("dd") else [])
                results = {server.name: [] for server in [RawmountServer] + others}
                # Allocating writes: one unmeasured round first, so neither server pays for
                # memory the machine has not handed out yet.
                for r in range(-1 if writes else 0, WRITE_ROUNDS if writes else ROUNDS):
                    order = [RawmountServer] + others
                    if r % 2:
                        order.reverse()
                    for server in order:
                        target = empty_image(work, fmt, allocated="overwrite" in title) if writes else img
                        sh("sync")  # earlier runs' dirty pages must not be charged to this one
                        try:
                            with server(target, SUBFORMAT.get(fmt, (fmt, []))[0], work) as path:
                                got = run(path)[0]
                        except subprocess.CalledProcessError as e:
                            if server is RawmountServer:
                                raise
                            # A peer that fails a row (xmount under 4 parallel jobs) gets no value.
                            print(f"  {server.name} failed {title}: {(e.stderr or '').strip()[:200]}", flush=True)
                            others = [o for o in others if o is not server]
                            results.pop(server.name, None)
                            continue
                        if r >= 0:
                            results[server.name].append(got)
                medians = {name: statistics.median(xs) for name, xs in results.items() if xs}
                ours = medians.pop(RawmountServer.name)
                rows.append((fmt, title, ours, medians))
                spread = lambda xs: "/".join(f"{x/1e6:.0f}" for x in xs)
                line = f"{fmt:6} {title:28} rawmount {ours/1e6:9.1f} MB/s"
                for name, theirs in medians.items():
                    line += f"   {name} {theirs/1e6:9.1f} MB/s  ratio {ours/theirs:5.2f}x ({spread(results[name])})"
                print(line + f"   (rawmount runs: {spread(results[RawmountServer.name])})", flush=True)
            if fmt in EWF:
                cpu_rows.append((fmt, {server.name: cpu_per_gib(server, img, fmt, work) for server in [RawmountServer] + peers(fmt, False)}))
    finally:
        restore_freed_pages(old_delay)
        subprocess.run(["rm", "-rf", work])
    if os.environ.get("BENCH_WRITEBACK") == "1":
        print()
        print("| format | test | rawmount MB/s | rawmount, write-back off MB/s | cost of the 1 s write-back |")
        print("|---|---|---|---|---|")
        for fmt, title, ours, medians in rows:
            if RawmountNoWriteBack.name in medians:
                off = medians[RawmountNoWriteBack.name]
                print(f"| {fmt} | {title} | {ours/1e6:.1f} | {off/1e6:.1f} | {100 * (off - ours) / off:+.1f}% |")
    print()
    print(f"| format | test | rawmount MB/s | qemu-storage-daemon MB/s | ratio | libyal (vmdkmount/qcowmount/ewfmount) or plain file MB/s | ratio | xmount MB/s | ratio |  (median of {ROUNDS} reads, {WRITE_ROUNDS} writes; reads: {SIZE_MB} MiB image, writes: {WRITE_MB} MiB)")
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt, title, ours, medians in rows:
        cells = []
        for names in ((QsdServer.name,), (VmdkmountServer.name, QcowmountServer.name, EwfmountServer.name, PlainFileServer.name), (XmountServer.name,)):
            theirs = next((medians[n] for n in names if n in medians), None)
            cells += [f"{theirs/1e6:.1f}", f"{ours/theirs:.2f}x"] if theirs else ["—", "—"]
        print(f"| {fmt} | {title} | {ours/1e6:.1f} | " + " | ".join(cells) + " |")

    if cpu_rows:
        print()
        print("| format | server CPU seconds per GiB read sequentially (user+sys, one dd of the whole disk) |")
        print("|---|---|")
        for fmt, cpu in cpu_rows:
            print(f"| {fmt} | " + ", ".join(f"{name} {sec:.2f} s" for name, sec in cpu.items()) + " |")


def cpu_per_gib(server, img, fmt, work):
    """CPU seconds (user+sys) the server process spends per GiB of one sequential read of the
    whole disk through the page cache (what inflating and checking costs)."""
    with server(img, SUBFORMAT.get(fmt, (fmt, []))[0], work) as path:
        mnt = os.path.dirname(path)
        pid = next(int(p) for p in sh("pgrep", "-f", mnt).stdout.split())
        def cpu():
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        before = cpu()
        sh("dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none")
        used = cpu() - before
        size = os.path.getsize(path)
    return used / (size / (1 << 30))


if __name__ == "__main__":
    sys.exit(main())
