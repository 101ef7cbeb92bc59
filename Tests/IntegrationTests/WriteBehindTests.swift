import XCTest
import Foundation

/// Large writes are acknowledged before they reach the image (FuseAdapter/WriteBehind.swift).
/// These check what a user must still be able to rely on: every later request sees them,
/// and a failure to apply one reaches the writer, the log, and leaves the image sound.
final class WriteBehindTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func testAcknowledgedWritesAreSeenByOtherReadersAndReachTheImage() throws {
        let s = try Scratch()
        let img = s.path("wb.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "64M"])
        let src = s.path("src.bin")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(src)", "bs=1M", "count=24", "status=none"])
        try s.mount(img)
        let raw = s.mnt + "/wb.raw"
        for (bs, seek) in [("1M", "4"), ("128k", "320")] {  // 4 MiB and 40 MiB in
            try Harness.run(["dd", "if=\(src)", "of=\(raw)", "bs=\(bs)", "seek=\(seek)", "count=\(bs == "1M" ? 24 : 64)",
                             "oflag=direct", "conv=notrunc", "status=none"])
        }
        // Another process, another descriptor, straight after the writer returned.
        try Harness.run(["cmp", "-n", "25165824", "-i", "0:4194304", src, raw])
        try Harness.run(["cmp", "-n", "8388608", "-i", "0:41943040", src, raw])
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
        let image = try s.qemuRaw(img)
        let bytes = try Files.read(src)
        XCTAssertEqual(image.subdata(in: 4 << 20 ..< 28 << 20), bytes)
        XCTAssertEqual(image.subdata(in: 40 << 20 ..< 48 << 20), bytes.prefix(8 << 20))
        XCTAssertEqual(image.prefix(4 << 20), Data(count: 4 << 20))
    }

    /// The host file system fills up under a writer: the writer gets ENOSPC (on the write
    /// itself or the next one), the log names the acknowledged write that failed, the
    /// mount still unmounts, and the image is consistent for qemu-img.
    func testHostDiskFullReachesTheWriterAndTheLog() throws {
        let s = try Scratch()
        let small = s.path("small")
        try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: true)
        try Harness.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", small])
        defer { _ = try? Harness.run(["umount", "-l", small], check: false) }
        let img = small + "/full.qed"
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "64M"])
        try s.mount(img)
        let dd = try Harness.run(["dd", "if=/dev/urandom", "of=\(s.mnt)/full.raw", "bs=1M", "count=32",
                                  "oflag=direct", "conv=notrunc,fsync", "status=none"], check: false)
        XCTAssertNotEqual(dd.status, 0, "dd succeeded on a full host file system")
        XCTAssertTrue(dd.err.contains("No space left on device"), dd.err)
        try s.unmount()
        let log = try String(contentsOfFile: s.serverLog, encoding: .utf8)
        XCTAssertTrue(log.contains("No space left on device"), log)
        XCTAssertTrue(log.contains("full.qed") && log.contains("acknowledged earlier"), log)
        let check = try Harness.run(["qemu-img", "check", img], check: false)
        XCTAssertTrue(check.status == 0 || check.status == 3, "corrupt after ENOSPC: \(check.out)\(check.err)")
        XCTAssertFalse(check.out.contains("ERROR"), check.out)
    }
}
