import Foundation
import XCTest
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// VHDX images made by qemu-img and qemu-io, read through a mount and compared with
/// `qemu-img convert -O raw`; damaged headers, region tables and logs as QEMU treats them.
final class VHDXTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    private func json(_ args: [String]) throws -> [String: Any] {
        try JSONSerialization.jsonObject(with: Data(try Harness.run(args).out.utf8)) as! [String: Any]
    }

    /// CRC-32C written out here, independent of the library rawmount uses.
    static func crc32c(_ bytes: Data) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for b in bytes {
            crc ^= UInt32(b)
            for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
        }
        return ~crc
    }

    /// Puts `value` little-endian at `at` inside the `length`-byte structure at `base`, and
    /// its CRC-32C (at base+4) right again.
    private func patch(_ d: inout Data, base: Int, length: Int, _ change: (inout Data) -> Void) {
        var s = d.subdata(in: base ..< base + length)
        change(&s)
        s.replaceSubrange(4 ..< 8, with: [0, 0, 0, 0])
        let c = Self.crc32c(s)
        s.replaceSubrange(4 ..< 8, with: (0..<4).map { UInt8(truncatingIfNeeded: c >> (8 * UInt32($0))) })
        d.replaceSubrange(base ..< base + length, with: s)
    }

    func testDynamicAndFixedReadAsQemuReadsThem() throws {
        let s = try Scratch()
        // A 5 GiB disk of 1 MiB blocks: writes on both sides of the first sector-bitmap entry
        // (after 4096 payload entries), zero blocks, and a fixed image.
        for (name, opts, size, writes) in [
            ("dyn", ["-o", "block_size=1M"], "5G", ["write -P 1 0 64k", "write -P 2 4095M 2M", "write -P 3 4600M 3M", "write -z 4300M 4M", "write -P 4 5119M 1M"]),
            ("default", [], "100M", ["write -P 5 1M 3M", "write -P 6 99M 512"]),
            ("fixed", ["-o", "subformat=fixed"], "64M", ["write -P 7 5M 1M", "write -P 8 63M 1M"]),
        ] {
            let img = s.path("\(name).vhdx"), oracle = s.path("\(name).oracle")
            try Harness.run(["qemu-img", "create", "-q", "-f", "vhdx"] + opts + [img, size])
            try Harness.run(["qemu-io", "-f", "vhdx"] + writes.flatMap { ["-c", $0] } + [img])
            try Harness.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", img, oracle])
            let sha = try Files.sha(img)
            let ours = try json([Harness.rawmount, "info", "--json", img])
            let theirs = try json(["qemu-img", "info", "--output=json", img])
            XCTAssertEqual(ours["format"] as? String, "vhdx", name)
            XCTAssertEqual(ours["virtual-size"] as? Int, theirs["virtual-size"] as? Int, "\(name): virtual size")
            XCTAssertEqual(ours["cluster-size"] as? Int, theirs["cluster-size"] as? Int, "\(name): cluster size")
            try s.mount(img, options: ["-r"])
            let raw = s.mnt + "/\(name).raw"
            XCTAssertEqual(try Files.size(raw), try Files.size(oracle), name)
            // (qemu-img compare passes the holes of both files by SEEK_HOLE.)
            let cmp = try Harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", raw, oracle], check: false)
            XCTAssertEqual(cmp.status, 0, "\(name): the mount differs from qemu-img convert: \(cmp.out)")
            try s.unmount()
            XCTAssertEqual(try Files.sha(img), sha, "\(name): a read-only mount changed the image")
        }
    }

    /// The current header (higher sequence number) damaged: the other one is used, as QEMU
    /// does; both damaged, or both region tables: refused naming the file and the structure.
    func testDamagedHeadersAndRegionTables() throws {
        let s = try Scratch()
        let img = s.path("h.vhdx"), oracle = s.path("h.oracle")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vhdx", img, "32M"])
        try Harness.run(["qemu-io", "-f", "vhdx", "-c", "write -P 9 1M 2M", img])
        try Harness.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", img, oracle])
        let good = try Data(contentsOf: URL(fileURLWithPath: img))
        func seq(_ d: Data, _ at: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(d[at + 8 + $1]) << (8 * UInt64($1)) } }
        let current = seq(good, 64 << 10) > seq(good, 128 << 10) ? 64 << 10 : 128 << 10
        var d = good
        d[current + 100] ^= 0xFF  // checksum no longer holds
        try d.write(to: URL(fileURLWithPath: img))
        XCTAssertEqual(try Harness.run(["qemu-img", "info", img], check: false).status, 0, "qemu-img reads it through the other header")
        try s.mount(img, options: ["-r"])
        XCTAssertEqual(try Files.sha(s.mnt + "/h.raw"), try Files.sha(oracle))
        try s.unmount()
        d[(64 << 10) + (128 << 10) - current + 100] ^= 0xFF
        try d.write(to: URL(fileURLWithPath: img))
        try s.assertMountRefused(["-r", img], mentions: ["h.vhdx", "neither header"], "both headers")
        d = good
        d[(192 << 10) + 200] ^= 0xFF
        try d.write(to: URL(fileURLWithPath: img))
        try s.mount(img, options: ["-r"])  // the second copy of the region table
        XCTAssertEqual(try Files.sha(s.mnt + "/h.raw"), try Files.sha(oracle))
        try s.unmount()
        d[(256 << 10) + 200] ^= 0xFF
        try d.write(to: URL(fileURLWithPath: img))
        try s.assertMountRefused(["-r", img], mentions: ["h.vhdx", "region table"], "both region tables")
        // Cut inside a present block: refused as truncated (QEMU refuses it too).
        try good.prefix(good.count - (1 << 20)).write(to: URL(fileURLWithPath: img))
        XCTAssertNotEqual(try Harness.run(["qemu-img", "info", img], check: false).status, 0)
        try s.assertMountRefused(["-r", img], mentions: ["h.vhdx", "truncated"], "truncated")
    }

    /// A log entry with the header's log GUID and a valid CRC-32C is a log QEMU would replay:
    /// refused with the command that replays it, as qemu-img refuses a read-only open.
    func testALogThatNeedsReplayIsRefusedWithTheCommand() throws {
        let s = try Scratch()
        let img = s.path("log.vhdx")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vhdx", img, "32M"])
        try Harness.run(["qemu-io", "-f", "vhdx", "-c", "write -P 9 1M 2M", img])
        var d = try Data(contentsOf: URL(fileURLWithPath: img))
        let guid = Data((0..<16).map { UInt8($0 * 7 + 1) })
        func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
        func field(_ base: Int, _ at: Int, _ n: Int) -> UInt64 { (0..<n).reduce(UInt64(0)) { $0 | UInt64(d[base + at + $1]) << (8 * UInt64($1)) } }
        let logOffset = Int(field(64 << 10, 72, 8))
        XCTAssertGreaterThanOrEqual(logOffset, 1 << 20)
        // One entry with no descriptors, at the start of the log.
        var entry = Data(count: 4096)
        entry.replaceSubrange(0 ..< 4, with: Array("loge".utf8))
        entry.replaceSubrange(8 ..< 12, with: le(4096, 4))
        entry.replaceSubrange(16 ..< 24, with: le(1, 8))
        entry.replaceSubrange(32 ..< 48, with: guid)
        entry.replaceSubrange(48 ..< 56, with: le(UInt64(d.count), 8))
        entry.replaceSubrange(56 ..< 64, with: le(UInt64(d.count), 8))
        d.replaceSubrange(logOffset ..< logOffset + 4096, with: entry)
        patch(&d, base: logOffset, length: 4096) { _ in }
        for h in [64 << 10, 128 << 10] { patch(&d, base: h, length: 4096) { $0.replaceSubrange(48 ..< 64, with: guid) } }
        try d.write(to: URL(fileURLWithPath: img))
        let q = try Harness.run(["qemu-img", "info", img], check: false)
        XCTAssertNotEqual(q.status, 0, "qemu-img read it without replaying: \(q.out)")
        try s.assertMountRefused(["-r", img], mentions: ["log.vhdx", "replay"], "dirty log")
        // qemu-img's replay makes it readable again.
        try Harness.run(["qemu-img", "check", "-r", "all", img], check: false)
        try s.mount(img, options: ["-r"])
        try s.unmount()
    }

    /// A log that changes the block table (block 0 now names data appended to the file) and
    /// zeroes a range: a writable mount replays it exactly as `qemu-img check -r all` does
    /// (same guest disk, same table and data bytes), and empties the log.
    func testALogIsReplayedAsQemuReplaysIt() throws {
        let s = try Scratch()
        let ours = s.path("ours.vhdx"), theirs = s.path("theirs.vhdx")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", ours, "16M"])
        try Harness.run(["qemu-io", "-f", "vhdx", "-c", "write -P 9 3M 1M", ours])
        var d = try Data(contentsOf: URL(fileURLWithPath: ours))
        func field(_ base: Int, _ at: Int, _ n: Int) -> UInt64 { (0..<n).reduce(UInt64(0)) { $0 | UInt64(d[base + at + $1]) << (8 * UInt64($1)) } }
        func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
        let logOffset = Int(field(64 << 10, 72, 8))
        // The BAT region: from the region table's entry for it (the first entry, as qemu-img writes it).
        let bat = Int(field(192 << 10, 16 + 16, 8))
        // A block of pattern appended at a whole MiB: what block 0 will name.
        let blockAt = (d.count + (1 << 20) - 1) / (1 << 20) * (1 << 20)
        d.append(Data(count: blockAt - d.count))
        d.append(Data((0 ..< (1 << 20)).map { UInt8(truncatingIfNeeded: $0 / 512 &* 7 &+ 1) }))
        var batSector = d.subdata(in: bat ..< bat + 4096)
        batSector.replaceSubrange(0 ..< 8, with: le(UInt64(blockAt) | 6, 8))  // block 0: fully present at blockAt
        let guid = Data((0..<16).map { UInt8($0 * 11 + 3) })
        var entry = Data(count: 8192)
        entry.replaceSubrange(0 ..< 4, with: Array("loge".utf8))
        entry.replaceSubrange(8 ..< 12, with: le(8192, 4))
        entry.replaceSubrange(16 ..< 24, with: le(5, 8))
        entry.replaceSubrange(24 ..< 28, with: le(2, 4))
        entry.replaceSubrange(32 ..< 48, with: guid)
        entry.replaceSubrange(48 ..< 56, with: le(UInt64(d.count), 8))
        entry.replaceSubrange(56 ..< 64, with: le(UInt64(d.count), 8))
        // Descriptor 1: the table sector ("desc", its first 8 and last 4 bytes inline).
        entry.replaceSubrange(64 ..< 68, with: Array("desc".utf8))
        entry.replaceSubrange(68 ..< 72, with: batSector[4092 ..< 4096])
        entry.replaceSubrange(72 ..< 80, with: batSector[0 ..< 8])
        entry.replaceSubrange(80 ..< 88, with: le(UInt64(bat), 8))
        entry.replaceSubrange(88 ..< 96, with: le(5, 8))
        // Descriptor 2: zero the block's second 4 KiB.
        entry.replaceSubrange(96 ..< 100, with: Array("zero".utf8))
        entry.replaceSubrange(104 ..< 112, with: le(4096, 8))
        entry.replaceSubrange(112 ..< 120, with: le(UInt64(blockAt + 4096), 8))
        entry.replaceSubrange(120 ..< 128, with: le(5, 8))
        // The data sector of descriptor 1.
        entry.replaceSubrange(4096 ..< 4100, with: Array("data".utf8))
        entry.replaceSubrange(4100 ..< 4104, with: le(0, 4))
        entry.replaceSubrange(4104 ..< 8188, with: batSector[8 ..< 4092])
        entry.replaceSubrange(8188 ..< 8192, with: le(5, 4))
        d.replaceSubrange(logOffset ..< logOffset + 8192, with: entry)
        patch(&d, base: logOffset, length: 8192) { _ in }
        for h in [64 << 10, 128 << 10] { patch(&d, base: h, length: 4096) { $0.replaceSubrange(48 ..< 64, with: guid) } }
        try d.write(to: URL(fileURLWithPath: ours))
        try d.write(to: URL(fileURLWithPath: theirs))

        try Harness.run(["qemu-img", "check", "-r", "all", theirs], check: false)
        let r = try Harness.run([Harness.rawmount, "mount", ours, s.mnt])
        XCTAssertTrue(r.err.contains("replayed 1 log entry"), r.err)
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        let cmp = try Harness.run(["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", ours, theirs], check: false)
        XCTAssertEqual(cmp.status, 0, cmp.out + cmp.err)
        let a = try Data(contentsOf: URL(fileURLWithPath: ours)), b = try Data(contentsOf: URL(fileURLWithPath: theirs))
        XCTAssertEqual(a.count, b.count)
        XCTAssertEqual(a.subdata(in: bat ..< bat + 4096), b.subdata(in: bat ..< bat + 4096), "the table differs from QEMU's replay")
        XCTAssertEqual(a.subdata(in: blockAt ..< blockAt + (1 << 20)), b.subdata(in: blockAt ..< blockAt + (1 << 20)), "the data differs from QEMU's replay")
        // Block 0 now reads the appended data, its second 4 KiB zeroed.
        let raw = s.path("ours.raw")
        try Harness.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", ours, raw])
        let head = try Files.pread(raw, count: 8192, at: 0)
        XCTAssertEqual(head[0], 1)
        XCTAssertEqual(head.subdata(in: 4096 ..< 8192), Data(count: 4096))
        // The log is empty now: a read-only open works.
        try s.mount(ours, options: ["-r"])
        try s.unmount()
    }

    /// Writes through the mount (new blocks, overwrites, across the first sector-bitmap
    /// entry, a fixed image) equal the same writes on a plain file for qemu-img compare, and
    /// qemu-img check finds the image clean.
    func testWritesThroughTheMountMatchAShadowCopy() throws {
        let s = try Scratch()
        for (name, opts, size) in [("dyn", ["-o", "block_size=1M"], "5G"), ("default", [], "40M"), ("fixed", ["-o", "subformat=fixed"], "24M")] {
            let img = s.path("\(name).vhdx"), shadow = s.path("\(name).shadow")
            try Harness.run(["qemu-img", "create", "-q", "-f", "vhdx"] + opts + [img, size])
            try Harness.run(["qemu-io", "-f", "vhdx", "-c", "write -P 17 1M 1M", img])
            try Harness.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", img, shadow])
            let bytes = try Files.size(shadow)
            try s.mount(img)
            let raw = s.mnt + "/\(name).raw"
            var rng = SeededRandom(seed: UInt64(name.count) &* 31)
            var writes: [(UInt64, [UInt8])] = [(bytes - 4096, rng.bytes(4096)), ((1 << 20) - 700, rng.bytes(1400))]
            if name == "dyn" { writes.append(((4 << 30) - 3000, rng.bytes(6000))) }  // across the bitmap entry
            for _ in 0..<30 {
                let len = Int(rng.next() % (200 << 10)) + 1
                writes.append((rng.next() % min(bytes - UInt64(len), 64 << 20), rng.bytes(len)))
            }
            for (at, b) in writes {
                try Files.pwrite(raw, b, at: at)
                try Files.pwrite(shadow, b, at: at)
            }
            try s.unmount()
            let check = try Harness.run(["qemu-img", "check", "-f", "vhdx", img], check: false)
            XCTAssertEqual(check.status, 0, "\(name): \(check.out)\(check.err)")
            let cmp = try Harness.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", img, shadow], check: false)
            XCTAssertEqual(cmp.status, 0, "\(name): \(cmp.out)\(cmp.err)")
        }
    }

    /// `rawmount create -f vhdx` lays files out as qemu-img create does: the same size, the
    /// same region tables (checksums included), block table and metadata (but for the
    /// disk's random identifier), for default, chosen and huge sizes, fixed images and
    /// block_state_zero=off; qemu-img checks it clean, and writes through a mount of it
    /// read back equal.
    func testCreateMakesQemuImgsLayout() throws {
        let s = try Scratch()
        for (size, opts) in [("100M", [String]()), ("5G", ["-o", "block_size=1M"]), ("40T", []), ("1000000", []),
                             ("20M", ["-o", "subformat=fixed"]), ("20M", ["-o", "subformat=fixed,block_state_zero=off"]),
                             ("30M", ["-o", "block_state_zero=off"]), ("100M", ["-o", "log_size=4M,block_size=2M"])] {
            let ours = s.path("ours.vhdx"), theirs = s.path("theirs.vhdx")
            try? FileManager.default.removeItem(atPath: ours)
            try? FileManager.default.removeItem(atPath: theirs)
            try Harness.run(["qemu-img", "create", "-q", "-f", "vhdx"] + opts + [theirs, size])
            try Harness.run([Harness.rawmount, "create", "-q", "-f", "vhdx"] + opts + [ours, size])
            let what = "\(size) \(opts)"
            XCTAssertEqual(try Files.size(ours), try Files.size(theirs), "\(what): file size")
            func bytes(_ p: String, _ at: UInt64, _ n: Int) throws -> Data { try Files.pread(p, count: n, at: at) }
            for table in [192 << 10, 256 << 10] {
                XCTAssertEqual(try bytes(ours, UInt64(table), 64 << 10), try bytes(theirs, UInt64(table), 64 << 10), "\(what): region table")
            }
            let regions = try bytes(theirs, 192 << 10, 80)
            func le64(_ d: Data, _ o: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(d[o + $1]) << (8 * UInt64($1)) } }
            let bat = le64(regions, 32), meta = le64(regions, 64)
            XCTAssertEqual(try bytes(ours, bat, 1 << 20), try bytes(theirs, bat, 1 << 20), "\(what): block table")
            XCTAssertEqual(try bytes(ours, meta, 64 << 10), try bytes(theirs, meta, 64 << 10), "\(what): metadata table")
            var a = try bytes(ours, meta + (64 << 10), 40), b = try bytes(theirs, meta + (64 << 10), 40)
            a.replaceSubrange(16 ..< 32, with: Data(count: 16)); b.replaceSubrange(16 ..< 32, with: Data(count: 16))  // the disk's identifier
            XCTAssertEqual(a, b, "\(what): metadata items")
            let info = try json(["qemu-img", "info", "--output=json", ours]), want = try json(["qemu-img", "info", "--output=json", theirs])
            XCTAssertEqual(info["virtual-size"] as? Int, want["virtual-size"] as? Int, what)
            XCTAssertEqual(info["cluster-size"] as? Int, want["cluster-size"] as? Int, what)
            XCTAssertEqual(try Harness.run(["qemu-img", "check", ours], check: false).status, 0, what)
        }
        let img = s.path("w.vhdx"), shadow = s.path("w.raw")
        try Harness.run([Harness.rawmount, "create", "-q", "-f", "vhdx", "-o", "subformat=fixed,block_state_zero=off", img, "12M"])
        try Harness.run(["truncate", "-s", "12M", shadow])
        try s.mount(img)
        var rng = SeededRandom(seed: 99)
        for _ in 0..<10 {
            let b = rng.bytes(Int(rng.next() % 100_000) + 1), at = rng.next() % (11 << 20)
            try Files.pwrite(s.mnt + "/w.raw", b, at: at)
            try Files.pwrite(shadow, b, at: at)
        }
        try s.unmount()
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", img, shadow], check: false).status, 0)
        XCTAssertEqual(try Harness.run(["qemu-img", "check", img], check: false).status, 0)
        try s.assertCreateRefused(["-f", "vhdx"], image: "big.vhdx", size: "65T", mentions: "64 TiB")
    }

    /// `convert -O vhdx` (dynamic and fixed) holds the source's bytes for qemu-img.
    func testConvertToVHDX() throws {
        let s = try Scratch()
        let src = try s.sampleQCOW2()
        for sub in ["dynamic", "fixed"] {
            let out = s.path("out-\(sub).vhdx")
            try Harness.run([Harness.rawmount, "convert", "-O", "vhdx", "-o", "subformat=\(sub)", src, out])
            let cmp = try Harness.run(["qemu-img", "compare", "-f", "qcow2", "-F", "vhdx", src, out], check: false)
            XCTAssertEqual(cmp.status, 0, "\(sub): \(cmp.out)\(cmp.err)")
            XCTAssertEqual(try Harness.run(["qemu-img", "check", out], check: false).status, 0, sub)
        }
    }

    /// Differencing VHDX (written by the fixture as the specification lays it out: qemu-img
    /// cannot make one): every block state reads as the specification says, partly present
    /// blocks sector by sector from their bitmaps, the parent found by its relative,
    /// absolute or volume path and checked by its data-write GUID; served read-only; a
    /// parent whose GUID differs, or that is nowhere, is refused by name.
    func testDifferencingChildReadsOverItsParent() throws {
        let s = try Scratch()
        let script = Harness.packageRoot.path + "/Tests/IntegrationTests/Fixtures/make_vhdx_child.py"
        let parent = s.path("parent.vhdx"), parentRaw = s.path("parent.raw")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", parent, "10M"])
        try Harness.run(["qemu-io", "-f", "vhdx", "-c", "write -P 0x41 0 3M", "-c", "write -P 0x42 7M 2M", parent])
        try Harness.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", parent, parentRaw])
        let sha = try Files.sha(parent)
        for mode in ["relative", "absolute", "volume"] {
            let child = s.path("child-\(mode).vhdx"), expected = s.path("expected-\(mode).raw")
            try Harness.run(["python3", script, parent, parentRaw, child, expected, mode])
            let r = try Harness.run([Harness.rawmount, "mount", "--log", s.serverLog, child, s.mnt])
            XCTAssertTrue(r.err.contains("read-only"), "\(mode): \(r.err)")
            try s.forgetMount(s.mnt)
            XCTAssertEqual(try Files.sha(s.mnt + "/child-\(mode).raw"), try Files.sha(expected), "\(mode): the child over its parent reads wrong")
            try Harness.run([Harness.rawmount, "unmount", s.mnt])
            XCTAssertEqual(try Files.sha(parent), sha, "\(mode): the parent changed")
        }
        try Harness.run(["python3", script, parent, parentRaw, s.path("other.vhdx"), s.path("other.raw"), "relative", "wrong"])
        try s.assertMountRefused(["-r", s.path("other.vhdx")], mentions: ["other.vhdx", "data-write GUID"], "another parent")
        try Harness.run(["python3", script, parent, parentRaw, s.path("orphan.vhdx"), s.path("orphan.raw"), "missing"])
        try s.assertMountRefused(["-r", s.path("orphan.vhdx")], mentions: ["orphan.vhdx", "gone-parent.vhdx"], "missing parent")
    }
}
