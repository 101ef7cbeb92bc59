import XCTest
import Foundation

/// No guest write lands on an image's own metadata, whatever its refcounts and tables say:
/// the write fails with EIO, the image is marked corrupt as QEMU marks it, and `check`
/// names the damage and `check --repair` fixes what qemu-img check -r all fixes.
final class MetadataGuardTests: XCTestCase {
    private func be(_ d: Data, _ o: Int, _ n: Int) -> UInt64 { (0..<n).reduce(UInt64(0)) { $0 << 8 | UInt64(d[o + $1]) } }

    /// A 64 MiB qcow2 (64 KiB clusters) with its first cluster written, so it has one L2
    /// table; its bytes and the L1 and refcount table offsets.
    private func qcow2WithOneL2(_ s: Scratch, _ name: String) throws -> (img: String, data: Data, l1: Int, refcountTable: Int) {
        let img = s.path(name)
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 64k", img])
        let d = try Data(contentsOf: URL(fileURLWithPath: img))
        return (img, d, Int(be(d, 40, 8)), Int(be(d, 48, 8)))
    }

    /// (Writes of 4 KiB: applied before they are acknowledged, so the writer sees the EIO.)
    /// qcow2 whose L2 table's refcount was set to 0: the next allocation would be that very
    /// cluster. The write is refused (EIO), the corrupt bit is set, the table is unchanged.
    func testWriteOntoAnL2TableWhoseRefcountIsZeroIsRefused() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let (img, d, l1, rtable) = try qcow2WithOneL2(s, "lie.qcow2")
        let cs = 65536
        let l2 = Int(be(d, l1, 8) & 0x00FF_FFFF_FFFF_FE00)
        let block = Int(be(d, rtable, 8))
        XCTAssertGreaterThan(l2, 0)
        // 16-bit refcount of the L2 table's cluster -> 0 (and of every free cluster before it
        // too, so the allocator's scan from the start reaches it first).
        try Files.pwrite(img, [0, 0], at: UInt64(block + (l2 / cs) * 2))
        let l2Before = d.subdata(in: l2..<(l2 + cs))
        let mapBefore = try Harness.run(["qemu-img", "map", "--output=json", img]).out
        try s.mount(img)
        let w = try Harness.run(["dd", "if=/dev/urandom", "of=\(s.mnt)/lie.raw", "bs=4k", "count=1", "seek=1600",
                                 "conv=notrunc,fsync", "oflag=direct", "status=none"], check: false)
        XCTAssertNotEqual(w.status, 0, "a write was placed on the L2 table")
        XCTAssertTrue(w.err.contains("Input/output error"), w.err)
        // Later writes are refused too; reads still work.
        let again = try Harness.run(["dd", "if=/dev/zero", "of=\(s.mnt)/lie.raw", "bs=4k", "count=1", "conv=notrunc,fsync",
                                     "oflag=direct", "status=none"], check: false)
        XCTAssertNotEqual(again.status, 0, "writes went on after the image was found corrupt")
        try Harness.run(["dd", "if=\(s.mnt)/lie.raw", "of=/dev/null", "bs=64k", "count=2", "status=none"])
        try s.unmount()
        let log = try String(contentsOfFile: s.serverLog, encoding: .utf8)
        XCTAssertTrue(log.contains("preventing a write on metadata") && log.contains("an L2 table"), log)
        let after = try Data(contentsOf: URL(fileURLWithPath: img))
        XCTAssertEqual(after.subdata(in: l2..<(l2 + cs)), l2Before, "the L2 table was overwritten")
        XCTAssertEqual(be(after, 72, 8) & 2, 2, "the corrupt bit is not set")
        XCTAssertEqual(try Harness.run(["qemu-img", "map", "--output=json", "-U", img]).out, mapBefore)
        // As qemu-img: corrupt, repaired by check --repair, clean afterwards.
        XCTAssertEqual(try Harness.run([Harness.rawmount, "check", img], check: false).status, 2)
        let r = try Harness.run([Harness.rawmount, "check", "--repair", img], check: false)
        XCTAssertEqual(r.status, 0, r.out + r.err)
        try Harness.run(["qemu-img", "check", img])
        XCTAssertEqual(be(try Data(contentsOf: URL(fileURLWithPath: img)), 72, 8) & 2, 0, "the corrupt bit stayed after the repair")
    }

    /// An L1 entry naming the refcount table as an L2 table: refused when it is used, so no
    /// guest write can turn refcount entries into mappings.
    func testL2TableAliasingTheRefcountTableIsRefused() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let (img, _, l1, table) = try qcow2WithOneL2(s, "alias.qcow2")
        let rtable = UInt64(table)
        try Files.pwrite(img, (0..<8).map { UInt8(truncatingIfNeeded: (rtable | 1 << 63) >> (56 - 8 * UInt64($0))) }, at: UInt64(l1))
        let before = try Data(contentsOf: URL(fileURLWithPath: img))
        try s.mount(img)
        let w = try Harness.run(["dd", "if=/dev/urandom", "of=\(s.mnt)/alias.raw", "bs=4k", "count=1", "seek=48",
                                 "conv=notrunc,fsync", "oflag=direct", "status=none"], check: false)
        XCTAssertNotEqual(w.status, 0)
        let r = try Harness.run(["dd", "if=\(s.mnt)/alias.raw", "of=/dev/null", "bs=64k", "count=1", "iflag=direct", "status=none"], check: false)
        XCTAssertNotEqual(r.status, 0, "a read through a table that is the refcount table succeeded")
        try s.unmount()
        let after = try Data(contentsOf: URL(fileURLWithPath: img))
        XCTAssertEqual(after.subdata(in: Int(rtable)..<Int(rtable) + 65536), before.subdata(in: Int(rtable)..<Int(rtable) + 65536),
                       "the refcount table changed")
        let log = try String(contentsOfFile: s.serverLog, encoding: .utf8)
        XCTAssertTrue(log.contains("lies in the refcount table") || log.contains("lies in the header"), log)
    }

    /// A compressed entry whose range was moved into another guest cluster's data cluster
    /// (refcount 1, two owners): overwriting the compressed cluster must not free that data.
    /// The write is refused, the image marked corrupt, the other cluster still reads back.
    func testReleasingACompressedRangeNeverFreesAnotherClustersData() throws {
        try Harness.requireFuse()
        let s = try Scratch()
        let img = s.path("shared.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -c -P 0x41 0 64k", "-c", "write -P 0x62 64k 64k", img])
        let d = try Data(contentsOf: URL(fileURLWithPath: img))
        let l2 = Int(be(d, Int(be(d, 40, 8)), 8) & 0x00FF_FFFF_FFFF_FE00)
        let compressed = be(d, l2, 8), data = be(d, l2 + 8, 8) & 0x00FF_FFFF_FFFF_FE00
        XCTAssertEqual(compressed >> 62 & 1, 1, "guest cluster 0 is not compressed")
        let hostBits: UInt64 = (1 << 54) - 1  // 64 KiB clusters: x = 62 - (16 - 8)
        let moved = compressed & ~hostBits | data
        try Files.pwrite(img, (0..<8).map { UInt8(truncatingIfNeeded: moved >> (56 - 8 * UInt64($0))) }, at: UInt64(l2))
        XCTAssertEqual(try Harness.run(["qemu-img", "check", img], check: false).status, 2, "the damage is not what qemu-img calls corruption")
        try s.mount(img)
        let w = try Harness.run(["dd", "if=/dev/urandom", "of=\(s.mnt)/shared.raw", "bs=64k", "count=1",
                                 "conv=notrunc,fsync", "oflag=direct", "status=none"], check: false)
        XCTAssertNotEqual(w.status, 0, "the compressed cluster was released over another cluster's data")
        // (A whole-cluster write is acknowledged before it is applied: unmount reports it too.)
        let u = try Harness.run([Harness.rawmount, "unmount", s.mnt], check: false)
        XCTAssertNotEqual(u.status, 0, "unmount did not report the refused write")
        XCTAssertTrue(u.err.contains("names as data"), u.err)
        XCTAssertEqual(be(try Data(contentsOf: URL(fileURLWithPath: img)), 72, 8) & 2, 2, "the corrupt bit is not set")
        // Guest cluster 1 still holds its data.
        let r = try Harness.run(["qemu-io", "-f", "qcow2", "-r", "-U", "-c", "read -P 0x62 64k 64k", img])
        XCTAssertFalse((r.out + r.err).contains("verification failed"), r.out + r.err)
        XCTAssertEqual(try Harness.run([Harness.rawmount, "check", img], check: false).status, 2)
    }
}
