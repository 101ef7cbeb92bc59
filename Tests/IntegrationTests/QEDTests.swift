import Foundation
import XCTest
import TestSupport

/// QED through real mounts, with qemu-img/qemu-io as the oracle.
final class QEDTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    func populate(_ image: String, _ cmds: [String]) throws {
        try Harness.run(["qemu-io", "-f", "qed"] + cmds.flatMap { ["-c", $0] } + [image])
    }

    func testQemuMadeImagesReadIdentical() throws {
        let s = try Scratch()
        let base = s.path("base.raw")
        var rng = SeededRandom(seed: 7)
        XCTAssertTrue(FileManager.default.createFile(atPath: base, contents: Data(rng.bytes(5 << 20)))) // shorter than the child
        let qedBase = s.path("base.qed")
        try Harness.run(["qemu-img", "convert", "-O", "qed", base, qedBase])
        let cases: [(String, [String])] = [
            ("default.qed", ["-o", "cluster_size=65536"]),
            ("small.qed", ["-o", "cluster_size=4096,table_size=2"]),
            ("big.qed", ["-o", "cluster_size=1048576"]),
            ("rawback.qed", ["-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw"]),
            ("qedback.qed", ["-b", "base.qed", "-F", "qed"]),
        ]
        for (name, opts) in cases {
            let img = s.path(name)
            try Harness.run(["qemu-img", "create", "-q", "-f", "qed"] + opts + [img, "12M"])
            try populate(img, ["write -P 0x5a 4096 512", "write -P 0x11 1000k 300k", "write -z 2M 128k",
                               "write -P 0x77 6M 64k", "write -P 0x33 12582400 512"])
            try s.mount(img, options: ["--read-only"])
            let raw = s.mnt + "/" + name.replacingOccurrences(of: ".qed", with: ".raw")
            XCTAssertEqual(try Files.read(raw), try s.qemuRaw(img), name)
            try s.unmount()
        }
    }

    func testRandomWritesThroughMountAreCleanAndMatchShadow() throws {
        let s = try Scratch()
        let base = s.path("base.raw")
        var rng = SeededRandom(seed: 99)
        XCTAssertTrue(FileManager.default.createFile(atPath: base, contents: Data(rng.bytes(6 << 20))))
        for (name, opts) in [("plain.qed", ["-o", "cluster_size=4096"]),
                             ("child.qed", ["-o", "cluster_size=65536", "-b", "base.raw", "-F", "raw"])] {
            let img = s.path(name), shadow = s.path(name + ".shadow")
            try Harness.run(["qemu-img", "create", "-q", "-f", "qed"] + opts + [img, "16M"])
            try populate(img, ["write -P 0x42 3M 200k"])
            try s.qemuRaw(img).write(to: URL(fileURLWithPath: shadow))
            try s.mount(img)
            let raw = s.mnt + "/" + name.replacingOccurrences(of: ".qed", with: ".raw")
            let fd = open(raw, O_RDWR)
            XCTAssertGreaterThanOrEqual(fd, 0)
            for k in 0..<150 {
                let len = Int(rng.next() % 150_000) + 1
                let off = rng.next() % UInt64((16 << 20) - len)
                if k % 10 == 9 {
                    XCTAssertEqual(fallocate(fd, k % 20 == 9 ? 0x03 : 0x10, off_t(off), off_t(len)), 0, "zeroing")
                    try Files.pwrite(shadow, [UInt8](repeating: 0, count: len), at: off)
                } else {
                    let data = k % 7 == 0 ? [UInt8](repeating: 0, count: len) : rng.bytes(len)
                    var written = 0
                    data.withUnsafeBytes { written = pwrite(fd, $0.baseAddress, len, off_t(off)) }
                    XCTAssertEqual(written, len)
                    try Files.pwrite(shadow, data, at: off)
                }
            }
            XCTAssertEqual(fsync(fd), 0)
            close(fd)
            XCTAssertEqual(try Files.read(raw), try Files.read(shadow), "through the mount: \(name)")
            try s.unmount()
            let check = try Harness.run(["qemu-img", "check", img], check: false)
            XCTAssertEqual(check.status, 0, "\(name): \(check.out)\(check.err)")
            try Harness.run(["qemu-img", "compare", "-f", "qed", "-F", "raw", img, shadow])
            XCTAssertEqual(try Files.read(img)[16] & 0x02, 0, "NEED_CHECK cleared")
        }
    }

    func testFilesystemOnQED() throws {
        try Harness.tool("mkfs.ext4")
        let s = try Scratch()
        let img = s.path("fs.qed")
        try Harness.run([Harness.rawmount, "create", "-f", "qed", img, "64M"])
        try s.mount(img)
        let raw = s.mnt + "/fs.raw"
        try s.partitionFormatAndCheck(raw: raw, bytes: 3 << 20, fill: 0x61)
        try s.unmount()
        let check = try Harness.run(["qemu-img", "check", img], check: false)
        XCTAssertEqual(check.status, 0, check.out)
    }

    func testSeekDataHoleAgreesWithQemuImgMap() throws {
        let s = try Scratch()
        let base = s.path("b.raw")
        XCTAssertTrue(FileManager.default.createFile(atPath: base, contents: Data(repeating: 1, count: 1 << 20)))
        let img = s.path("m.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4096", "-b", "b.raw", "-F", "raw", img, "8M"])
        try populate(img, ["write -P 1 2M 64k", "write -z 512k 64k", "write -P 2 5M 4k"])
        let map = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "map", "--output=json", img]).out.utf8)) as! [[String: Any]]
        var expectData: [(UInt64, UInt64)] = []
        for e in map where (e["data"] as? Bool) == true {
            let start = (e["start"] as! NSNumber).uint64Value, len = (e["length"] as! NSNumber).uint64Value
            if let last = expectData.last, last.0 + last.1 == start { expectData[expectData.count - 1].1 += len } else { expectData.append((start, len)) }
        }
        try s.mount(img, options: ["--read-only"])
        let fd = open(s.mnt + "/m.raw", O_RDONLY)
        var got: [(UInt64, UInt64)] = []
        var pos: off_t = 0
        while true {
            let d = lseek(fd, pos, 3)
            if d < 0 { break }
            let h = lseek(fd, d, 4)
            got.append((UInt64(d), UInt64(h - d)))
            pos = h
        }
        close(fd)
        try s.unmount()
        XCTAssertEqual(got.map(\.0), expectData.map(\.0))
        XCTAssertEqual(got.map(\.1), expectData.map(\.1))
    }

    func testUncleanImageIsRepairedOnWritableOpenOnly() throws {
        let s = try Scratch()
        let img = s.path("crash.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "8M"])
        _ = try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P 1 0 64k", "-c", "abort", img], check: false)
        XCTAssertEqual(try Files.read(img)[16], 0x02, "qemu-io abort leaves NEED_CHECK")
        let before = try Files.sha(img)
        try s.mount(img, options: ["--read-only"])
        XCTAssertEqual(try Files.read(s.mnt + "/crash.raw").prefix(65536), Data(repeating: 1, count: 65536))
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), before, "read-only open changed the image")
        let r = try Harness.run([Harness.rawmount, "mount", img, s.mnt])
        XCTAssertTrue(r.err.contains("NEED_CHECK"), r.err)
        try s.unmount()
        XCTAssertEqual(try Files.read(img)[16], 0)
        XCTAssertEqual(try Harness.run(["qemu-img", "check", img], check: false).status, 0)
    }

    /// Like QEMU: NEED_CHECK is set before the first allocation and cleared after 5 idle
    /// seconds, so a mount killed while idle leaves a clean image with the data.
    func testIdleMountClearsNeedCheckAndSurvivesSigkill() throws {
        let s = try Scratch()
        let img = s.path("idle.qed")
        try Harness.run([Harness.rawmount, "create", "-f", "qed", img, "16M"])
        try s.mount(img)
        try Files.pwrite(s.mnt + "/idle.raw", [UInt8](repeating: 0x6B, count: 300_000), at: 1_000_000)
        XCTAssertEqual(try Files.read(img)[16] & 0x02, 0x02, "NEED_CHECK set before the first allocation")
        var waited = 0
        while try Files.read(img)[16] & 0x02 != 0 && waited < 100 { usleep(100_000); waited += 1 }
        XCTAssertLessThan(waited, 100, "NEED_CHECK still set after 10 s idle")
        let pidFile = "/run/rawmount/" + s.mnt.replacingOccurrences(of: "%", with: "%25").replacingOccurrences(of: "/", with: "%2F") + ".pid"
        let pid = pid_t(try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))!
        XCTAssertEqual(kill(pid, SIGKILL), 0)
        for _ in 0..<500 {  // gone, or a zombie nobody has reaped yet
            let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
            if stat.isEmpty || stat.contains(") Z ") { break }
            usleep(10_000)
        }
        // The user's way out of a dead mount: `rawmount unmount` still works and says what happened.
        let u = try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertTrue(u.err.contains("had already exited"), u.err)
        XCTAssertFalse(FileManager.default.fileExists(atPath: pidFile), "stale pid file removed")
        XCTAssertFalse(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status == 0)
        try Harness.run(["qemu-img", "check", img])
        let r = try Harness.run(["qemu-io", "-f", "qed", "-c", "read -P 0x6b 1000000 300000", img])
        XCTAssertFalse(r.out.contains("Pattern verification failed"), r.out)
    }

    /// The other direction of the lock test: an image QEMU has open for writing is refused,
    /// read-only too (as QEMU's own readers refuse it), and nothing gets mounted, unless the
    /// user asks for a read-only look anyway with --force-share (qemu-img's -U).
    func testImageInUseByQemuIsRefused() throws {
        try Harness.tool("qemu-storage-daemon")
        let s = try Scratch()
        let img = s.path("busy.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "8M"])
        try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P 0x3c 1M 1M", img])
        let target = s.path("qsd-target")
        XCTAssertTrue(FileManager.default.createFile(atPath: target, contents: nil))
        let qsd = Process()
        qsd.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        qsd.arguments = ["qemu-storage-daemon",
                         "--blockdev", "driver=file,node-name=file,filename=\(img)",
                         "--blockdev", "driver=qed,node-name=fmt,file=file",
                         "--export", "type=fuse,id=exp,node-name=fmt,mountpoint=\(target),writable=on"]
        qsd.standardOutput = FileHandle.nullDevice
        qsd.standardError = FileHandle.nullDevice
        try qsd.run()
        defer { qsd.terminate(); qsd.waitUntilExit() }
        var waited = 0
        while try Harness.run(["mountpoint", "-q", target], check: false).status != 0 && waited < 500 {
            usleep(10_000); waited += 1
        }
        XCTAssertLessThan(waited, 500, "qemu-storage-daemon did not export the image")
        for extra in [[], ["--read-only"]] {
            try s.assertMountRefused(extra + [img], status: nil, mentions: ["busy.qed", "in use"],
                                     "an image QEMU has open for writing (\(extra))")
        }
        // Asking for it: --force-share reads it anyway, read-only only.
        try s.assertMountRefused(["--force-share", img], status: nil, mentions: ["--read-only"], "--force-share without -r")
        let before = try Files.sha(img)
        try s.mount(img, options: ["-r", "-U"])
        let shown = try Files.read(s.mnt + "/busy.raw")
        XCTAssertEqual(shown.count, 8 << 20)
        XCTAssertTrue(shown.subdata(in: 1 << 20 ..< 2 << 20) == Data(repeating: 0x3C, count: 1 << 20))
        XCTAssertTrue(shown.prefix(1 << 20) == Data(count: 1 << 20))
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), before, "a force-shared read-only mount changed the image")
        qsd.terminate()
        qsd.waitUntilExit()
        try s.mount(img)
        try s.unmount()
    }

    /// A missing backing file or extent file is the referring image's problem: the message
    /// names that image and the name it looked for, and nothing is mounted.
    func testMissingReferencedFilesAreNamed() throws {
        let s = try Scratch()
        let child = s.path("child.qed"), base = s.path("gone.raw")
        try Harness.run(["truncate", "-s", "4M", base])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-b", "gone.raw", "-F", "raw", child, "4M"])
        let flat = s.path("flat.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", flat, "4M"])
        try FileManager.default.removeItem(atPath: base)
        try FileManager.default.removeItem(atPath: s.path("flat-flat.vmdk"))
        for (image, missing) in [(child, "gone.raw"), (flat, "flat-flat.vmdk")] {
            try s.assertMountRefused(["-r", image], mentions: [image + ":", "'\(missing)' not found"], missing)
        }
    }

    /// A symlinked image finds its backing file next to the link, as qemu-img does (the
    /// target's folder holds a different base here).
    func testSymlinkedImageFindsBackingNextToTheLink() throws {
        let s = try Scratch()
        for (dir, pattern) in [("a", "0xaa"), ("b", "0xbb")] {
            try FileManager.default.createDirectory(atPath: s.path(dir), withIntermediateDirectories: true)
            try Harness.run(["qemu-img", "create", "-q", "-f", "qed", s.path("\(dir)/base.qed"), "1M"])
            try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P \(pattern) 0 64k", s.path("\(dir)/base.qed")])
        }
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", s.path("a/child.qed")])
        try FileManager.default.createSymbolicLink(atPath: s.path("b/link.qed"), withDestinationPath: "../a/child.qed")
        let link = s.path("b/link.qed")
        try s.mount(link, options: ["-r"])
        let view = try Files.read(s.mnt + "/link.raw")
        XCTAssertTrue(view == (try s.qemuRaw(link)), "differs from qemu-img convert of the link")
        XCTAssertEqual(view.first, 0xBB, "the backing file next to the link")
        try s.unmount()
    }

    func testCreateAndCheckCommands() throws {
        let s = try Scratch()
        let base = s.path("b.qed"), child = s.path("c.qed")
        try Harness.run([Harness.rawmount, "create", "-f", "qed", "--cluster-size", "4096", "--table-size", "2", base, "10M"])
        try Harness.run([Harness.rawmount, "create", "-f", "qed", "--backing", "b.qed", "--backing-format", "qed", child, "10M"])
        let info = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "info", "--output=json", child]).out.utf8)) as! [String: Any]
        XCTAssertEqual((info["virtual-size"] as! NSNumber).intValue, 10 << 20)
        XCTAssertEqual(info["backing-filename"] as? String, "b.qed")
        try Harness.run(["qemu-img", "check", base])
        try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P 9 1M 8k", base])
        try s.mount(child)
        XCTAssertEqual(try Files.read(s.mnt + "/c.raw").subdata(in: (1 << 20)..<((1 << 20) + 8192)), Data(repeating: 9, count: 8192))
        try Files.pwrite(s.mnt + "/c.raw", [7, 7, 7], at: 5000)
        try s.unmount()
        XCTAssertEqual(try Harness.run([Harness.rawmount, "check", child]).status, 0)
        try Harness.run(["qemu-img", "check", child])
        // As with qemu-img: without SIZE the backing image's size is used, and a backing
        // file that cannot be opened is an error, not an image that fails at mount.
        let sized = s.path("sized.qed")
        try Harness.run([Harness.rawmount, "create", "-f", "qed", "--backing", "c.qed", sized])
        let sizedInfo = try Harness.run(["qemu-img", "info", "--output=json", sized]).out
        XCTAssertTrue(sizedInfo.contains("\"virtual-size\": \(10 << 20)"), sizedInfo)
        let typo = try Harness.run([Harness.rawmount, "create", "-f", "qed", "--backing", "c.qde", s.path("typo.qed")], check: false)
        XCTAssertEqual(typo.status, 1)
        XCTAssertTrue(typo.err.contains("c.qde") && typo.err.contains("not found"), typo.err)
        XCTAssertFalse(FileManager.default.fileExists(atPath: s.path("typo.qed")))
        // table_size=1 is valid QED (QEMU 7.2 refuses to open it): write and read back.
        let t1 = s.path("t1.qed")
        try Harness.run([Harness.rawmount, "create", "-f", "qed", "--table-size", "1", "--cluster-size", "4096", t1, "2M"])
        try s.mount(t1)
        try Files.pwrite(s.mnt + "/t1.raw", [UInt8](repeating: 0xEE, count: 10_000), at: 1_000_000)
        try s.unmount()
        try s.mount(t1, options: ["--read-only"])
        XCTAssertEqual(try Files.read(s.mnt + "/t1.raw").subdata(in: 1_000_000..<1_010_000), Data(repeating: 0xEE, count: 10_000))
        try s.unmount()
    }

    /// Damaged headers and tables: a clear error naming the file, or zeros; never a crash or hang.
    func testDamagedImagesFailCleanly() throws {
        let s = try Scratch()
        let good = s.path("good.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4096", good, "8M"])
        try populate(good, ["write -P 3 0 8k"])
        let bytes = try Files.read(good)
        let damages: [(String, Int, [UInt8], String)] = [
            ("magic", 0, [0x51, 0x45, 0x44, 0x01], "magic"),
            ("cluster0", 4, le(0, 4), "cluster_size"),
            ("cluster3000", 4, le(3000, 4), "cluster_size"),
            ("clusterhuge", 4, le(1 << 30, 4), "cluster_size"),
            ("table0", 8, le(0, 4), "table_size"),
            ("table32", 8, le(32, 4), "table_size"),
            ("feature", 16, le(0x80, 8), "feature"),
            ("l1unaligned", 40, le(4097, 8), "l1_table_offset"),
            ("l1past", 40, le(1 << 40, 8), "l1_table_offset"),
            ("l1header", 40, le(0, 8), "l1_table_offset"),
            ("size511", 48, le(511, 8), "image_size"),
            ("sizehuge", 48, le(1 << 62, 8), "image_size"),
            ("headerhuge", 12, le(0xFFFF_FFFF, 4), "header_size"),
            ("backingname", 16, le(1, 8) + le(0, 16) + le(4096, 8) + le(8 << 20, 8) + le(60, 4) + le(1000, 4), "backing"),
        ]
        try s.assertDamagedCopiesRefused(bytes, ext: "qed", mountOptions: ["-r", "--format", "qed"], damages)
        // Truncated: header cut short, and L1 cut off.
        for (name, len) in [("cut40", 40), ("cutl1", 4096 + 100)] {
            let p = s.path("\(name).qed")
            try bytes.prefix(len).write(to: URL(fileURLWithPath: p))
            let r = try Harness.run([Harness.rawmount, "info", "--format", "qed", p], check: false)
            XCTAssertEqual(r.status, 1, "\(name): \(r.out)")
            XCTAssertTrue(r.err.contains("\(name).qed"), r.err)
        }
        // Table entries pointing past the end, into the header, or at the L1 itself: the
        // image mounts, the bad range fails with EIO, and nothing hangs.
        let l1 = 4096
        let l2 = Int(le64(bytes, l1))
        for (name, where_, value) in [("l2past", l1, UInt64(1) << 40), ("l2self", l1, UInt64(l1)),
                                      ("datapast", l2, UInt64(1) << 40), ("datahdr", l2, 2), ("dataunaligned", l2, 4096 * 3 + 8)] {
            var d = bytes
            d.replaceSubrange(where_..<(where_ + 8), with: le(value, 8))
            let p = s.path("\(name).qed")
            try d.write(to: URL(fileURLWithPath: p))
            try s.mount(p, options: ["-r"])
            let fd = open(s.mnt + "/\(name).raw", O_RDONLY)
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = pread(fd, &buf, 4096, 0)
            if n < 0 {
                XCTAssertEqual(errno, EIO, name)
                // The server log says which request failed, in which image, and why.
                let log = (try? String(contentsOfFile: s.serverLog, encoding: .utf8)) ?? ""
                let line = log.split(separator: "\n").last { $0.contains("\(name).qed") } ?? ""
                XCTAssertTrue(line.contains("read ") && line.contains(" at 0: Input/output error"), "\(name): log line '\(line)'")
            } else if name != "l2self" { XCTFail("\(name): read \(n) bytes of a bad cluster") }
            if !name.hasPrefix("l2") { // a bad L1 entry takes its whole L2 range with it
                XCTAssertEqual(pread(fd, &buf, 4096, 7 << 20), 4096, "\(name): unaffected ranges still read")
            }
            close(fd)
            try s.unmount()
            // The checker finds it and repair makes qemu-img happy.
            let c = try Harness.run([Harness.rawmount, "check", p], check: false)
            XCTAssertEqual(c.status, 2, "\(name): \(c.out)")
            try Harness.run([Harness.rawmount, "check", "--repair", p], check: false)
            let q = try Harness.run(["qemu-img", "check", p], check: false)
            XCTAssertNotEqual(q.status, 2, "\(name) after repair: \(q.out)")
        }
    }

    func le64(_ d: Data, _ o: Int) -> UInt64 { le(d, at: o, 8) }
}
