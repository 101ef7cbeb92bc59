import XCTest
import Synchronization
@testable import BlockEngine

/// Records the order of table writes by watching the file between batches.
final class TableCacheTests: XCTestCase {
    var dir: String!
    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "tc-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(atPath: dir) }

    func makeFile(_ bytes: [UInt8]) throws -> ImageFile {
        let p = dir + "/f"
        XCTAssertTrue(FileManager.default.createFile(atPath: p, contents: Data(bytes)))
        return try ImageFile(path: p, writable: true)
    }

    func testDecodesAllThreeEncodings() throws {
        var b = [UInt8](repeating: 0, count: 64)
        b[0..<8] = [1, 2, 3, 4, 5, 6, 7, 8][...]
        let f = try makeFile(b)
        XCTAssertEqual(try TableCache(file: f, tableBytes: 16, encoding: .u32LE, capacity: 2).entry(table: 0, index: 0), 0x04030201)
        XCTAssertEqual(try TableCache(file: f, tableBytes: 16, encoding: .u32LE, capacity: 2).entry(table: 0, index: 1), 0x08070605)
        XCTAssertEqual(try TableCache(file: f, tableBytes: 16, encoding: .u64LE, capacity: 2).entry(table: 0, index: 0), 0x0807060504030201)
        XCTAssertEqual(try TableCache(file: f, tableBytes: 16, encoding: .u64BE, capacity: 2).entry(table: 0, index: 0), 0x0102030405060708)
    }

    func testSetEntryEncodesAndWritesBackOnFlush() throws {
        let f = try makeFile([UInt8](repeating: 0, count: 64))
        for enc in [TableEncoding.u32LE, .u64LE, .u64BE] {
            let c = TableCache(file: f, tableBytes: 32, encoding: enc, capacity: 4)
            try c.setEntry(table: 32, index: 1, value: 0xA1B2C3D4)
            XCTAssertEqual(try f.readBytes(count: 32, at: 32, what: "t"), [UInt8](repeating: 0, count: 32), "not written before flush")
            try c.flush()
            let back = TableCache(file: f, tableBytes: 32, encoding: enc, capacity: 4)
            XCTAssertEqual(try back.entry(table: 32, index: 1), 0xA1B2C3D4, "\(enc)")
            XCTAssertEqual(try back.entry(table: 32, index: 0), 0)
            try f.write([UInt8](repeating: 0, count: 32), at: 32)
        }
    }

    /// Lookups evict clean tables only: a dirty one stays (nothing is written, no barrier
    /// runs on a reader's behalf) and the cache stays within its capacity.
    func testCapacityIsBoundedAndLookupsNeverWriteBack() throws {
        let f = try makeFile([UInt8](repeating: 0, count: 16 * 8))
        let barriers = Mutex(0)
        let c = TableCache(file: f, tableBytes: 16, encoding: .u64LE, capacity: 3, beforeWriteBack: { barriers.withLock { $0 += 1 } })
        try c.setEntry(table: 0, index: 0, value: 77)       // dirty, least recently used
        for t in 1..<8 { _ = try c.entry(table: UInt64(t * 16), index: 0) }
        XCTAssertEqual(c.stats.evictions, 5)
        XCTAssertEqual(barriers.withLock { $0 }, 0, "a lookup ran the barrier")
        XCTAssertEqual(try f.readBytes(count: 8, at: 0, what: "t"), [UInt8](repeating: 0, count: 8), "a lookup wrote a table")
        XCTAssertEqual(c.dirtyCount, 1)
        XCTAssertEqual(try c.entry(table: 0, index: 0), 77, "the dirty table was dropped")
        try c.flush()
        XCTAssertEqual(try f.readBytes(count: 8, at: 0, what: "t"), [77, 0, 0, 0, 0, 0, 0, 0])
    }

    /// Every table dirty: lookups run past the capacity (to twice it, then keep nothing
    /// new), and the next change writes the dirty tables back and evicts down to the capacity.
    func testACacheFullOfDirtyTablesIsRelievedByTheNextChange() throws {
        let f = try makeFile([UInt8](repeating: 0, count: 16 * 16))
        let c = TableCache(file: f, tableBytes: 16, encoding: .u64LE, capacity: 2)
        try c.setEntry(table: 0, index: 0, value: 5)
        try c.setEntry(table: 16, index: 0, value: 6)
        for t in 2..<10 { XCTAssertEqual(try c.entry(table: UInt64(t * 16), index: 0), 0) }
        XCTAssertEqual(c.dirtyCount, 2)
        XCTAssertTrue(c.cachedCount <= 4, "lookups grew the cache past twice its capacity")
        try c.setEntry(table: 32 * 5, index: 1, value: 7)
        XCTAssertEqual(try f.readBytes(count: 1, at: 0, what: "t"), [5])
        XCTAssertEqual(try f.readBytes(count: 1, at: 16, what: "t"), [6])
        XCTAssertTrue(c.cachedCount <= 2, "not evicted down to the capacity")
        XCTAssertEqual(try c.entry(table: 32 * 5, index: 1), 7)
    }

    /// A write-back held in its barrier (an fdatasync that takes long) blocks no lookup of a
    /// cached or uncached table and no change: they finish while the barrier still waits.
    func testLookupsAndChangesGoOnWhileAWriteBackWaitsInItsBarrier() throws {
        let f = try makeFile([UInt8](repeating: 0, count: 16 * 8))
        let entered = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let c = TableCache(file: f, tableBytes: 16, encoding: .u64LE, capacity: 2,
                           beforeWriteBack: { entered.signal(); release.wait() })
        try c.setEntry(table: 0, index: 0, value: 1)
        try c.setEntry(table: 16, index: 0, value: 2)
        let flushed = DispatchSemaphore(value: 0)
        Thread.detachNewThread { try? c.flush(); flushed.signal() }
        XCTAssertEqual(entered.wait(timeout: .now() + 20), .success)
        let looked = DispatchSemaphore(value: 0), changed = DispatchSemaphore(value: 0)
        let seen = Mutex<[UInt64]>([])
        Thread.detachNewThread {
            let a = (try? c.entry(table: 0, index: 0)) ?? 99
            let b = (try? c.entry(table: 64, index: 0)) ?? 99    // a miss in a full, dirty cache
            seen.withLock { $0 = [a, b] }
            looked.signal()
            try? c.setEntry(table: 16, index: 1, value: 3)        // over capacity: its relief waits its turn
            changed.signal()
        }
        // (A hang guard, not a timing: lookups that waited for the barrier never finish.)
        XCTAssertEqual(looked.wait(timeout: .now() + 20), .success, "a lookup waited for the write-back's barrier")
        release.signal(); release.signal()
        XCTAssertEqual(flushed.wait(timeout: .now() + 20), .success)
        XCTAssertEqual(changed.wait(timeout: .now() + 20), .success)
        XCTAssertEqual(seen.withLock { $0 }, [1, 0])
        XCTAssertEqual(try f.readBytes(count: 1, at: 0, what: "t"), [1])
    }

    /// A walk streaming through many more tables than the cache holds does not push out a
    /// table that keeps being used (second chance), and prefetched tables are held.
    func testAStreamingWalkKeepsATableInUseAndPrefetchFills() throws {
        let f = try makeFile([UInt8](repeating: 0, count: 16 * 200))
        let c = TableCache(file: f, tableBytes: 16, encoding: .u64LE, capacity: 4)
        _ = try c.entry(table: 0, index: 0)
        for t in 1..<150 {
            _ = try c.entry(table: UInt64(t * 16), index: 0)
            _ = try c.entry(table: 0, index: 1)
        }
        XCTAssertEqual(c.stats.misses, 150, "the table in use was read again")
        XCTAssertTrue(c.isCached(table: 0))
        let d = TableCache(file: f, tableBytes: 16, encoding: .u64LE, capacity: 16)
        try d.readAhead(from: 160, upTo: 160 + 8 * 16, count: 64)
        for t in 0..<8 { XCTAssertTrue(d.isCached(table: UInt64(160 + t * 16))) }
        let before = d.stats.misses
        _ = try d.entry(table: 160 + 5 * 16, index: 1)
        XCTAssertEqual(d.stats.misses, before, "a prefetched table was read again")
    }

    func testChangingAParentAfterItsChildWritesChildFirst() throws {
        // L1 (table 0) dirtied first, then a new L2 (table 64) installed, then L1 updated to
        // point at it: write-back must put L2 on disk before the L1 that references it.
        let f = try makeFile([UInt8](repeating: 0, count: 128))
        let order = Mutex<[UInt64]>([])
        let c = TableCache(file: f, tableBytes: 32, encoding: .u64LE, capacity: 8)
        try c.setEntry(table: 0, index: 0, value: 5)
        try c.install(table: 64)
        try c.setEntry(table: 64, index: 2, value: 9)
        try c.setEntry(table: 0, index: 1, value: 64)
        // Watch the order by writing back table by table.
        try c.writeBack(table: 64)
        order.withLock { $0.append(contentsOf: [64]) }
        XCTAssertEqual(try f.readBytes(count: 8, at: 64 + 16, what: "t")[0], 9, "child written")
        XCTAssertEqual(try f.readBytes(count: 16, at: 0, what: "t"), [UInt8](repeating: 0, count: 16), "parent not yet written")
        try c.writeBack(table: 0)
        XCTAssertEqual(try f.readBytes(count: 16, at: 0, what: "t")[8], 64)
    }

    func testWriteBackOfOneTableWritesEarlierChangesAndCallsBarrierOncePerBatch() throws {
        let f = try makeFile([UInt8](repeating: 0, count: 256))
        let barriers = Mutex(0)
        let c = TableCache(file: f, tableBytes: 32, encoding: .u32LE, capacity: 8,
                           beforeWriteBack: { barriers.withLock { $0 += 1 } })
        try c.setEntry(table: 0, index: 0, value: 1)
        try c.setEntry(table: 32, index: 0, value: 2)
        try c.setEntry(table: 64, index: 0, value: 3)
        try c.writeBack(table: 32)
        XCTAssertEqual(barriers.withLock { $0 }, 1)
        XCTAssertEqual(try f.readBytes(count: 1, at: 0, what: "t"), [1], "earlier change written")
        XCTAssertEqual(try f.readBytes(count: 1, at: 32, what: "t"), [2])
        XCTAssertEqual(try f.readBytes(count: 1, at: 64, what: "t"), [0], "later change still pending")
        XCTAssertEqual(c.dirtyCount, 1)
        try c.flush()
        try c.flush() // nothing dirty: no barrier
        XCTAssertEqual(barriers.withLock { $0 }, 2)
        XCTAssertEqual(c.stats.tableWrites, 3)
    }

    func testInstallDoesNotReadAndFillsEntries() throws {
        let f = try makeFile([UInt8](repeating: 0xFF, count: 64))
        let c = TableCache(file: f, tableBytes: 32, encoding: .u32LE, capacity: 2)
        try c.install(table: 1 << 40, fill: 0xFFFF_FFFE) // far past EOF: must not be read
        XCTAssertEqual(try c.entry(table: 1 << 40, index: 7), 0xFFFF_FFFE)
        XCTAssertEqual(c.stats.misses, 1)
    }

    func testReadingATablePastTheEndIsATruncationError() throws {
        let f = try makeFile([UInt8](repeating: 0, count: 40))
        let c = TableCache(file: f, tableBytes: 32, encoding: .u64LE, capacity: 2)
        XCTAssertThrowsError(try c.entry(table: 32, index: 0)) { e in
            guard case .truncated? = e as? BlockError else { return XCTFail("\(e)") }
        }
    }

    func testConcurrentLookupsSeeConsistentValues() throws {
        let tables = 64, perTable = 32
        var bytes = [UInt8](repeating: 0, count: tables * perTable * 8)
        for t in 0..<tables { for i in 0..<perTable {
            let v = UInt64(t * 1000 + i)
            for k in 0..<8 { bytes[(t * perTable + i) * 8 + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))) }
        } }
        let f = try makeFile(bytes)
        let c = TableCache(file: f, tableBytes: perTable * 8, encoding: .u64LE, capacity: 8)
        let failures = Mutex(0)
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            var rng = UInt64(worker + 1)
            for _ in 0..<4000 {
                rng = rng &* 6364136223846793005 &+ 1442695040888963407
                let t = Int(rng >> 33) % tables, i = Int(rng >> 20) % perTable
                let v = try? c.entry(table: UInt64(t * perTable * 8), index: i)
                if v != UInt64(t * 1000 + i) { failures.withLock { $0 += 1 } }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, 0)
        XCTAssertGreaterThan(c.stats.evictions, 0, "the working set exceeded the capacity")
    }

    /// Lookups of small tables are served from the thread's memo without the lock; the memo
    /// must never outlive a change made by another thread, a discard of the space (rewritten
    /// on disk since) or an eviction.
    func testLockFreeLookupsNeverSeeAStaleTable() throws {
        let f = try makeFile([UInt8](repeating: 0, count: 8 * 64))
        let c = TableCache(file: f, tableBytes: 64, encoding: .u64LE, capacity: 2)
        // (DispatchQueue.sync may run its block on the calling thread: a Thread does not.)
        func onAnotherThread<R: Sendable>(_ body: @escaping @Sendable () throws -> R) throws -> R {
            let result = Mutex<Result<R, any Error>?>(nil), done = DispatchSemaphore(value: 0)
            Thread { result.withLock { $0 = Result { try body() } }; done.signal() }.start()
            done.wait()
            return try result.withLock { $0! }.get()
        }
        XCTAssertEqual(try c.entry(table: 0, index: 3), 0)
        XCTAssertEqual(try c.entry(table: 0, index: 3), 0)  // now from this thread's memo
        try onAnotherThread { try c.setEntry(table: 0, index: 3, value: 77) }
        XCTAssertEqual(try c.entry(table: 0, index: 3), 77, "a change by another thread")
        try c.setEntry(table: 0, index: 3, value: 78)
        XCTAssertEqual(try c.entry(table: 0, index: 3), 78, "this thread's own change")
        XCTAssertEqual(try c.withEntries(table: 0) { $0[3] }, 78)
        try c.flush()
        // The space is freed and comes back as something else, written on disk directly.
        c.discard(0, length: 64)
        try f.write([UInt8](repeating: 0x11, count: 64), at: 0)
        XCTAssertEqual(try c.entry(table: 0, index: 3), 0x1111_1111_1111_1111, "a discarded table")
        // Evicted (two other tables read), then changed on disk behind the cache's back: the
        // next lookup must read the file, not this thread's memo.
        XCTAssertEqual(try c.entry(table: 0, index: 0), 0x1111_1111_1111_1111)
        for t in 1...4 { _ = try onAnotherThread { try c.entry(table: UInt64(t * 64), index: 0) } }
        XCTAssertFalse(c.isCached(table: 0))
        try f.write([UInt8](repeating: 0x22, count: 64), at: 0)
        XCTAssertEqual(try c.entry(table: 0, index: 0), 0x2222_2222_2222_2222, "an evicted table")

        // Readers racing one writer never see a value older than one they saw before.
        let d = TableCache(file: f, tableBytes: 64, encoding: .u64LE, capacity: 8)
        let stale = Mutex(0), rounds = 20_000
        DispatchQueue.concurrentPerform(iterations: 4) { w in
            if w == 0 {
                for v in 1...rounds { try? d.setEntry(table: 128, index: 5, value: UInt64(v)) }
                return
            }
            var seen: UInt64 = 0
            for _ in 0..<(rounds * 2) {
                guard let v = try? d.entry(table: 128, index: 5) else { continue }
                if v < seen { stale.withLock { $0 += 1 } }
                seen = max(seen, v)
            }
        }
        XCTAssertEqual(stale.withLock { $0 }, 0)
        XCTAssertEqual(try d.entry(table: 128, index: 5), UInt64(rounds))
    }

    /// A cache large enough to be sharded: the capacity still bounds it, write-back is
    /// still oldest change first over all shards, and parallel readers and writers of many
    /// tables see and leave consistent values.
    func testShardedCacheKeepsItsBoundOrderAndValues() throws {
        let tables = 1024, perTable = 8, cap = TableCache.shardedFrom * 2
        let f = try makeFile([UInt8](repeating: 0, count: tables * perTable * 8))
        let c = TableCache(file: f, tableBytes: perTable * 8, encoding: .u64LE, capacity: cap)
        DispatchQueue.concurrentPerform(iterations: 4) { w in
            for t in stride(from: w, to: tables, by: 4) {
                try? c.setEntry(table: UInt64(t * perTable * 8), index: 0, value: UInt64(t + 1))
                _ = try? c.entry(table: UInt64(((t * 7) % tables) * perTable * 8), index: 0)
            }
        }
        XCTAssertLessThanOrEqual(c.cachedCount, 2 * cap, "lookups and changes grew the cache past twice its capacity")
        try c.flush()
        XCTAssertEqual(c.dirtyCount, 0)
        let check = TableCache(file: f, tableBytes: perTable * 8, encoding: .u64LE, capacity: 4)
        for t in 0..<tables { XCTAssertEqual(try check.entry(table: UInt64(t * perTable * 8), index: 0), UInt64(t + 1)) }
        // Order over shards: a write-back of one table writes every table changed before it
        // (whatever shard holds it) and none changed after.
        let keys = (0..<40).map { UInt64($0 * perTable * 8) }
        for (n, k) in keys.enumerated() { try c.setEntry(table: k, index: 1, value: UInt64(1000 + n)) }
        try c.writeBack(table: keys[19])
        for (n, k) in keys.enumerated() {
            let v = try f.readBytes(count: 8, at: k + 8, what: "t").enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
            XCTAssertEqual(v, n <= 19 ? UInt64(1000 + n) : 0, "table \(n) after writing back table 19")
        }
        let s = c.stats
        XCTAssertGreaterThan(s.evictions, 0)
        XCTAssertGreaterThan(s.hits + s.misses, tables)
    }

    /// Four writers of four tables in a cache of two: tables are written back and evicted
    /// while others are read in again outside the lock. No change is lost: a table evicted
    /// between a change's two locks, or read before a change of it was written back and
    /// evicted, is read again (before: entries lost in 4 of 6 runs of 1000 rounds).
    func testConcurrentWritersToDistinctEntriesAllLand() throws {
        var lost = 0, failed = 0
        for _ in 0 ..< 1000 {
            let f = try makeFile([UInt8](repeating: 0, count: 4 * 64 * 4))
            let c = TableCache(file: f, tableBytes: 64 * 4, encoding: .u32LE, capacity: 2)
            let errors = Mutex(0)
            DispatchQueue.concurrentPerform(iterations: 4) { w in
                for i in 0..<64 {
                    do { try c.setEntry(table: UInt64(w * 256), index: i, value: UInt64(w << 16 | i)) } catch { errors.withLock { $0 += 1 } }
                }
            }
            failed += errors.withLock { $0 }
            try c.flush()
            let check = TableCache(file: f, tableBytes: 64 * 4, encoding: .u32LE, capacity: 4)
            for w in 0..<4 { for i in 0..<64 where try check.entry(table: UInt64(w * 256), index: i) != UInt64(w << 16 | i) { lost += 1 } }
        }
        XCTAssertEqual(failed, 0, "changes that threw")
        XCTAssertEqual(lost, 0, "entries lost over 1000 rounds")
    }

    /// A lookup reads a missing table outside the lock; meanwhile a change of that table is
    /// written back and the table evicted. The lookup's older bytes are not kept: they would
    /// hide the change from later lookups, and the next change of the table would write
    /// the older entries back over it. (The loader pauses the lookup's read on cue.)
    func testAReadOlderThanAWrittenBackChangeIsNotKept() throws {
        let f = try makeFile([UInt8](repeating: 0, count: 2 * 64))
        let pauseNext = Mutex(false)
        let read = DispatchSemaphore(value: 0), resume = DispatchSemaphore(value: 0)
        let c = TableCache(file: f, tableBytes: 64, encoding: .u32LE, capacity: 1, loader: { key in
            let bytes = try f.readBytes(count: 64, at: key, what: "table")
            if pauseNext.withLock({ p in defer { p = false }; return p }) { read.signal(); resume.wait() }
            return bytes
        })
        pauseNext.withLock { $0 = true }
        let looked = Mutex<UInt64?>(nil)
        let done = DispatchSemaphore(value: 0)
        let reader = Thread { looked.withLock { $0 = try? c.entry(table: 0, index: 3) }; done.signal() }
        reader.start()
        read.wait()  // the lookup holds table 0 as it was: all zeros
        try c.setEntry(table: 0, index: 3, value: 7)
        try c.flush()
        try c.setEntry(table: 64, index: 0, value: 1)  // evicts table 0 (clean, capacity 1)
        XCTAssertFalse(c.isCached(table: 0))
        resume.signal()
        XCTAssertEqual(done.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(looked.withLock { $0 }, 7, "the lookup answered from bytes older than a written-back change")
        XCTAssertEqual(try c.entry(table: 0, index: 3), 7)
        try c.setEntry(table: 0, index: 4, value: 9)
        try c.flush()
        XCTAssertEqual(try f.readBytes(count: 4, at: 12, what: "entry"), [7, 0, 0, 0], "a later change wrote older entries back")
    }
}

extension TableCacheTests {
    /// A run of filled tables is counted from one read without loading them; a table changed
    /// in the cache (newer than the file) is judged by the cache, in both directions; the
    /// count stops at `limit` and at `end`, and the first table that differs is cached.
    func testCountFilledJudgesCachedTablesByTheCacheAndStopsAtTheFirstDifference() throws {
        var b = [UInt8](repeating: 0xFF, count: 16 * 10)
        b[16 * 6 + 3] = 0
        let f = try makeFile(b)
        let c = TableCache(file: f, tableBytes: 16, encoding: .u32LE, capacity: 64)
        XCTAssertEqual(try c.countFilled(from: 0, upTo: 160, byte: 0xFF, limit: 100), 6)
        XCTAssertTrue(c.isCached(table: 96), "the differing table is cached")
        XCTAssertFalse(c.isCached(table: 16), "filled tables are not loaded")
        XCTAssertEqual(try c.countFilled(from: 0, upTo: 160, byte: 0xFF, limit: 4), 4)
        XCTAssertEqual(try c.countFilled(from: 0, upTo: 40, byte: 0xFF, limit: 100), 2, "only whole tables before the end")
        XCTAssertEqual(try c.countFilled(from: 112, upTo: 160, byte: 0xFF, limit: 100), 3)
        XCTAssertEqual(try c.countFilled(from: 0, upTo: 160, byte: 0, limit: 100), 0)
        // An entry set in table 2 (not yet written) ends the run there, though the file is filled.
        try c.setEntry(table: 32, index: 1, value: 7)
        XCTAssertEqual(try c.countFilled(from: 0, upTo: 160, byte: 0xFF, limit: 100), 2)
        XCTAssertEqual(try c.countFilled(from: 32, upTo: 160, byte: 0xFF, limit: 100), 0)
        // Table 6 made filled in the cache: the run goes on past it, the file still says otherwise.
        try c.setEntry(table: 96, index: 0, value: 0xFFFF_FFFF)
        XCTAssertEqual(try c.countFilled(from: 48, upTo: 160, byte: 0xFF, limit: 100), 7)
        XCTAssertEqual(try f.readBytes(count: 16, at: 96, what: "t")[3], 0)
    }

    /// A run longer than the first read goes on in a second read, where held tables are
    /// still judged by the cache.
    func testCountFilledGoesOnPastItsFirstRead() throws {
        let batch = TableCache.firstFilledBatch
        var b = [UInt8](repeating: 0xFF, count: 16 * (3 * batch))
        b[16 * (2 * batch) + 5] = 1
        let f = try makeFile(b)
        let c = TableCache(file: f, tableBytes: 16, encoding: .u32LE, capacity: 64)
        XCTAssertEqual(try c.countFilled(from: 0, upTo: UInt64(b.count), byte: 0xFF, limit: 1000), 2 * batch)
        try c.setEntry(table: UInt64(16 * (batch + 3)), index: 2, value: 9)
        XCTAssertEqual(try c.countFilled(from: 0, upTo: UInt64(b.count), byte: 0xFF, limit: 1000), batch + 3)
        XCTAssertEqual(try c.countFilled(from: 16, upTo: UInt64(b.count), byte: 0xFF, limit: batch + 1), batch + 1)
    }
}

extension TableCacheTests {
    /// A run of an all-alike value crosses whole chunks from the file (read in batches) and
    /// stops exactly at the first entry that differs, inside a chunk; other values are
    /// scanned entry by entry with the same answers.
    func testFlatTableRunOfAbsentEntriesStopsAtTheExactEntry() throws {
        XCTAssertEqual(FlatTable.repeatedByte(0xFFFF_FFFF, width: 4), 0xFF)
        XCTAssertEqual(FlatTable.repeatedByte(0, width: 8), 0)
        XCTAssertNil(FlatTable.repeatedByte(0xFFFF_FFFE, width: 4))
        XCTAssertNil(FlatTable.repeatedByte(0x1_FFFF_FFFF, width: 4))
        let entries = 40_000
        var b = [UInt8](repeating: 0xFF, count: entries * 4)
        for k in 0..<4 { b[4 * 30_001 + k] = 7 }           // entry 30001 is used
        for k in 0..<4 { b[4 * 100 + k] = 0x11 }           // a run of another value: 100..<103
        for e in 101..<103 { for k in 0..<4 { b[4 * e + k] = 0x11 } }
        let f = try makeFile(b)
        let t = FlatTable(file: f, start: 0, entries: UInt64(entries), encoding: .u32LE, fileSize: UInt64(b.count))
        XCTAssertEqual(try t.run(of: 0xFFFF_FFFF, from: 103, limit: .max), 30_001 - 103)
        XCTAssertEqual(try t.run(of: 0xFFFF_FFFF, from: 1024, limit: 5000), 5000)
        XCTAssertEqual(try t.run(of: 0xFFFF_FFFF, from: 30_002, limit: .max), UInt64(entries - 30_002), "up to the table's end")
        XCTAssertEqual(try t.run(of: 0x1111_1111, from: 100, limit: .max), 3)
        XCTAssertEqual(try t.run(of: 0xFFFF_FFFF, from: 0, limit: .max), 100)
    }
}
