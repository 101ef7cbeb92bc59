import XCTest
import Foundation

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
}
