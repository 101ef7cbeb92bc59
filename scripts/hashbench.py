#!/usr/bin/env python3
"""`rawmount hash` against coreutils on the same bytes (issue 15): sha256sum / md5sum of the
raw file `qemu-img convert -O raw` writes, next to rawmount hashing the image itself.
Rows: a raw image (the same file both read), a qcow2 of the same data, and a sparse qcow2
(8 GiB disk, 512 MiB of data). Medians of HASH_ROUNDS runs with a warm page cache.

  python3 scripts/hashbench.py        (make bench runs it)
  HASH_MB=256 HASH_ROUNDS=3           data size and rounds
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import sh  # noqa: E402

RAWMOUNT = os.environ.get("RAWMOUNT", os.path.join(os.path.dirname(__file__), "..", ".build", "release", "rawmount"))
MB = int(os.environ.get("HASH_MB", "1024"))
ROUNDS = int(os.environ.get("HASH_ROUNDS", "3"))


def timed(args):
    start = time.monotonic()
    out = subprocess.run(args, check=True, text=True, capture_output=True).stdout
    return time.monotonic() - start, out


def digest_of(out):
    return out.split()[-1] if "=" in out else out.split()[0]


def main():
    work = tempfile.mkdtemp(prefix="rawmount-hashbench-", dir=os.environ.get("BENCH_DIR"))
    data = os.path.join(work, "data.raw")
    sh("dd", "if=/dev/urandom", f"of={data}", "bs=1M", f"count={MB}", "status=none")
    qcow = os.path.join(work, "data.qcow2")
    sh("qemu-img", "convert", "-O", "qcow2", data, qcow)
    sparse_src = os.path.join(work, "sparse-src.raw")
    with open(sparse_src, "wb") as f:
        f.truncate(8 << 30)
        for k in range(8):  # 64 MiB of data every GiB
            f.seek(k << 30)
            f.write(os.urandom(64 << 20))
    sparse = os.path.join(work, "sparse.qcow2")
    sh("qemu-img", "convert", "-O", "qcow2", sparse_src, sparse)
    cases = [("raw image", data, data), ("qcow2", qcow, data), ("sparse qcow2 (8 GiB, 512 MiB data)", sparse, sparse_src)]
    print(f"| image | algorithm | rawmount hash MB/s | coreutils on qemu-img convert output MB/s | ratio |  (median of {ROUNDS}; {MB} MiB of data)")
    print("|---|---|---|---|---|")
    for name, image, converted in cases:
        size = os.path.getsize(converted)
        for algo, tool in (("sha256", "sha256sum"), ("md5", "md5sum")):
            ours, theirs = [], []
            timed([RAWMOUNT, "hash", "-a", algo, image])  # warm the page cache
            timed([tool, converted])
            for _ in range(ROUNDS):  # alternate them
                t, out = timed([RAWMOUNT, "hash", "-a", algo, image])
                ours.append(size / t / 1e6)
                mine = digest_of(out)
                t, out = timed([tool, converted])
                theirs.append(size / t / 1e6)
                assert mine == out.split()[0], f"{name} {algo}: {mine} != {out.split()[0]}"
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"| {name} | {algo} | {a:.1f} | {b:.1f} | {a / b:.2f}x |", flush=True)
    sh("rm", "-rf", work)


if __name__ == "__main__":
    main()
