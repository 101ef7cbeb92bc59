import Foundation
import XCTest
import TestSupport
import Synchronization

/// Readers racing an allocating writer through a real mount: reads, SEEK_DATA/HOLE and
/// stat must never fail while clusters are being allocated and linked, every read must see
/// all writes that completed before it started (large ones are applied in the background),
/// and the image must come out clean and equal to what was written.
final class ConcurrencyTests: XCTestCase {
    override func setUpWithError() throws {
        try Harness.requireFuse()
        try Harness.tool("qemu-img")
    }

    func race(format: String, createOptions: [String] = []) throws {
        let s = try Scratch()
        let img = s.path("race.\(format)")
        // Neither chunk is a multiple of any cluster: fills and splits. 48 KiB writes are
        // written in place, 192 KiB ones behind the acknowledgement.
        let size = 24 << 20, chunks = [48 << 10, 192 << 10]
        try Harness.run(["qemu-img", "create", "-q", "-f", format] + createOptions + [img, "\(size)"])
        // Background writes wait 2 ms before they are applied: a read that does not wait for
        // them sees stale data.
        try s.mount(img, environment: ["RAWMOUNT_TEST_APPLY_DELAY_US": "2000"])
        let raw = s.mnt + "/race.raw"
        var rng = SeededRandom(seed: 99)
        let data = rng.bytes(size)
        let done = Atomic<Bool>(false)
        let written = Atomic<Int>(0)  // every byte below this was acknowledged
        let failures = Mutex<[String]>([])
        let reader = Thread {
            let fd = open(raw, O_RDONLY | 0o40000 /* O_DIRECT: every read reaches the server */)
            var buf = [UInt8](repeating: 0, count: 65536)
            var r = SeededRandom(seed: 7)
            var st = stat()
            while !done.load(ordering: .acquiring) {
                // Reads first, several in a row: the seeks below wait for background writes.
                var off: off_t = 0
                for _ in 0..<8 {
                    let before = written.load(ordering: .acquiring)
                    // Every other read straddles the frontier, where the newest writes land.
                    off = r.next() % 2 == 0 ? off_t(min(max(0, before - buf.count / 2), size - buf.count))
                                            : off_t(r.next() % UInt64(size - buf.count))
                    if pread(fd, &buf, buf.count, off) < 0 { failures.withLock { $0.append("pread at \(off): errno \(errno)") } }
                    let seen = max(0, min(buf.count, before - Int(off)))
                    if seen > 0 && !buf[0..<seen].elementsEqual(data[Int(off)..<Int(off) + seen]) {
                        failures.withLock { $0.append("pread at \(off): stale data below the acknowledged \(before)") }
                    }
                }
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
        var pos = 0, turn = 0
        while pos < size {
            let n = min(chunks[turn % chunks.count], size - pos)
            turn += 1
            let w = data.withUnsafeBytes { pwrite(fd, $0.baseAddress! + pos, n, off_t(pos)) }
            if w != n { failures.withLock { $0.append("pwrite at \(pos): \(w), errno \(errno)") } }
            pos += n
            written.store(pos, ordering: .releasing)
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

    /// fio's own verifier on each writable format: four writers, each in its own slice, with
    /// random sizes from 4 KiB to 1 MiB (both the in-place and the background write path),
    /// unaligned to clusters, then read back and checked; the image must stay clean.
    func testFioVerifyingWritersOnEachFormat() throws {
        try Harness.tool("fio")
        for (format, options) in [("qed", ["-o", "cluster_size=16384"]), ("vdi", []), ("vmdk", []), ("qcow2", ["-o", "cluster_size=16384"]),
                                  ("qcow2", ["-o", "extended_l2=on,cluster_size=64k"])] {
            let s = try Scratch()
            let img = s.path("fio.\(format)")
            try Harness.run(["qemu-img", "create", "-q", "-f", format] + options + [img, "64M"])
            try s.mount(img)
            let r = try Harness.run(["fio", "--name=v", "--filename=\(s.mnt)/fio.raw", "--rw=randwrite", "--bsrange=4k-1m",
                                     "--blockalign=4k", "--numjobs=4", "--size=16M", "--offset_increment=16M", "--direct=1",
                                     "--ioengine=psync", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                                     "--verify_state_save=0", "--group_reporting"], check: false)
            XCTAssertEqual(r.status, 0, "\(format): \(r.err)")
            XCTAssertTrue(r.out.contains("err= 0"), "\(format): \(r.out)")
            try s.unmount()
            try Harness.run(["qemu-img", "check", img])
        }
    }

    func testQEDReadersDuringAllocation() throws { try race(format: "qed", createOptions: ["-o", "cluster_size=16384"]) }
    func testVDIReadersDuringAllocation() throws { try race(format: "vdi") }
    func testVMDKReadersDuringAllocation() throws { try race(format: "vmdk") }
    func testQCOW2ReadersDuringAllocation() throws {
        try race(format: "qcow2", createOptions: ["-o", "cluster_size=16384"])
        try race(format: "qcow2", createOptions: ["-o", "extended_l2=on,cluster_size=64k"])
    }
}
