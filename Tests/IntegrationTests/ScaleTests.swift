import Foundation
import TestSupport
import XCTest

/// Huge sparse images (8 TiB, QEMU's own layouts: VMDK with every grain table preallocated
/// in a host hole, VDI with a 32 MiB block map): st_blocks, SEEK_DATA/SEEK_HOLE and reads are
/// right, and stay right after writes land in tables that were holes. Timings are in
/// `make bench` (scripts/scale.py), not here.
final class ScaleTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    func seek(_ fd: Int32, _ from: UInt64, data: Bool) -> Int64 { Int64(lseek(fd, off_t(from), data ? 3 : 4)) }

    func blocks(_ path: String) -> UInt64 {
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        return UInt64(st.st_blocks) * 512
    }

    /// st_blocks once it stops changing toward `want` (the kernel caches attributes for a
    /// second, and the recount after a change runs at most once a second): at most 10 s.
    func settledBlocks(_ path: String, _ want: UInt64) -> UInt64 {
        var got = blocks(path)
        var tries = 0
        while got != want && tries < 10 { usleep(1_100_000); got = blocks(path); tries += 1 }
        return got
    }

    func testHugeSparseImagesReportExactAllocationBeforeAndAfterWrites() throws {
        let s = try Scratch()
        let tib: UInt64 = 1 << 40
        for (format, options) in [("qcow2", [String]()), ("qed", []), ("vdi", []), ("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized"])] {
            let img = s.path("big.\(format)")
            try? FileManager.default.removeItem(atPath: img)
            try Harness.run(["qemu-img", "create", "-q", "-f", format] + options + [img, "8T"])
            try Harness.run(["qemu-io", "-f", format, "-c", "write -P 0x5a \(4 * tib) 1M", img])
            let writable = !options.contains("subformat=streamOptimized")
            try s.mount(img, options: writable ? [] : ["--read-only"])
            let raw = s.mnt + "/big.raw"
            let what = "\(format) \(options)"
            // The first stat may show an estimate while the first walk runs in the background.
            XCTAssertEqual(settledBlocks(raw, 1 << 20), 1 << 20, "\(what): st_blocks")
            let fd = open(raw, writable ? O_RDWR : O_RDONLY)
            XCTAssertEqual(seek(fd, 0, data: true), Int64(4 * tib), "\(what): SEEK_DATA")
            XCTAssertEqual(seek(fd, 4 * tib, data: false), Int64(4 * tib + (1 << 20)), "\(what): SEEK_HOLE")
            XCTAssertEqual(seek(fd, 4 * tib + (1 << 20), data: true), -1, "\(what): data past the only extent")
            var buf = [UInt8](repeating: 0, count: 4096)
            XCTAssertEqual(pread(fd, &buf, 4096, off_t(4 * tib + 8192)), 4096)
            XCTAssertEqual(buf, [UInt8](repeating: 0x5a, count: 4096), what)
            if writable {
                // A write far from the data lands in a table that was a hole (or missing).
                let bytes = [UInt8](repeating: 0xa5, count: 65536)
                XCTAssertEqual(pwrite(fd, bytes, bytes.count, off_t(tib)), bytes.count)
                XCTAssertEqual(fsync(fd), 0)
                XCTAssertEqual(seek(fd, 0, data: true), Int64(tib), "\(what): SEEK_DATA after a write")
                let unit: UInt64 = format == "vdi" ? 1 << 20 : 65536  // a VDI block is 1 MiB
                XCTAssertEqual(seek(fd, tib, data: false), Int64(tib + unit), "\(what): SEEK_HOLE after a write")
                XCTAssertEqual(settledBlocks(raw, (1 << 20) + unit), (1 << 20) + unit, "\(what): st_blocks after a write")
            }
            close(fd)
            try s.unmount()
            if writable {
                let check = try Harness.run(["qemu-img", "check", img], check: false)
                XCTAssertEqual(check.status, 0, "\(what): \(check.out)")
                let read = try Harness.run(["qemu-io", "-f", format, "-c", "read -P 0xa5 \(tib) 64k", "-c", "read -P 0x5a \(4 * tib) 1M", img])
                XCTAssertFalse(read.out.contains("Pattern verification failed"), "\(what): \(read.out)")
            }
            try? FileManager.default.removeItem(atPath: img)
        }
    }
}
