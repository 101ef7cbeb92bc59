#!/usr/bin/env python3
"""Crash harness: kill -9 the rawmount server under a writer that records which writes a
completed fsync covered, then ask the peers what is left.

Each round: create an image with qemu-img, mount it writable, write whole 64 KiB regions
(each with its own version pattern) from a writer thread, fsync every few writes, and kill
the server with SIGKILL at a random moment (some VDI rounds pause the server between the
header and the map write of a flush, some qcow2 rounds between the two writes of each
ordering the crash rules need, some VHDX rounds between a durable log entry and the table
writes it carries, so the kill lands there). Then:
  1. qemu-img check right after the crash: clean, leaks only, or corrupt;
  2. every region a completed fsync covered still holds that version or a later one;
  3. a writable remount (which repairs) and unmount; qemu-img check must then be 0 or 3;
  4. a qemu-io write to a fresh area must not change any other region.
qcow2 rounds vary the layout (4 KiB and 512-byte clusters, whose refcount table must grow;
extended L2), sometimes take an internal snapshot of pre-written regions first (so writes
copy shared clusters and free them), and punch holes too; the snapshot must read as it
was taken.
Prints one row per format (and --json for the test suite).

  python3 scripts/crash.py [--rounds N] [--formats qcow2,qed,vdi,vmdk,vpc,vhdx,raw] [--seed S] [--json]
"""
import argparse, ctypes, json, os, random, shutil, signal, struct, subprocess, sys, tempfile, threading, time

REGION = 64 << 10
SIZE = 64 << 20
RAWMOUNT = os.environ.get("RAWMOUNT", os.path.join(os.path.dirname(__file__), "..", ".build", "debug", "rawmount"))


def run(args, check=True, env=None):
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr}{r.stdout}")
    return r


def pattern(region, version):
    head = struct.pack("<QQ", region, version)
    return (head * (REGION // len(head)))


LIBC = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def punch(fd, offset, length):
    return LIBC.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, ctypes.c_long(offset), ctypes.c_long(length)) == 0


QCOW2_LAYOUTS = ["cluster_size=65536", "cluster_size=4096", "cluster_size=512,refcount_bits=64",
                 "extended_l2=on,cluster_size=65536", "compat=0.10"]


def pid_file(mnt):
    d = "/run/rawmount" if os.getuid() == 0 else f"/tmp/rawmount-{os.getuid()}"
    return os.path.join(d, mnt.replace("%", "%25").replace("/", "%2F") + ".pid")


def qemu_check(fmt, img):
    if fmt == "raw":
        return "clean"
    # qemu-img has no check for VHD (vpc); rawmount's (same exit codes) looks at the table
    # and the footer, and the data is judged through qemu-img convert either way.
    tool = [RAWMOUNT, "check"] if fmt == "vpc" else ["qemu-img", "check", "-f", fmt]
    r = run(tool + [img], check=False)
    if fmt == "vhdx" and LOG_PENDING in r.stderr + r.stdout:
        # A log to replay: what a crashed QEMU leaves too; the next writable open replays
        # it. Counted with the leaks (repairable without losing anything).
        return "leaks"
    return {0: "clean", 3: "leaks"}.get(r.returncode, "corrupt")


LOG_PENDING = "contains a log that needs to be replayed"


def qemu_bitmaps(img):
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", img]).stdout)
    return info.get("format-specific", {}).get("data", {}).get("bitmaps", [])


def qemu_raw(fmt, img, out):
    r = run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", img, out], check=False)
    if r.returncode != 0 and LOG_PENDING in r.stderr:
        # QEMU reads such a VHDX only after replaying its log: replayed by QEMU on a copy.
        copy = out + ".replayed"
        shutil.copyfile(img, copy)
        run(["qemu-img", "check", "-r", "all", copy], check=False)
        run(["qemu-img", "convert", "-f", fmt, "-O", "raw", copy, out])
        os.unlink(copy)
    elif r.returncode != 0:
        raise RuntimeError(f"qemu-img convert {img}: exit {r.returncode}: {r.stderr}")
    with open(out, "rb") as f:
        return f.read()


def versions_on_disk(data, regions):
    """Per region, the set of versions its 512-byte sectors hold (0: zeros, -1: garbage).
    A write that was not fsync'd may be torn at sector granularity, so each sector is read
    on its own."""
    found = {}
    zero = bytes(512)
    for r in regions:
        chunk = data[r * REGION:(r + 1) * REGION]
        seen = set()
        for at in range(0, REGION, 512):
            sector = chunk[at:at + 512]
            if sector == zero:
                seen.add(0)
                continue
            reg, ver = struct.unpack("<QQ", sector[:16])
            seen.add(ver if reg == r and sector == sector[:16] * 32 else -1)
        found[r] = seen
    return found


def one_round(fmt, rng, work):
    img = os.path.join(work, f"c.{fmt}")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    if os.path.exists(img):
        os.unlink(img)
    options = ["-o", rng.choice(QCOW2_LAYOUTS)] if fmt == "qcow2" else []
    run(["qemu-img", "create", "-q", "-f", fmt] + options + [img, str(SIZE)])
    regions = list(range(SIZE // REGION - 16))   # the last 16 regions are for the QEMU write
    snapshot = None
    if fmt == "qcow2" and rng.random() < 0.5:
        # Regions written before an internal snapshot: later writes must copy them.
        run([RAWMOUNT, "mount", img, mnt])
        fd = os.open(os.path.join(mnt, "c.raw"), os.O_WRONLY)
        for r in regions[::2]:
            os.pwrite(fd, pattern(r, 0), r * REGION)
        os.close(fd)
        run([RAWMOUNT, "unmount", mnt])
        run(["qemu-img", "snapshot", "-c", "before", img])
        snapshot = qemu_raw_snapshot(img, os.path.join(work, "snap.raw"))
    # Persistent dirty bitmaps (qcow2 v3): a kill must leave every one flagged in use.
    bitmaps = fmt == "qcow2" and "compat=0.10" not in options[1:] and rng.random() < 0.5
    if bitmaps:
        run(["qemu-img", "bitmap", "--add", "-g", "4k", img, "b0"])
        run(["qemu-img", "bitmap", "--add", "--disable", img, "b1"])
    env = dict(os.environ)
    paused = fmt in ("vdi", "qcow2", "vhdx") and rng.random() < 0.3
    if paused and fmt == "vdi":
        env["RAWMOUNT_TEST_VDI_PAUSE_AFTER_HEADER_US"] = "3000000"
    if paused and fmt == "vhdx":
        # Between a durable log entry and the table sectors in place: the next writable open
        # (and QEMU's) must replay it.
        env["RAWMOUNT_TEST_VHDX_PAUSE_AFTER_LOG_US"] = "3000000"
    if paused and fmt == "qcow2":
        # Between a new L2 table and its L1 entry, an unlink and its refcount drop, a grown
        # refcount table and the header switch.
        env["RAWMOUNT_TEST_QCOW2_PAUSE_US"] = "3000000"
    run([RAWMOUNT, "mount", img, mnt], env=env)
    raw = os.path.join(mnt, "c.raw")
    with open(pid_file(os.path.realpath(mnt))) as f:
        pid = int(f.read().strip())

    committed = {}          # region -> version a completed fsync covered
    attempted = {}          # region -> versions written since (may or may not have landed)
    zeroed = set()          # versions that were hole punches (they read as zeros)
    stop = threading.Event()

    def writer():
        version = 0
        pending = {}
        fd = os.open(raw, os.O_WRONLY)
        try:
            while not stop.is_set():
                for _ in range(rng.randint(1, 24)):
                    r = rng.choice(regions)
                    version += 1
                    attempted.setdefault(r, []).append(version)
                    if fmt == "qcow2" and rng.random() < 0.1:
                        zeroed.add(version)
                        if not punch(fd, r * REGION, REGION):
                            raise OSError("punch")
                    else:
                        os.pwrite(fd, pattern(r, version), r * REGION)
                    pending[r] = version
                os.fsync(fd)
                committed.update(pending)
                pending.clear()
        except OSError:
            pass
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # the server is gone: the close reports it

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(rng.uniform(0.2, 2.0) + (1.0 if paused else 0))
    os.kill(pid, signal.SIGKILL)
    stop.set()
    t.join()
    run([RAWMOUNT, "unmount", mnt])

    result = {"after_crash": qemu_check(fmt, img), "bitmaps_trusted": 0, "with_bitmaps": int(bitmaps)}
    if bitmaps:
        result["bitmaps_trusted"] = sum("in-use" not in b.get("flags", []) for b in qemu_bitmaps(img))
    data = qemu_raw(fmt, img, os.path.join(work, "out.raw"))
    on_disk = versions_on_disk(data, regions)
    lost = 0
    for r in regions:
        v = on_disk[r]
        want = committed.get(r, 0)
        allowed = {want} | {a for a in attempted.get(r, []) if a > want}
        allowed = {0 if a in zeroed else a for a in allowed}
        if not v <= allowed:
            lost += 1
            if os.environ.get("CRASH_DEBUG"):
                print(f"{fmt} {options} snapshot={snapshot is not None} region {r}: on disk {v}, fsync'd {want}, "
                      f"attempted {attempted.get(r, [])[-5:]}, zeroed {[a for a in attempted.get(r, []) if a in zeroed]}", file=sys.stderr)
    result["fsynced_lost"] = lost
    # A writable remount repairs what the crash left; then the peers must agree.
    run([RAWMOUNT, "mount", img, mnt])
    run([RAWMOUNT, "unmount", mnt])
    result["after_repair"] = qemu_check(fmt, img)
    if bitmaps:  # a bitmap in use at open stays inconsistent
        result["bitmaps_trusted"] += sum("in-use" not in b.get("flags", []) for b in qemu_bitmaps(img))
    before = qemu_raw(fmt, img, os.path.join(work, "out.raw"))
    fresh = (SIZE // REGION - 8) * REGION
    run(["qemu-io", "-f", fmt, "-c", f"write -P 0x5c {fresh} {REGION}", img])
    after = qemu_raw(fmt, img, os.path.join(work, "out.raw"))
    result["disturbed"] = int(before[:fresh] != after[:fresh] or before[fresh + REGION:] != after[fresh + REGION:])
    result["final"] = qemu_check(fmt, img)
    result["snapshot_changed"] = int(snapshot is not None and qemu_raw_snapshot(img, os.path.join(work, "snap.raw")) != snapshot)
    return result


def print_table(seed, table, columns, as_json):
    """The campaign's table: JSON for the test suite, else markdown (`columns`: title, key)."""
    if as_json:
        print(json.dumps({"seed": seed, "table": table}))
        return
    print(f"seed {seed}")
    print("| format | " + " | ".join(title for title, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for fmt, r in table.items():
        print(f"| {fmt} | " + " | ".join(str(r[key]) for _, key in columns) + " |")


def qemu_raw_snapshot(img, out):
    run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=before", img, out])
    with open(out, "rb") as f:
        return f.read()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--formats", default="raw,qcow2,qed,vdi,vmdk,vpc,vhdx")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    table = {}
    for fmt in args.formats.split(","):
        row = {"rounds": 0, "clean": 0, "leaks_only": 0, "corrupt": 0, "corrupt_after_repair": 0,
               "fsynced_lost": 0, "disturbed_by_qemu": 0, "snapshot_changed": 0, "with_bitmaps": 0, "bitmaps_trusted": 0}
        for _ in range(args.rounds):
            work = tempfile.mkdtemp(prefix="rawmount-crash-")
            try:
                r = one_round(fmt, rng, work)
            finally:
                subprocess.run(["umount", "-l", os.path.join(work, "mnt")], capture_output=True)
                shutil.rmtree(work, ignore_errors=True)
            row["rounds"] += 1
            row[{"clean": "clean", "leaks": "leaks_only", "corrupt": "corrupt"}[r["after_crash"]]] += 1
            row["corrupt_after_repair"] += int(r["after_repair"] == "corrupt" or r["final"] == "corrupt")
            row["fsynced_lost"] += r["fsynced_lost"]
            row["disturbed_by_qemu"] += r["disturbed"]
            row["snapshot_changed"] += r["snapshot_changed"]
            row["bitmaps_trusted"] += r["bitmaps_trusted"]
            row["with_bitmaps"] += r["with_bitmaps"]
        table[fmt] = row
    print_table(args.seed, table, [("rounds", "rounds"), ("clean", "clean"), ("leaks only", "leaks_only"),
                                   ("corrupt after crash", "corrupt"), ("corrupt after repair", "corrupt_after_repair"),
                                   ("fsync'd writes lost", "fsynced_lost"), ("disturbed by a QEMU write", "disturbed_by_qemu"),
                                   ("snapshot changed", "snapshot_changed"), ("rounds with bitmaps", "with_bitmaps"),
                                   ("bitmaps trusted after a kill", "bitmaps_trusted")], args.json)


if __name__ == "__main__":
    main()
