import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How entries of a metadata table are stored on disk.
public enum TableEncoding: Sendable {
    case u32LE, u32BE, u64LE, u64BE
    @inlinable public var width: Int { self == .u32LE || self == .u32BE ? 4 : 8 }
}

/// A bounded, thread-safe LRU cache of fixed-size metadata tables (QED L2, VMDK grain tables,
/// qcow2 L2, chunks of the VDI block map and Bochs catalog), keyed by host offset.
///
/// Write-back order: a table is written only after every table whose last change came
/// before its own last change. Changing an already-dirty table moves it to the back of the
/// queue, so a parent table (L1, directory) that was changed to point at a new child is
/// always written after the child. `beforeWriteBack` runs once before each batch of table
/// writes (formats pass an fdatasync so data lands before the metadata that points at it).
///
/// Locks: the tables are spread over shards by key, each with its own lock, so parallel
/// readers of different tables do not queue on one lock (a small cache has one shard and
/// is exact about its capacity). Lookups take only their shard's lock, which is never held
/// across a barrier (fdatasync). A write-back copies the dirty tables shard by shard, runs
/// the barrier holding only `writeBackLock` (one write-back at a time), then writes the
/// copies. Change order is one clock over all shards. Eviction drops clean tables only;
/// when every table is dirty the cache runs over its capacity until the next change writes
/// them back (`relieve`), and lookups stop keeping new tables at twice the capacity, so
/// memory stays bounded whatever the barrier does.
public final class TableCache: MetadataLayer {
    public let tableBytes: Int
    public let encoding: TableEncoding
    public let capacity: Int
    public var entriesPerTable: Int { tableBytes / encoding.width }

    private let file: ImageFile
    /// For a file another process may be writing (`--force-share`), tables are read again
    /// once they are this old, so the mount follows the writer; nil: kept until evicted.
    private let maxAge: Double?
    static let sharedMaxAge = 0.5
    private let beforeWriteBack: (@Sendable () throws -> Void)?
    /// A shard: its tables and eviction queue under one lock.
    final class Shard: Sendable {
        let generation = TableMemo.Generation()
        let state: Mutex<State>
        init() { state = Mutex(State(generation: generation)) }
    }
    private let shards: [Shard]
    /// Tables one shard keeps (the cache's capacity split evenly).
    private let shardCapacity: Int
    /// The order of changes over all shards (write-back goes oldest change first).
    private let clock = Atomic<UInt64>(0)
    /// Caches at least this large are sharded (`shardCount` ways).
    static let shardedFrom = 64
    static let shardCount = 8
    /// One write-back (copy, barrier, write) at a time; lookups never take it.
    private let writeBackLock = Mutex<Void>(())
    /// This cache's name in threads' memos, and whether lookups use them (small tables of a
    /// file no other process writes).
    private let serial = TableMemo.newSerial()
    private let memoized: Bool

    final class Slot: @unchecked Sendable { // only touched under its shard's lock
        var bytes: [UInt8]
        /// Used since it was loaded or last passed by the eviction hand (second chance).
        var referenced = false
        var dirtySeq: UInt64? = nil
        /// The byte every byte of the table is, once asked: -1 none (mixed), nil not known
        /// (or changed since).
        var uniform: Int? = nil
        /// Times this table was written to the file (a periodic write-back's copy of it is
        /// stale once this moved).
        var writes: UInt64 = 0
        /// When it was read (only kept for files other processes write, see `maxAge`).
        var loadedAt = 0.0
        init(bytes: [UInt8]) { self.bytes = bytes }
    }
    struct State: ~Copyable {
        /// Moved on by every change of a held table's bytes and every table dropped, so
        /// threads' memos of this shard's tables (`TableMemo`) stop being used.
        let generation: TableMemo.Generation
        var slots: [UInt64: Slot] = [:]
        /// Keys in the order eviction visits them (second chance: a table used since it was
        /// queued goes to the back once), from `head`; new tables join at the back. A miss
        /// costs O(1) amortized, so a walk streaming through more tables than the cache holds
        /// stays linear. Keys of slots dropped elsewhere are skipped when they come up.
        var queue: [UInt64] = []
        var head = 0
        var stats = Stats()
        /// Tables dropped so far (evicted or discarded), and the keys of the last
        /// `recentDrops` of them (drop n at n % recentDrops): a table read outside the lock
        /// is kept only if it was not dropped meanwhile (`withLoadedSlot`).
        var drops: UInt64 = 0
        var dropped: [UInt64] = []
        mutating func drop(_ key: UInt64) {
            if dropped.count < TableCache.recentDrops { dropped.append(key) } else { dropped[Int(drops % UInt64(TableCache.recentDrops))] = key }
            drops += 1
        }
        /// Whether `key` may have been dropped since the count was `since` (when more were
        /// dropped than are remembered, it may have been).
        func dropped(_ key: UInt64, since: UInt64) -> Bool {
            let n = drops - since
            guard n > 0 else { return false }
            guard n <= UInt64(TableCache.recentDrops) else { return true }
            return (since ..< drops).contains { dropped[Int($0 % UInt64(TableCache.recentDrops))] == key }
        }
    }
    /// Dropped keys each shard remembers.
    static let recentDrops = 64
    public struct Stats: Sendable, Equatable {
        public var hits = 0, misses = 0, evictions = 0, tableWrites = 0, writeBackBatches = 0
    }

    /// Writes a batch of table copies somewhere other than in place first (VHDX puts them in
    /// its log, then applies them): used instead of direct writes, outside every lock. Only
    /// for tables that are never freed (the direct path guards against a table freed and
    /// reused while its copy was in flight; a journal does not need to).
    public typealias Journal = @Sendable (_ tables: [(offset: UInt64, bytes: [UInt8])]) throws -> Void
    private let journal: Journal?

    /// Reads the table a key names, for tables that are not `tableBytes` in place in `file`
    /// (EWF chunk tables: of any length, in any segment file, checked against their
    /// checksum and mirror copy): returns exactly `tableBytes` bytes. Such a cache is read-only.
    public typealias Loader = @Sendable (_ key: UInt64) throws -> [UInt8]
    private let loader: Loader?
    /// Nothing changes this cache's tables (the file is read-only: EWF's, a read-only mount's):
    /// a table read outside the lock cannot be older than a change of ours, so it is kept
    /// whatever was dropped meanwhile.
    private let neverChanged: Bool

    /// The write-back chain this cache is a layer of (set once, before any change): its own
    /// write-backs then go through the chain, which writes the layers it depends on first.
    final class ChainLink: @unchecked Sendable { weak var chain: WriteBackChain? }
    private let link = ChainLink()
    func join(_ chain: WriteBackChain) {
        precondition(beforeWriteBack == nil, "a cache in a chain gets its barriers from the chain")
        link.chain = chain
    }

    public init(file: ImageFile, tableBytes: Int, encoding: TableEncoding, capacity: Int,
                beforeWriteBack: (@Sendable () throws -> Void)? = nil, journal: Journal? = nil, loader: Loader? = nil) {
        precondition(tableBytes > 0 && tableBytes % encoding.width == 0 && capacity > 0)
        self.file = file
        maxAge = file.sharedWithWriters ? Self.sharedMaxAge : nil
        self.tableBytes = tableBytes
        self.encoding = encoding
        self.capacity = capacity
        self.beforeWriteBack = beforeWriteBack
        self.journal = journal
        self.loader = loader
        neverChanged = !file.isWritable
        memoized = maxAge == nil && tableBytes <= TableMemo.maxTableBytes
        let n = capacity >= Self.shardedFrom ? Self.shardCount : 1
        shards = (0..<n).map { _ in Shard() }
        shardCapacity = (capacity + n - 1) / n
    }

    /// The shard holding `table` (keys are spread by a multiplicative hash, so neighbouring
    /// tables land in different shards).
    @inline(__always) private func shard(_ table: UInt64) -> Shard { shards[shardIndex(table)] }
    @inline(__always) private func shardIndex(_ table: UInt64) -> Int {
        shards.count == 1 ? 0 : Int(truncatingIfNeeded: (table &* 0x9E37_79B9_7F4A_7C15) >> 61)
    }
    /// Every shard's drop count now (taken before a read that fills several tables).
    private var dropCounts: [UInt64] { shards.map { $0.state.withLock { $0.drops } } }

    /// The next change stamp (called under a shard's lock).
    @inline(__always) private func tick() -> UInt64 {
        clock.wrappingAdd(1, ordering: .relaxed).newValue
    }

    public var stats: Stats {
        shards.reduce(into: Stats()) { sum, sh in
            let s = sh.state.withLock { $0.stats }
            sum.hits += s.hits; sum.misses += s.misses; sum.evictions += s.evictions
            sum.tableWrites += s.tableWrites; sum.writeBackBatches += s.writeBackBatches
        }
    }

    /// The table at `table`, from the file or the loader.
    private func readTable(_ table: UInt64) throws -> [UInt8] {
        if let loader {
            let bytes = try loader(table)
            precondition(bytes.count == tableBytes, "a table loader returns whole tables")
            return bytes
        }
        return try file.readBytes(count: tableBytes, at: table, what: "metadata table")
    }
    /// Tables held now (tests: the capacity bound).
    var cachedCount: Int { shards.reduce(0) { n, sh in n + sh.state.withLock { $0.slots.count } } }
    public var dirtyCount: Int {
        shards.reduce(0) { n, sh in n + sh.state.withLock { $0.slots.values.filter { $0.dirtySeq != nil }.count } }
    }

    /// Entry `index` of the table at `table`, reading the table on a miss.
    public func entry(table: UInt64, index: Int) throws -> UInt64 {
        precondition(index >= 0 && index < entriesPerTable)
        let sh = shard(table)
        if memoized, let v = TableMemo.read(cache: serial, table: table, generation: sh.generation.load(), { decode($0, index) }) {
            return v
        }
        if let v = sh.state.withLock({ s -> UInt64? in
            guard let slot = s.slots[table], isFresh(slot) else { return nil }
            slot.referenced = true; s.stats.hits += 1
            remember(s, table, slot)
            return decode(slot.bytes, index)
        }) { return v }
        return try withLoadedSlot(table, forChange: false) { _, slot in decode(slot.bytes, index) }
    }

    /// Calls `body` with entries `range` of the table, under the lock (no I/O in `body`).
    public func withEntries<R>(table: UInt64, _ body: (TableView) throws -> R) throws -> R {
        let sh = shard(table)
        if memoized, let r = try TableMemo.read(cache: serial, table: table, generation: sh.generation.load(), {
            try body(TableView(bytes: $0, encoding: encoding))
        }) { return r }
        if let r = try sh.state.withLock({ s -> R? in
            guard let slot = s.slots[table], isFresh(slot) else { return nil }
            slot.referenced = true; s.stats.hits += 1
            remember(s, table, slot)
            return try body(TableView(bytes: slot.bytes, encoding: encoding))
        }) { return r }
        return try withLoadedSlot(table, forChange: false) { _, slot in try body(TableView(bytes: slot.bytes, encoding: encoding)) }
    }

    /// The table's entries as they are now, to scan without holding the cache's lock: the
    /// view shares the cached bytes, and a later change copies them first (copy on write),
    /// so the view stays one consistent state of the table.
    public func view(table: UInt64) throws -> TableView {
        try withEntries(table: table) { $0 }
    }

    /// Whether every entry of the table is 0 (an empty table a walk can skip in one step);
    /// remembered per cached table, so a table that many parents alias is scanned once.
    public func isEmpty(table: UInt64) throws -> Bool { try isFilled(table: table, with: 0) }

    /// Whether every byte of the table is `byte` (VDI's unallocated map entries are 0xFF...).
    public func isFilled(table: UInt64, with byte: UInt8) throws -> Bool {
        try withSlot(table) { uniformByte($0) == Int(byte) }
    }

    /// The byte every byte of the slot's table is, or -1 (mixed); remembered until it changes.
    private func uniformByte(_ slot: Slot) -> Int {
        if let u = slot.uniform { return u }
        let first = slot.bytes.first ?? 0
        let same = slot.bytes.withUnsafeBytes { Self.allBytes($0.baseAddress, $0.count, equal: first) }
        slot.uniform = same ? Int(first) : -1
        return slot.uniform!
    }

    /// Whether all `count` bytes at `p` are `byte`: the range equals itself shifted by one
    /// byte only if every byte is its first (one memcmp, no pattern buffer).
    public static func allBytes(_ p: UnsafeRawPointer?, _ count: Int, equal byte: UInt8) -> Bool {
        guard count > 0, let p else { return true }
        return p.load(as: UInt8.self) == byte && (count == 1 || memcmp(p, p + 1, count - 1) == 0)
    }

    private func withSlot<R>(_ table: UInt64, _ body: (Slot) throws -> R) throws -> R {
        let sh = shard(table)
        if let r = try sh.state.withLock({ s -> R? in
            guard let slot = s.slots[table], isFresh(slot) else { return nil }
            slot.referenced = true; s.stats.hits += 1
            return try body(slot)
        }) { return r }
        return try withLoadedSlot(table, forChange: false) { _, slot in try body(slot) }
    }

    /// Tries at reading a missing table outside the lock before `withLoadedSlot` reads it
    /// holding the lock.
    static let unlockedReadTries = 3

    /// Runs `body` on `table`'s slot under its shard's lock, reading the table outside the
    /// lock when it is missing (or, for a lookup, when the held copy of a shared file is too
    /// old). `forChange`: the table is about to be changed (kept past the capacity; a held
    /// copy is used however old). The bytes read are kept only if the table was not dropped
    /// meanwhile: the read may predate a change that was written back before the table was
    /// evicted, and keeping it would undo that change. A read that lost that race
    /// (or a table evicted between the two locks) is made again; the last try reads
    /// holding the lock, so a cache evicting without pause cannot make this spin.
    private func withLoadedSlot<R>(_ table: UInt64, forChange: Bool, _ body: (inout State, Slot) throws -> R) throws -> R {
        let sh = shard(table)
        func usable(_ slot: Slot?) -> Slot? {
            guard let slot, forChange || isFresh(slot) else { return nil }
            slot.referenced = true
            return slot
        }
        for _ in 0 ..< Self.unlockedReadTries {
            let since = sh.state.withLock { s in usable(s.slots[table]) == nil ? s.drops : nil }
            let bytes = try since.map { _ in try readTable(table) }
            if let r = try sh.state.withLock({ s -> R? in
                if let slot = usable(s.slots[table]) { return try body(&s, slot) }
                // A held but too old copy of a shared file takes the newer bytes.
                guard let bytes, let since, s.slots[table] != nil || neverChanged || !s.dropped(table, since: since) else { return nil }
                return try body(&s, try insertLocked(&s, table: table, bytes: bytes, forChange: forChange))
            }) { return r }
        }
        return try sh.state.withLock { s in
            if let slot = usable(s.slots[table]) { return try body(&s, slot) }
            return try body(&s, try insertLocked(&s, table: table, bytes: try readTable(table), forChange: forChange))
        }
    }

    /// Sets an entry and marks the table dirty (moving it to the back of the write order).
    public func setEntry(table: UInt64, index: Int, value: UInt64) throws {
        precondition(index >= 0 && index < entriesPerTable)
        let overfull = try withLoadedSlot(table, forChange: true) { s, slot in
            if memoized { TableMemo.forget(cache: serial, table: table) }
            encode(&slot.bytes, index, value)
            s.generation.bump()
            slot.uniform = nil
            slot.referenced = true; slot.dirtySeq = tick()
            return s.slots.count > shardCapacity
        }
        if overfull { try relieve() }
    }

    /// Calls `body` with the table's raw bytes, under the lock (no I/O in `body`): for
    /// entries no `TableEncoding` describes (qcow2 refcounts of 1 to 64 bits).
    public func withBytes<R>(table: UInt64, _ body: ([UInt8]) throws -> R) throws -> R {
        try withSlot(table) { try body($0.bytes) }
    }

    /// Changes the table's raw bytes and marks it dirty (moving it to the back of the write order).
    public func modify<R>(table: UInt64, _ body: (inout [UInt8]) throws -> R) throws -> R {
        let (result, overfull) = try withLoadedSlot(table, forChange: true) { s, slot in
            if memoized { TableMemo.forget(cache: serial, table: table) }
            s.generation.bump()  // first: `body` may throw after changing some bytes
            let r = try body(&slot.bytes)
            slot.uniform = nil
            slot.referenced = true; slot.dirtySeq = tick()
            return (r, s.slots.count > shardCapacity)
        }
        if overfull { try relieve() }
        return result
    }

    /// Reads up to `count` consecutive tables from `table`, never past `end`, in one I/O
    /// when `table` is not held (a walk over a flat map of small tables, the VDI block map or
    /// a VMDK grain directory, would otherwise pay one read per table); tables already held
    /// are kept as they are. At most as many as the cache holds.
    public func readAhead(from table: UInt64, upTo end: UInt64, count: Int) throws {
        guard loader == nil, end > table, !isCached(table: table) else { return }
        let n = Int(min(UInt64(min(count, capacity)), (end - table) / UInt64(tableBytes)))
        guard n > 1 else { return }
        let since = dropCounts
        let bytes = try file.readBytes(count: n * tableBytes, at: table, what: "metadata tables")
        for k in 0 ..< n {
            let t = table + UInt64(k * tableBytes)
            // Not kept if it was dropped meanwhile (see `withLoadedSlot`).
            try shard(t).state.withLock { s in
                guard s.slots[t] == nil, neverChanged || !s.dropped(t, since: since[shardIndex(t)]) else { return }
                _ = try insertLocked(&s, table: t, bytes: Array(bytes[k * tableBytes ..< (k + 1) * tableBytes]))
            }
        }
    }

    /// How many consecutive tables from `table` (at most `limit`, whole tables before `end`)
    /// have every byte equal to `byte`: a walk passes a run of empty VDI map sectors with a
    /// few reads and locks, without loading them into the cache (a status walk over an 8 TiB
    /// map would otherwise churn 32768 slots through it). The first read is small, so a walk
    /// that meets a used table at once reads little. A table held in the cache is judged by
    /// its cached bytes, which may be newer than the file's; the first table that differs is
    /// cached, since the caller reads it next.
    public func countFilled(from table: UInt64, upTo end: UInt64, byte: UInt8, limit: Int) throws -> Int {
        precondition(loader == nil, "countFilled reads tables in place")
        guard end > table else { return 0 }
        let n = Int(min(UInt64(max(limit, 0)), (end - table) / UInt64(tableBytes)))
        guard n > 0 else { return 0 }
        // A held first table that differs costs no read.
        if isCached(table: table), try !isFilled(table: table, with: byte) { return 0 }
        let most = max(1, Self.filledReadBytes / tableBytes)
        var done = 0, batch = min(n, Self.firstFilledBatch)
        while done < n {
            let first = table + UInt64(done * tableBytes)
            let since = dropCounts
            let bytes = try file.readBytes(count: batch * tableBytes, at: first, what: "metadata tables")
            let filled = try filledPrefix(bytes, at: first, count: batch, byte: byte, since: since)
            done += filled
            if filled < batch { break }
            batch = min(n - done, most)
        }
        return done
    }

    /// Tables `countFilled` reads first; later reads take at most `filledReadBytes`.
    static let firstFilledBatch = 8
    static let filledReadBytes = 1 << 20

    /// How many of the `count` tables read into `bytes` from `first` on are all `byte`,
    /// judging held tables by the cache (checked under the lock, after the read: a table
    /// loaded and perhaps changed meanwhile is never judged by the older file bytes). `since`:
    /// the shards' drop counts before the read; a missing table dropped meanwhile may have
    /// been changed, written back and evicted after the read, so it is read again (holding
    /// the lock: rare).
    private func filledPrefix(_ bytes: [UInt8], at first: UInt64, count: Int, byte: UInt8, since: [UInt64]) throws -> Int {
        for k in 0 ..< count {
            let t = first + UInt64(k * tableBytes)
            let same = try shard(t).state.withLock { s -> Bool in
                if let slot = s.slots[t] { return uniformByte(slot) == Int(byte) }
                let reread = neverChanged || !s.dropped(t, since: since[shardIndex(t)]) ? nil : try readTable(t)
                let same = reread.map { $0.withUnsafeBytes { Self.allBytes($0.baseAddress, tableBytes, equal: byte) } }
                    ?? bytes.withUnsafeBytes { Self.allBytes($0.baseAddress.map { $0 + k * tableBytes }, tableBytes, equal: byte) }
                if !same { _ = try insertLocked(&s, table: t, bytes: reread ?? Array(bytes[k * tableBytes ..< (k + 1) * tableBytes])) }
                return same
            }
            if !same { return k }
        }
        return count
    }

    /// Puts a table read by other means (at open, with its neighbours) into the cache, clean,
    /// unless it is held already.
    public func seed(table: UInt64, bytes: [UInt8]) {
        guard bytes.count == tableBytes else { return }
        try? shard(table).state.withLock { s in
            if s.slots[table] == nil { _ = try insertLocked(&s, table: table, bytes: bytes) }
        }
    }

    /// Whether any table starting in `[start, end)` is held.
    public func holdsAny(from start: UInt64, to end: UInt64) -> Bool {
        shards.contains { sh in sh.state.withLock { $0.slots.keys.contains { $0 >= start && $0 < end } } }
    }

    /// Whether the table is held (possibly changed and not yet written back).
    public func isCached(table: UInt64) -> Bool { shard(table).state.withLock { $0.slots[table] != nil } }

    /// Drops every cached table in `[start, start+length)` without writing it: the space was
    /// freed (nothing points at it any more) and may come back as a different table.
    public func discard(_ start: UInt64, length: UInt64) {
        if UInt64(cachedCount) <= length / UInt64(tableBytes) {
            for sh in shards {
                sh.state.withLock { s in
                    for key in s.slots.keys where key >= start && key < start + length { s.slots[key] = nil; s.drop(key) }
                    s.generation.bump()
                }
            }
        } else {
            var t = start
            while t < start + length {
                let key = t
                shard(key).state.withLock { s in
                    if s.slots.removeValue(forKey: key) != nil { s.generation.bump(); s.drop(key) }
                }
                t += UInt64(tableBytes)
            }
        }
    }

    /// Whether any table waits to be written.
    public var isDirty: Bool {
        shards.contains { sh in sh.state.withLock { s in s.slots.values.contains { $0.dirtySeq != nil } } }
    }

    /// Makes the child table every two-level format creates on demand (QED L2, VMDK grain
    /// table, qcow2 L2): `bytes` at `offset` read as `contents` (zeros when nil) in the file
    /// -- extended without a write when the space lies past everything written (`fresh`),
    /// written otherwise -- no stale cached piece of that space survives, and the range is
    /// recorded in `metadata`, so no data mapping may point into it. `touched`: the entry
    /// offset about to be set, whose piece goes into the cache without a read.
    public func createTable(at offset: UInt64, bytes: UInt64, contents: [UInt8]? = nil, fresh: Bool,
                            touched: UInt64? = nil, metadata: MetadataRanges, what: StaticString) throws {
        try metadata.guardWrite(offset, bytes, as: "new \(what)", file: file.path)
        discard(offset, length: bytes)
        if let contents {
            try file.write(contents, at: offset)
        } else if fresh {
            try file.extend(to: offset + bytes)
        } else {
            try file.write([UInt8](repeating: 0, count: Int(bytes)), at: offset)
        }
        if contents == nil, let touched { try install(table: offset + (touched - offset) / UInt64(tableBytes) * UInt64(tableBytes)) }
        metadata.insert(.init(start: offset, length: bytes, what: what))
    }

    /// Puts a brand-new table (all `fill`) into the cache, dirty, without reading the disk.
    public func install(table: UInt64, fill: UInt64 = 0) throws {
        var bytes = [UInt8](repeating: 0, count: tableBytes)
        if fill != 0 { for i in 0..<entriesPerTable { encode(&bytes, i, fill) } }
        let overfull = try shard(table).state.withLock { s in
            let slot = try insertLocked(&s, table: table, bytes: bytes, forChange: true)
            slot.bytes = bytes
            s.generation.bump()
            slot.uniform = nil
            slot.referenced = true; slot.dirtySeq = tick()
            return s.slots.count > shardCapacity
        }
        if overfull { try relieve() }
    }

    /// Writes `table` and every table dirtied before its last change (in a chain: every
    /// table, after the layers before it).
    public func writeBack(table: UInt64) throws {
        guard let seq = shard(table).state.withLock({ $0.slots[table]?.dirtySeq }) else { return }
        try writeOwn(upTo: seq)
    }

    /// Writes every dirty table, oldest change first, after one barrier.
    public func flush() throws { try writeOwn(upTo: .max) }

    /// The periodic write-back: the same as `flush` (the caller adds no fdatasync after it).
    public func writeBackSettled() throws { try writeOwn(upTo: .max) }

    /// As a layer of a chain: every dirty table, without a barrier of its own.
    public func writeChanges() throws { try writeCopies(upTo: .max, barrier: false) }

    private func writeOwn(upTo seq: UInt64) throws {
        if let chain = link.chain { try chain.write(through: self) } else { try writeCopies(upTo: seq) }
    }

    private struct Copy {
        let offset: UInt64, slot: Slot, bytes: [UInt8], seq: UInt64, written: UInt64
    }

    /// Every table dirtied at or before `seq`, as it is now, reaches the file after the
    /// barrier, oldest change first. Copies are taken shard by shard under its lock (a
    /// batch has no barrier inside it, so the copies need not be one instant's state: what
    /// was changed before this call is in them); the barrier runs with only `writeBackLock`
    /// held, so lookups and changes go on while it waits. A table changed after its copy
    /// was taken stays dirty for its newer entries; one dropped meanwhile (its space freed)
    /// is not written.
    private func writeCopies(upTo seq: UInt64, barrier: Bool = true) throws {
        try writeBackLock.withLock { _ in
            let copies = shards.flatMap { sh in
                sh.state.withLock { s in
                    s.slots.compactMap { (offset, slot) -> Copy? in
                        guard let d = slot.dirtySeq, d <= seq else { return nil }
                        return Copy(offset: offset, slot: slot, bytes: slot.bytes, seq: d, written: slot.writes)
                    }
                }
            }.sorted { $0.seq < $1.seq }
            guard !copies.isEmpty else { return }
            if barrier { try beforeWriteBack?() }
            if let journal { try journal(copies.map { ($0.offset, $0.bytes) }) }
            shards[0].state.withLock { $0.stats.writeBackBatches += 1 }
            for c in copies {
                // Under the shard's lock, so a table freed and reused meanwhile is never
                // overwritten with its old bytes (the write goes to the page cache).
                try shard(c.offset).state.withLock { s in
                    guard s.slots[c.offset] === c.slot && c.slot.writes == c.written else { return }
                    if journal == nil { try file.write(c.bytes, at: c.offset) }
                    c.slot.writes += 1
                    if c.slot.dirtySeq == c.seq { c.slot.dirtySeq = nil }
                    s.stats.tableWrites += 1
                }
            }
        }
    }

    /// After a change that left its shard past its capacity (judged under the change's own
    /// lock: a change takes no other shard's): the dirty tables are written back (outside
    /// the shards' locks) and clean tables evicted down to the capacity.
    private func relieve() throws {
        try writeOwn(upTo: .max)
        for sh in shards { sh.state.withLock { s in evictClean(&s, keeping: shardCapacity) } }
    }

    // MARK: - internals (state lock held)

    /// Lets this thread find the table without the lock until the shard changes.
    @inline(__always) private func remember(_ s: borrowing State, _ table: UInt64, _ slot: Slot) {
        if memoized { TableMemo.remember(cache: serial, table: table, generation: s.generation.load(), bytes: slot.bytes) }
    }

    @inline(__always) private func isFresh(_ slot: Slot) -> Bool {
        guard let maxAge, slot.dirtySeq == nil else { return true }
        return monotonicSeconds() - slot.loadedAt < maxAge
    }

    /// `forChange`: the table is about to be changed (it must be kept, even past the
    /// capacity); a lookup past twice the capacity gets a slot that is not kept.
    private func insertLocked(_ s: inout State, table: UInt64, bytes: [UInt8], forChange: Bool = false) throws -> Slot {
        if let existing = s.slots[table] {
            existing.referenced = true
            if !isFresh(existing) {  // read again for a shared file: take what is on disk now
                existing.bytes = bytes
                s.generation.bump()
                existing.uniform = nil
                existing.loadedAt = monotonicSeconds()
            }
            return existing  // (or another thread loaded it meanwhile)
        }
        s.stats.misses += 1
        evictClean(&s, keeping: shardCapacity - 1)
        let slot = Slot(bytes: bytes)
        if maxAge != nil { slot.loadedAt = monotonicSeconds() }
        if !forChange && s.slots.count >= 2 * shardCapacity { return slot }  // every table dirty: not kept
        s.slots[table] = slot
        s.queue.append(table)
        if s.queue.count - s.head > 2 * shardCapacity + 64 { s.queue = Array(s.slots.keys); s.head = 0 }
        return slot
    }

    /// Evicts clean tables (second chance for recently used ones) until at most `keeping`
    /// remain or two passes over the queue found only dirty ones.
    private func evictClean(_ s: inout State, keeping: Int) {
        var visits = 2 * (s.queue.count - s.head) + 1
        while s.slots.count > keeping && s.head < s.queue.count && visits > 0 {
            visits -= 1
            let key = s.queue[s.head]
            s.head += 1
            guard let victim = s.slots[key] else { continue }  // dropped elsewhere (or a stale duplicate)
            if victim.referenced || victim.dirtySeq != nil { victim.referenced = false; s.queue.append(key); continue }
            s.slots[key] = nil
            s.generation.bump()
            s.drop(key)
            s.stats.evictions += 1
        }
        if s.head > 4096 && s.head * 2 > s.queue.count { s.queue.removeFirst(s.head); s.head = 0 }
    }

    @inline(__always) private func decode(_ b: [UInt8], _ i: Int) -> UInt64 {
        TableView(bytes: b, encoding: encoding)[i]
    }

    @inline(__always) private func encode(_ b: inout [UInt8], _ i: Int, _ v: UInt64) {
        let o = i * encoding.width
        switch encoding {
        case .u32LE: for k in 0..<4 { b[o + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))) }
        case .u32BE: for k in 0..<4 { b[o + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(3 - k))) }
        case .u64LE: for k in 0..<8 { b[o + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))) }
        case .u64BE: for k in 0..<8 { b[o + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(7 - k))) }
        }
    }
}

/// Read-only access to a cached table's entries. Inlinable: drivers scan whole tables with
/// it (allocation counts), and a call per entry across modules cost more than the scan.
public struct TableView {
    @usableFromInline let bytes: [UInt8]
    @usableFromInline let encoding: TableEncoding
    public init(bytes: [UInt8], encoding: TableEncoding) { self.bytes = bytes; self.encoding = encoding }
    @inlinable public var count: Int { bytes.count / encoding.width }
    @inlinable public subscript(i: Int) -> UInt64 {
        bytes.withUnsafeBytes { raw in
            let o = i * encoding.width
            switch encoding {
            case .u32LE: return UInt64(UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: o, as: UInt32.self)))
            case .u32BE: return UInt64(UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: o, as: UInt32.self)))
            case .u64LE: return UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: o, as: UInt64.self))
            case .u64BE: return UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: o, as: UInt64.self))
            }
        }
    }

    /// The sum of `value` over the entries of `range`, on the raw bytes in one pass.
    @inlinable public func sum(in range: Range<Int>, _ value: (UInt64) -> Int) -> Int {
        bytes.withUnsafeBytes { raw in
            var n = 0
            switch encoding {
            case .u32LE: for i in range { n += value(UInt64(UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)))) }
            case .u32BE: for i in range { n += value(UInt64(UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)))) }
            case .u64LE: for i in range { n += value(UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))) }
            case .u64BE: for i in range { n += value(UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))) }
            }
            return n
        }
    }

    /// How many entries of `range` satisfy `test`.
    @inlinable public func count(in range: Range<Int>, where test: (UInt64) -> Bool) -> Int {
        sum(in: range) { test($0) ? 1 : 0 }
    }
}
