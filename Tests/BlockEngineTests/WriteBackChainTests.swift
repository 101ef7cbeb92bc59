import XCTest
import Synchronization
@testable import BlockEngine

/// The write-back chain's order: each layer after the ones it depends on, with a barrier
/// between them, and a dependent cache's own write-back going through the chain.
final class WriteBackChainTests: XCTestCase {
    final class Log: Sendable {
        let lines = Mutex<[String]>([])
        func append(_ line: String) { lines.withLock { $0.append(line) } }
        func take() -> String { lines.withLock { l in defer { l = [] }; return l.joined() } }
    }

    /// A layer that records its writes in a shared log.
    final class Recorder: MetadataLayer {
        let name: String
        let log: Log
        let dirty = Atomic(false)
        init(_ name: String, _ log: Log) { self.name = name; self.log = log }
        var isDirty: Bool { dirty.load(ordering: .relaxed) }
        func change() { dirty.store(true, ordering: .relaxed) }
        func writeChanges() throws {
            log.append(name)
            dirty.store(false, ordering: .relaxed)
        }
    }

    func testLayersAreWrittenInOrderWithABarrierBeforeEachDependentOne() throws {
        let log = Log()
        let a = Recorder("A", log), b = Recorder("B", log), c = Recorder("C", log)
        let chain = WriteBackChain([.init(a), .init(b, afterData: true), .init(c)], barrier: { log.append("|") })
        func run(_ body: () throws -> Void) rethrows -> String {
            _ = log.take()
            try body()
            return log.take()
        }
        a.change(); b.change(); c.change()
        XCTAssertEqual(try run { try chain.flush() }, "A|B|C|")
        // Nothing changed: a flush is one barrier (fsync's data), a write-back nothing.
        XCTAssertEqual(try run { try chain.flush() }, "|")
        XCTAssertEqual(try run { try chain.writeChanges() }, "")
        // Only the last layer: still a barrier before it (whatever wrote its dependencies
        // outside this pass is made durable first).
        c.change()
        XCTAssertEqual(try run { try chain.writeChanges() }, "|C")
        // A first layer depends on nothing: no barrier before it...
        a.change()
        XCTAssertEqual(try run { try chain.writeChanges() }, "A")
        // ...unless it comes after the data.
        let d = Recorder("D", log), e = Recorder("E", log)
        let afterData = WriteBackChain([.init(d, afterData: true), .init(e)], barrier: { log.append("|") })
        d.change(); e.change()
        XCTAssertEqual(try run { try afterData.writeChanges() }, "|D|E")
        // A chain nested as a layer keeps its own barriers inside the outer order.
        let outer = WriteBackChain([.init(afterData), .init(c)], barrier: { log.append("|") })
        d.change(); e.change(); c.change()
        XCTAssertEqual(try run { try outer.flush() }, "|D|E|C|")
        // Writing through a layer writes what it depends on first, and nothing after it.
        a.change(); b.change(); c.change()
        XCTAssertEqual(try run { try chain.write(through: b) }, "A|B")
        XCTAssertTrue(c.isDirty)
        XCTAssertEqual(try run { try chain.write(through: b) }, "", "nothing to write: no barrier")
    }

    /// A table cache that depends on an earlier layer writes itself back (a flush, or the
    /// relief of a cache full of dirty tables) only after that layer and a barrier.
    func testADependentCacheWritesBackThroughTheChain() throws {
        let dir = NSTemporaryDirectory() + "wbc-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        XCTAssertTrue(FileManager.default.createFile(atPath: dir + "/f", contents: Data(count: 4096)))
        let f = try ImageFile(path: dir + "/f", writable: true)
        let log = Log()
        let first = Recorder("R", log)
        let cache = TableCache(file: f, tableBytes: 64, encoding: .u64LE, capacity: 2)
        let chain = WriteBackChain([.init(first), .init(cache, afterData: true)], barrier: { log.append("|") })
        first.change()
        try cache.setEntry(table: 0, index: 0, value: 7)
        try cache.flush()
        XCTAssertEqual(log.take(), "R|", "the cache's flush wrote its dependency first, then a barrier")
        XCTAssertEqual(try f.readBytes(count: 1, at: 0, what: "t"), [7])
        // Relief: a third dirty table past the capacity of 2 writes back through the chain.
        first.change()
        for t in 0..<3 { try cache.setEntry(table: UInt64(64 * (t + 1)), index: 1, value: UInt64(t + 1)) }
        XCTAssertEqual(log.take(), "R|")
        XCTAssertEqual(try f.readBytes(count: 1, at: 64 + 8, what: "t"), [1])
        XCTAssertFalse(chain.isDirty)
    }
}
