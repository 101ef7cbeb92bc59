import BlockEngine

/// st_blocks and `info`'s allocation for a read-only VDI: the block map read 1 MiB at a time
/// past the cache (an 8 TiB image's is 32 MiB, 8 Mi entries, counted in a few milliseconds,
/// so the mount's first count does not compete with the first SEEK walk for seconds).
/// A writable image may hold map entries newer than the file in the cache: it is counted
/// through `status`.
extension VDIDriver: AllocationCounting {
    public func countAllocated(from: UInt64, to: UInt64, budget: inout WorkBudget) throws -> UInt64? {
        guard !isWritable else { return try countByStatus(from: from, to: to, budget: &budget) }
        let chunk: UInt64 = 1 << 18, limit = UInt64(header.blocksInImage)
        var block = from / blockSize, total: UInt64 = 0
        let stop = (to + blockSize - 1) / blockSize
        while block < stop {
            guard budget.spend() else { return nil }
            let n = min(chunk, stop - block)
            let view = TableView(bytes: try file.readBytes(count: Int(n * 4), at: UInt64(header.offsetBmap) + block * 4, what: "VDI block map"),
                                 encoding: .u32LE)
            let base = block * blockSize
            // Entries at or past blocks_in_image are free, discarded or invalid (map reports those).
            total += UnitCount.bytes(from: max(from, base) - base, to: min(to, base + n * blockSize) - base, unit: blockSize) {
                view.count(in: $0) { $0 < limit }
            }
            block += n
        }
        return total
    }
}
