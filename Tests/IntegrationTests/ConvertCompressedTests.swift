import Foundation
import XCTest

/// `rawmount convert -c -O qcow2` against `qemu-img convert -c`: the result checks clean,
/// reads equal to the source (qemu-img compare and through a mount), holds compressed
/// clusters, is no larger than qemu-img's own, and takes writes over its compressed clusters.
final class ConvertCompressedTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func testCompressedConvertReadsAsTheSourceAndChecksClean() throws {
        let s = try Scratch()
        let random = s.path("random")
        try Data((0..<(3 << 20)).map { _ in UInt8.random(in: 0...255) }).write(to: URL(fileURLWithPath: random))
        let cases: [(String, String, UInt64)] = [("qcow2", "64k", 40 << 20), ("vmdk", "512", 10 << 20), ("vdi", "2M", 24 << 20), ("qed", "4k", (10 << 20) + 3584)]
        for (fmt, cluster, size) in cases {
            let src = s.path("src.\(fmt)"), ours = s.path("ours.qcow2"), theirs = s.path("theirs.qcow2")
            try Harness.run(["qemu-img", "create", "-q", "-f", fmt, src, "\(size)"])
            // Text-like data (compresses), random data (does not), zeros, and a part-cluster tail.
            try Harness.run(["qemu-io", "-f", fmt, "-c", "write -P 0x41 0 1M", "-c", "write -s \(random) 2M 3M", "-c", "write -P 7 5000k 3k",
                             "-c", "write -P 9 \(size - 3584) 3584", src])
            let sourceRaw = s.path("src.raw")
            try Harness.run(["qemu-img", "convert", "-O", "raw", src, sourceRaw])
            try Harness.run([Harness.rawmount, "convert", "-c", "-O", "qcow2", "-o", "cluster_size=\(cluster)", src, ours])
            try Harness.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=\(cluster)", src, theirs])
            let check = try Harness.run(["qemu-img", "check", ours], check: false)
            XCTAssertEqual(check.status, 0, "\(fmt): \(check.out.prefix(500))")
            XCTAssertFalse(check.out.contains(" 0.00% compressed"), "\(fmt): nothing was compressed: \(check.out)")
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-F", fmt, ours, src], check: false).status, 0, fmt)
            XCTAssertLessThanOrEqual(try Files.size(ours), try Files.size(theirs) + (try Files.size(theirs)) / 10, "\(fmt): larger than qemu-img's by more than 10%")
            // Through a mount: reads, then writes over compressed clusters.
            try s.mount(ours)
            let raw = s.mnt + "/ours.raw"
            XCTAssertEqual(try Files.sha(raw), try Files.sha(sourceRaw), fmt)
            let fh = try FileHandle(forUpdating: URL(fileURLWithPath: raw))
            try fh.seek(toOffset: 100_000)
            fh.write(Data(repeating: 0x5A, count: 300_000))
            try fh.synchronize()
            try fh.close()
            try s.unmount()
            XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", ours], check: false).status, 0, "\(fmt): after writing over compressed clusters")
            let expected = sourceRaw
            let e = try FileHandle(forUpdating: URL(fileURLWithPath: expected))
            try e.seek(toOffset: 100_000)
            e.write(Data(repeating: 0x5A, count: 300_000))
            try e.close()
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-F", "raw", ours, expected], check: false).status, 0, fmt)
            for p in [src, ours, theirs, sourceRaw] { try? FileManager.default.removeItem(atPath: p) }
        }
        // Refused where it cannot apply.
        let q = s.path("q.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", q, "1M"])
        XCTAssertNotEqual(try Harness.run([Harness.rawmount, "convert", "-c", "-O", "vdi", q, s.path("x.vdi")], check: false).status, 0)
        XCTAssertNotEqual(try Harness.run([Harness.rawmount, "convert", "-c", "-O", "qcow2", "-B", q, q, s.path("x.qcow2")], check: false).status, 0)
    }

    /// `convert -O vmdk -o subformat=streamOptimized`: every grain compressed behind its
    /// marker, as qemu-img writes it; qemu-img check clean and compare equal, rawmount reads
    /// it back, no larger than qemu-img's stream.
    func testStreamOptimizedOutputReadsAsTheSource() throws {
        let s = try Scratch()
        let random = s.path("random")
        try Data((0..<(1 << 20)).map { _ in UInt8.random(in: 0...255) }).write(to: URL(fileURLWithPath: random))
        for (fmt, size) in [("qcow2", UInt64(64 << 20)), ("vdi", UInt64(9 << 20) + 512)] {
            let src = s.path("src.\(fmt)"), ours = s.path("ours.vmdk"), theirs = s.path("theirs.vmdk")
            try Harness.run(["qemu-img", "create", "-q", "-f", fmt, src, "\(size)"])
            try Harness.run(["qemu-io", "-f", fmt, "-c", "write -P 0x41 0 1M", "-c", "write -s \(random) 3M 1M", "-c", "write -P 3 \(size - 512) 512", src])
            try Harness.run([Harness.rawmount, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, ours])
            try Harness.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, theirs])
            XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", ours], check: false).status, 0, fmt)
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-F", fmt, ours, src], check: false).status, 0, fmt)
            XCTAssertTrue(try Harness.run(["qemu-img", "info", ours]).out.contains("create type: streamOptimized"))
            let sourceRaw = s.path("src.raw")
            try Harness.run(["qemu-img", "convert", "-O", "raw", src, sourceRaw])
            let digest = try Harness.run([Harness.rawmount, "hash", "--algorithm", "sha256", ours]).out
            XCTAssertTrue(digest.contains(try Files.sha(sourceRaw)), "\(fmt): \(digest)")
            XCTAssertLessThanOrEqual(try Files.size(ours), try Files.size(theirs) + (try Files.size(theirs)) / 10, fmt)
            for p in [src, ours, theirs, sourceRaw] { try? FileManager.default.removeItem(atPath: p) }
        }
    }
}
