import XCTest
import Foundation

/// The host fails a write or a flush under a real mount (RAWMOUNT_TEST_FAULT, the engine's
/// fault point): the error reaches the writer and `unmount`, later flushes fail too, and
/// the image stays sound for qemu-img. `make crash` runs the full campaign (scripts/faults.py).
final class HostFaultMountTests: XCTestCase {
    /// One failed fdatasync: that fsync fails, and so does every later one (Linux may have
    /// dropped the pages it could not write), although the host would now succeed;
    /// `unmount` says why, and after a remount qemu-img finds at most leaks.
    func testAFailedFlushFailsEveryLaterFlushUntilRemount() throws {
        try Harness.requireFuse()
        for format in ["qcow2", "qed", "vdi", "vmdk", "vpc", "vhdx", "raw"] {
            let s = try Scratch()
            let img = s.path("f.\(format)")
            try Harness.run(["qemu-img", "create", "-q", "-f", format, img, "32M"])
            let report = s.path("fault-report")
            // The first fdatasync the server makes for the writes fails (only that one); a
            // writable VHDX open makes two itself (both headers, as QEMU's open does).
            let nth = format == "vhdx" ? 3 : 1
            try s.mount(img, environment: ["RAWMOUNT_TEST_FAULT": "sync:\(nth):eio", "RAWMOUNT_TEST_FAULT_REPORT": report])
            let raw = s.mnt + "/f.raw"
            let first = try Harness.run(["dd", "if=/dev/urandom", "of=\(raw)", "bs=64k", "count=8", "conv=notrunc,fsync", "status=none"], check: false)
            XCTAssertNotEqual(first.status, 0, "\(format): the failed fsync was hidden")
            XCTAssertTrue(try String(contentsOfFile: report, encoding: .utf8).contains("test fault: sync #\(nth)"), format)
            let second = try Harness.run(["dd", "if=/dev/urandom", "of=\(raw)", "bs=64k", "count=1", "seek=100", "conv=notrunc,fsync", "status=none"], check: false)
            XCTAssertNotEqual(second.status, 0, "\(format): a write and fsync after a failed flush succeeded")
            let u = try Harness.run([Harness.rawmount, "unmount", s.mnt], check: false)
            XCTAssertEqual(u.status, 1, "\(format): unmount hid the failure: \(u.err)")
            XCTAssertTrue(u.err.contains("an earlier write-back failed") && u.err.contains("Input/output error"), u.err)
            try s.forgetMount(s.mnt)
            // A writable remount repairs what the failure left; then qemu-img agrees.
            try s.mount(img)
            try s.unmount()
            if format != "raw" {
                // (qemu-img has no check for VHD; rawmount's has its exit codes.)
                let check = try Harness.run(format == "vpc" ? [Harness.rawmount, "check", img] : ["qemu-img", "check", "-f", format, img], check: false)
                XCTAssertTrue(check.status == 0 || check.status == 3, "\(format): \(check.out)\(check.err)")
            }
        }
    }

    /// `create` and `mount --overlay` whose writes fail part way leave no file behind that
    /// looks like an image (a kill leaves at most the hidden temporary file): the next
    /// attempt works without deleting anything by hand.
    func testCreationThatFailsPartWayLeavesNoImage() throws {
        let s = try Scratch()
        // The fault: a write after the first where the format makes several, else the only
        // write (QED) or the sizing ftruncate (raw).
        for (format, extra, fault) in [("vmdk", [String](), "write:2"), ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"], "write:2"),
                                       ("qcow2", [], "write:2"), ("qed", [], "write:1"), ("vdi", [], "write:2"), ("raw", [], "fallocate:1")] {
            let img = s.path("new-\(format)\(extra.isEmpty ? "" : "-split").\(format)")
            let failed = try Harness.run(["env", "RAWMOUNT_TEST_FAULT=\(fault):eio", Harness.rawmount, "create", "-f", format] + extra + [img, "64M"], check: false)
            XCTAssertNotEqual(failed.status, 0, "\(format): create went on past a failed write")
            XCTAssertFalse(FileManager.default.fileExists(atPath: img), "\(format): a half-made image was left at \(img)")
            let leftovers = try FileManager.default.contentsOfDirectory(atPath: s.dir).filter { $0.contains("rawmount-new") }
            XCTAssertEqual(leftovers, [], "\(format): temporary files left after an error")
            try Harness.run([Harness.rawmount, "create", "-f", format] + extra + [img, "64M"])
            try Harness.run(["qemu-img", "check", "-f", format, img], check: format != "raw")
        }
        try Harness.requireFuse()
        let evidence = s.path("evidence.raw")
        try Harness.run(["truncate", "-s", "16M", evidence])
        let overlay = s.path("ov.qcow2")
        let failed = try Harness.run(["env", "RAWMOUNT_TEST_FAULT=write:2:eio", Harness.rawmount, "mount", "--overlay", overlay, evidence, s.mnt], check: false)
        XCTAssertNotEqual(failed.status, 0, "the overlay's creation failed but the mount went on")
        XCTAssertFalse(FileManager.default.fileExists(atPath: overlay), "a half-made overlay was left")
        try s.mount(evidence, options: ["--overlay", overlay])
        try Harness.run(["dd", "if=/dev/urandom", "of=\(s.mnt)/evidence.raw", "bs=64k", "count=4", "conv=notrunc,fsync", "status=none"])
        try s.unmount()
        try Harness.run(["qemu-img", "check", overlay])
    }
}
