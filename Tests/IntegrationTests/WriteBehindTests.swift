import XCTest
import Foundation

/// Large writes are acknowledged before they reach the image (FuseAdapter/WriteBehind.swift).
/// These check what a user must still be able to rely on: every later request sees them,
/// and a failure to apply one reaches the writer, the log, and leaves the image sound.
final class WriteBehindTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    /// Background writes are held 20 ms before they are applied, so each request below runs
    /// while some are still queued: it must see them (and a punch must not be overtaken).
    func testAcknowledgedWritesAreSeenByLaterRequestsAndReachTheImage() throws {
        let s = try Scratch()
        let img = s.path("wb.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "64M"])
        let src = s.path("src.bin")
        try Harness.run(["dd", "if=/dev/urandom", "of=\(src)", "bs=1M", "count=24", "status=none"])
        try s.mount(img, environment: ["RAWMOUNT_TEST_APPLY_DELAY_US": "20000"])
        let raw = s.mnt + "/wb.raw"
        try Harness.run(["dd", "if=\(src)", "of=\(raw)", "bs=1M", "seek=4", "count=24", "oflag=direct", "conv=notrunc", "status=none"])
        try Harness.run(["fallocate", "-p", "-o", "26M", "-l", "1M", raw])  // inside the last writes
        try Harness.run(["dd", "if=\(src)", "of=\(raw)", "bs=128k", "seek=320", "count=64", "oflag=direct", "conv=notrunc", "status=none"])
        let fd = open(raw, O_RDONLY)
        XCTAssertEqual(lseek(fd, 40 << 20, 4 /* SEEK_HOLE */), 48 << 20, "SEEK_HOLE sees the newest writes")
        close(fd)
        // Another process, another descriptor, straight after the writers returned.
        try Harness.run(["cmp", "-n", "8388608", "-i", "0:41943040", src, raw])
        var expected = Data(count: 64 << 20)
        let bytes = try Files.read(src)
        expected.replaceSubrange(4 << 20 ..< 28 << 20, with: bytes)
        expected.replaceSubrange(26 << 20 ..< 27 << 20, with: Data(count: 1 << 20))
        expected.replaceSubrange(40 << 20 ..< 48 << 20, with: bytes.prefix(8 << 20))
        XCTAssertTrue(try Files.read(raw) == expected, "the raw view differs from what was written")
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
        XCTAssertTrue(try s.qemuRaw(img) == expected, "the image differs from what was written")
    }

    /// Unmounting while acknowledged writes are still held: they reach the image before the
    /// server closes it, with the image clean (NEED_CHECK cleared) afterwards.
    func testUnmountRightAfterWritesKeepsThem() throws {
        let s = try Scratch()
        let img = s.path("late.qed"), src = s.path("src.bin")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "32M"])
        try Harness.run(["dd", "if=/dev/urandom", "of=\(src)", "bs=1M", "count=8", "status=none"])
        try s.mount(img, environment: ["RAWMOUNT_TEST_APPLY_DELAY_US": "50000"])
        try Harness.run(["dd", "if=\(src)", "of=\(s.mnt)/late.raw", "bs=1M", "seek=16", "oflag=direct", "conv=notrunc", "status=none"])
        try s.unmount()
        XCTAssertEqual(try Files.read(img)[16] & 0x02, 0, "NEED_CHECK left set by a clean unmount")
        try Harness.run(["qemu-img", "check", img])
        XCTAssertTrue(try s.qemuRaw(img).subdata(in: 16 << 20 ..< 24 << 20) == (try Files.read(src)), "held writes lost at unmount")
    }

    /// Applies held back 1 s: an O_DSYNC write, and a plain write once its file is closed,
    /// must already be in the image when the writer gets control back.
    func testSyncWritesAndCloseReachTheImageBeforeReturning() throws {
        let s = try Scratch()
        let img = s.path("sync.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "16M"])
        try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P 0x11 0 1M", img])
        // Where guest offset 0 lives in the file: the O_DSYNC check reads it there itself,
        // since spawning a witness would close a copy of the open descriptor, and every
        // close makes the server flush.
        let map = try Harness.run(["qemu-img", "map", "--output=json", img]).out
        let host = try XCTUnwrap(map.split(separator: ",").first { $0.contains("\"offset\"") }
            .flatMap { Int($0.split(separator: ":").last!.trimmingCharacters(in: .whitespaces.union(CharacterSet(charactersIn: "}]\n")))) })
        let b = s.path("b.bin")
        try Data(repeating: 0x6B, count: 1 << 20).write(to: URL(fileURLWithPath: b))
        try s.mount(img, environment: ["RAWMOUNT_TEST_APPLY_DELAY_US": "1000000"])
        let raw = s.mnt + "/sync.raw"
        let fd = open(raw, O_WRONLY | 0o40000 /* O_DIRECT */ | O_DSYNC | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buf.deallocate() }
        memset(buf, 0x5A, 1 << 20)
        XCTAssertEqual(pwrite(fd, buf, 1 << 20, 0), 1 << 20)
        let image = open(img, O_RDONLY | O_CLOEXEC)
        var seen = [UInt8](repeating: 0, count: 4096)
        XCTAssertEqual(pread(image, &seen, 4096, off_t(host)), 4096)
        close(image)
        XCTAssertEqual(Set(seen), [0x5A], "an O_DSYNC write returned before it was in the image")
        close(fd)
        func imageHolds(_ pattern: String, at offset: String) throws -> Bool {
            let r = try Harness.run(["qemu-io", "-U", "-r", "-f", "qed", "-c", "read -P \(pattern) \(offset) 1M", img], check: false)
            return r.status == 0 && !r.out.contains("Pattern verification failed")
        }
        try Harness.run(["dd", "if=\(b)", "of=\(raw)", "bs=1M", "seek=4", "oflag=direct", "conv=notrunc", "status=none"])
        XCTAssertTrue(try imageHolds("0x6b", at: "4M"), "close returned before the held write was in the image")
        try s.unmount()
        try Harness.run(["qemu-img", "check", img])
    }

    /// The host file system fills up under a writer: the writer gets ENOSPC (on the write
    /// itself or the next one), the log names the acknowledged write that failed, the
    /// mount still unmounts, and the image is consistent for qemu-img. Whether closing then
    /// fails too depends on which write hit the wall (see the next test for that path).
    func testHostDiskFullReachesTheWriterAndTheLog() throws {
        for format in ["qed", "qcow2"] {
            let s = try Scratch()
            let small = try s.tmpfs("small", size: "6M")
            let img = small + "/full.\(format)"
            try Harness.run(["qemu-img", "create", "-q", "-f", format, img, "64M"])
            try s.mount(img)
            let dd = try Harness.run(["dd", "if=/dev/urandom", "of=\(s.mnt)/full.raw", "bs=1M", "count=32",
                                      "oflag=direct", "conv=notrunc,fsync", "status=none"], check: false)
            XCTAssertNotEqual(dd.status, 0, "\(format): dd succeeded on a full host file system")
            XCTAssertTrue(dd.err.contains("No space left on device"), dd.err)
            let u = try Harness.run([Harness.rawmount, "unmount", s.mnt], check: false)
            if u.status != 0 {
                XCTAssertEqual(u.status, 1, u.err)
                XCTAssertTrue(u.err.contains("unmounted, but closing \(img)") && u.err.contains("No space left on device"), u.err)
            }
            XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0)
            let log = try String(contentsOfFile: s.serverLog, encoding: .utf8)
            XCTAssertTrue(log.contains("No space left on device"), log)
            XCTAssertTrue(log.contains("full.\(format)") && log.contains("acknowledged earlier"), log)
            let check = try Harness.run(["qemu-img", "check", img], check: false)
            XCTAssertTrue(check.status == 0 || check.status == 3, "\(format): corrupt after ENOSPC: \(check.out)\(check.err)")
            XCTAssertFalse(check.out.contains("ERROR"), check.out)
            try s.forgetMount(s.mnt)
        }
    }

    /// The disk under the image dies after a write was acknowledged: closing cannot write
    /// QED's metadata, so `unmount` still unmounts but says what failed and exits 1.
    func testCloseFailureIsReportedByUnmount() throws {
        let s = try Scratch()
        let disk = try s.ext4("disk", size: "32M")
        let img = disk + "/dying.qed"
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "16M"])
        try s.mount(img)
        try Harness.run(["dd", "if=/dev/urandom", "of=\(s.mnt)/dying.raw", "bs=1M", "count=1", "oflag=direct",
                         "conv=notrunc", "status=none"])
        try s.shutDownFileSystem(disk)
        let u = try Harness.run([Harness.rawmount, "unmount", s.mnt], check: false)
        XCTAssertEqual(u.status, 1, "unmount hid a failed close: \(u.err)")
        XCTAssertTrue(u.err.contains("unmounted, but closing \(img)") && u.err.contains("Input/output error"), u.err)
        XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0)
        let log = try String(contentsOfFile: s.serverLog, encoding: .utf8)
        XCTAssertTrue(log.contains("dying.qed") && log.contains("Input/output error"), log)
    }
}
