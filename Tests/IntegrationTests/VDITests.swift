import Foundation
import XCTest
import TestSupport

/// VDI through real mounts, with qemu-img/qemu-io as the oracle.
final class VDITests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    func testDynamicAndStaticImagesReadIdentical() throws {
        let s = try Scratch()
        for (name, opts, size) in [("dyn.vdi", [String](), "20M"), ("static.vdi", ["-o", "static=on"], "6M"), ("odd.vdi", [], "3000000")] {
            let img = s.path(name)
            try Harness.run(["qemu-img", "create", "-q", "-f", "vdi"] + opts + [img, size])
            try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x77 1536k 4k", "-c", "write -P 0x12 2M 700k",
                             "-c", "write -P 0x9 0 512", img])
            try s.mount(img, options: ["-r"])
            XCTAssertEqual(try Files.read(s.mnt + "/" + name.replacingOccurrences(of: ".vdi", with: ".raw")), try s.qemuRaw(img), name)
            try s.unmount()
        }
    }

    func testRandomWritesAreCleanAndMatchShadow() throws {
        let s = try Scratch()
        var rng = SeededRandom(seed: 5)
        for (name, opts) in [("w.vdi", [String]()), ("ws.vdi", ["-o", "static=on"])] {
            let img = s.path(name), shadow = s.path(name + ".shadow")
            try Harness.run(["qemu-img", "create", "-q", "-f", "vdi"] + opts + [img, "12M"])
            try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x44 3M 1M", img])
            try s.qemuRaw(img).write(to: URL(fileURLWithPath: shadow))
            try s.mount(img)
            let raw = s.mnt + "/" + name.replacingOccurrences(of: ".vdi", with: ".raw")
            let fd = open(raw, O_RDWR)
            for k in 0..<120 {
                let len = Int(rng.next() % 300_000) + 1
                let off = rng.next() % UInt64((12 << 20) - len)
                if k % 10 == 9 {
                    XCTAssertEqual(fallocate(fd, k % 20 == 9 ? 0x03 : 0x10, off_t(off), off_t(len)), 0)
                    try Files.pwrite(shadow, [UInt8](repeating: 0, count: len), at: off)
                } else {
                    let data = rng.bytes(len)
                    XCTAssertEqual(data.withUnsafeBytes { pwrite(fd, $0.baseAddress, len, off_t(off)) }, len)
                    try Files.pwrite(shadow, data, at: off)
                }
            }
            // Punch the whole disk's last block and a middle one: reads zeros afterwards.
            XCTAssertEqual(fallocate(fd, 0x03, off_t(11 << 20), off_t(1 << 20)), 0)
            XCTAssertEqual(fallocate(fd, 0x03, off_t(3 << 20), off_t(1 << 20)), 0)
            try Files.pwrite(shadow, [UInt8](repeating: 0, count: 1 << 20), at: 11 << 20)
            try Files.pwrite(shadow, [UInt8](repeating: 0, count: 1 << 20), at: 3 << 20)
            close(fd)
            XCTAssertEqual(try Files.read(raw), try Files.read(shadow), name)
            try s.unmount()
            let check = try Harness.run(["qemu-img", "check", img], check: false)
            XCTAssertEqual(check.status, 0, "\(name): \(check.out)\(check.err)")
            try Harness.run(["qemu-img", "compare", "-f", "vdi", "-F", "raw", img, shadow])
            XCTAssertEqual(try Harness.run([Harness.rawmount, "check", img]).status, 0)
        }
    }

    func testFilesystemOnVDI() throws {
        let s = try Scratch()
        let img = s.path("fs.vdi")
        try Harness.run([Harness.rawmount, "create", "-f", "vdi", img, "64M"])
        try s.mount(img)
        let raw = s.mnt + "/fs.raw"
        try s.partitionFormatAndCheck(raw: raw, bytes: 5 << 20, fill: 0x62)
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
        let info = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "info", "--output=json", img]).out.utf8)) as! [String: Any]
        XCTAssertEqual((info["virtual-size"] as! NSNumber).intValue, 64 << 20)
    }

    /// A VirtualBox-style image: other header text, LCHS header size, data at 1 MiB, and
    /// block_extra bytes in front of every block; the map points out of order.
    func testVirtualBoxLayoutWithBlockExtra() throws {
        let s = try Scratch()
        let img = s.path("vbox.vdi")
        var h = [UInt8](repeating: 0, count: 512)
        func put32(_ o: Int, _ v: UInt32) { for k in 0..<4 { h[o + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) } }
        let text = Array("<<< Oracle VM VirtualBox Disk Image >>>\n".utf8)
        h.replaceSubrange(0..<text.count, with: text)
        put32(0x40, 0xBEDA107F); put32(0x44, 0x00010001); put32(0x48, 0x190); put32(0x4C, 1)
        put32(0x154, 0x200); put32(0x158, 0x100000); put32(0x168, 512)
        put32(0x170, 3 << 20); put32(0x178, 1 << 20); put32(0x17C, 512); put32(0x180, 3); put32(0x184, 2)
        h[0x188] = 0x11
        var file = Data(h)
        var map = [UInt8](repeating: 0, count: 512)
        for (i, v) in [UInt32(1), 0xFFFF_FFFF, 0].enumerated() { for k in 0..<4 { map[i * 4 + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) } }
        file.append(contentsOf: map)
        file.append(Data(count: 0x100000 - file.count))
        let stride = (1 << 20) + 512
        var blocks = Data(repeating: 0xEE, count: 2 * stride) // 0xEE marks the extra bytes
        blocks.replaceSubrange(512..<stride, with: Data(repeating: 0xB0, count: 1 << 20))          // index 0
        blocks.replaceSubrange((stride + 512)..<(2 * stride), with: Data(repeating: 0xA1, count: 1 << 20)) // index 1
        file.append(blocks)
        try file.write(to: URL(fileURLWithPath: img))
        try s.mount(img, options: ["-r"])
        let got = try Files.read(s.mnt + "/vbox.raw")
        try s.unmount()
        var want = Data(repeating: 0xA1, count: 1 << 20)
        want.append(Data(count: 1 << 20))
        want.append(Data(repeating: 0xB0, count: 1 << 20))
        XCTAssertEqual(got, want)
        // Writing allocates after the last block with its own extra prefix; data lands right.
        try s.mount(img)
        try Files.pwrite(s.mnt + "/vbox.raw", [UInt8](repeating: 0x5C, count: 4096), at: (1 << 20) + 8192)
        try s.unmount()
        try s.mount(img, options: ["-r"])
        let after = try Files.read(s.mnt + "/vbox.raw")
        try s.unmount()
        want.replaceSubrange(((1 << 20) + 8192)..<((1 << 20) + 12288), with: Data(repeating: 0x5C, count: 4096))
        XCTAssertEqual(after, want)
        XCTAssertEqual(try Harness.run([Harness.rawmount, "check", img]).status, 0)
    }

    func testCreateStaticAndCheckFindsBadMaps() throws {
        let s = try Scratch()
        let img = s.path("st.vdi")
        try Harness.run([Harness.rawmount, "create", "-f", "vdi", "--static", img, "4M"])
        try Harness.run(["qemu-img", "check", img])
        let info = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "info", "--output=json", img]).out.utf8)) as! [String: Any]
        XCTAssertEqual((info["virtual-size"] as! NSNumber).intValue, 4 << 20)
        // Duplicate and out-of-range indices: check reports them (exit 2) like qemu-img check.
        var d = try Files.read(img)
        d.replaceSubrange(0x204..<0x208, with: [0, 0, 0, 0])         // block 1 -> index 0 (duplicate)
        d.replaceSubrange(0x208..<0x20C, with: [0x40, 0, 0, 0])      // block 2 -> index 64 (out of range)
        let bad = s.path("bad.vdi")
        try d.write(to: URL(fileURLWithPath: bad))
        let r = try Harness.run([Harness.rawmount, "check", bad], check: false)
        XCTAssertEqual(r.status, 2, r.out)
        XCTAssertTrue(r.out.contains("out of range") && r.out.contains("used twice"), r.out)
        XCTAssertNotEqual(try Harness.run(["qemu-img", "check", bad], check: false).status, 0, "the oracle agrees")
        // Reading the out-of-range block fails with EIO; the rest reads.
        try s.mount(bad, options: ["-r"])
        let fd = open(s.mnt + "/bad.raw", O_RDONLY)
        var buf = [UInt8](repeating: 0, count: 4096)
        XCTAssertEqual(pread(fd, &buf, 4096, 2 << 20), -1)
        XCTAssertEqual(errno, EIO)
        XCTAssertEqual(pread(fd, &buf, 4096, 0), 4096)
        close(fd)
        try s.unmount()
    }

    /// A VirtualBox snapshot (differencing) image in VM/Snapshots, its base in VM/: the child
    /// finds its parent by UUID; its blocks overlay the parent's, free blocks read through,
    /// zero blocks read as zeros. Served read-only, image untouched; a missing parent is named.
    func testDifferencingImageReadsThroughItsParent() throws {
        let s = try Scratch()
        let vm = s.path("VM"), snaps = s.path("VM/Snapshots")
        try FileManager.default.createDirectory(atPath: snaps, withIntermediateDirectories: true)
        let base = vm + "/base.vdi"
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", base, "8M"])
        try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x11 0 8M", base])
        let plain = s.path("plain.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", plain, "8M"])
        try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x22 1M 1M", "-c", "write -P 0x33 3M 4k", "-c", "write -P 0x44 5M 4k", plain])
        // Make it a differencing image of base: type 4, parent UUID = base's UUID, block 5 zero.
        var child = try Files.read(plain)
        let baseHeader = try Files.read(base).prefix(512)
        child.replaceSubrange(0x4C..<0x50, with: le(4, 4))
        child.replaceSubrange(0x1A8..<0x1B8, with: baseHeader[0x188..<0x198])
        let mapAt = Int(child[0x154]) | Int(child[0x155]) << 8
        child.replaceSubrange((mapAt + 5 * 4)..<(mapAt + 6 * 4), with: le(0xFFFF_FFFE, 4))
        let snap = snaps + "/{6d1f0c2e-0000-4000-8000-000000000001}.vdi"
        try child.write(to: URL(fileURLWithPath: snap))
        let sha = try Files.sha(snap), baseSha = try Files.sha(base)
        var expected = Data(repeating: 0x11, count: 8 << 20)
        let plainView = try s.qemuRaw(plain)
        expected.replaceSubrange(1 << 20 ..< 2 << 20, with: plainView[1 << 20 ..< 2 << 20])  // allocated in the child
        expected.replaceSubrange(3 << 20 ..< 4 << 20, with: plainView[3 << 20 ..< 4 << 20])
        expected.replaceSubrange(5 << 20 ..< 6 << 20, with: Data(count: 1 << 20))           // zero block
        let r = try Harness.run([Harness.rawmount, "mount", snap, s.mnt])
        XCTAssertTrue(r.err.contains("differencing") && r.err.contains("read-only"), r.err)
        let raw = s.mnt + "/{6d1f0c2e-0000-4000-8000-000000000001}.raw"
        XCTAssertTrue(try Files.read(raw) == expected, "the snapshot does not read as its blocks over its parent")
        XCTAssertEqual(open(raw, O_WRONLY), -1)
        try s.unmount()
        XCTAssertEqual(try Files.sha(snap), sha)
        XCTAssertEqual(try Files.sha(base), baseSha)
        let info = try Harness.run([Harness.rawmount, "info", snap]).out
        XCTAssertTrue(info.contains("differencing (parent {") && info.contains("backing file 1: \(base)"), info)
        // A second file with the parent's UUID (planted, or a copy): refused, naming both,
        // never chosen by its name; one that belongs to another user is never taken.
        let planted = snaps + "/aaa-planted.vdi"
        try FileManager.default.copyItem(atPath: base, toPath: planted)
        try s.assertMountRefused(["-r", snap], mentions: ["refusing to guess", planted, base], "two parents")
        XCTAssertEqual(chown(planted, 12345, 12345), 0)
        try Harness.run([Harness.rawmount, "mount", snap, s.mnt])
        XCTAssertTrue(try Files.read(raw) == expected, "the planted copy of another user was read")
        try s.unmount()
        try FileManager.default.removeItem(atPath: planted)
        // Without its parent: refused, naming the UUID it needs.
        try FileManager.default.moveItem(atPath: base, toPath: s.path("elsewhere.vdi"))
        let uuid = try XCTUnwrap(info.split(separator: "\n").first { $0.contains("parent {") }?.split(separator: "{").last?.prefix(36))
        try s.assertMountRefused(["-r", snap], mentions: ["6d1f0c2e", "needs its parent {\(uuid)}"], "parent missing")
    }

    func testDamagedHeadersFailCleanly() throws {
        let s = try Scratch()
        let good = s.path("good.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", good, "3M"])
        let bytes = try Files.read(good)
        let damages: [(String, Int, [UInt8], String)] = [
            ("sig", 0x40, le(0xBEDA107E, 4), "signature"),
            ("version", 0x44, le(0x00010000, 4), "version"),
            ("type", 0x4C, le(3, 4), "type"),
            ("diffnoparent", 0x4C, le(4, 4), "parent UUID"),
            ("sector", 0x168, le(4096, 4), "sector_size"),
            ("block", 0x178, le(2 << 20, 4), "block_size"),
            ("bmapalign", 0x154, le(0x201, 4), "offset_bmap"),
            ("dataalign", 0x158, le(0x401, 4), "offset_data"),
            ("overlap", 0x158, le(0x200, 4), "offset_data"),
            ("disksize", 0x170, le(4 << 20, 8), "disk_size"),
            ("blockshuge", 0x180, le(0x7FFF_FFFF, 4), "blocks_in_image"),
            ("mappast", 0x180, le(0x1000, 4), ""),
            ("allocated", 0x184, le(9, 4), "blocks_allocated"),
            ("extra", 0x17C, le(100, 4), "block_extra"),
        ]
        try s.assertDamagedCopiesRefused(bytes, ext: "vdi", mountOptions: ["-r", "--format", "vdi"], damages)
        let cut = s.path("cut.vdi")
        try bytes.prefix(300).write(to: URL(fileURLWithPath: cut))
        let r = try Harness.run([Harness.rawmount, "info", "--format", "vdi", cut], check: false)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.err.contains("cut.vdi") && r.err.contains("truncated"), r.err)
    }

    /// A VDI whose header count disagrees with its map (what a failed write-back leaves):
    /// `check` calls it corrupt as qemu-img does, `check --repair` fixes it (the writable
    /// open's repair) and exits 0, after which qemu-img check is clean and the data the same.
    func testCheckRepairFixesTheAllocatedCount() throws {
        let s = try Scratch()
        let img = s.path("count.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", img, "16M"])
        try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 5M 1M", img])
        let data = try Data(contentsOf: URL(fileURLWithPath: img))
        XCTAssertEqual(le(data, at: 0x184, 4), 2)
        try Files.pwrite(img, le(3, 4), at: 0x184)
        let before = s.path("before.raw")
        try Harness.run(["qemu-img", "convert", "-f", "vdi", "-O", "raw", img, before])
        XCTAssertEqual(try Harness.run(["qemu-img", "check", img], check: false).status, 2)
        XCTAssertEqual(try Harness.run([Harness.rawmount, "check", img], check: false).status, 2)
        let r = try Harness.run([Harness.rawmount, "check", "--repair", "--output=json", img], check: false)
        XCTAssertEqual(r.status, 0, r.out + r.err)
        let json = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any]
        XCTAssertEqual((json?["corruptions-fixed"] as? NSNumber)?.intValue, 1, r.out)
        XCTAssertNil(json?["corruptions"], r.out)
        XCTAssertFalse(r.err.contains("not implemented"), r.err)
        try Harness.run(["qemu-img", "check", img])
        try Harness.run(["qemu-img", "compare", "-f", "vdi", "-F", "raw", img, before])
        XCTAssertEqual(try Harness.run([Harness.rawmount, "check", img]).status, 0)
    }
}
