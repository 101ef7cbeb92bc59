import Foundation
import XCTest
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// VHD (`vpc`) images made by qemu-img and qemu-io, read through a mount and compared with
/// `qemu-img convert -O raw`; sizes as qemu-img info gives them.
final class VHDTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    private func be32(_ d: Data, _ o: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(d[o + $1]) } }

    /// Rewrites the footer at `at` (checksum made valid again) after `change`.
    private func patchFooter(_ path: String, at: Int, _ change: (inout Data) -> Void) throws {
        var d = try Data(contentsOf: URL(fileURLWithPath: path))
        var footer = d.subdata(in: at ..< at + 512)
        change(&footer)
        footer.replaceSubrange(64 ..< 68, with: [0, 0, 0, 0])
        let sum = ~footer.reduce(UInt32(0)) { $0 &+ UInt32($1) }
        footer.replaceSubrange(64 ..< 68, with: (0..<4).map { UInt8(truncatingIfNeeded: sum >> (24 - 8 * UInt32($0))) })
        d.replaceSubrange(at ..< at + 512, with: footer)
        try d.write(to: URL(fileURLWithPath: path))
    }

    private func qemuSize(_ img: String) throws -> Int {
        let j = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "info", "-f", "vpc", "--output=json", img]).out.utf8)) as! [String: Any]
        return j["virtual-size"] as! Int
    }

    private func ourSize(_ img: String, _ extra: [String] = []) throws -> Int {
        let out = try Harness.run([Harness.rawmount, "info", "--json"] + extra + [img]).out
        let j = try JSONSerialization.jsonObject(with: Data(out.utf8)) as! [String: Any]
        return j["virtual-size"] as! Int
    }

    func testDynamicAndFixedReadAsQemuReadsThem() throws {
        let s = try Scratch()
        for sub in ["dynamic", "fixed"] {
            let img = s.path("\(sub).vhd")
            try Harness.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=\(sub)", img, "64M"])
            try Harness.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x33 40M 512k", "-c", "write -P 0x7e 63M 4k", img])
            let oracle = s.path("\(sub).oracle")
            try Harness.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", img, oracle])
            let sha = try Files.sha(img)
            let extra = sub == "fixed" ? ["--format", "vpc"] : []
            XCTAssertEqual(try ourSize(img, extra), try qemuSize(img), "\(sub): virtual size")
            // qemu-img info's keys: a cluster size for dynamic images only.
            let ours = try JSONSerialization.jsonObject(with: Data(try Harness.run([Harness.rawmount, "info", "--json"] + extra + [img]).out.utf8)) as! [String: Any]
            let theirs = try JSONSerialization.jsonObject(with: Data(try Harness.run(["qemu-img", "info", "-f", "vpc", "--output=json", img]).out.utf8)) as! [String: Any]
            XCTAssertEqual(ours["cluster-size"] as? Int, theirs["cluster-size"] as? Int, "\(sub): cluster-size")
            XCTAssertEqual(ours["format"] as? String, "vpc")
            try s.mount(img, options: ["-r"] + extra)
            let raw = s.mnt + "/\(sub).raw"
            XCTAssertEqual(try Files.sha(raw), try Files.sha(oracle), "\(sub): the mount differs from qemu-img convert")
            XCTAssertEqual(open(raw, O_WRONLY), -1)
            try s.unmount()
            XCTAssertEqual(try Files.sha(img), sha, "\(sub): a read-only mount changed the image")
        }
    }

    /// Hyper-V ('win ') images are sized by the footer's current size, Virtual PC and old
    /// QEMU ones by their CHS geometry, as QEMU 7.2 does.
    func testSizeFollowsTheCreatorAsInQemu() throws {
        let s = try Scratch()
        let img = s.path("hv.vhd")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vpc", img, "100M"])
        // A current size that is not the geometry's: still the geometry for QEMU's creator.
        let size: [UInt8] = (0..<8).map { UInt8(truncatingIfNeeded: UInt64(100 << 20) >> (56 - 8 * UInt64($0))) }
        try patchFooter(img, at: 0) { $0.replaceSubrange(48 ..< 56, with: size) }
        let chs = try qemuSize(img)
        XCTAssertEqual(try ourSize(img), chs)
        try patchFooter(img, at: 0) { $0.replaceSubrange(28 ..< 32, with: Array("win ".utf8)) }
        XCTAssertEqual(try qemuSize(img), 100 << 20)
        XCTAssertEqual(try ourSize(img), 100 << 20, "a Hyper-V image is not sized by its current size")
        XCTAssertNotEqual(chs, 100 << 20)
    }

    /// A footer whose checksum is wrong, and a table naming a block past the end of the file:
    /// refused with the file and the reason named, as qemu-img refuses them.
    func testDamagedFooterAndTruncatedImageAreRefused() throws {
        let s = try Scratch()
        let img = s.path("bad.vhd")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vpc", img, "16M"])
        try Harness.run(["qemu-io", "-f", "vpc", "-c", "write -P 1 0 64k", img])
        let good = try Data(contentsOf: URL(fileURLWithPath: img))
        var d = good
        d[64] ^= 0xFF
        try d.write(to: URL(fileURLWithPath: img))
        XCTAssertNotEqual(try Harness.run(["qemu-img", "info", img], check: false).status, 0)
        try s.assertMountRefused(["-r", img], mentions: ["bad.vhd", "checksum"], "footer checksum")
        // Cut the file inside its one block.
        try good.prefix(good.count - 512 - 1 << 20).write(to: URL(fileURLWithPath: img))
        XCTAssertNotEqual(try Harness.run(["qemu-img", "info", img], check: false).status, 0)
        try s.assertMountRefused(["-r", img], mentions: ["bad.vhd", "truncated"], "truncated")
        XCTAssertEqual(be32(good, 0), 0x636F_6E65)  // ("cone", the cookie the probe keys on)
    }

    /// Seeded writes through the mount (unaligned, across blocks, overwrites, the last
    /// sector) land as qemu-img reads them: equal to the same writes on a plain file, the
    /// table and footer sound, and a dynamic image as large as QEMU's own after them.
    func testWritesThroughTheMountMatchAShadowCopy() throws {
        let s = try Scratch()
        for sub in ["dynamic", "fixed"] {
            let img = s.path("w-\(sub).vhd"), shadow = s.path("w-\(sub).shadow")
            try Harness.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=\(sub)", img, "24M"])
            try Harness.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x11 5M 1M", img])
            try Harness.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", img, shadow])
            let size = try qemuSize(img)
            let extra = sub == "fixed" ? ["--format", "vpc"] : []
            try s.mount(img, options: extra)
            let raw = s.mnt + "/w-\(sub).raw"
            var rng = SeededRandom(seed: sub == "fixed" ? 7 : 8)
            var writes: [(UInt64, [UInt8])] = [(UInt64(size) - 512, rng.bytes(512)), (2 << 20 - 700, rng.bytes(1400))]
            for _ in 0..<40 {
                let len = Int(rng.next() % (300 << 10)) + 1
                writes.append((rng.next() % UInt64(size - len), rng.bytes(len)))
            }
            for (at, bytes) in writes {
                try Files.pwrite(raw, bytes, at: at)
                try Files.pwrite(shadow, bytes, at: at)
            }
            try s.unmount()
            let cmp = try Harness.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", img, shadow], check: false)
            XCTAssertEqual(cmp.status, 0, "\(sub): \(cmp.out)\(cmp.err)")
            if sub == "dynamic" {
                // `map` says what qemu-img map says, extent for extent.
                let ourMap = try Harness.run([Harness.rawmount, "map", "--output=json", img]).out
                let theirMap = try Harness.run(["qemu-img", "map", "-f", "vpc", "--output=json", img]).out
                XCTAssertEqual(ourMap.trimmingCharacters(in: .whitespacesAndNewlines), theirMap.trimmingCharacters(in: .whitespacesAndNewlines))
                let check = try Harness.run([Harness.rawmount, "check", img], check: false)
                XCTAssertEqual(check.status, 0, check.out + check.err)
                // The same writes by QEMU allocate the same blocks: the files are as large.
                let peer = s.path("peer.vhd")
                try Harness.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", shadow, peer])
                let ours = try Files.size(img), theirs = try Files.size(peer)
                XCTAssertLessThanOrEqual(ours, theirs + 2 << 20, "more blocks than QEMU's copy holds")
                XCTAssertEqual(ours % 512, 0)
                // The footer ends the file, a copy of the one at the start.
                let head = try Files.pread(img, count: 512, at: 0), tail = try Files.pread(img, count: 512, at: ours - 512)
                XCTAssertEqual(head, tail, "the file does not end with its footer")
            }
        }
    }

    /// `rawmount create -f vpc` lays images out as qemu-img create does, byte for byte but
    /// for the time stamp, the UUID and the checksum: CHS-rounded sizes, force_size, fixed.
    func testCreateMakesQemuImgsLayout() throws {
        let s = try Scratch()
        for (size, opts) in [("1M", [String]()), ("100M", []), ("3G", []), ("127G", []), ("200G", []), ("1000000", []),
                             ("100M", ["-o", "force_size=on"]), ("10G", ["-o", "force_size=on"]),
                             ("1M", ["-o", "subformat=fixed"]), ("100M", ["-o", "subformat=fixed,force_size=on"])] {
            let ours = s.path("ours.vhd"), theirs = s.path("theirs.vhd")
            try? FileManager.default.removeItem(atPath: ours)
            try? FileManager.default.removeItem(atPath: theirs)
            try Harness.run(["qemu-img", "create", "-q", "-f", "vpc"] + opts + [theirs, size])
            try Harness.run([Harness.rawmount, "create", "-q", "-f", "vpc"] + opts + [ours, size])
            let a = try Data(contentsOf: URL(fileURLWithPath: ours)), b = try Data(contentsOf: URL(fileURLWithPath: theirs))
            XCTAssertEqual(a.count, b.count, "\(size) \(opts): file size")
            guard a.count == b.count else { continue }
            // Time stamp (24..<28), checksum and UUID (64..<84) of each footer copy differ by nature.
            let footers = opts.contains(where: { $0.contains("fixed") }) ? [a.count - 512] : [0, a.count - 512]
            var differing: [Int] = []
            for i in 0..<a.count where a[i] != b[i] {
                guard let f = footers.first(where: { i >= $0 && i < $0 + 512 }), (24..<28).contains(i - f) || (64..<84).contains(i - f) else {
                    differing.append(i); continue
                }
            }
            XCTAssertEqual(differing.prefix(8), [], "\(size) \(opts): bytes differ from qemu-img's")
            XCTAssertEqual(try qemuSize(ours), try qemuSize(theirs), "\(size) \(opts)")
        }
        try s.assertCreateRefused(["-f", "vpc", "-o", "force_size=on"], image: "big.vhd", size: "3T", mentions: "2040 GiB")
    }

    /// `convert -O vpc` (both subformats) holds the source's bytes for qemu-img, and sizes
    /// the disk as qemu-img convert does (rounded up to the geometry, never down).
    func testConvertToVHD() throws {
        let s = try Scratch()
        let src = try s.sampleQCOW2()
        for sub in ["dynamic", "fixed"] {
            let ours = s.path("ours-\(sub).vhd"), theirs = s.path("theirs-\(sub).vhd")
            try Harness.run([Harness.rawmount, "convert", "-O", "vpc", "-o", "subformat=\(sub)", src, ours])
            try Harness.run(["qemu-img", "convert", "-O", "vpc", "-o", "subformat=\(sub)", src, theirs])
            let cmp = try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "vpc", src, ours], check: false)
            XCTAssertEqual(cmp.status, 0, "\(sub): \(cmp.out)\(cmp.err)")
            XCTAssertEqual(try qemuSize(ours), try qemuSize(theirs), sub)
            if sub == "dynamic" { XCTAssertEqual(try Harness.run([Harness.rawmount, "check", ours]).status, 0) }
        }
    }

    /// A table entry that names the table itself: reading or writing that block fails with
    /// EIO (a guest write would otherwise rewrite the table), the rest of the disk works,
    /// and the image keeps its bytes.
    func testABlockOnTheTableIsRefusedNotWritten() throws {
        let s = try Scratch()
        let img = s.path("t.vhd")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vpc", img, "16M"])
        try Harness.run(["qemu-io", "-f", "vpc", "-c", "write -P 1 0 64k", img])
        try Files.pwrite(img, [0, 0, 0, 2], at: 1536 + 4)  // block 1 at sector 2: over the table at 1536
        let before = try Files.sha(img)
        try s.mount(img)
        let raw = s.mnt + "/t.raw"
        let fd = open(raw, O_RDWR)
        var buf = [UInt8](repeating: 7, count: 4096)
        XCTAssertEqual(Glibc.pwrite(fd, &buf, 4096, 2 << 20), -1)
        XCTAssertEqual(errno, EIO)
        XCTAssertEqual(Glibc.pread(fd, &buf, 4096, 2 << 20), -1)
        XCTAssertEqual(Glibc.pread(fd, &buf, 4096, 0), 4096)
        XCTAssertEqual(buf[0], 1)
        close(fd)
        try s.unmount()
        XCTAssertEqual(try Files.sha(img), before, "the image changed")
        let check = try Harness.run([Harness.rawmount, "check", img], check: false)
        XCTAssertEqual(check.status, 2, check.out)
        XCTAssertTrue(check.out.contains("block allocation table"), check.out)
    }

    /// Differencing VHDs (written by the fixture as the specification lays them out: qemu-img
    /// cannot make them) read over their parent, sector by sector as their bitmaps say, the
    /// parent found by a relative or absolute Windows locator, a file URL or its name, and
    /// served read-only; a parent whose UUID differs, or that is nowhere, is refused by name.
    func testDifferencingChildReadsOverItsParent() throws {
        let s = try Scratch()
        let script = Harness.packageRoot.path + "/Tests/IntegrationTests/Fixtures/make_vhd_child.py"
        for (sub, mode) in [("dynamic", "w2ru"), ("dynamic", "w2ku"), ("fixed", "macx"), ("dynamic", "name")] {
            let parent = s.path("parent-\(sub).vhd"), parentRaw = s.path("parent-\(sub).raw")
            if !FileManager.default.fileExists(atPath: parent) {
                try Harness.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=\(sub)", parent, "12M"])
                try Harness.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x41 0 3M", "-c", "write -P 0x42 7M 1M", parent])
                try Harness.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", parent, parentRaw])
            }
            let child = s.path("child-\(mode).vhd"), expected = s.path("expected-\(mode).raw")
            try Harness.run(["python3", script, parent, parentRaw, child, expected, mode])
            let sha = try Files.sha(parent)
            let r = try Harness.run([Harness.rawmount, "mount", "--log", s.serverLog, child, s.mnt])
            XCTAssertTrue(r.err.contains("read-only"), "\(mode): \(r.err)")
            try s.forgetMount(s.mnt)
            let raw = s.mnt + "/child-\(mode).raw"
            XCTAssertEqual(try Files.sha(raw), try Files.sha(expected), "\(mode): the child over its parent reads wrong")
            try Harness.run([Harness.rawmount, "unmount", s.mnt])
            XCTAssertEqual(try Files.sha(parent), sha, "\(mode): the parent changed")
            let info = try Harness.run([Harness.rawmount, "info", child]).out
            XCTAssertTrue(info.contains("subformat: differencing") && info.contains("backing file 1: "), info)
        }
        // The parent replaced by another disk (its UUID differs): refused.
        let child = s.path("child-w2ru.vhd"), parent = s.path("parent-dynamic.vhd")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vpc", parent, "12M"])
        try s.assertMountRefused(["-r", child], mentions: ["child-w2ru.vhd", "UUID"], "another parent")
        // Locators naming a file that is not there: refused, naming what was looked for.
        try Harness.run(["python3", script, parent, s.path("parent-dynamic.raw"), s.path("orphan.vhd"), s.path("orphan.raw"), "missing"])
        try s.assertMountRefused(["-r", s.path("orphan.vhd")], mentions: ["orphan.vhd", "gone-parent-dynamic.vhd"], "missing parent")
    }
}
