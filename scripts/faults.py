#!/usr/bin/env python3
"""Host fault campaign: the host fails the Nth write, fdatasync or fallocate of the image
(counted across all the server's threads; RAWMOUNT_TEST_FAULT, see
Sources/BlockEngine/HostFaults.swift) with EIO, ENOSPC or a write that stops half way,
for N over the whole workload, under a writer that records which writes a completed fsync
covered. Each round:
  1. the fault fires (the server says so in a report file) and reaches the writer (a failed
     write, fsync or punch) or `rawmount unmount` (exit 1 naming it);
  2. once an fsync failed, the next one fails too (sticky flush errors);
  3. qemu-img check right after the unmount: clean, leaks only, or corrupt;
  4. every region a completed fsync covered still holds that version or a later one;
  5. a writable remount (which repairs what the failure left) and unmount: qemu-img check 0 or 3;
  6. qcow2: the internal snapshot still reads as taken.
Formats: qcow2 (an internal snapshot and two bitmaps), qed, vdi, vmdk, vpc (VHD: checked by
`rawmount check`, as qemu-img has no check for it), vhdx, raw, and an --overlay
(qcow2 over read-only raw evidence). Prints one row per format (--json for the test suite).

  python3 scripts/faults.py [--rounds N] [--formats ...] [--seed S] [--json]
"""
import argparse, os, random, shutil, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from crash import REGION, RAWMOUNT, run, pattern, punch, qemu_check, qemu_raw, versions_on_disk, qemu_raw_snapshot, print_table  # noqa: E402

SIZE = 16 << 20
REGIONS = SIZE // REGION
KINDS = [("all", "eio"), ("write", "enospc"), ("write", "short"), ("sync", "eio"), ("fallocate", "eio"), ("all", "eio:from")]


def prepare(fmt, work):
    """The image to mount, the format qemu-img reads it as, and extra mount arguments."""
    if fmt == "overlay":
        evidence = os.path.join(work, "evidence.raw")
        with open(evidence, "wb") as f:
            for r in range(REGIONS):
                f.write(pattern(r, 0) if r % 3 == 0 else bytes(REGION))
        os.chmod(evidence, 0o444)
        overlay = os.path.join(work, "c.qcow2")
        return evidence, overlay, "qcow2", ["--overlay", overlay]
    img = os.path.join(work, f"c.{fmt}")
    run(["qemu-img", "create", "-q", "-f", fmt, img, str(SIZE)])
    if fmt == "qcow2":
        # Regions shared with an internal snapshot (writes copy them) and two bitmaps.
        run(["qemu-io", "-f", "qcow2"] + sum((["-c", f"write -P {r % 250 + 1} {r * REGION} {REGION}"] for r in range(0, REGIONS, 2)), []) + [img])
        run(["qemu-img", "snapshot", "-c", "before", img])
        run(["qemu-img", "bitmap", "--add", "-g", "4k", img, "b0"])
        run(["qemu-img", "bitmap", "--add", "--disable", img, "b1"])
    return img, img, fmt, []


def workload(raw, rng, steps):
    """Writes, punches and fsyncs from one seeded plan; stops at the first error. Returns
    what a completed fsync covered, what was attempted since, the punched versions, the
    first error, and whether an fsync after a failed one failed too."""
    committed, attempted, zeroed, pending = {}, {}, set(), {}
    version, error, later_sync_failed, step = 0, None, None, "write"
    fd = os.open(raw, os.O_WRONLY)
    try:
        for _ in range(steps):
            for _ in range(rng.randint(1, 6)):
                r = rng.randrange(REGIONS)
                version += 1
                attempted.setdefault(r, []).append(version)
                pending[r] = version
                if rng.random() < 0.15:
                    zeroed.add(version)
                    step = "punch"
                    if not punch(fd, r * REGION, REGION):
                        raise OSError("punch failed")
                else:
                    step = "write"
                    os.pwrite(fd, pattern(r, version), r * REGION)
            step = "fsync"
            os.fsync(fd)
            committed.update(pending)
            pending.clear()
    except OSError as e:
        error = f"{step}: {e.strerror or e}"
        try:
            os.fsync(fd)
            later_sync_failed = False
        except OSError:
            later_sync_failed = True
    finally:
        try:
            os.close(fd)
        except OSError as e:
            error = error or f"close: {e.strerror}"
    return committed, attempted, zeroed, error, later_sync_failed


def one_round(fmt, n, kind, seed, work, calibrate=False):
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    source, img, qfmt, extra = prepare(fmt, work)
    snapshot = qemu_raw_snapshot(img, os.path.join(work, "snap.raw")) if fmt == "qcow2" else None
    report = os.path.join(work, "fault-report")
    ops, errkind = kind
    env = dict(os.environ, RAWMOUNT_TEST_FAULT=f"{ops}:{0 if calibrate else n}:{errkind}", RAWMOUNT_TEST_FAULT_REPORT=report)
    m = run([RAWMOUNT, "mount"] + extra + [source, mnt], check=False, env=env)
    result = {"fired": False, "reported": True, "mount_refused": False, "sticky_ok": True, "ops": {}}
    if m.returncode != 0:
        # The fault hit the open (a dirty bit, a bitmap flag): refused with a message, nothing mounted.
        result["mount_refused"] = True
        result["reported"] = "rawmount:" in m.stderr
        committed, attempted, zeroed, error = {}, {}, set(), m.stderr
    else:
        raw = os.path.join(mnt, sorted(f for f in os.listdir(mnt) if "-p" not in f and ".dirty-" not in f)[0])
        committed, attempted, zeroed, error, later = workload(raw, random.Random(seed), 12)
        u = run([RAWMOUNT, "unmount", mnt], check=False)
        # A failed fsync (or a write acknowledged earlier that failed) makes every later one
        # fail; a failed punch or synchronous write alone need not.
        if later is False and error.startswith("fsync"):
            result["sticky_ok"] = False
        result["writer_error"] = error
        result["unmount_error"] = u.returncode != 0
    text = open(report).read() if os.path.exists(report) else ""
    for line in text.splitlines():
        if line.startswith("ops "):
            result["ops"] = {k: int(v) for k, v in (w.split("=") for w in line.split()[1:])}
    result["fired"] = "test fault:" in text
    if result["fired"] and m.returncode == 0:
        # A failed background reservation (fallocate ahead of the frontier) harms nothing and
        # need not be reported; every other fault must reach the writer or unmount.
        harmless = "fallocate" in text and not error and not result["unmount_error"]
        result["reported"] = bool(error) or result["unmount_error"] or harmless
    result["after_fault"] = qemu_check(qfmt, img) if os.path.exists(img) else "clean"
    lost = 0
    if os.path.exists(img):
        data = qemu_raw(qfmt, img, os.path.join(work, "out.raw"))
        on_disk = versions_on_disk(data, range(REGIONS))
        for r in range(REGIONS):
            if r not in attempted:
                continue
            want = committed.get(r)
            if want is None:
                continue  # never covered by a completed fsync: anything it held may be there
            allowed = {want} | {a for a in attempted[r] if a > want}
            allowed = {0 if a in zeroed else a for a in allowed}
            if not on_disk[r] <= allowed:
                lost += 1
                if os.environ.get("FAULT_DEBUG"):
                    print(f"{fmt} N={n} {kind} region {r}: on disk {on_disk[r]}, fsync'd {want}, attempted {attempted[r][-4:]}", file=sys.stderr)
    result["fsynced_lost"] = lost
    # The writable remount repairs what the failure left; then the peers must agree.
    r2 = run([RAWMOUNT, "mount"] + extra + [source, mnt], check=False)
    if r2.returncode == 0:
        run([RAWMOUNT, "unmount", mnt], check=False)
    result["after_repair"] = qemu_check(qfmt, img) if os.path.exists(img) else "clean"
    result["snapshot_changed"] = int(snapshot is not None and qemu_raw_snapshot(img, os.path.join(work, "snap.raw")) != snapshot)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40, help="fault points per format (spread over the workload)")
    ap.add_argument("--formats", default="qcow2,qed,vdi,vmdk,vpc,vhdx,raw,overlay")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    table = {}
    for fmt in args.formats.split(","):
        row = {"rounds": 0, "fired": 0, "clean": 0, "leaks_only": 0, "corrupt": 0, "corrupt_after_repair": 0,
               "fsynced_lost": 0, "unreported": 0, "flush_after_failure_ok": 0, "snapshot_changed": 0, "ops": 0}
        # Calibrate: how many host operations the workload makes when nothing fails.
        work = tempfile.mkdtemp(prefix="rawmount-faults-")
        try:
            counts = one_round(fmt, 0, ("all", "eio"), args.seed, work, calibrate=True)["ops"]
        finally:
            subprocess.run(["umount", "-l", os.path.join(work, "mnt")], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
        row["ops"] = " / ".join(str(counts.get(k, 0)) for k in ("write", "sync", "fallocate"))
        done = set()
        for i in range(args.rounds):
            kind = KINDS[i % len(KINDS)]
            # N spread over the operations of the kinds this round fails.
            total = sum(counts.values()) if kind[0] == "all" else counts.get(kind[0], 0)
            n = 1 + (i * total) // args.rounds if total else 0
            if total == 0 or (kind, n) in done:
                continue
            done.add((kind, n))
            work = tempfile.mkdtemp(prefix="rawmount-faults-")
            try:
                r = one_round(fmt, n, kind, args.seed, work)
            finally:
                subprocess.run(["umount", "-l", os.path.join(work, "mnt")], capture_output=True)
                shutil.rmtree(work, ignore_errors=True)
            row["rounds"] += 1
            row["fired"] += int(r["fired"])
            row[{"clean": "clean", "leaks": "leaks_only", "corrupt": "corrupt"}[r["after_fault"]]] += 1
            row["corrupt_after_repair"] += int(r["after_repair"] == "corrupt")
            row["fsynced_lost"] += r["fsynced_lost"]
            row["unreported"] += int(r["fired"] and not r["reported"])
            row["flush_after_failure_ok"] += int(not r["sticky_ok"])
            row["snapshot_changed"] += r["snapshot_changed"]
            if os.environ.get("FAULT_DEBUG") and (r["after_fault"] == "corrupt" or r["after_repair"] == "corrupt" or r["fsynced_lost"] or not r["reported"] or not r["sticky_ok"]):
                print(f"{fmt} N={n} {kind}: {r}", file=sys.stderr)
        table[fmt] = row
    print_table(args.seed, table, [("host ops (write / sync / fallocate)", "ops"), ("rounds", "rounds"), ("fault fired", "fired"),
                                   ("clean", "clean"), ("leaks only", "leaks_only"), ("corrupt", "corrupt"),
                                   ("corrupt after repair", "corrupt_after_repair"), ("fsync'd regions lost", "fsynced_lost"),
                                   ("error not reported", "unreported"), ("fsync ok after a failed one", "flush_after_failure_ok"),
                                   ("snapshot changed", "snapshot_changed")], args.json)

if __name__ == "__main__":
    main()
