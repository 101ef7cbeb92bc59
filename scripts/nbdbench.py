#!/usr/bin/env python3
"""`rawmount serve` (nbdkit + rawmount's plugin) against `qemu-nbd` on the same image over
a Unix socket (issue 17), read through fio's nbd engine (libnbd), alternating the two
servers; medians of NBD_ROUNDS runs. Rows: sequential 1M reads and random 4k reads with 4
jobs (one connection each) for qcow2, VMDK, VDI and a compressed qcow2.

  python3 scripts/nbdbench.py        (make bench runs it)
  NBD_MB=1024 NBD_ROUNDS=3 NBD_RUNTIME=5 NBD_FORMATS=qcow2,vmdk
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import sh  # noqa: E402

RAWMOUNT = os.environ.get("RAWMOUNT", os.path.join(os.path.dirname(__file__), "..", ".build", "release", "rawmount"))
MB = int(os.environ.get("NBD_MB", "1024"))
ROUNDS = int(os.environ.get("NBD_ROUNDS", "3"))
RUNTIME = int(os.environ.get("NBD_RUNTIME", "5"))
FORMATS = os.environ.get("NBD_FORMATS", "qcow2,vmdk,vdi,qcow2-c").split(",")


def wait_for(path, proc):
    for _ in range(1000):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.returncode}")
        time.sleep(0.01)
    raise RuntimeError(f"{path} never appeared")


class Server:
    def __init__(self, kind, image, fmt, work):
        self.kind, self.image, self.fmt = kind, image, fmt
        self.sock = os.path.join(work, f"{kind}.sock")

    def __enter__(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        if self.kind == "rawmount":
            args = [RAWMOUNT, "serve", "--read-only", "--unix", self.sock, self.image]
        else:  # four connections share it, as with nbdkit
            args = ["qemu-nbd", "-r", "-f", self.fmt, "-e", "8", "-t", "-k", self.sock, self.image]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self.sock, self.proc)
        time.sleep(0.2)
        return f"nbd+unix:///?socket={self.sock}"

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def fio(uri, name, rw, bs, jobs):
    args = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--numjobs={jobs}", "--iodepth=1", "--group_reporting", "--output-format=json", "--gtod_reduce=1",
            f"--size={MB}M", f"--runtime={RUNTIME}", "--time_based"]
    text = sh(*args).stdout
    out = json.loads(text[text.index("{"):])  # the nbd engine prints "connected" first
    return out["jobs"][0]["read"]["bw_bytes"]


ROWS = [("seq read 1M", lambda u: fio(u, "seq", "read", "1M", 1)),
        ("rand read 4k x4 jobs", lambda u: fio(u, "rand", "randread", "4k", 4))]


def main():
    work = tempfile.mkdtemp(prefix="rawmount-nbdbench-", dir=os.environ.get("BENCH_DIR"))
    data = os.path.join(work, "data.raw")
    sh("dd", "if=/dev/urandom", f"of={data}", "bs=1M", f"count={MB}", "status=none")
    print(f"| format | test | rawmount serve MB/s | qemu-nbd MB/s | ratio |  (median of {ROUNDS}; {MB} MiB image, Unix socket, fio nbd engine)")
    print("|---|---|---|---|---|")
    for name in FORMATS:
        fmt = "qcow2" if name.startswith("qcow2") else name
        img = os.path.join(work, f"img.{name}")
        sh("qemu-img", "convert", *(["-c"] if name == "qcow2-c" else []), "-O", fmt, data, img)
        for row, run in ROWS:
            ours, theirs = [], []
            for _ in range(ROUNDS):
                for kind, results in (("rawmount", ours), ("qemu-nbd", theirs)):
                    with Server(kind, img, fmt, work) as uri:
                        results.append(run(uri) / 1e6)
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"| {name} | {row} | {a:.1f} | {b:.1f} | {a / b:.2f}x |", flush=True)
        os.unlink(img)
    sh("rm", "-rf", work)


if __name__ == "__main__":
    main()
