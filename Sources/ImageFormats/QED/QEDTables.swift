import BlockEngine

/// L1 and L2 tables of one QED image through the shared table cache. Tables can be up to
/// 16 × 64 MiB, so the cache holds them in chunks of at most 64 KiB: a lookup reads only the
/// chunk it needs and opening an image reads no table at all.
struct QEDTables {
    let cache: TableCache
    let header: QEDHeader
    let chunkBytes: UInt64
    var entriesPerChunk: Int { Int(chunkBytes / 8) }

    init(file: ImageFile, header: QEDHeader, cacheBytes: Int = 32 << 20) {
        self.header = header
        chunkBytes = min(header.tableBytes, 64 << 10)
        let capacity = max(16, cacheBytes / Int(chunkBytes))
        cache = TableCache(file: file, tableBytes: Int(chunkBytes), encoding: .u64LE, capacity: capacity,
                           beforeWriteBack: { [file] in try file.sync() })
    }

    /// Where entry `index` of the table at `table` lives in the cache.
    @inline(__always)
    func slot(_ table: UInt64, _ index: UInt64) -> (chunk: UInt64, index: Int) {
        let epc = UInt64(entriesPerChunk)
        return (table + (index / epc) * chunkBytes, Int(index % epc))
    }

    func entry(_ table: UInt64, _ index: UInt64) throws -> UInt64 {
        let s = slot(table, index)
        return try cache.entry(table: s.chunk, index: s.index)
    }

    func set(_ table: UInt64, _ index: UInt64, _ value: UInt64) throws {
        let s = slot(table, index)
        try cache.setEntry(table: s.chunk, index: s.index, value: value)
    }
}
