import Foundation
import TestSupport
import XCTest

/// qcow2 images made by qemu-img, read through a read-only mount and compared with
/// `qemu-img convert -O raw`; the image must not change (writing: QCOW2WriteTests).
final class QCOW2Tests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    /// Random data in a few places, zero writes, a discard and a compressed cluster.
    func populate(_ img: String, size: Int) throws {
        try Harness.run(["qemu-io", "-f", "qcow2",
                         "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 \(size / 2 + 4096) 12k",
                         "-c", "write -z 64k 128k", "-c", "write -P 0x33 \(size - 8192) 8k",
                         "-c", "discard 512k 64k", img])
    }

    func assertReadsLikeQemu(_ s: Scratch, _ img: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let sha = try Files.sha(img)
        try Harness.run([Harness.rawmount, "mount", "-r", img, s.mnt])
        let name = (img as NSString).lastPathComponent.split(separator: ".")[0]
        let raw = s.mnt + "/\(name).raw"
        XCTAssertEqual(open(raw, O_WRONLY), -1, what, file: file, line: line)
        XCTAssertTrue(try Files.read(raw) == (try s.qemuRaw(img)), "\(what): differs from qemu-img convert", file: file, line: line)
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), sha, "\(what): the image changed", file: file, line: line)
    }

    func testImagesFromQemuImgReadIdenticalAndStayUntouched() throws {
        let s = try Scratch()
        let size = 24 << 20
        for options in ["compat=0.10", "compat=1.1", "cluster_size=512", "cluster_size=2M",
                        "extended_l2=on,cluster_size=32k", "refcount_bits=1,lazy_refcounts=on"] {
            let img = s.path("v.qcow2")
            try? FileManager.default.removeItem(atPath: img)
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, img, "\(size)"])
            try populate(img, size: size)
            try assertReadsLikeQemu(s, img, options)
        }
        // Compressed clusters (deflate and zstd), 4 KiB and 64 KiB clusters, from a source
        // that is part random, part compressible.
        let src = s.path("src.raw")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(src)", "bs=1M", "count=3", "status=none"])
        try Harness.run(["truncate", "-s", "8M", src])
        try Harness.run(["sh", "-c", "yes rawmount | head -c 2000000 | dd of=\(src) bs=1M seek=5 conv=notrunc status=none"])
        for cs in ["4096", "65536"] {
            for type in ["zlib", "zstd"] {
                let img = s.path("c\(cs)\(type).qcow2")
                try Harness.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=\(cs),compression_type=\(type)", src, img])
                try assertReadsLikeQemu(s, img, "\(type)-compressed, \(cs)-byte clusters")
                XCTAssertTrue(try Files.read(img).count < 4 << 20, "the compressible part was not compressed")
            }
        }
    }

    /// A deflate stream that goes on past the cluster (another writer's, or a damaged one):
    /// QEMU takes the first cluster of it, and so must rawmount, whose fast one-pass inflate
    /// refuses such a stream and has to hand it to zlib.
    func testCompressedStreamLongerThanItsClusterReadsAsQemuReadsIt() throws {
        let s = try Scratch()
        let src = s.path("a.raw"), img = s.path("long.qcow2")
        try Harness.run(["sh", "-c", "head -c 65536 /dev/zero | tr '\\0' A > \(src)"])
        try Harness.run(["qemu-img", "convert", "-c", "-O", "qcow2", src, img])
        // Replace the cluster's stream with one that inflates to 70000 bytes of 'B'.
        try Harness.run(["python3", "-c", """
            import struct, sys, zlib
            f = open(sys.argv[1], 'r+b'); h = f.read(72)
            bits = struct.unpack('>I', h[20:24])[0]; l1 = struct.unpack('>Q', h[40:48])[0]
            f.seek(l1); l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
            f.seek(l2); e = struct.unpack('>Q', f.read(8))[0]
            assert e >> 62 == 1, hex(e)
            x = 62 - (bits - 8); host = e & ((1 << x) - 1); room = ((e >> x) & ((1 << (bits - 8)) - 1)) * 512 + 512 - host % 512
            c = zlib.compressobj(9, zlib.DEFLATED, -12); stream = c.compress(b'B' * 70000) + c.flush()
            assert len(stream) <= room, (len(stream), room)
            f.seek(host); f.write(stream)
            """, img])
        XCTAssertEqual(try s.qemuRaw(img), Data(repeating: 0x42, count: 65536), "QEMU no longer truncates the stream")
        try assertReadsLikeQemu(s, img, "a stream longer than its cluster")
    }

    /// Small reads of compressed clusters whose streams are Huffman-coded (compressible
    /// data), as random 4 KiB readers make them: a first read in a cluster's first half is
    /// inflated only up to what it needs (zlib stops there), a later one in the same cluster
    /// inflates it whole. Every piece equals QEMU's bytes, for qcow2 deflate clusters and
    /// streamOptimized VMDK grains.
    func testSmallReadsOfCodedCompressedClustersMatchQemu() throws {
        let s = try Scratch()
        let src = s.path("text.raw")
        // Seeded text: words from a small vocabulary, so deflate codes it (no stored blocks).
        try Harness.run(["python3", "-c", """
            import random, sys
            r = random.Random(14); words = [''.join(r.choice('abcdefghijklmnop') for _ in range(r.randint(2, 9))) for _ in range(500)]
            out = bytearray()
            while len(out) < 4 << 20: out += (' '.join(r.choice(words) for _ in range(12)) + '\\n').encode()
            open(sys.argv[1], 'wb').write(out[:4 << 20])
            """, src])
        for (format, options) in [("qcow2", ["-c"]), ("vmdk", ["-o", "subformat=streamOptimized"])] {
            let img = s.path("text.\(format)")
            try Harness.run(["qemu-img", "convert", "-O", format] + options + [src, img])
            XCTAssertLessThan(try Files.read(img).count, 3 << 20, "\(format): the text was not compressed")
            let want = try s.qemuRaw(img)
            try Harness.run([Harness.rawmount, "mount", "-r", img, s.mnt])
            let fd = open(s.mnt + "/text.raw", O_RDONLY)
            XCTAssertGreaterThanOrEqual(fd, 0)
            var rng = SeededRandom(seed: 14)
            for k in 0 ..< 400 {
                // Half the reads start in a cluster's first half; sizes 512 B to 8 KiB.
                let cluster = Int(rng.next() % UInt64(want.count >> 16))
                let inCluster = Int(rng.next() % (k % 2 == 0 ? 32768 : 65536)) & ~511
                let length = [512, 4096, 8192][Int(rng.next() % 3)]
                let at = min(cluster << 16 + inCluster, want.count - length)
                var buf = [UInt8](repeating: 0, count: length)
                XCTAssertEqual(pread(fd, &buf, length, off_t(at)), length, "\(format) at \(at)")
                XCTAssertTrue(buf.elementsEqual(want[at ..< at + length]), "\(format): \(length) bytes at \(at) differ from qemu-img convert")
            }
            close(fd)
            try s.unmount()
        }
    }

    /// A snapshot, a dirty bitmap, and writes after the snapshot: the active disk is shown,
    /// and `info` says what else the image holds.
    func testSnapshotsAndBitmapsAreLeftAlone() throws {
        let s = try Scratch()
        let img = s.path("snap.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 5 0 2M", img])
        try Harness.run(["qemu-img", "snapshot", "-c", "before", img])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 6 1M 2M", img])
        try Harness.run(["qemu-img", "bitmap", "--add", "--granularity", "65536", img, "bm0"])
        try assertReadsLikeQemu(s, img, "snapshot and bitmap")
        let info = try Harness.run([Harness.rawmount, "info", img]).out
        XCTAssertTrue(info.contains("format: qcow2") && info.contains("internal snapshots: 1") && info.contains("dirty bitmaps"), info)
        try Harness.run(["qemu-img", "check", img])
    }

    /// `mount --snapshot ID|NAME` shows an internal snapshot as `qemu-img convert -l` does (at
    /// the image's current size); a damaged snapshot table fails only that, naming the file.
    func testInternalSnapshotsMountByIdOrName() throws {
        let s = try Scratch()
        let img = s.path("hist.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 3M", img])
        try Harness.run(["qemu-img", "snapshot", "-c", "first", img])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 3M", "-c", "write -z 6M 1M", img])
        try Harness.run(["qemu-img", "snapshot", "-c", "second", img])
        try Harness.run(["qemu-img", "resize", "-q", img, "12M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 9M 1M", img])
        let sha = try Files.sha(img)
        let info = try Harness.run([Harness.rawmount, "info", img]).out
        XCTAssertTrue(info.contains("snapshot 1: first, 8.0 MiB") && info.contains("snapshot 2: second"), info)
        for (key, param) in [("first", "snapshot.name=first"), ("2", "snapshot.id=2")] {
            let oracle = s.path("oracle.raw")
            try Harness.run(["qemu-img", "convert", "-l", param, "-O", "raw", img, oracle])
            try s.mount(img, options: ["--snapshot", key])
            let view = try Files.read(s.mnt + "/hist.raw")
            XCTAssertEqual(view.count, 12 << 20, "snapshot \(key): the image's current size, as qemu-img shows it")
            XCTAssertTrue(view == (try Files.read(oracle)), "snapshot \(key) differs from qemu-img convert -l \(param)")
            XCTAssertEqual(open(s.mnt + "/hist.raw", O_WRONLY), -1, "a snapshot is read-only")
            try s.unmount()
        }
        try s.mount(img, options: ["-r"])
        XCTAssertTrue(try Files.read(s.mnt + "/hist.raw") == (try s.qemuRaw(img)), "the active disk")
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), sha, "the image changed")
        try s.assertMountRefused(["--snapshot", "third", img], mentions: ["hist.qcow2", "third", "1 (first), 2 (second)"], "unknown snapshot")
        var d = try Files.read(img)
        d.replaceSubrange(60..<64, with: [0, 0x10, 0, 0])  // nb_snapshots 1048576
        try d.write(to: URL(fileURLWithPath: s.path("bad.qcow2")))
        try s.assertMountRefused(["--snapshot", "first", s.path("bad.qcow2")], mentions: ["bad.qcow2", "snapshot"], "huge snapshot count")
        let badInfo = try Harness.run([Harness.rawmount, "info", s.path("bad.qcow2")]).out
        XCTAssertTrue(badInfo.contains("snapshot table: unreadable"), badInfo)
    }

    /// qcow2 in backing chains, both ways: qcow2 (extended L2, subcluster writes) over raw,
    /// QED over qcow2 over QED.
    func testBackingChains() throws {
        let s = try Scratch()
        let base = s.path("base.raw")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(base)", "bs=1M", "count=8", "status=none"])
        let sub = s.path("sub.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                         "-o", "extended_l2=on,cluster_size=64k", sub, "12M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 4k 2k", "-c", "write -z 10k 2k",
                         "-c", "write -P 0x42 70k 1k", "-c", "discard 128k 64k", sub])
        try assertReadsLikeQemu(s, sub, "extended L2 over raw")
        let mid = s.path("mid.qed"), q = s.path("q.qcow2"), top = s.path("top.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", mid, "8M"])
        try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P 1 1M 1M", mid])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qed", "-F", "qed", q])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 1536k 1M", q])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-b", "q.qcow2", "-F", "qcow2", top])
        try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P 3 2M 1M", top])
        try s.mount(top, options: ["-r"])
        XCTAssertTrue(try Files.read(s.mnt + "/top.raw") == (try s.qemuRaw(top)), "QED over qcow2 over QED over raw")
        try s.unmount()
    }

    /// What rawmount cannot read is refused by name, not shown wrongly, by `mount` and `check`.
    func testUnsupportedFeaturesAreNamed() throws {
        let s = try Scratch()
        let ext = s.path("ext.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=\(s.path("ext.data"))", ext, "1M"])
        try s.assertMountRefused(["-r", ext], mentions: ["ext.qcow2", "external data file"], "data file")
        var d = try Files.read(s.path("ext.qcow2"))
        d.replaceSubrange(72..<80, with: le(1 << 40, 8).reversed())  // unknown incompatible bit 40
        try d.write(to: URL(fileURLWithPath: s.path("bit.qcow2")))
        try s.assertMountRefused(["-r", s.path("bit.qcow2")], mentions: ["bit.qcow2", "feature bit 40"], "unknown bit")
        let check = try Harness.run([Harness.rawmount, "check", ext], check: false)
        XCTAssertEqual(check.status, 1)
        XCTAssertTrue(check.err.contains("ext.qcow2") && check.err.contains("external data file"), check.err)
    }

    func testDamagedImagesFailCleanly() throws {
        let s = try Scratch()
        let img = s.path("good.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "8M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", "-c", "write -P 8 4M 64k", img])
        let bytes = try Files.read(img)
        func be(_ v: UInt64, _ n: Int) -> [UInt8] { le(v, n).reversed() }
        let damages: [(String, Int, [UInt8], String)] = [
            ("version4", 4, be(4, 4), "version 4"),
            ("bits8", 20, be(8, 4), "cluster bits"),
            ("bits22", 20, be(22, 4), "cluster bits"),
            ("crypt", 32, be(1, 4), "encrypted"),
            ("l1small", 36, be(0, 4), "L1 size"),
            ("l1huge", 36, be(0x0800_0000, 4), "L1 size"),
            ("l1odd", 40, be(4096 + 8, 8), "L1 table offset"),
            ("l1past", 40, be(1 << 40, 8), "truncated"),
            ("sizeodd", 24, be(8 << 20 | 1, 8), "size"),
            ("hdrlen", 100, be(100, 4), "header length"),
            ("backing", 8, be(4000, 8) + be(2000, 4), "backing file name"),
            ("refcount", 96, be(7, 4), "refcount order"),
        ]
        try s.assertDamagedCopiesRefused(bytes, ext: "qcow2", mountOptions: ["-r"], damages)
        // An L2 entry with an unaligned data offset: that cluster fails with EIO, others read.
        let l1 = Int(bytes[40...47].reduce(0) { $0 << 8 | UInt64($1) })
        let l2 = Int(bytes[l1...(l1 + 7)].reduce(0) { $0 << 8 | UInt64($1) } & 0x00FF_FFFF_FFFF_FE00)
        var d = bytes
        d.replaceSubrange(l2..<(l2 + 8), with: be(0x8000_0000_0000_0000 | 0x1_0200, 8))
        try s.assertDamageIsLocal(d, name: "unaligned.qcow2", bad: 0, good: 4 << 20)
    }
}
