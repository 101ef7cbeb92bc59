import XCTest
import Foundation
import Synchronization
@testable import BlockEngine
@testable import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// A one-level test format over a real file: guest cluster -> host cluster, new clusters from
/// released ones first (as qcow2 reuses freed clusters), then the end of the file. Discards
/// unlink a cluster and report it, so the engine's deferred release is what is tested.
final class ReusingDriver: ImageAllocating, @unchecked Sendable {
    let file: ImageFile
    let info: ImageInfo
    var isWritable: Bool { true }
    static let cluster: UInt64 = 4096
    private let state = Mutex<(table: [UInt64: UInt64], free: [UInt64], end: UInt64, unlinked: [HostRange])>(([:], [], 0, []))
    /// Failures to inject into the next `flush` calls (true: that call throws).
    let flushFailures = Mutex<[Bool]>([])
    /// Every range `release` was given, in order.
    let released = Mutex<[HostRange]>([])
    /// Allocations handed out so far.
    let allocations = Mutex(0)
    /// Called with each allocation as `commit` starts, before it is linked.
    let onCommit = Mutex<(@Sendable (Allocation) -> Void)?>(nil)

    init(file: ImageFile, size: UInt64) {
        self.file = file
        info = ImageInfo(format: "test", virtualSize: size, clusterSize: Self.cluster)
    }

    func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let n = RangeWalk.toClusterEnd(offset, clusterSize: Self.cluster, maxLength: maxLength)
        guard let host = state.withLock({ $0.table[offset / Self.cluster] }) else { return .unallocated(length: n) }
        return .data(host: host + offset % Self.cluster, length: n)
    }

    func allocate(_ offset: UInt64, length: UInt64) throws -> Allocation {
        allocations.withLock { $0 += 1 }
        let (host, fresh) = state.withLock { s -> (UInt64, Bool) in
            if let h = s.free.popLast() { return (h, false) }
            defer { s.end += Self.cluster }
            return (s.end, true)
        }
        return Allocation(guestOffset: offset.alignedDown(Self.cluster), hostOffset: host, length: Self.cluster, fresh: fresh)
    }

    func commit(_ a: Allocation) throws {
        onCommit.withLock { $0 }?(a)
        state.withLock { $0.table[a.guestOffset / Self.cluster] = a.hostOffset }
    }
    func takeUnlinked() -> [HostRange] { state.withLock { s in defer { s.unlinked = [] }; return s.unlinked } }
    func release(_ ranges: [HostRange]) throws {
        released.withLock { $0 += ranges }
        state.withLock { s in s.free += ranges.map(\.offset) }
    }

    func zeroRange(_ offset: UInt64, length: UInt64, deallocate: Bool) throws -> (offset: UInt64, length: UInt64) {
        let start = offset.alignedUp(Self.cluster), end = (offset + length).alignedDown(Self.cluster)
        guard start < end else { return (offset, 0) }
        state.withLock { s in
            for c in stride(from: start, to: end, by: Int(Self.cluster)) {
                if let h = s.table.removeValue(forKey: c / Self.cluster) { s.unlinked.append(HostRange(offset: h, length: Self.cluster)) }
            }
        }
        return (start, end - start)
    }

    func flush() throws {
        let fail = flushFailures.withLock { f in f.isEmpty ? false : f.removeFirst() }
        if fail { throw BlockError.io(file: file.path, operation: "fdatasync", offset: nil, errno: EIO) }
        try file.sync()
    }

    func close() throws { try flush() }
}

final class HostFaultTests: XCTestCase {
    private func scratchFile() throws -> (ImageFile, String) {
        let p = NSTemporaryDirectory() + "faults-" + UUID().uuidString
        XCTAssertTrue(FileManager.default.createFile(atPath: p, contents: nil))
        addTeardownBlock { try? FileManager.default.removeItem(atPath: p) }
        return (try ImageFile(path: p, writable: true), p)
    }

    private func fill(_ byte: UInt8) -> [UInt8] { [UInt8](repeating: byte, count: Int(ReusingDriver.cluster)) }

    /// A reader that mapped a cluster and has not read it yet is overtaken: the cluster is
    /// discarded, a flush releases it, a write elsewhere reuses it. The reader must still get
    /// the bytes of the offset it asked for (the old ones), never the new owner's: the
    /// release waits for reads that began before it.
    func testReleaseWaitsForAReaderThatMappedTheCluster() throws {
        let (file, _) = try scratchFile()
        let driver = ReusingDriver(file: file, size: 1 << 20)
        let device = BlockDevice(driver: driver)
        try fill(0x41).withUnsafeBytes { try device.write($0, at: 0) }
        try device.flush()

        let mapped = DispatchSemaphore(value: 0), go = DispatchSemaphore(value: 0)
        BlockDevice.testHookAfterReadMap = { d in
            guard d === device else { return }
            mapped.signal()
            _ = go.wait(timeout: .now() + 10)
        }
        defer { BlockDevice.testHookAfterReadMap = nil }
        let got = Mutex<[UInt8]>([])
        let reader = Thread {
            var buf = [UInt8](repeating: 0, count: Int(ReusingDriver.cluster))
            buf.withUnsafeMutableBytes { try? device.read(into: $0, at: 0) }
            got.withLock { $0 = buf }
        }
        reader.start()
        XCTAssertEqual(mapped.wait(timeout: .now() + 10), .success)

        try device.zero(at: 0, length: ReusingDriver.cluster, deallocate: true)
        let flushed = DispatchSemaphore(value: 0)
        Thread { try? device.flush(); flushed.signal() }.start()
        // The flush must not release the cluster while the reader holds its mapping.
        XCTAssertEqual(flushed.wait(timeout: .now() + 0.5), .timedOut, "the release did not wait for the reader")
        try fill(0x42).withUnsafeBytes { try device.write($0, at: 8 * ReusingDriver.cluster) }
        go.signal()
        XCTAssertEqual(flushed.wait(timeout: .now() + 10), .success)
        while got.withLock({ $0.isEmpty }) { usleep(1000) }
        XCTAssertTrue(got.withLock { $0 } == fill(0x41), "the reader returned another offset's bytes: \(Set(got.withLock { $0 }))")
        XCTAssertEqual(driver.released.withLock { $0.count }, 1)
    }

    /// One failed flush after the release (QEMU's case: the refcount drop cannot be written):
    /// the batch is released once, never again, and every later write and flush fails until
    /// the image is opened again.
    func testAFailedFlushIsStickyAndNeverReleasesTwice() throws {
        let (file, _) = try scratchFile()
        let driver = ReusingDriver(file: file, size: 1 << 20)
        let device = BlockDevice(driver: driver)
        try fill(0x41).withUnsafeBytes { try device.write($0, at: 0) }
        try device.flush()
        try device.zero(at: 0, length: ReusingDriver.cluster, deallocate: true)
        // The first flush of the next call succeeds, the one after the release fails.
        driver.flushFailures.withLock { $0 = [false, true] }
        XCTAssertThrowsError(try device.flush())
        XCTAssertEqual(driver.released.withLock { $0.count }, 1)
        XCTAssertThrowsError(try device.flush(), "a flush after a failed one succeeded")
        XCTAssertThrowsError(try fill(0x43).withUnsafeBytes { try device.write($0, at: 4096) }) { error in
            XCTAssertEqual((error as? BlockError)?.errnoValue, EIO)
            XCTAssertTrue("\(error)".contains("earlier"), "\(error)")
        }
        XCTAssertThrowsError(try device.zero(at: 0, length: 4096, deallocate: true))
        XCTAssertThrowsError(try device.writeBack())
        XCTAssertEqual(driver.released.withLock { $0.count }, 1, "the released batch was freed a second time")
        XCTAssertThrowsError(try device.close(), "close hid the failure")
        // Reads still work.
        var buf = [UInt8](repeating: 1, count: 4096)
        try buf.withUnsafeMutableBytes { try device.read(into: $0, at: 0) }
        XCTAssertTrue(buf == [UInt8](repeating: 0, count: 4096))
    }

    /// A failed fdatasync is remembered by the file: the next one fails too, even if the
    /// kernel would now say 0.
    func testFileSyncFailureIsSticky() throws {
        let (file, _) = try scratchFile()
        try file.write([1, 2, 3], at: 0)
        try file.sync()
        file.rememberSyncFailure(EIO)
        XCTAssertThrowsError(try file.sync())
        XCTAssertThrowsError(try file.sync(), "the second fdatasync hid the first one's failure")
    }

    /// A new VDI block whose data write stops part way (host disk full) is not handed out
    /// again as fresh: the next block allocated there must not show the failed write's bytes
    /// in sectors its guest never wrote.
    func testAbandonedVDIBlockIsNotReusedAsFresh() throws {
        let p = NSTemporaryDirectory() + "abandon-" + UUID().uuidString + ".vdi"
        addTeardownBlock { try? FileManager.default.removeItem(atPath: p) }
        try VDICreate.create(path: p, size: 16 << 20, isStatic: false)
        let file = try ImageFile(path: p, writable: true)
        let driver = try VDIDriver(file: file)
        let device = BlockDevice(driver: driver)
        let block: UInt64 = 1 << 20
        let dataStart = UInt64(driver.header.offsetData)
        // The file may grow to half a block past the data start: the 4 KiB of 'X' land, the
        // extension of the file over the rest of the block fails (EFBIG).
        let limit = dataStart + block / 2
        signal(SIGXFSZ, SIG_IGN)
        var old = rlimit()
        getrlimit(Int32(RLIMIT_FSIZE.rawValue), &old)
        var small = rlimit(rlim_cur: rlim_t(limit), rlim_max: old.rlim_max)
        XCTAssertEqual(setrlimit(Int32(RLIMIT_FSIZE.rawValue), &small), 0)
        let x = [UInt8](repeating: 0x58, count: 4096)
        XCTAssertThrowsError(try x.withUnsafeBytes { try device.write($0, at: 0) })
        XCTAssertEqual(setrlimit(Int32(RLIMIT_FSIZE.rawValue), &old), 0)
        // Another guest block, written elsewhere in its block: the rest must read zeros.
        let y = [UInt8](repeating: 0x59, count: 4096)
        try y.withUnsafeBytes { try device.write($0, at: 5 * block + 65536) }
        var buf = [UInt8](repeating: 1, count: 65536)
        try buf.withUnsafeMutableBytes { try device.read(into: $0, at: 5 * block) }
        XCTAssertTrue(buf == [UInt8](repeating: 0, count: 65536), "the new block shows the failed write's bytes: \(Set(buf))")
        var first = [UInt8](repeating: 1, count: 4096)
        try first.withUnsafeMutableBytes { try device.read(into: $0, at: 0) }
        XCTAssertTrue(first == [UInt8](repeating: 0, count: 4096), "the failed write is linked: \(Set(first))")
        try device.close()
    }

    /// A writer that mapped a VDI block in place and is overtaken by a discard of that block
    /// and a new allocation must not land in another guest block.
    func testLateWriteAfterDiscardStaysInItsBlock() throws {
        let p = NSTemporaryDirectory() + "late-" + UUID().uuidString + ".vdi"
        addTeardownBlock { try? FileManager.default.removeItem(atPath: p) }
        try VDICreate.create(path: p, size: 16 << 20, isStatic: false)
        let device = BlockDevice(driver: try VDIDriver(file: try ImageFile(path: p, writable: true)))
        let block = 1 << 20
        try [UInt8](repeating: 0x41, count: block).withUnsafeBytes { try device.write($0, at: 0) }
        try device.flush()
        let mapped = DispatchSemaphore(value: 0), go = DispatchSemaphore(value: 0)
        BlockDevice.testHookAfterWriteMap = { d in
            guard d === device else { return }
            BlockDevice.testHookAfterWriteMap = nil
            mapped.signal()
            _ = go.wait(timeout: .now() + 10)
        }
        defer { BlockDevice.testHookAfterWriteMap = nil }
        let writer = Thread { _ = try? [UInt8](repeating: 0x57, count: 4096).withUnsafeBytes { try device.write($0, at: 0) } }
        writer.start()
        XCTAssertEqual(mapped.wait(timeout: .now() + 10), .success)
        try device.zero(at: 0, length: UInt64(block), deallocate: true)
        // A flush that could release the block (it waits for the paused writer if it does).
        let flushed = DispatchSemaphore(value: 0)
        Thread { try? device.flush(); flushed.signal() }.start()
        let early = flushed.wait(timeout: .now() + 0.3)
        try [UInt8](repeating: 0x42, count: block).withUnsafeBytes { try device.write($0, at: 3 * UInt64(block)) }
        go.signal()
        if early == .timedOut { XCTAssertEqual(flushed.wait(timeout: .now() + 10), .success) }
        writer.cancel()
        while !writer.isFinished { usleep(1000) }
        var buf = [UInt8](repeating: 0, count: block)
        try buf.withUnsafeMutableBytes { try device.read(into: $0, at: 3 * UInt64(block)) }
        XCTAssertTrue(buf == [UInt8](repeating: 0x42, count: block), "a late write landed in another guest block: \(Set(buf))")
        try device.close()
    }
}
