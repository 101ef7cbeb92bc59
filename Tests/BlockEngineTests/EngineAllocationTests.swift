import XCTest
import Foundation
import Synchronization
@testable import BlockEngine
@testable import ImageFormats

/// The engine's allocating write on a test driver (no FUSE, no format): data reaches the
/// file before the driver links it, a partial write is filled from the backing image, and
/// writers racing for one cluster allocate it once.
final class EngineAllocationTests: XCTestCase {
    private let cluster = ReusingDriver.cluster

    private func scratch(_ contents: [UInt8] = []) throws -> ImageFile {
        let p = NSTemporaryDirectory() + "engine-" + UUID().uuidString
        XCTAssertTrue(FileManager.default.createFile(atPath: p, contents: Data(contents)))
        addTeardownBlock { try? FileManager.default.removeItem(atPath: p) }
        return try ImageFile(path: p, writable: true)
    }

    private func read(_ device: BlockDevice, _ offset: UInt64, _ count: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0xEE, count: count)
        try b.withUnsafeMutableBytes { try device.read(into: $0, at: offset) }
        return b
    }

    func testDataIsInTheFileBeforeCommitLinksIt() throws {
        let file = try scratch()
        let driver = ReusingDriver(file: file, size: 1 << 20)
        let device = BlockDevice(driver: driver)
        let seen = Mutex<[[UInt8]]>([])
        driver.onCommit.withLock { $0 = { a in seen.withLock { $0.append((try? file.readBytes(count: Int(a.length), at: a.hostOffset, what: "t")) ?? []) } } }
        try [UInt8](repeating: 0x55, count: Int(cluster)).withUnsafeBytes { try device.write($0, at: 2 * cluster) }
        XCTAssertEqual(seen.withLock { $0.count }, 1)
        XCTAssertTrue(seen.withLock { $0 }.first == [UInt8](repeating: 0x55, count: Int(cluster)), "commit ran before the data was written")
    }

    func testAPartialWriteIsFilledFromTheBackingImage() throws {
        let base = try scratch([UInt8](repeating: 0x11, count: 1 << 20))
        let backing = BlockDevice(driver: try RawDriver(file: base, probed: false))
        let file = try scratch()
        let driver = ReusingDriver(file: file, size: 1 << 20)
        let device = BlockDevice(driver: driver, backing: backing)
        let committed = Mutex<[UInt8]>([])
        driver.onCommit.withLock { $0 = { a in committed.withLock { $0 = (try? file.readBytes(count: Int(a.length), at: a.hostOffset, what: "t")) ?? [] } } }
        try [UInt8](repeating: 0x77, count: 512).withUnsafeBytes { try device.write($0, at: cluster + 100) }
        var want = [UInt8](repeating: 0x11, count: Int(cluster))
        want.replaceSubrange(100 ..< 612, with: [UInt8](repeating: 0x77, count: 512))
        XCTAssertTrue(committed.withLock { $0 } == want, "the cluster was not filled around the write before it was linked")
        XCTAssertTrue(try read(device, cluster, Int(cluster)) == want)
        XCTAssertTrue(try read(device, 0, 16) == [UInt8](repeating: 0x11, count: 16), "an untouched cluster does not read through")
    }

    func testWritersRacingForOneClusterAllocateItOnce() throws {
        let file = try scratch()
        let driver = ReusingDriver(file: file, size: 1 << 20)
        let device = BlockDevice(driver: driver)
        let group = DispatchGroup(), cluster = self.cluster
        for k in 0 ..< 8 {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                try? [UInt8](repeating: UInt8(k + 1), count: 512).withUnsafeBytes { try device.write($0, at: 5 * cluster + UInt64(k) * 512) }
            }
        }
        XCTAssertEqual(group.wait(timeout: .now() + 20), .success)
        XCTAssertEqual(driver.allocations.withLock { $0 }, 1, "one cluster was allocated more than once")
        let back = try read(device, 5 * cluster, Int(cluster))
        for k in 0 ..< 8 { XCTAssertTrue(back[k * 512 ..< (k + 1) * 512].allSatisfy { $0 == UInt8(k + 1) }, "writer \(k)'s bytes were lost") }
    }
}
