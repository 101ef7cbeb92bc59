import Foundation
import XCTest

/// `rawmount resize` against `qemu-img resize` on copies of the same images: the same new
/// size, the old content kept, the new space reading as zeros, the image checking clean.
final class ResizeTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func testResizeEndsAsQemuImgResizeEnds() throws {
        let s = try Scratch()
        for (fmt, create) in [("raw", ["-f", "raw"]), ("qcow2", ["-f", "qcow2"]), ("qcow2", ["-f", "qcow2", "-o", "cluster_size=4k,compat=0.10"]), ("qed", ["-f", "qed"])] {
            let ours = s.path("ours.\(fmt)"), theirs = s.path("theirs.\(fmt)"), before = s.path("before.raw")
            for p in [ours, theirs] {
                try Harness.run(["qemu-img", "create", "-q"] + create + [p, "16M"])
                try Harness.run(["qemu-io", "-f", fmt, "-c", "write -P 5 1M 64k", "-c", "write -P 6 15M 1M", p])
            }
            try Harness.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", ours, before])
            for change in ["+16M", "40M"] {
                try Harness.run([Harness.rawmount, "resize", "-q", ours, change])
                try Harness.run(["qemu-img", "resize", "-q", "-f", fmt, theirs, change])
                let size = { (p: String) in try Harness.run(["qemu-img", "info", "-f", fmt, "--output=json", p]).out
                    .split(separator: "\n").first { $0.contains("\"virtual-size\"") }.map(String.init) ?? "" }
                XCTAssertEqual(try size(ours), try size(theirs), "\(create) \(change)")
                XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, ours, theirs], check: false).status, 0, "\(create) \(change)")
                if fmt != "raw" { XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", "-f", fmt, ours], check: false).status, 0) }
            }
            XCTAssertEqual(try Harness.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", ours, before], check: false).status, 0,
                           "\(create): the old disk and zeros after it")
            // Smaller: refused without --shrink (raw and qcow2 shrink with it: below).
            XCTAssertNotEqual(try Harness.run([Harness.rawmount, "resize", ours, "8M"], check: false).status, 0)
            if fmt == "raw" {
                try Harness.run([Harness.rawmount, "resize", "-q", "--shrink", ours, "8M"])
                XCTAssertEqual(try Files.size(ours), 8 << 20)
            }
        }
        // A qcow2 growing past what its L1 clusters map: the table moves (512-byte clusters map
        // 32 KiB per L1 entry, so 64 MiB needs 32 clusters of L1), with a snapshot present as
        // qemu-img allows; then shrinking, as qemu-img --shrink: data past the end is gone.
        // (64 MiB, not 1 GiB: qemu-img's shrink of the peer's 1 GiB of 512-byte clusters took
        // 99 s, most of the suite's longest test.)
        let small = s.path("small.qcow2"), peer = s.path("small-peer.qcow2")
        for p in [small, peer] {
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "1M"])
            try Harness.run(["qemu-io", "-c", "write -P 7 100k 200k", p])
            try Harness.run(["qemu-img", "snapshot", "-c", "s", p])
        }
        try Harness.run([Harness.rawmount, "resize", "-q", small, "64M"])
        try Harness.run(["qemu-img", "resize", "-q", peer, "64M"])
        for p in [small, peer] { try Harness.run(["qemu-io", "-c", "write -P 8 60M 1M", "-c", "write -P 9 150k 10k", p]) }
        XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", small], check: false).status, 0, "after moving the L1 table")
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", small, peer], check: false).status, 0)
        try Harness.run([Harness.rawmount, "resize", "-q", "--shrink", small, "200k"])
        try Harness.run(["qemu-img", "resize", "-q", "--shrink", peer, "200k"])
        let shrunk = try Harness.run(["qemu-img", "check", small], check: false)
        XCTAssertEqual(shrunk.status, 0, "after shrinking: \(shrunk.out.prefix(500))")
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", small, peer], check: false).status, 0)
        try Harness.run([Harness.rawmount, "resize", "-q", small, "2M"])
        try Harness.run(["qemu-img", "resize", "-q", peer, "2M"])
        XCTAssertEqual(try Harness.run(["qemu-img", "compare", small, peer], check: false).status, 0, "grown again: zeros past the old end")
        // Persistent dirty bitmaps are resized with the disk, their bits kept, as qemu-img
        // resizes them: the same dirty extents after growing and after shrinking.
        let withBitmaps = [s.path("bm-ours.qcow2"), s.path("bm-theirs.qcow2")]
        for p in withBitmaps {
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", p, "16M"])
            try Harness.run(["qemu-img", "bitmap", "--add", p, "b1"])
            try Harness.run(["qemu-img", "bitmap", "--add", "-g", "1M", p, "b2"])
            try Harness.run(["qemu-io", "-c", "write -P 1 1M 3M", "-c", "write 15M 1M", p])
        }
        for change in ["1G", "8M"] {
            try Harness.run([Harness.rawmount, "resize", "-q", "--shrink", withBitmaps[0], change])
            try Harness.run(["qemu-img", "resize", "-q", "--shrink", withBitmaps[1], change])
            XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", withBitmaps[0]], check: false).status, 0, "bitmaps, \(change)")
            for b in ["b1", "b2"] {
                XCTAssertEqual(try Harness.run([Harness.rawmount, "bitmap", "dump", withBitmaps[0], b]).out,
                               try Harness.run([Harness.rawmount, "bitmap", "dump", withBitmaps[1], b]).out, "\(b) after resizing to \(change)")
            }
            try Harness.run(["qemu-io", "-c", "write 7M 64k", withBitmaps[0]])  // QEMU loads and keeps them
            XCTAssertEqual(try Harness.run(["qemu-img", "check", "-q", withBitmaps[0]], check: false).status, 0, "bitmaps, \(change), after QEMU wrote")
            try Harness.run(["qemu-io", "-c", "write 7M 64k", withBitmaps[1]])
        }
        // QED does not shrink (qemu-img refuses too).
        let qed = s.path("s.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", qed, "16M"])
        XCTAssertNotEqual(try Harness.run([Harness.rawmount, "resize", "--shrink", qed, "8M"], check: false).status, 0)
        // Formats qemu-img does not resize.
        let vdi = s.path("d.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", vdi, "8M"])
        let v = try Harness.run([Harness.rawmount, "resize", vdi, "16M"], check: false)
        XCTAssertNotEqual(v.status, 0)
        XCTAssertTrue(v.err.contains("raw, qcow2 and QED"), v.err)
    }

    /// A kill -9 before each host write and sync of a qcow2 resize that moves the L1 table
    /// (and of a shrink): the image checks clean but for leaked clusters, and the disk reads
    /// as before up to the smaller of the two sizes.
    func testAKillAtEveryWriteOfAQcow2ResizeKeepsTheDisk() throws {
        let s = try Scratch()
        let make = { (name: String) throws -> String in
            let img = s.path(name)
            try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M"])
            try Harness.run(["qemu-io", "-c", "write -P 7 100k 200k", "-c", "write -P 8 900k 100k", img])
            try Harness.run(["qemu-img", "snapshot", "-c", "s", img])
            return img
        }
        let model = try make("model.qcow2"), before = s.path("before.raw")
        try Harness.run(["qemu-img", "convert", "-O", "raw", model, before])
        for (label, args, kept) in [("grow", ["64M"], 1 << 20), ("shrink", ["--shrink", "200k"], 200 << 10)] {
            let count = try make("count-\(label).qcow2"), report = s.path("ops-\(label)")
            try Harness.run(["env", "RAWMOUNT_TEST_FAULT=write,sync:0:eio", "RAWMOUNT_TEST_FAULT_REPORT=\(report)", Harness.rawmount, "resize", "-q"] + [count] + args)
            let total = try Harness.writesAndSyncs(inReport: report)
            XCTAssertGreaterThan(total, 3, label)
            for n in stride(from: 1, through: total, by: max(1, total / 25)) {
                let img = try make("k.qcow2")
                let r = try Harness.run(["env", "RAWMOUNT_TEST_FAULT=write,sync:\(n):kill", Harness.rawmount, "resize", "-q", img] + args, check: false)
                XCTAssertNotEqual(r.status, 0, "\(label) op \(n) was not reached")
                let c = try Harness.run(["qemu-img", "check", img], check: false)
                XCTAssertTrue(c.status == 0 || c.status == 3, "\(label) op \(n): check exit \(c.status) \(c.out.prefix(300))")
                let now = s.path("k.raw")
                try Harness.run(["qemu-img", "convert", "-O", "raw", img, now])
                XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: now)).prefix(kept), try Data(contentsOf: URL(fileURLWithPath: before)).prefix(kept),
                               "\(label) op \(n): the disk changed")
                try FileManager.default.removeItem(atPath: img)
            }
        }
    }
}
