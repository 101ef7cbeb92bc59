import Foundation
import XCTest
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
            let r = try Harness.run([Harness.rawmount, "mount", "--log", s.serverLog, img, s.mnt])
            XCTAssertTrue(r.err.contains("read-only"), r.err)
            try s.forgetMount(s.mnt)
            let raw = s.mnt + "/\(name).raw"
            XCTAssertEqual(try Files.size(raw), try Files.size(oracle), name)
            // (qemu-img compare passes the holes of both files by SEEK_HOLE.)
            let cmp = try Harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", raw, oracle], check: false)
            XCTAssertEqual(cmp.status, 0, "\(name): the mount differs from qemu-img convert: \(cmp.out)")
            try Harness.run([Harness.rawmount, "unmount", s.mnt])
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
}
