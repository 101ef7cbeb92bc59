import XCTest
import Synchronization
@testable import BlockEngine
@testable import ImageFormats

final class AllocatorTests: XCTestCase {
    func testAlignedMonotonicAllocation() throws {
        let a = Allocator(file: "x", nextOffset: 1000, alignment: 4096)
        XCTAssertEqual(try a.allocate(1), 4096)
        XCTAssertEqual(try a.allocate(4097), 8192)
        XCTAssertEqual(try a.allocate(4096), 16384)
        XCTAssertEqual(a.end, 20480)
    }

    func testLimitAndOverflowAreErrorsNotTraps() {
        let a = Allocator(file: "img", nextOffset: 0, alignment: 512, limit: 4096)
        XCTAssertNoThrow(try a.allocate(4096))
        XCTAssertThrowsError(try a.allocate(512))
        let b = Allocator(file: "img", nextOffset: UInt64.max - 1023, alignment: 512)
        XCTAssertThrowsError(try b.allocate(1 << 20))
    }

    func testConcurrentAllocationsNeverOverlap() {
        let a = Allocator(file: "x", nextOffset: 0, alignment: 65536)
        let got = Mutex<[UInt64]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            for _ in 0..<500 { if let o = try? a.allocate(65536) { got.withLock { $0.append(o) } } }
        }
        let offsets = got.withLock { $0 }.sorted()
        XCTAssertEqual(offsets.count, 4000)
        XCTAssertEqual(Set(offsets).count, 4000)
        XCTAssertEqual(offsets.last, 3999 * 65536)
    }

    func testHostSpaceIsReservedAheadWithoutGrowingTheFileAndReturnedOnRelease() throws {
        let p = NSTemporaryDirectory() + "prealloc-" + UUID().uuidString
        XCTAssertTrue(FileManager.default.createFile(atPath: p, contents: Data(count: 65536)))
        defer { try? FileManager.default.removeItem(atPath: p) }
        let f = try ImageFile(path: p, writable: true)
        let a = Allocator(file: p, nextOffset: 65536, alignment: 65536, preallocating: f)
        let at = try a.allocate(1 << 20)
        try f.write([UInt8](repeating: 9, count: 1 << 20), at: at)
        a.settle()
        XCTAssertEqual(try f.size(), 65536 + (1 << 20), "the reservation must not move the file's end")
        XCTAssertGreaterThanOrEqual(f.allocatedBytes(), 4 << 20, "space past the frontier is reserved")
        XCTAssertLessThan(f.allocatedBytes(), 16 << 20, "a session that allocated little reserves little")
        // A long sequential fill: the reserve grows with what the session allocated.
        var end = at + (1 << 20)
        for _ in 0..<64 { end = try a.allocate(1 << 20) + (1 << 20); a.settle() }
        XCTAssertGreaterThanOrEqual(f.allocatedBytes(), end + (32 << 20), "the reserve grows with the fill")
        XCTAssertLessThanOrEqual(f.allocatedBytes(), end + (128 << 20) + (1 << 20), "but stays bounded")
        XCTAssertEqual(try f.size(), 65536 + (1 << 20), "the reservation must not move the file's end")
        a.release()
        XCTAssertEqual(try f.size(), 65536 + (1 << 20))
        XCTAssertLessThanOrEqual(f.allocatedBytes(), (1 << 20) + 65536 + 8192, "the unused reservation is returned")
        _ = try? a.allocate(65536) // after release: allocation still works, nothing is reserved
        a.settle()
        XCTAssertLessThanOrEqual(f.allocatedBytes(), (1 << 20) + 65536 + 8192)
        let readOnly = Allocator(file: p, nextOffset: 0, alignment: 512, preallocating: try ImageFile(path: p, writable: false))
        _ = try readOnly.allocate(512)
        readOnly.settle()
        XCTAssertLessThanOrEqual(f.allocatedBytes(), (1 << 20) + 65536 + 8192, "a read-only file is never touched")
    }
}

final class RangeWalkTests: XCTestCase {
    func testSplitsAtClusterBoundaries() {
        var steps: [ClusterStep] = []
        RangeWalk.clusters(1000, length: 10000, clusterSize: 4096) { steps.append($0); return true }
        XCTAssertEqual(steps.map(\.offset), [1000, 4096, 8192])
        XCTAssertEqual(steps.map(\.length), [3096, 4096, 2808])
        XCTAssertEqual(steps.map(\.cluster), [0, 1, 2])
        XCTAssertEqual(steps.map(\.offsetInCluster), [1000, 0, 0])
        XCTAssertEqual(steps.reduce(0) { $0 + $1.length }, 10000)
    }

    func testStopsEarlyAndHandlesEmptyRange() {
        var n = 0
        RangeWalk.clusters(0, length: 1 << 20, clusterSize: 512) { _ in n += 1; return n < 3 }
        XCTAssertEqual(n, 3)
        RangeWalk.clusters(77, length: 0, clusterSize: 512) { _ in XCTFail("no steps"); return true }
        XCTAssertEqual(RangeWalk.toClusterEnd(4095, clusterSize: 4096, maxLength: 100), 1)
    }
}

final class ImageFileTests: XCTestCase {
    func path() -> String { NSTemporaryDirectory() + "if-" + UUID().uuidString }

    func testShortReadIsATruncationErrorNamingTheFile() throws {
        let p = path()
        XCTAssertTrue(FileManager.default.createFile(atPath: p, contents: Data(repeating: 7, count: 100)))
        defer { try? FileManager.default.removeItem(atPath: p) }
        let f = try ImageFile(path: p, writable: false)
        XCTAssertThrowsError(try f.readBytes(count: 64, at: 64, what: "L1 table")) { e in
            let text = "\(e)"
            XCTAssertTrue(text.contains(p) && text.contains("L1 table") && text.contains("100 bytes"), text)
        }
        var buf = [UInt8](repeating: 1, count: 64)
        try buf.withUnsafeMutableBytes { try f.readZeroFilled(into: $0, at: 64) }
        XCTAssertEqual(Array(buf[0..<36]), [UInt8](repeating: 7, count: 36))
        XCTAssertEqual(Array(buf[36...]), [UInt8](repeating: 0, count: 28))
        XCTAssertThrowsError(try f.write([1], at: 0)) { XCTAssertEqual($0 as? BlockError, .readOnly(file: p)) }
    }

    func testMissingFileErrorNamesIt() {
        XCTAssertThrowsError(try ImageFile(path: "/nonexistent/disk.qed", writable: false)) { e in
            XCTAssertTrue("\(e)".contains("/nonexistent/disk.qed"))
            XCTAssertEqual((e as? BlockError)?.errnoValue, ENOENT)
        }
    }

    func testLocksConflictBetweenWritersButNotReaders() throws {
        let p = path()
        XCTAssertTrue(FileManager.default.createFile(atPath: p, contents: Data(count: 4096)))
        defer { try? FileManager.default.removeItem(atPath: p) }
        let r1 = try ImageFile(path: p, writable: false), r2 = try ImageFile(path: p, writable: false)
        try ImageLock.acquire(r1, writable: false)
        try ImageLock.acquire(r2, writable: false)
        let w = try ImageFile(path: p, writable: true)
        XCTAssertThrowsError(try ImageLock.acquire(w, writable: true), "readers refuse a writer") { e in
            guard case .locked? = e as? BlockError else { return XCTFail("\(e)") }
        }
    }
}

final class RawEngineTests: XCTestCase {
    func testEngineReadWriteZeroOnRaw() throws {
        let p = NSTemporaryDirectory() + "raw-" + UUID().uuidString
        XCTAssertTrue(FileManager.default.createFile(atPath: p, contents: Data(repeating: 0x55, count: 1 << 20)))
        defer { try? FileManager.default.removeItem(atPath: p) }
        let dev = try ImageOpener.open(path: p, options: .init(writable: true))
        XCTAssertEqual(dev.virtualSize, 1 << 20)
        let data = [UInt8](repeating: 0xEE, count: 5000)
        try data.withUnsafeBytes { try dev.write($0, at: 70_000) }
        XCTAssertThrowsError(try data.withUnsafeBytes { try dev.write($0, at: (1 << 20) - 10) }) { e in
            XCTAssertEqual((e as? BlockError)?.errnoValue, ENOSPC)
        }
        try dev.zero(at: 71_000, length: 1000, deallocate: true)
        var back = [UInt8](repeating: 0, count: 6000)
        try back.withUnsafeMutableBytes { try dev.read(into: $0, at: 69_500) }
        XCTAssertEqual(back[0..<500].allSatisfy { $0 == 0x55 }, true)
        XCTAssertEqual(back[500..<1500].allSatisfy { $0 == 0xEE }, true)
        XCTAssertEqual(back[1500..<2500].allSatisfy { $0 == 0 }, true)
        XCTAssertEqual(back[2500..<5500].allSatisfy { $0 == 0xEE }, true)
        XCTAssertEqual(back[5500...].allSatisfy { $0 == 0x55 }, true)
        // Reads past the end of the disk return zeros, never file bytes or garbage.
        var tail = [UInt8](repeating: 9, count: 100)
        try tail.withUnsafeMutableBytes { try dev.read(into: $0, at: (1 << 20) - 50) }
        XCTAssertEqual(Array(tail[50...]), [UInt8](repeating: 0, count: 50))
        try dev.close()
    }
}

/// Inflated-cluster caches share one process budget: many compressed images (a long chain,
/// many extents) cannot each keep their own 8 MiB.
final class InflatedClustersBudgetTests: XCTestCase {
    func testAllCachesTogetherStayInTheProcessBudget() throws {
        let cluster = 2 << 20
        var caches: [InflatedClusters] = []
        for c in 0..<64 {
            let cache = InflatedClusters(clusterBytes: cluster)
            for k in 0..<6 {
                let bytes = try cache.cluster(at: UInt64(k) * 4096, need: cluster) { [UInt8](repeating: UInt8(c), count: $0) }
                XCTAssertEqual(bytes.count, cluster)
            }
            caches.append(cache)
            XCTAssertLessThanOrEqual(InflatedClusters.heldBytes, InflatedClusters.processBudget + cluster, "after \(c + 1) caches")
        }
        // Still answers (from cache or by inflating again), and freeing the caches gives the budget back.
        XCTAssertEqual(try caches[0].cluster(at: 0, need: 16) { [UInt8](repeating: 0, count: $0) }.first, 0)
        caches.removeAll()
        XCTAssertEqual(InflatedClusters.heldBytes, 0)
    }
}
