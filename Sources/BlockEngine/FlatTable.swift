/// A flat on-disk array of table entries (qcow2 L1, Bochs catalog and page table) read in
/// chunks through a `TableCache`. Chunks are the largest power of two up to 4 KiB whose
/// whole count, from the table's start, stays inside the file, so no read runs past its end.
public struct FlatTable: Sendable {
    public let start: UInt64
    public let entries: UInt64
    let cache: TableCache
    let perChunk: UInt64

    /// `regionEnd`: where the table's own region ends, for a table that is written (a chunk
    /// is written whole, so it must never reach the bytes after the table); reads only need
    /// to stay inside the file.
    public init(file: ImageFile, start: UInt64, entries: UInt64, encoding: TableEncoding, fileSize: UInt64,
                regionEnd: UInt64? = nil, cacheBytes: Int = 1 << 20,
                beforeWriteBack: (@Sendable () throws -> Void)? = nil, journal: TableCache.Journal? = nil) {
        let width = UInt64(encoding.width)
        let bytes = entries * width
        let limit = min(fileSize, regionEnd ?? .max)
        var chunk: UInt64 = 4096
        while chunk > width && start + (bytes + chunk - 1) / chunk * chunk > limit { chunk /= 2 }
        self.start = start
        self.entries = entries
        perChunk = chunk / width
        cache = TableCache(file: file, tableBytes: Int(chunk), encoding: encoding, capacity: max(64, cacheBytes / Int(chunk)),
                           beforeWriteBack: beforeWriteBack, journal: journal)
    }

    /// Entry `i` (the caller keeps `i` below `entries`).
    public func entry(_ i: UInt64) throws -> UInt64 {
        try cache.entry(table: chunkOffset(i), index: Int(i % perChunk))
    }

    /// Sets entry `i` in the cache; it reaches the file at the next `flush`, after the barrier.
    public func setEntry(_ i: UInt64, _ value: UInt64) throws {
        try cache.setEntry(table: chunkOffset(i), index: Int(i % perChunk), value: value)
    }

    /// Writes changed chunks back (after the barrier); the caller makes them durable.
    public func flush() throws { try cache.flush() }

    private func chunkOffset(_ i: UInt64) -> UInt64 { start + (i / perChunk) * perChunk * UInt64(cache.encoding.width) }
}

extension FlatTable {
    /// How many entries from `i` on (at most `limit`, never past the table) equal `value`,
    /// scanned a cached chunk at a time: a run of unallocated catalog entries is passed with
    /// one lock and one lookup per chunk instead of one per entry. Whole chunks of a value
    /// whose bytes are all alike (0xFFFFFFFF, Bochs' "absent") are judged straight from the
    /// file a batch at a time (`TableCache.countFilled`), without loading them.
    public func run(of value: UInt64, from i: UInt64, limit: UInt64) throws -> UInt64 {
        let limit = min(limit, entries > i ? entries - i : 0)
        let width = UInt64(cache.encoding.width)
        let fill = Self.repeatedByte(value, width: cache.encoding.width)
        var n: UInt64 = 0
        while n < limit {
            let index = i + n
            let chunk = index / perChunk * perChunk
            if let fill, index == chunk, limit - n >= perChunk {
                let whole = try cache.countFilled(from: start + chunk * width, upTo: start + (chunk + (limit - n) / perChunk * perChunk) * width,
                                                  byte: fill, limit: Int(clamping: (limit - n) / perChunk))
                n += UInt64(whole) * perChunk
                if whole > 0 { continue }
            }
            let differs = try cache.withEntries(table: start + chunk * width) { view -> Bool in
                var k = Int(index - chunk)
                while k < Int(perChunk) && n < limit {
                    if view[k] != value { return true }
                    n += 1; k += 1
                }
                return false
            }
            if differs { break }
        }
        return n
    }

    /// The byte every byte of `value`'s `width`-byte encoding is, if they are all alike.
    static func repeatedByte(_ value: UInt64, width: Int) -> UInt8? {
        let byte = UInt8(truncatingIfNeeded: value)
        let mask: UInt64 = width == 8 ? .max : (1 << (8 * UInt64(width))) - 1
        return value & mask == (UInt64(byte) &* 0x0101_0101_0101_0101) & mask && value <= mask ? byte : nil
    }

    /// Calls `body(index, entry)` for entries `0..<count` of the array at `start`, read 1 MiB
    /// at a time without caching them: one pass over a whole L1, grain directory or block
    /// map at open or check time. Stops quietly where the file ends (`fileSize`); entries
    /// past it are reported when they are used.
    public static func forEachEntry(_ file: ImageFile, start: UInt64, count: UInt64, encoding: TableEncoding,
                                    fileSize: UInt64? = nil, what: String,
                                    _ body: (UInt64, UInt64) throws -> Void) throws {
        try forEachChunk(file, start: start, count: count, encoding: encoding, fileSize: fileSize, what: what) { first, view in
            for i in 0..<view.count { try body(first + UInt64(i), view[i]) }
            return true
        }
    }

    /// The same a 1 MiB chunk at a time: `body(index of the chunk's first entry, entries)`
    /// returns false to stop (a count whose budget is spent).
    public static func forEachChunk(_ file: ImageFile, start: UInt64, count: UInt64, encoding: TableEncoding,
                                    fileSize: UInt64? = nil, what: String,
                                    _ body: (UInt64, TableView) throws -> Bool) throws {
        let width = UInt64(encoding.width)
        let perChunk = UInt64(1 << 20) / width
        var first: UInt64 = 0
        while first < count {
            let n = min(count - first, perChunk)
            let at = start + first * width
            if let fileSize, at + n * width > fileSize { return }
            let bytes = try file.readBytes(count: Int(n * width), at: at, what: what)
            guard try body(first, TableView(bytes: bytes, encoding: encoding)) else { return }
            first += n
        }
    }
}
