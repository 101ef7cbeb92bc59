import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Each thread's memo of the small tables it looked up last, so a lookup of a table that
/// has not changed takes no lock. Small random reads of a format whose whole map is a few
/// small tables (a VHDX BAT chunk, a VHD BAT, a VDI map piece) otherwise all queue on
/// the one lock of the one shard holding that table: with 4 readers that lock cost ~8% of
/// the throughput of a 4K random read.
///
/// Soundness: a memo keeps its own reference to the table's bytes, so a change to the
/// table (copy on write) never touches the memo's copy; and the memo is used only while
/// the table's shard `generation` is the one read, under the shard's lock, when the memo
/// was made. Every change, insert-over, eviction and discard in that shard moves the
/// generation on, under the lock, before the lock is released.
///
/// Bounded: `slots` tables per thread, each at most `maxTableBytes` (larger tables would
/// make every change of a memoized table copy it whole); a memo's tables are released when
/// replaced or when its thread ends.
enum TableMemo {
    static let slots = 16
    static let maxTableBytes = 4096

    /// A shard's change count (its own allocation: readers load it, only changes write it).
    final class Generation: Sendable {
        private let value = Atomic<UInt64>(0)
        /// Called under the shard's lock, after the change and before the unlock.
        @inline(__always) func bump() { value.wrappingAdd(1, ordering: .releasing) }
        @inline(__always) func load() -> UInt64 { value.load(ordering: .acquiring) }
    }

    /// Identifies a cache for the lifetime of the process (a new cache at a freed cache's
    /// address never matches its memos).
    private static let serials = Atomic<UInt64>(0)
    static func newSerial() -> UInt64 { serials.wrappingAdd(1, ordering: .relaxed).newValue }

    struct Entry {
        var cache: UInt64 = 0, table: UInt64 = 0, generation: UInt64 = 0
        var bytes: [UInt8] = []
    }
    final class Memo { var entries = [Entry](repeating: Entry(), count: TableMemo.slots) }

    nonisolated(unsafe) private static var key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in if let p { Unmanaged<AnyObject>.fromOpaque(p).release() } }
        return k
    }()

    @inline(__always) private static func current() -> Memo {
        if let p = pthread_getspecific(key) { return Unmanaged<Memo>.fromOpaque(p).takeUnretainedValue() }
        let m = Memo()
        pthread_setspecific(key, Unmanaged.passRetained(m).toOpaque())
        return m
    }

    @inline(__always) private static func slot(_ cache: UInt64, _ table: UInt64) -> Int {
        Int(truncatingIfNeeded: (((table >> 3) &+ cache &* 0x9E37_79B9) &* 0x9E37_79B9_7F4A_7C15) >> 60)
    }

    /// `body` on this thread's memo of the table, if it was made at `generation`.
    @inline(__always) static func read<R>(cache: UInt64, table: UInt64, generation: UInt64,
                                          _ body: ([UInt8]) throws -> R) rethrows -> R? {
        let m = current(), i = slot(cache, table)
        guard m.entries[i].cache == cache, m.entries[i].table == table, m.entries[i].generation == generation else { return nil }
        return try body(m.entries[i].bytes)
    }

    /// Remembers the table's bytes as of `generation` (called under the shard's lock).
    @inline(__always) static func remember(cache: UInt64, table: UInt64, generation: UInt64, bytes: [UInt8]) {
        let m = current(), i = slot(cache, table)
        m.entries[i] = Entry(cache: cache, table: table, generation: generation, bytes: bytes)
    }

    /// Drops this thread's memo of the table (before the thread changes it: its own memo
    /// would make the change copy the table).
    @inline(__always) static func forget(cache: UInt64, table: UInt64) {
        let m = current(), i = slot(cache, table)
        if m.entries[i].cache == cache && m.entries[i].table == table { m.entries[i] = Entry() }
    }
}
