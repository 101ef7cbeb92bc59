import XCTest
import Foundation
import TestSupport

/// `check` (and the repair a dirty image gets on a writable open) does work that follows
/// the metadata present, not the size of the file: a small image made huge with truncate,
/// or tables that are holes, finish at once. Each run is bounded by `timeout` only to turn
/// a hang into a failure; no timing is asserted.
final class CheckWorkTests: XCTestCase {
    /// A 512-byte-cluster qcow2 truncated to 1 TiB: 2^31 clusters in the file, one refcount
    /// block. (Before, check visited every cluster: hours.) Also dirty with lazy refcounts,
    /// so a writable open repairs it the same way.
    func testHugeTruncatedQcow2ChecksByItsMetadata() throws {
        let s = try Scratch()
        let img = s.path("huge.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,lazy_refcounts=on", img, "1M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 64k", img])
        try Harness.run(["truncate", "-s", "1T", img])
        let r = try Harness.run(["timeout", "120", Harness.rawmount, "check", img], check: false)
        XCTAssertNotEqual(r.status, 124, "check did not finish")
        // Clean: the clusters past the data are neither referenced nor counted. (qemu-img
        // gives up on this file: "Check failed: File too large".)
        XCTAssertEqual(r.status, 0, r.out + r.err)
        // Dirty: the writable open runs the repair.
        var incompatible = [UInt8](repeating: 0, count: 8)
        incompatible[7] = 1
        try Files.pwrite(img, incompatible, at: 72)
        try Harness.requireFuse()
        let m = try Harness.run(["timeout", "120", Harness.rawmount, "mount", img, s.mnt], check: false)
        XCTAssertEqual(m.status, 0, m.err)
        if m.status == 0 { try Harness.run([Harness.rawmount, "unmount", s.mnt]) }
        let after = try Harness.run(["timeout", "120", Harness.rawmount, "check", img], check: false)
        XCTAssertEqual(after.status, 0, after.out + after.err)
    }

    /// A QED whose L1 names a thousand 1 MiB L2 tables that are holes in the file.
    func testQEDTablesThatAreHolesCostNothing() throws {
        let s = try Scratch()
        let img = s.path("holes.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=65536,table_size=16", img, "64T"])
        try Harness.run(["python3", "-c", """
            import os, struct, sys
            p = sys.argv[1]
            d = open(p, 'rb').read(64)
            cs, ts, hs = struct.unpack_from('<III', d, 4)
            l1 = struct.unpack_from('<Q', d, 40)[0]
            table = cs * ts
            end = (os.path.getsize(p) + cs - 1) // cs * cs
            with open(p, 'r+b') as f:
                for i in range(1000):
                    f.seek(l1 + 8 * i)
                    f.write(struct.pack('<Q', end + i * table))
                f.truncate(end + 1000 * table)
            """, img])
        let r = try Harness.run(["timeout", "120", Harness.rawmount, "check", img], check: false)
        XCTAssertNotEqual(r.status, 124, "check did not finish")
        XCTAssertEqual(r.status, 0, r.out + r.err)
        XCTAssertTrue(r.out.contains("1000"), "the tables were not counted: \(r.out)")
    }

    /// qemu-img is the oracle for what is damage: on 150 seeded random damages of a qcow2
    /// with a snapshot (bytes, flipped bits and extreme integers in its first 40 KiB: header,
    /// tables, snapshot table), `rawmount check` exits as `qemu-img check` does (0 clean,
    /// 2 corrupt, 3 leaks, 1 unreadable), reserved bits and a broken snapshot table included.
    func testCheckAgreesWithQemuImgOnDamagedImages() throws {
        let s = try Scratch()
        let base = s.path("base.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "16M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", "-c", "write -P 2 8M 1M", base])
        try Harness.run(["qemu-img", "snapshot", "-c", "s", base])
        let original = try Files.read(base)
        var rng = SeededRandom(seed: 5)
        let img = s.path("d.qcow2")
        var disagreements: [String] = []
        var statuses: [Int32: Int] = [:]
        for n in 0..<150 {
            var b = original
            for _ in 0..<(1 + Int(rng.next() % 3)) {
                let at = Int(rng.next() % UInt64(min(b.count - 8, 40000)))
                switch rng.next() % 3 {
                case 0: b[at] = UInt8(truncatingIfNeeded: rng.next())
                case 1:
                    let v: [UInt64] = [0, 1, 1 << 63, UInt64.max, rng.next() % (1 << 40)]
                    let x = v[Int(rng.next() % 5)]
                    for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: x >> (56 - 8 * UInt64(i))) }
                default: b[at] ^= UInt8(1) << (rng.next() % 8)
                }
            }
            try b.write(to: URL(fileURLWithPath: img))
            let q = try Harness.run(["qemu-img", "check", img], check: false)
            let r = try Harness.run([Harness.rawmount, "check", img], check: false)
            statuses[q.status, default: 0] += 1
            if q.status != r.status {
                disagreements.append("case \(n): qemu-img \(q.status), rawmount \(r.status): \(q.out.split(separator: "\n").filter { $0.contains("ERROR") }.prefix(2)) / \(r.err)")
            }
        }
        XCTAssertEqual(disagreements, [], "\(disagreements.count) of 150 disagree")
        XCTAssertGreaterThan(statuses[2] ?? 0, 20, "too few corrupt cases to test anything: \(statuses)")
    }
}
