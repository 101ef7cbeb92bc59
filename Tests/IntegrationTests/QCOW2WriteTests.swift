import Foundation
import TestSupport
import XCTest

/// qcow2 written through a real mount, with QEMU as the oracle: after every unmount
/// `qemu-img check` is clean (exit 0), `qemu-img compare` matches a shadow file written
/// the same way, and internal snapshots read as they did before.
final class QCOW2WriteTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    /// The same random writes, fsyncs, hole punches and zero ranges to the mounted raw file
    /// and to a plain shadow file.
    func writeBoth(_ raw: String, _ shadow: String, seed: UInt64, writes: Int = 200, file: StaticString = #filePath, line: UInt = #line) throws {
        var rng = SeededRandom(seed: seed)
        let f = open(raw, O_RDWR), g = open(shadow, O_RDWR)
        defer { close(f); close(g) }
        XCTAssertTrue(f >= 0 && g >= 0, "open \(raw): \(errno)", file: file, line: line)
        let size = UInt64(lseek(g, 0, SEEK_END))
        for i in 0..<writes {
            let n = [1, 512, 4096, 5000, 65536, 70000, 300_000][Int(rng.next() % 7)]
            let off = rng.next() % (size - UInt64(n))
            let bytes = rng.bytes(n)
            XCTAssertEqual(pwrite(f, bytes, n, off_t(off)), n, "write \(n) at \(off): \(errno)", file: file, line: line)
            XCTAssertEqual(pwrite(g, bytes, n, off_t(off)), n, file: file, line: line)
            if i % 40 == 0 { XCTAssertEqual(fsync(f), 0, file: file, line: line) }
            if i % 50 == 25 {
                let at = off_t(rng.next() % (size - (1 << 20))), len = off_t(1 + rng.next() % (1 << 20))
                let mode: Int32 = i % 100 == 25 ? 0x03 /* PUNCH_HOLE | KEEP_SIZE */ : 0x10 /* ZERO_RANGE */
                XCTAssertEqual(fallocate(f, mode, at, len), 0, "fallocate \(mode) at \(at)+\(len): \(errno)", file: file, line: line)
                XCTAssertEqual(fallocate(g, mode, at, len), 0, file: file, line: line)
            }
        }
    }

    func assertCleanAndEqual(_ img: String, _ shadow: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let check = try Harness.run(["qemu-img", "check", img], check: false)
        XCTAssertEqual(check.status, 0, "\(what): qemu-img check: \(check.out)\(check.err)", file: file, line: line)
        let cmp = try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, shadow], check: false)
        XCTAssertEqual(cmp.status, 0, "\(what): \(cmp.out)\(cmp.err)", file: file, line: line)
    }

    func snapshotRaw(_ s: Scratch, _ img: String, _ name: String) throws -> Data {
        let out = s.path("snap-\(UUID().uuidString.prefix(6)).raw")
        defer { try? FileManager.default.removeItem(atPath: out) }
        try Harness.run(["qemu-img", "convert", "-O", "raw", "-l", "snapshot.name=\(name)", img, out])
        return try Files.read(out)
    }

    /// Every layout qemu-img makes: both versions, 512 B and 2 MiB clusters, extended L2,
    /// every refcount width. Each image holds data, zero clusters and an internal snapshot
    /// (so writes copy shared clusters and L2 tables), then takes random writes, fsyncs,
    /// punched holes and zero ranges.
    func testWritesOnEveryLayoutCheckCleanAndMatchAShadow() throws {
        let s = try Scratch()
        for (n, options) in ["compat=0.10", "compat=1.1", "cluster_size=512", "cluster_size=2M", "extended_l2=on,cluster_size=64k",
                             "extended_l2=on,cluster_size=16k", "refcount_bits=1", "refcount_bits=2", "refcount_bits=4",
                             "refcount_bits=8", "refcount_bits=32", "refcount_bits=64", "cluster_size=4096,lazy_refcounts=on"].enumerated() {
            let img = s.path("l\(n).qcow2"), shadow = s.path("l\(n).shadow")
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, img, "24M"])
            try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -z 2M 256k",
                             "-c", "write -P 0x22 5M 300k", "-c", "write -P 0x33 9M 64k", img])
            // 1-bit refcounts cannot count a second owner: no snapshot there (QEMU refuses too).
            let snap = !options.contains("refcount_bits=1")
            if snap { try Harness.run(["qemu-img", "snapshot", "-c", "before", img]) }
            let before = snap ? try snapshotRaw(s, img, "before") : Data()
            try s.qemuRaw(img).write(to: URL(fileURLWithPath: shadow))
            try s.mount(img)
            try writeBoth(s.mnt + "/l\(n).raw", shadow, seed: UInt64(n))
            try s.unmount()
            try assertCleanAndEqual(img, shadow, options)
            if snap { XCTAssertTrue(try snapshotRaw(s, img, "before") == before, "\(options): the snapshot changed") }
        }
    }

    /// Overwriting compressed clusters (deflate, zstd) inflates, fills and frees the old
    /// range; writing over backing files of every format fills partial clusters from them
    /// and leaves the backing file untouched.
    func testCompressedClustersAndBackingChains() throws {
        let s = try Scratch()
        let src = s.path("src.raw")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(src)", "bs=1M", "count=3", "status=none"])
        try Harness.run(["truncate", "-s", "8M", src])
        try Harness.run(["sh", "-c", "yes rawmount | head -c 2000000 | dd of=\(src) bs=1M seek=5 conv=notrunc status=none"])
        for type in ["zlib", "zstd"] {
            for cs in ["4096", "65536"] {
                let img = s.path("c.qcow2"), shadow = s.path("c.shadow")
                try? FileManager.default.removeItem(atPath: img)
                try Harness.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=\(cs),compression_type=\(type)", src, img])
                try Files.read(src).write(to: URL(fileURLWithPath: shadow))
                try s.mount(img)
                try writeBoth(s.mnt + "/c.raw", shadow, seed: 7, writes: 60)
                try s.unmount()
                try assertCleanAndEqual(img, shadow, "\(type), \(cs)-byte clusters")
                let check = try Harness.run(["qemu-img", "check", img]).out
                XCTAssertTrue(check.contains("compressed clusters") && !check.contains(" 0.00% compressed"), "\(type): none stayed compressed: \(check)")
            }
        }
        for format in ["raw", "qcow2", "qed", "vmdk", "vdi"] {
            let base = s.path("base.\(format)"), top = s.path("top-\(format).qcow2"), shadow = s.path("top.shadow")
            try Harness.run(["qemu-img", "create", "-q", "-f", format, base, "16M"])
            try Harness.run(["qemu-io", "-f", format, "-c", "write -P 0x5a 0 16M", base])
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", format, top])
            let sha = try Files.sha(base)
            try s.qemuRaw(top).write(to: URL(fileURLWithPath: shadow))
            try s.mount(top)
            try writeBoth(s.mnt + "/top-\(format).raw", shadow, seed: 11, writes: 80)
            try s.unmount()
            try assertCleanAndEqual(top, shadow, "over \(format)")
            XCTAssertEqual(try Files.sha(base), sha, "the \(format) backing file changed")
        }
    }

    /// 512-byte clusters filled with data: the refcount table must grow (it moves to a new,
    /// self-describing area and the header follows) and the image still checks clean.
    func testRefcountTableGrowsOnSmallClusters() throws {
        let s = try Scratch()
        for bits in ["16", "64"] {
            let img = s.path("g\(bits).qcow2"), shadow = s.path("g.shadow")
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=\(bits)", img, "40M"])
            let tableBefore = try Files.read(img).subdata(in: 48..<60)
            try Harness.run(["dd", "if=/dev/urandom", "of=\(shadow)", "bs=1M", "count=40", "status=none"])
            try s.mount(img)
            try Harness.run(["dd", "if=\(shadow)", "of=\(s.mnt)/g\(bits).raw", "bs=1M", "conv=notrunc,fsync", "status=none"])
            try s.unmount()
            XCTAssertNotEqual(try Files.read(img).subdata(in: 48..<60), tableBefore, "\(bits)-bit: the refcount table did not grow")
            try assertCleanAndEqual(img, shadow, "512-byte clusters, \(bits)-bit refcounts")
        }
    }

    /// Extended L2: a small write into an unallocated subcluster allocates only that
    /// subcluster (the rest still reads from the backing file), and a second one in the same
    /// cluster lands in the same host cluster.
    func testSubclusterWritesAllocateOnlyTheirSubcluster() throws {
        let s = try Scratch()
        let base = s.path("b.raw"), img = s.path("x.qcow2"), shadow = s.path("x.shadow")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(base)", "bs=1M", "count=4", "status=none"])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", "-b", base, "-F", "raw", img])
        try Files.read(base).write(to: URL(fileURLWithPath: shadow))
        try s.mount(img)
        let sub = 2048
        for (at, n) in [(65536 + 3 * sub + 100, 700), (65536 + 9 * sub, 2 * sub + 5)] {
            let bytes = [UInt8](repeating: 0xC3, count: n)
            let f = open(s.mnt + "/x.raw", O_WRONLY)
            XCTAssertEqual(pwrite(f, bytes, n, off_t(at)), n)
            close(f)
            try Files.pwrite(shadow, bytes, at: UInt64(at))
        }
        try s.unmount()
        try assertCleanAndEqual(img, shadow, "subcluster writes")
        let map = try Harness.run(["qemu-img", "map", "--output=json", img]).out
        guard let rows = try JSONSerialization.jsonObject(with: Data(map.utf8)) as? [[String: Any]] else { XCTFail(map); return }
        let mine = rows.filter { ($0["depth"] as? Int) == 0 && ($0["data"] as? Bool) == true }
        let ranges = mine.map { (($0["start"] as? Int) ?? -1, ($0["length"] as? Int) ?? -1, ($0["offset"] as? Int) ?? -1) }
        XCTAssertEqual(ranges.map { [$0.0, $0.1] }, [[65536 + 3 * sub, sub], [65536 + 9 * sub, 3 * sub]], map)
        if ranges.count == 2 { XCTAssertEqual(ranges[1].2 - ranges[0].2, 6 * sub, "both subclusters are in one host cluster") }
    }

    /// PUNCH_HOLE frees clusters: after the fsync that makes the unlink durable their host
    /// range is punched, and new data reuses them instead of growing the file.
    func testDiscardedClustersArePunchedAndReused() throws {
        let s = try Scratch()
        let img = s.path("r.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"])
        try s.mount(img)
        let raw = s.mnt + "/r.raw"
        try Harness.run(["dd", "if=/dev/urandom", "of=\(raw)", "bs=1M", "count=8", "conv=notrunc,fsync", "status=none"])
        let grown = try Files.read(img).count
        let f = open(raw, O_RDWR)
        XCTAssertEqual(fallocate(f, 0x03, 0, 8 << 20), 0)
        XCTAssertEqual(fsync(f), 0)
        close(f)
        var st = stat()
        XCTAssertEqual(stat(img, &st), 0)
        XCTAssertLessThan(Int(st.st_blocks) * 512, 2 << 20, "the freed clusters were not punched")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(raw)", "bs=1M", "count=8", "seek=20", "conv=notrunc,fsync", "status=none"])
        XCTAssertEqual(try Files.read(img).count, grown, "new data did not reuse the freed clusters")
        XCTAssertEqual(try Files.read(raw).prefix(8 << 20), Data(count: 8 << 20))
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
    }

    /// Header features as QEMU treats them when opening for writing.
    func testHeaderFeaturesOnAWritableOpen() throws {
        let s = try Scratch()
        func be(_ v: UInt64, _ n: Int) -> [UInt8] { le(v, n).reversed() }
        // Corrupt (bit 1): refused writable with the reason; read-only works.
        let bad = s.path("corrupt.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", bad, "8M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", bad])
        try Files.pwrite(bad, be(2, 8), at: 72)
        try s.assertMountRefused([bad], mentions: ["corrupt.qcow2", "corrupt", "--read-only"], "corrupt bit")
        try s.mount(bad, options: ["-r"])
        XCTAssertEqual(try Files.read(s.mnt + "/corrupt.raw").prefix(65536), Data(repeating: 1, count: 65536))
        try s.unmount()

        // Dirty (bit 0) with stale refcounts, as a lazy-refcount crash leaves it: rebuilt on
        // open with a note, the bit cleared, and the image checks clean after writing.
        let dirty = s.path("dirty.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", dirty, "8M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 0 256k", "-c", "abort", dirty], check: false)
        XCTAssertEqual(try Files.read(dirty)[79] & 1, 1, "QEMU left the dirty bit")
        XCTAssertNotEqual(try Harness.run(["qemu-img", "check", "-r", "none", dirty], check: false).status, 0)
        let r = try Harness.run([Harness.rawmount, "mount", dirty, s.mnt])
        XCTAssertTrue(r.err.contains("dirty.qcow2") && r.err.contains("refcounts rebuilt"), r.err)
        try s.forgetMount(s.mnt)
        try Harness.run(["dd", "if=/dev/zero", "of=\(s.mnt)/dirty.raw", "bs=64k", "seek=8", "count=4", "conv=notrunc,fsync", "status=none"])
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertEqual(try Files.read(dirty)[79] & 1, 0)
        try Harness.run(["qemu-img", "check", dirty])
        XCTAssertEqual(try s.qemuRaw(dirty).prefix(262144), Data(repeating: 2, count: 262144))

        // Bitmaps and unknown autoclear bits: a writable mount keeps the bitmaps (autoclear
        // bit 0 stays, they are trusted again after the unmount) and clears unknown autoclear
        // bits; lazy_refcounts stays as it was.
        let bm = s.path("bm.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", bm, "8M"])
        try Harness.run(["qemu-img", "bitmap", "--add", bm, "b0"])
        var h = try Files.read(bm)
        XCTAssertEqual(h[95] & 1, 1)
        try Files.pwrite(bm, be(UInt64(h[95]) | 1 << 40, 8), at: 88)
        try s.mount(bm, options: ["-r"])
        try s.unmount()
        XCTAssertEqual(try Files.read(bm).subdata(in: 88..<96), Data(be(UInt64(h[95]) | 1 << 40, 8)), "a read-only mount changed the header")
        try Harness.run([Harness.rawmount, "mount", bm, s.mnt])
        XCTAssertTrue(try Harness.run(["qemu-img", "info", "-U", bm]).out.contains("in-use"), "not flagged in use while mounted")
        // As with qemu-img: refused while a writer holds it, with the way to look anyway;
        // -U looks (the writer's bitmap shows in use), and info takes -U too.
        let busy = try Harness.run([Harness.rawmount, "bitmap", "list", bm], check: false)
        XCTAssertEqual(busy.status, 1)
        XCTAssertTrue(busy.err.contains("in use") && busy.err.contains("-r -U"), busy.err)
        let shared = try Harness.run([Harness.rawmount, "bitmap", "list", "-U", bm])
        XCTAssertTrue(shared.out.contains("b0") && shared.out.contains("in-use"), shared.out)
        XCTAssertTrue(try Harness.run([Harness.rawmount, "info", "-U", bm]).out.contains("bitmap b0"))
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        h = try Files.read(bm)
        XCTAssertEqual(h.subdata(in: 88..<96), Data(be(1, 8)), "unknown autoclear bit not cleared")
        XCTAssertEqual(h[87] & 1, 1, "lazy_refcounts changed")
        let check = try Harness.run(["qemu-img", "check", bm], check: false)
        XCTAssertEqual(check.status, 0, check.out + check.err)
        let info = try Harness.run(["qemu-img", "info", bm]).out
        XCTAssertTrue(info.contains("auto") && !info.contains("in-use"), "the bitmap was not stored back: \(info)")
        // `rawmount info` lists the bitmaps with qemu-img's flag names.
        let ours = try Harness.run([Harness.rawmount, "info", "--json", bm]).out
        let fields = try JSONSerialization.jsonObject(with: Data(ours.utf8)) as? [String: Any]
        let listed = (fields?["bitmaps"] as? [[String: Any]])?.map {
            "\($0["name"] as? String ?? "?") \($0["granularity"] as? Int ?? 0) \(($0["flags"] as? [String] ?? []).joined(separator: ","))"
        }
        XCTAssertEqual(listed, ["b0 65536 auto"], ours)
    }

    /// `rawmount create -f qcow2` with every option: qemu-img accepts the result and reports
    /// what was asked for; it mounts, takes writes and still checks clean.
    func testCreateMakesImagesQemuAccepts() throws {
        let s = try Scratch()
        try Harness.run(["qemu-img", "create", "-q", "-f", "raw", s.path("base.raw"), "6M"])
        let cases: [([String], [String: String])] = [
            ([], ["cluster-size": "65536", "compat": "1.1", "refcount-bits": "16"]),
            (["--compat", "0.10"], ["compat": "0.10"]),
            (["--cluster-size", "512", "--refcount-bits", "64"], ["cluster-size": "512", "refcount-bits": "64"]),
            (["--cluster-size", "2M", "--refcount-bits", "1"], ["cluster-size": "2097152", "refcount-bits": "1"]),
            (["--extended-l2", "--cluster-size", "32k", "--lazy-refcounts"], ["extended-l2": "true", "lazy-refcounts": "true"]),
            (["--preallocation", "metadata", "--cluster-size", "4096"], ["cluster-size": "4096"]),
            (["--backing", "base.raw", "--backing-format", "raw"], ["backing-filename": "base.raw", "backing-filename-format": "raw"]),
        ]
        for (n, (args, want)) in cases.enumerated() {
            let img = s.path("n\(n).qcow2"), shadow = s.path("n.shadow")
            try Harness.run([Harness.rawmount, "create", "-f", "qcow2"] + args + [img] + (args.contains("--backing") ? [] : ["6M"]))
            try Harness.run(["qemu-img", "check", img])
            let info = try Harness.run(["qemu-img", "info", "--output=json", img]).out
            let flat = info.replacingOccurrences(of: " ", with: "").replacingOccurrences(of: "\n", with: "")
            for (k, v) in want {
                XCTAssertTrue(flat.contains("\"\(k)\":\(v)") || flat.contains("\"\(k)\":\"\(v)\""), "\(args): \(k) is not \(v): \(info)")
            }
            XCTAssertTrue(flat.contains("\"virtual-size\":6291456"), info)
            if args.contains("metadata") {
                let map = try Harness.run(["qemu-img", "map", "--output=json", img]).out
                XCTAssertTrue(map.contains("\"offset\""), "metadata preallocation maps every cluster: \(map)")
            }
            try s.qemuRaw(img).write(to: URL(fileURLWithPath: shadow))
            try s.mount(img)
            try writeBoth(s.mnt + "/n\(n).raw", shadow, seed: UInt64(100 + n), writes: 40)
            try s.unmount()
            try assertCleanAndEqual(img, shadow, "created with \(args)")
        }
        let refused = try Harness.run([Harness.rawmount, "create", "-f", "qcow2", "--compat", "0.10", "--refcount-bits", "8", s.path("bad.qcow2"), "1M"], check: false)
        XCTAssertEqual(refused.status, 1)
        XCTAssertTrue(refused.err.contains("bad.qcow2") && refused.err.contains("16-bit"), refused.err)
        XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("bad.qcow2")))
    }

    /// `rawmount check` finds what `qemu-img check` finds (leaks: exit 3; refcounts too low
    /// and wrong COPIED flags: exit 2), and `--repair` leaves an image qemu-img finds clean.
    func testCheckFindsAndRepairsRefcountDamage() throws {
        let s = try Scratch()
        let good = s.path("good.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", good, "8M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", "-c", "write -P 8 4M 64k", good])
        try Harness.run(["qemu-img", "snapshot", "-c", "s", good])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 8k", good])
        XCTAssertEqual(try Harness.run([Harness.rawmount, "check", good]).status, 0)
        let bytes = try Files.read(good)
        func be64(_ at: Int) -> UInt64 { bytes[at..<(at + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
        let table = Int(be64(48)), block = Int(be64(table))
        let l1 = Int(be64(40)), l2 = Int(be64(l1) & 0x00FF_FFFF_FFFF_FE00)
        func damaged(_ name: String, _ change: (inout Data) -> Void) throws -> String {
            var d = bytes
            change(&d)
            let p = s.path(name)
            try d.write(to: URL(fileURLWithPath: p))
            return p
        }
        let leak = try damaged("leak.qcow2") { $0[block + 1] = 2 }  // the header cluster counts 2
        let low = try damaged("low.qcow2") { $0[block + 2 * (l2 / 4096) + 1] = 0 }  // the L2 table counts 0
        let copied = try damaged("copied.qcow2") { $0[l2] ^= 0x80 }  // COPIED flipped on a data entry
        for (img, status) in [(leak, Int32(3)), (low, 2), (copied, 2)] {
            let ours = try Harness.run([Harness.rawmount, "check", img], check: false)
            let theirs = try Harness.run(["qemu-img", "check", img], check: false)
            XCTAssertEqual(ours.status, status, "\(img): \(ours.out)\(ours.err)")
            XCTAssertEqual(theirs.status, status, "qemu-img on \(img): \(theirs.out)")
            let fixed = try Harness.run([Harness.rawmount, "check", "--repair", img], check: false)
            XCTAssertEqual(fixed.status, 0, "\(img): \(fixed.out)\(fixed.err)")
            let after = try Harness.run(["qemu-img", "check", img], check: false)
            XCTAssertEqual(after.status, 0, "\(img) after repair: \(after.out)")
            XCTAssertTrue(try s.qemuRaw(img) == (try s.qemuRaw(good)), "\(img): repair changed the data")
        }
    }

    /// The usual tools on a mounted qcow2: sfdisk, mkfs.ext4 and e2fsck on a loop device.
    func testPartitionAndFileSystemOnAQcow2() throws {
        let s = try Scratch()
        let img = s.path("disk.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"])
        try s.mount(img)
        try s.partitionFormatAndCheck(raw: s.mnt + "/disk.raw", bytes: 8 << 20, fill: 0x6B)
        let mounted = try Files.read(s.mnt + "/disk.raw")
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
        XCTAssertTrue(try s.qemuRaw(img) == mounted, "what QEMU reads differs from what the mount showed")
    }
}
