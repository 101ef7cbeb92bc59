import Foundation
import XCTest
import TestSupport
import Synchronization

/// Readers racing an allocating writer through a real mount: reads, SEEK_DATA/HOLE and
/// stat must never fail while clusters are being allocated and linked, and the image must
/// come out clean and equal to what was written.
final class ConcurrencyTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    func race(format: String, createOptions: [String] = []) throws {
        let s = try Scratch()
        let img = s.path("race.\(format)")
        let size = 24 << 20, chunk = 48 << 10 // not a multiple of any cluster: fills and splits
        try Harness.run(["qemu-img", "create", "-q", "-f", format] + createOptions + [img, "\(size)"])
        try s.mount(img)
        let raw = s.mnt + "/race.raw"
        var rng = SeededRandom(seed: 99)
        let data = rng.bytes(size)
        let done = Atomic<Bool>(false)
        let failures = Mutex<[String]>([])
        let reader = Thread {
            let fd = open(raw, O_RDONLY)
            var buf = [UInt8](repeating: 0, count: 65536)
            var r = SeededRandom(seed: 7)
            var st = stat()
            while !done.load(ordering: .acquiring) {
                let off = off_t(r.next() % UInt64(size - buf.count))
                if pread(fd, &buf, buf.count, off) < 0 { failures.withLock { $0.append("pread at \(off): errno \(errno)") } }
                let d = lseek(fd, off, 3 /* SEEK_DATA */)
                if d < 0 && errno != ENXIO { failures.withLock { $0.append("SEEK_DATA from \(off): errno \(errno)") } }
                if lseek(fd, off, 4 /* SEEK_HOLE */) < 0 { failures.withLock { $0.append("SEEK_HOLE from \(off): errno \(errno)") } }
                if fstat(fd, &st) != 0 { failures.withLock { $0.append("fstat: errno \(errno)") } }
            }
            close(fd)
        }
        reader.start()
        let fd = open(raw, O_WRONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        var pos = 0
        while pos < size {
            let n = min(chunk, size - pos)
            let w = data.withUnsafeBytes { pwrite(fd, $0.baseAddress! + pos, n, off_t(pos)) }
            if w != n { failures.withLock { $0.append("pwrite at \(pos): \(w), errno \(errno)") } }
            pos += n
        }
        close(fd)
        done.store(true, ordering: .releasing)
        while !reader.isFinished { usleep(1000) }
        try s.unmount()
        XCTAssertEqual(failures.withLock { $0 }, [], "\(format): requests failed while clusters were being allocated")
        try Harness.run(["qemu-img", "check", img])
        let shadow = s.path("shadow.raw")
        try Data(data).write(to: URL(fileURLWithPath: shadow))
        try Harness.run(["qemu-img", "compare", "-f", format, "-F", "raw", img, shadow])
    }

    func testQEDReadersDuringAllocation() throws { try race(format: "qed", createOptions: ["-o", "cluster_size=16384"]) }
    func testVDIReadersDuringAllocation() throws { try race(format: "vdi") }
    func testVMDKReadersDuringAllocation() throws { try race(format: "vmdk") }
}
