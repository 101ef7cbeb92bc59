#!/usr/bin/env python3
"""`rawmount convert` against `qemu-img convert` on the same image (issue 16), alternating
them, medians of CONVERT_ROUNDS runs with a warm page cache. Both in their default cache
mode, unsafe (no fdatasync of the destination: qemu-img convert's default, and rawmount's).
`cp --sparse=always` of the raw output is printed next to them: the same bytes written by
the kernel's own copy to the same file system. Every result is compared with
`qemu-img compare` before it counts.

  python3 scripts/convertbench.py          (make bench runs it)
  CONVERT_MB=512 CONVERT_ROUNDS=3           data size and rounds
"""
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import sh  # noqa: E402

RAWMOUNT = os.environ.get("RAWMOUNT", os.path.join(os.path.dirname(__file__), "..", ".build", "release", "rawmount"))
MB = int(os.environ.get("CONVERT_MB", "512"))
ROUNDS = int(os.environ.get("CONVERT_ROUNDS", "3"))


def timed(args):
    start = time.monotonic()
    subprocess.run(args, check=True, capture_output=True)
    return time.monotonic() - start


def main():
    work = tempfile.mkdtemp(prefix="rawmount-convertbench-", dir=os.environ.get("BENCH_DIR"))
    src_raw = os.path.join(work, "src.raw")
    with open(src_raw, "wb") as f:  # 4 GiB disk: data in 8 runs, holes between
        f.truncate(4 << 30)
        for k in range(8):
            f.seek(k << 29)
            f.write(os.urandom(MB << 17))
    sources = []
    for fmt in ("qcow2", "vmdk", "vdi"):
        img = os.path.join(work, f"src.{fmt}")
        sh("qemu-img", "convert", "-O", fmt, src_raw, img)
        sources.append((fmt, img))
    print(f"| source | -O | rawmount convert MB/s | qemu-img convert MB/s | ratio | cp --sparse MB/s |  (median of {ROUNDS}; {MB} MiB of data in a 4 GiB disk)")
    print("|---|---|---|---|---|---|")
    data = MB << 20
    for fmt, img in sources:
        for out in ("qcow2", "raw", "vdi"):
            ours, theirs = [], []
            a_dst, b_dst = os.path.join(work, f"ours.{out}"), os.path.join(work, f"theirs.{out}")
            for r in range(ROUNDS + 1):  # round 0 warms the cache and is not counted
                for p in (a_dst, b_dst):
                    if os.path.exists(p):
                        os.unlink(p)
                t_ours = timed([RAWMOUNT, "convert", "-O", out, img, a_dst])
                t_theirs = timed(["qemu-img", "convert", "-O", out, img, b_dst])
                if r:
                    ours.append(data / t_ours / 1e6)
                    theirs.append(data / t_theirs / 1e6)
            sh("qemu-img", "compare", "-q", "-f", out, "-F", out, a_dst, b_dst)
            ceiling = ""
            if out == "raw":
                c = os.path.join(work, "cp.raw")
                cps = []
                for _ in range(ROUNDS):
                    if os.path.exists(c):
                        os.unlink(c)
                    cps.append(data / timed(["cp", "--sparse=always", b_dst, c]) / 1e6)
                ceiling = f"{statistics.median(cps):.1f}"
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"| {fmt} | {out} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {ceiling} |", flush=True)
    # compare: each source against the raw disk, and qcow2 against VMDK (identical disks:
    # every data byte is read and compared), alternating, as qemu-img compare.
    print()
    print(f"| compare | rawmount compare MB/s | qemu-img compare MB/s | ratio |  (median of {ROUNDS}; {MB} MiB of data in a 4 GiB disk)")
    print("|---|---|---|---|")
    pairs = [(img, src_raw) for _, img in sources] + [(sources[0][1], sources[1][1])]
    for a_img, b_img in pairs:
        ours, theirs = [], []
        for r in range(ROUNDS + 1):
            t_ours = timed([RAWMOUNT, "compare", "-q", a_img, b_img])
            t_theirs = timed(["qemu-img", "compare", "-q", a_img, b_img])
            if r:
                ours.append(data / t_ours / 1e6)
                theirs.append(data / t_theirs / 1e6)
        a, b = statistics.median(ours), statistics.median(theirs)
        name = f"{os.path.basename(a_img)} vs {os.path.basename(b_img)}"
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |", flush=True)
    # commit and rebase: a chain whose top changed a tenth of the data; each run on fresh
    # copies of the same chain, rawmount and qemu-img alternating.
    print()
    print(f"| verb | rawmount s | qemu-img s | ratio |  (median of {ROUNDS}; a 4 GiB qcow2 chain, {MB // 10} MiB changed in the top)")
    print("|---|---|---|---|")
    base = os.path.join(work, "base.qcow2")
    sh("qemu-img", "convert", "-O", "qcow2", src_raw, base)
    top0 = os.path.join(work, "top0.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top0)
    writes = []
    for k in range(MB // 10):
        writes += ["-c", f"write -P {k % 200 + 1} {(k * 37 % (4096 - 1)) << 20} 1M"]
    sh("qemu-io", "-f", "qcow2", *writes, top0)
    for verb, ours_args, theirs_args in (
            ("commit -d", lambda t: [RAWMOUNT, "commit", "-q", "-d", t], lambda t: ["qemu-img", "commit", "-q", "-d", t]),
            ("rebase -b \"\" (flatten)", lambda t: [RAWMOUNT, "rebase", "-b", "", t], lambda t: ["qemu-img", "rebase", "-b", "", t])):
        ours, theirs = [], []
        for r in range(ROUNDS):
            for who in ((0, 1) if r % 2 == 0 else (1, 0)):
                b, t = os.path.join(work, "base.qcow2.copy"), os.path.join(work, "top.qcow2")
                sh("cp", base, b); sh("cp", top0, t)
                sh("qemu-img", "rebase", "-u", "-b", "base.qcow2.copy", "-F", "qcow2", t)
                args = ours_args(t) if who == 0 else theirs_args(t)
                (ours if who == 0 else theirs).append(timed(args))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"| {verb} | {a:.2f} | {b:.2f} | {b / a:.2f}x faster |", flush=True)
    # Compressed output and internal snapshots: text-like data (deflates about 3:1) in a
    # 4 GiB qcow2; snapshot -c then -d of that image, each on a fresh copy.
    text = os.path.join(work, "text.qcow2")
    words = [bytes(random_word(k), "ascii") for k in range(4000)]
    rng = random.Random(7)
    raw = os.path.join(work, "text.raw")
    with open(raw, "wb") as f:
        f.truncate(4 << 30)
        for k in range(MB // 2):
            f.seek((k * 7 % 4000) << 20)
            f.write(b" ".join(rng.choice(words) for _ in range(200_000))[: 1 << 20])
    sh("qemu-img", "convert", "-O", "qcow2", raw, text)
    print()
    print(f"| verb | rawmount s | qemu-img s | ratio |  (median of {ROUNDS}; a 4 GiB qcow2 with {MB // 2} MiB of text-like data)")
    print("|---|---|---|---|")
    for verb, ours_args, theirs_args, out in (
            ("convert -c -O qcow2", lambda o: [RAWMOUNT, "convert", "-c", "-O", "qcow2", text, o],
             lambda o: ["qemu-img", "convert", "-c", "-O", "qcow2", text, o], "c.qcow2"),
            ("convert -O vmdk streamOptimized", lambda o: [RAWMOUNT, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", text, o],
             lambda o: ["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", text, o], "s.vmdk"),
            ("snapshot -c, then -d", lambda o: ["sh", "-c", f"cp {text} {o} && {RAWMOUNT} snapshot -c s {o} && {RAWMOUNT} snapshot -d s {o}"],
             lambda o: ["sh", "-c", f"cp {text} {o} && qemu-img snapshot -c s {o} && qemu-img snapshot -d s {o}"], "snap.qcow2")):
        ours, theirs, sizes = [], [], {}
        for r in range(ROUNDS):
            for who in ((0, 1) if r % 2 == 0 else (1, 0)):
                o = os.path.join(work, ("ours-" if who == 0 else "theirs-") + out)
                if os.path.exists(o):
                    os.unlink(o)
                (ours if who == 0 else theirs).append(timed(ours_args(o) if who == 0 else theirs_args(o)))
                sizes[who] = os.path.getsize(o)
                sh("qemu-img", "compare", "-q", o, text)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"| {verb} | {a:.2f} | {b:.2f} | {b / a:.2f}x faster | (files: {sizes[0] >> 20} / {sizes[1] >> 20} MiB)", flush=True)
    sh("rm", "-rf", work)


def random_word(k):
    rng = random.Random(k)
    return "".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rng.randint(2, 10)))


if __name__ == "__main__":
    main()
