#!/usr/bin/env python3
"""Crash harness: kill -9 the rawmount server under a writer that records which writes a
completed fsync covered, then ask the peers what is left.

Each round: create an image with qemu-img, mount it writable, write whole 64 KiB regions
(each with its own version pattern) from a writer thread, fsync every few writes, and kill
the server with SIGKILL at a random moment (some VDI rounds pause the server between the
header and the map write of a flush, so the kill lands there). Then:
  1. qemu-img check right after the crash: clean, leaks only, or corrupt;
  2. every region a completed fsync covered still holds that version or a later one;
  3. a writable remount (which repairs) and unmount; qemu-img check must then be 0 or 3;
  4. a qemu-io write to a fresh area must not change any other region.
Prints one row per format (and --json for the test suite).

  python3 scripts/crash.py [--rounds N] [--formats qed,vdi,vmdk,raw] [--seed S] [--json]
"""
import argparse, json, os, random, shutil, signal, struct, subprocess, sys, tempfile, threading, time

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


def pid_file(mnt):
    d = "/run/rawmount" if os.getuid() == 0 else f"/tmp/rawmount-{os.getuid()}"
    return os.path.join(d, mnt.replace("%", "%25").replace("/", "%2F") + ".pid")


def qemu_check(fmt, img):
    if fmt == "raw":
        return "clean"
    r = run(["qemu-img", "check", "-f", fmt, img], check=False)
    return {0: "clean", 3: "leaks"}.get(r.returncode, "corrupt")


def qemu_raw(fmt, img, out):
    run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", img, out])
    with open(out, "rb") as f:
        return f.read()


def versions_on_disk(data, regions):
    found = {}
    for r in regions:
        chunk = data[r * REGION:(r + 1) * REGION]
        if chunk == bytes(REGION):
            found[r] = 0
            continue
        reg, ver = struct.unpack("<QQ", chunk[:16])
        found[r] = ver if reg == r and chunk == pattern(r, ver) else -1
    return found


def one_round(fmt, rng, work):
    img = os.path.join(work, f"c.{fmt}")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    if os.path.exists(img):
        os.unlink(img)
    run(["qemu-img", "create", "-q", "-f", fmt, img, str(SIZE)])
    env = dict(os.environ)
    paused = fmt == "vdi" and rng.random() < 0.3
    if paused:
        env["RAWMOUNT_TEST_VDI_PAUSE_AFTER_HEADER_US"] = "3000000"
    run([RAWMOUNT, "mount", img, mnt], env=env)
    raw = os.path.join(mnt, "c.raw")
    with open(pid_file(os.path.realpath(mnt))) as f:
        pid = int(f.read().strip())

    regions = list(range(SIZE // REGION - 16))   # the last 16 regions are for the QEMU write
    committed = {}          # region -> version a completed fsync covered
    attempted = {}          # region -> versions written since (may or may not have landed)
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

    result = {"after_crash": qemu_check(fmt, img)}
    data = qemu_raw(fmt, img, os.path.join(work, "out.raw"))
    on_disk = versions_on_disk(data, regions)
    lost = 0
    for r in regions:
        v = on_disk[r]
        want = committed.get(r, 0)
        allowed = {want} | {a for a in attempted.get(r, []) if a > want}
        if v not in allowed:
            lost += 1
    result["fsynced_lost"] = lost
    # A writable remount repairs what the crash left; then the peers must agree.
    run([RAWMOUNT, "mount", img, mnt])
    run([RAWMOUNT, "unmount", mnt])
    result["after_repair"] = qemu_check(fmt, img)
    before = qemu_raw(fmt, img, os.path.join(work, "out.raw"))
    fresh = (SIZE // REGION - 8) * REGION
    run(["qemu-io", "-f", fmt, "-c", f"write -P 0x5c {fresh} {REGION}", img])
    after = qemu_raw(fmt, img, os.path.join(work, "out.raw"))
    result["disturbed"] = int(before[:fresh] != after[:fresh] or before[fresh + REGION:] != after[fresh + REGION:])
    result["final"] = qemu_check(fmt, img)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--formats", default="raw,qed,vdi,vmdk")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    table = {}
    for fmt in args.formats.split(","):
        row = {"rounds": 0, "clean": 0, "leaks_only": 0, "corrupt": 0, "corrupt_after_repair": 0,
               "fsynced_lost": 0, "disturbed_by_qemu": 0}
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
        table[fmt] = row
    if args.json:
        print(json.dumps({"seed": args.seed, "table": table}))
    else:
        print(f"seed {args.seed}")
        print("| format | rounds | clean | leaks only | corrupt after crash | corrupt after repair | fsync'd writes lost | disturbed by a QEMU write |")
        print("|---|---|---|---|---|---|---|---|")
        for fmt, r in table.items():
            print(f"| {fmt} | {r['rounds']} | {r['clean']} | {r['leaks_only']} | {r['corrupt']} | "
                  f"{r['corrupt_after_repair']} | {r['fsynced_lost']} | {r['disturbed_by_qemu']} |")


if __name__ == "__main__":
    main()
